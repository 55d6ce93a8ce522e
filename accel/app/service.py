"""What the page and the `compare` API endpoint call, without gradio: load the model, read the uploads, check the
request, compare, and write the outputs to files.

    service = Service(ModelPool(max_models=2), Limits())
    model, result = service.compare("image", "tiny-random-flux", "", Settings(preset="fast", steps=6))
    paths = service.write_outputs(model, result, display=False)   # PNG / MP4 / TXT, baseline then accelerated
"""

from __future__ import annotations

import shutil
import tempfile
import threading
from pathlib import Path

from accel.app.compare import Comparison, compare
from accel.app.limits import IMAGE_SUFFIXES, VIDEO_SUFFIXES, AppInputError, Limits
from accel.app.models import LoadedModel
from accel.app.pool import ModelPool
from accel.app.settings import Settings

KEEP_OUTPUT_DIRS = 64  # output folders of the latest requests kept on disk (gradio copies what it serves)


class Service:
    def __init__(self, pool: ModelPool, limits: Limits | None = None, workdir: str | Path | None = None):
        self.pool = pool
        self.limits = limits or Limits()
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="accel-app-"))
        self._dirs: list[Path] = []
        self._dirs_lock = threading.Lock()

    def model(self, name: str, kind: str | None = None) -> LoadedModel:
        """The loaded model `name`; with `kind`, refused unless it makes that kind of output."""
        model = self.pool.get(name)
        if kind is not None and model.kind != kind:
            tab = {"image": "Image", "video": "Video", "vlm": "VLM"}[model.kind]
            raise AppInputError(
                f"{model.name} is a{'n' if model.kind == 'image' else ''} {model.kind} model; use the {tab} tab"
            )
        return model

    def compare(
        self,
        kind: str | None,
        name: str,
        prompt: str,
        settings: Settings,
        image: str | None = None,
        video: str | None = None,
    ) -> tuple[LoadedModel, Comparison]:
        """Baseline vs accelerated on model `name` (of `kind`, when given). `image`/`video`: paths of uploads
        for a VLM."""
        model = self.model(name, kind)
        pictures = {}
        if model.kind == "vlm":
            pictures = self._uploads(image, video)
        elif image or video:
            raise AppInputError(f"{model.name} makes {model.kind}s from a prompt; it takes no upload")
        request = settings.request(model, prompt or "", self.limits, **pictures)
        return model, compare(model, settings, request)

    def _uploads(self, image: str | None, video: str | None) -> dict:
        from accel.app import media

        found = {}
        if image:
            found["image"] = media.read_image(self.limits.check_upload(image, IMAGE_SUFFIXES, "an image"))
        if video:
            found["video"] = media.read_video(self.limits.check_upload(video, VIDEO_SUFFIXES, "a video"))
        return found

    def output_dir(self) -> Path:
        """A new folder for one request's files; the oldest beyond KEEP_OUTPUT_DIRS are deleted."""
        folder = Path(tempfile.mkdtemp(dir=self.workdir))
        with self._dirs_lock:
            self._dirs.append(folder)
            old, self._dirs = self._dirs[:-KEEP_OUTPUT_DIRS], self._dirs[-KEEP_OUTPUT_DIRS:]
        for path in old:
            shutil.rmtree(path, ignore_errors=True)
        return folder

    def write_outputs(self, model: LoadedModel, result: Comparison, display: bool) -> tuple[str, str]:
        """Both sides' outputs as files (PNG images, MP4 clips, TXT answers), enlarged for the page if `display`."""
        from accel.app import media

        folder = self.output_dir()
        paths = []
        for label, side in (("baseline", result.baseline), ("accelerated", result.accelerated)):
            if model.kind == "vlm":
                path = folder / f"{label}.txt"
                path.write_text((side.output.text or "") + "\n")
                paths.append(str(path))
                continue
            pixels = side.output.pixels
            scale = media.display_scale(pixels) if display else 1
            write = media.write_mp4 if model.kind == "video" else media.write_png
            paths.append(write(pixels, folder / f"{label}.{'mp4' if model.kind == 'video' else 'png'}", scale))
        return paths[0], paths[1]
