"""The page: three tabs (Image, Video, VLM) and the `compare` API endpoint. `build_app` is the entry point."""

from __future__ import annotations

from types import SimpleNamespace

import gradio as gr
import torch

from accel.app.limits import Limits
from accel.app.models import KINDS, builtin_names
from accel.app.pool import ModelPool
from accel.app.service import Service
from accel.app.settings import Settings
from accel.app.ui_tab import TITLES, build_tab, control_updates, default_model, dependent_outputs, log, wire
from accel.errors import AccelError

INTRO = """\
# accel: baseline vs accelerated

Pick a model and a preset (or set the accelerators one by one), then **Compare**: the same request runs without
accel and with it, with the same seed, and the page shows both outputs, the time each took and what the
acceleration cost in quality. The baseline of a request is kept, so changing only accelerator settings reruns only
the accelerated side. Timings of the tiny models on a CPU say little about real speed: they show the mechanics.
"""


# The two videos of the Video tab play, pause and seek together: whichever the user drives, the other follows.
SYNC_VIDEOS = """
() => {
  const other = (video) => {
    const box = video.closest('#accel-video-baseline, #accel-video-accelerated');
    if (!box) return null;
    const id = box.id === 'accel-video-baseline' ? 'accel-video-accelerated' : 'accel-video-baseline';
    return document.querySelector(`#${id} video`);
  };
  for (const type of ['play', 'pause', 'seeked']) {
    document.addEventListener(type, (event) => {
      const follower = event.target instanceof HTMLVideoElement ? other(event.target) : null;
      if (!follower) return;
      if (Math.abs(follower.currentTime - event.target.currentTime) > 0.05) follower.currentTime = event.target.currentTime;
      if (type === 'play' && follower.paused) follower.play().catch(() => {});
      if (type === 'pause' && !follower.paused) follower.pause();
    }, true);
  }
}
"""


def build_app(
    preload: str | None = None,
    max_models: int = 2,
    device: str | torch.device | None = None,
    limits: Limits | None = None,
    allow_custom: bool = True,
) -> gr.Blocks:
    """The app as a `gr.Blocks` (launch it, mount it in FastAPI, or serve it as a Space).

    preload: a model to load now (a name from the lists, a local folder or a Hub id); others load when picked.
    max_models: models kept loaded (least recently used dropped first); also the number of comparisons that run
        at once (one per model).
    device: where reference and from_pretrained models run (default: CUDA when available); the tiny random
        models stay on the CPU.
    limits: bounds of a request (`accel.app.Limits`).
    allow_custom: whether the model pickers take local folders and Hub ids besides the built-in models.
    """
    limits = limits or Limits()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    service = Service(ModelPool(max_models, device), limits)
    preload_kind = service.model(preload).kind if preload else None
    with gr.Blocks(title="accel: baseline vs accelerated", delete_cache=(3600, 3600)) as demo:
        gr.Markdown(INTRO)
        history = gr.State([])
        tabs = []
        with gr.Tabs():
            for kind in KINDS:
                with gr.Tab(TITLES[kind]):
                    value = default_model(kind, preload, preload_kind)
                    tabs.append(build_tab(kind, limits, builtin_names(kind), value, allow_custom))
                    wire(tabs[-1], service, history, max_models)
        _api_endpoint(service, max_models)
        for tab in tabs:  # a preloaded model's controls show what applies from the start; nothing loads here
            show = lambda name, tab=tab: control_updates(tab, service.pool.peek(name))  # noqa: E731
            demo.load(show, tab.model, dependent_outputs(tab), api_visibility="private")
        demo.load(None, js=SYNC_VIDEOS)
    demo.queue(default_concurrency_limit=max_models)
    # For embedding code and tests: the service (its pool and limits), the tabs' components, the session state.
    demo.accel = SimpleNamespace(service=service, tabs={tab.kind: tab for tab in tabs}, history=history)
    return demo


def _api_endpoint(service: Service, concurrency: int) -> None:
    """`compare` for gradio_client: (model, prompt, settings JSON, image, video) -> (baseline file, accelerated
    file, metrics JSON). Files: PNG for images, MP4 for clips, TXT answers for VLMs, at the model's own size."""
    with gr.Group(visible=False):
        inputs = [
            gr.Textbox(label="model"),
            gr.Textbox(label="prompt"),
            gr.JSON(label="settings"),
            gr.File(label="image"),  # what a file holds is checked by decoding it (accel.app.media)
            gr.File(label="video"),
        ]
        outputs = [gr.File(label="baseline"), gr.File(label="accelerated"), gr.JSON(label="metrics")]
        button = gr.Button("compare")

    def compare(model: str, prompt: str, settings: dict | None, image: str | None, video: str | None):
        """Baseline vs accelerated on `model` with the same seed: both outputs as files, and the metrics."""
        try:
            loaded, result = service.compare(None, model, prompt, Settings.from_json(settings), image, video)
            baseline, accelerated = service.write_outputs(loaded, result, display=False)
        except AccelError as err:
            raise gr.Error(str(err), print_exception=False) from None
        except TypeError as err:  # a setting of the wrong type, e.g. {"steps": "many"}
            raise gr.Error(f"bad settings: {err}", print_exception=False) from None
        except Exception as err:
            log.exception("comparison failed")
            raise gr.Error(f"the comparison failed: {type(err).__name__}: {err}") from None
        return baseline, accelerated, result.metrics

    button.click(compare, inputs, outputs, api_name="compare", concurrency_limit=concurrency, concurrency_id="compare")


def launch(demo: gr.Blocks, host: str = "127.0.0.1", port: int | None = None, share: bool = False, **kwargs):
    """`demo.launch` with the upload limit of the app's `Limits` (refused before the upload is stored). gradio gives
    up when its own first request to the page takes over 3 s, which a loaded machine can make it do: that is tried
    three times."""
    limits = demo.accel.service.limits
    for attempt in range(3):
        try:
            return demo.launch(
                server_name=host, server_port=port, share=share, max_file_size=f"{limits.max_upload_mb}mb", **kwargs
            )
        except ValueError as err:
            if "localhost is not accessible" not in str(err) or attempt == 2:
                raise
            demo.close()
