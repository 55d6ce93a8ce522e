"""The models the app offers, loaded and wrapped so that one call shape runs each of them.

Three sources, one `LoadedModel` each:

- the reference models (`accel.zoo.reference`: ref-flux makes images, ref-wan clips, trained on a toy domain of
  coloured shapes, their prompts scored by `accel.bench.prompt_score`; `accel.zoo.reference_vlm`: ref-vlm, a
  Qwen2-VL with its processor answering questions about scenes of shapes);
- the tiny random zoo (`accel.zoo.build`), named "tiny-random-<family>": real pipeline and model classes with
  tiny configs and random weights. They have no text encoder or processor, so they take no prompt (a diffusion
  pipeline gets fixed random prompt embeddings, a VLM seeded random tokens and pixels): they show what the
  accelerators do to a model's computation, not pictures or answers;
- anything else is a local folder or a Hugging Face Hub id for `from_pretrained` (`accel.app.pretrained`).

`LoadedModel.run(request, label)` returns an `Output`: pixels in [0, 1] ([1, C, H, W] or [1, F, C, H, W]) or the
generated tokens of a VLM. The lock serialises every run of one model (one job per model at a time).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

KINDS = ("image", "video", "vlm")
TINY_PREFIX = "tiny-random-"
REFERENCE_VLM = "ref-vlm"  # accel.zoo.reference_vlm: a Qwen2-VL with its processor, on multi-shape scenes
BASELINES_PER_MODEL = 16  # cached baseline outputs kept per loaded model


@dataclass(frozen=True)
class Request:
    """What one side of a comparison runs on (already checked against the limits and resolved to the model's
    defaults: None means the model's own default, which the app does not know)."""

    prompt: str
    seed: int
    steps: int | None
    size: int | None
    frames: int | None
    new_tokens: int
    image: Any = None  # VLM: a PIL image
    video: Any = None  # VLM: a list of PIL frames

    def baseline_key(self) -> tuple:
        """What the baseline's output depends on (not the accelerator settings)."""
        return (self.prompt, self.seed, self.steps, self.size, self.frames, self.new_tokens, _digest(self))


def _digest(request: Request) -> str | None:
    import hashlib

    pictures = [request.image] if request.image is not None else list(request.video or [])
    if not pictures:
        return None
    h = hashlib.sha256()
    for picture in pictures:
        h.update(picture.tobytes())
    return h.hexdigest()


@dataclass
class Output:
    pixels: torch.Tensor | None = None  # float32 in [0, 1], on CPU
    tokens: list[int] | None = None  # VLM: the generated token ids
    text: str | None = None  # VLM: the decoded answer (token ids when the model has no tokenizer)
    picture: Any = None  # VLM: the image it was asked about (PIL), when it read one


@dataclass
class LoadedModel:
    name: str
    kind: str  # "image" | "video" | "vlm"
    source: str  # "reference" | "tiny" | "pretrained"
    target: Any  # what accel.patch takes
    run_fn: Callable[[Request, str], Output] = field(repr=False)
    default_steps: int | None = None
    default_size: int | None = None
    default_frames: int | None = None
    note: str = ""  # shown under the model picker
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)
    baselines: OrderedDict = field(default_factory=OrderedDict, repr=False)
    capabilities: dict = field(default_factory=dict)  # control -> why it cannot be used here (None: it can)

    def run(self, request: Request, label: str) -> Output:
        return self.run_fn(request, label)

    def remember_baseline(self, key: tuple, value: Any) -> None:
        self.baselines[key] = value
        self.baselines.move_to_end(key)
        while len(self.baselines) > BASELINES_PER_MODEL:
            self.baselines.popitem(last=False)


def builtin_names(kind: str) -> list[str]:
    """The reference models, then the tiny random zoo, of `kind`."""
    from accel.zoo import image, video, vlm
    from accel.zoo.reference import NAMES, reference

    refs = [name for name in NAMES if reference(name).kind == kind] + ([REFERENCE_VLM] if kind == "vlm" else [])
    builders = {"image": image.BUILDERS, "video": video.BUILDERS, "vlm": vlm.BUILDERS}[kind]
    return refs + [TINY_PREFIX + family for family in builders]


def builtin_kind(name: str) -> str | None:
    return next((kind for kind in KINDS if name in builtin_names(kind)), None)


def load(name: str, device: torch.device) -> LoadedModel:
    """Load `name` (a reference model, a tiny-random-<family>, a local folder or a Hub id) onto `device`."""
    from accel.zoo.reference import NAMES

    if name in NAMES:
        return _reference(name, device)
    if name == REFERENCE_VLM:
        return _reference_vlm(device)
    if name.startswith(TINY_PREFIX) and builtin_kind(name):
        return _tiny(name)
    from accel.app.pretrained import load_pretrained

    return load_pretrained(name, device)


def show_progress(pipe, label: str) -> None:
    """Let the pipeline's denoising loop report its steps (gr.Progress(track_tqdm=True) shows them)."""
    pipe.set_progress_bar_config(disable=False, desc=label, leave=False)


def _reference(name: str, device: torch.device) -> LoadedModel:
    from accel.bench.reference_demo import build
    from accel.zoo.reference import reference

    ref = reference(name)
    pipe, trained = build(name)
    pipe.to(device)

    def run(request: Request, label: str) -> Output:
        kwargs = ref.call_kwargs(steps=request.steps)
        kwargs.update(height=request.size or ref.size, width=request.size or ref.size)
        if ref.kind == "video":
            kwargs["num_frames"] = request.frames or ref.frames
        show_progress(pipe, label)
        out = pipe(request.prompt, generator=torch.Generator().manual_seed(request.seed), **kwargs)
        pixels = out.frames if ref.kind == "video" else out.images
        return Output(pixels=pixels.float().cpu())

    note = (
        f"{name}: a {type(pipe).__name__} trained here on a toy domain of coloured shapes "
        f"(prompts like 'a red circle on a navy background'{' moving left' if ref.kind == 'video' else ''})."
    )
    if not trained:
        note += " No trained weights were found, so it runs with random weights: its pictures are noise."
    frames = ref.frames if ref.kind == "video" else None
    return LoadedModel(name, ref.kind, "reference", pipe, run, ref.steps, ref.size, frames, note, device)


def _reference_vlm(device: torch.device) -> LoadedModel:
    import random

    from accel.app.pretrained import chat_run
    from accel.zoo import reference_vlm, scenes_multi

    trained = (reference_vlm.WEIGHTS / "config.json").exists()
    model, processor = reference_vlm.load(device=device) if trained else reference_vlm.untrained()
    model.to(device)

    def scene(seed: int):
        from PIL import Image

        pixels = scenes_multi.render(scenes_multi.sample_scene(random.Random(seed)))
        return Image.fromarray(pixels.permute(1, 2, 0).numpy(), "RGB")

    note = (
        f"{REFERENCE_VLM}: a {type(model).__name__} trained here on scenes of coloured shapes (questions like "
        "'how many shapes are there ?', 'what colour is the shape at the top left ?'). Without an upload it is "
        "asked about a scene drawn from the seed."
    )
    if not trained:
        note += " No trained weights were found, so it runs with random weights: its answers are noise."
    run = chat_run(model, processor, device, picture=scene)
    return LoadedModel(REFERENCE_VLM, "vlm", "reference", model, run, note=note, device=device)


def _tiny(name: str) -> LoadedModel:
    from accel import zoo

    tiny = zoo.build(name[len(TINY_PREFIX) :])
    note = (
        f"{name}: a {type(tiny.obj).__name__} with a tiny config and random weights. It has no text encoder "
        "or processor, so it takes no prompt"
        + (" or upload (it reads seeded random tokens and pixels)" if tiny.kind == "vlm" else "")
        + ": it shows what the accelerators change, not pictures or answers."
    )
    if tiny.kind == "vlm":
        return LoadedModel(name, "vlm", "tiny", tiny.obj, _tiny_vlm_run(tiny), note=note)

    def run(request: Request, label: str) -> Output:
        overrides = {"num_inference_steps": request.steps or tiny.default_steps}
        if request.size:
            overrides.update(height=request.size, width=request.size)
        if request.frames and tiny.kind == "video":
            overrides["num_frames"] = request.frames
        show_progress(tiny.obj, label)
        return Output(pixels=tiny.run(request.seed, **overrides).float().cpu())

    return LoadedModel(name, tiny.kind, "tiny", tiny.obj, run, tiny.default_steps, note=note)


def _tiny_vlm_run(tiny) -> Callable[[Request, str], Output]:
    from accel.zoo.vlm import generate, make_inputs

    def run(request: Request, label: str) -> Output:
        inputs = make_inputs(tiny.obj, seed=request.seed)
        prompt_len = inputs["input_ids"].shape[1]
        tokens = generate(tiny.obj, inputs, max_new_tokens=request.new_tokens).sequences[0, prompt_len:].tolist()
        return Output(tokens=tokens, text="token ids: " + " ".join(map(str, tokens)))

    return run
