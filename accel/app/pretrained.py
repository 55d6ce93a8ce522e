"""Models the app loads with `from_pretrained`: a local folder (offline) or a Hugging Face Hub id.

A folder with `model_index.json` is a diffusers pipeline (a video pipeline when its `__call__` takes
`num_frames`), one with `config.json` a transformers vision-language model, read with its `AutoProcessor`. A Hub
id is looked up first (`HfApi.model_info`, which fails at once when the Hub cannot be reached, where a download
would retry for half a minute), so an offline machine gets a message, not a traceback. accel must support the
model's family (`accel.pipelines.find_adapter`); otherwise loading stops with the supported families.
"""

from __future__ import annotations

import inspect
import os
import re

import torch

from accel.app.models import LoadedModel, Output, Request, show_progress
from accel.errors import AccelError, UnsupportedModelError

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelLoadError(AccelError, ValueError):
    """A model name the app cannot load: not a folder or Hub id, the Hub out of reach, or a model accel does not
    support; the message says which and what to give instead."""


def load_pretrained(name: str, device: torch.device) -> LoadedModel:
    files = _top_level_files(name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if "model_index.json" in files:
        return _diffusers(name, device, dtype)
    if "config.json" in files:
        return _vlm(name, device, dtype)
    raise ModelLoadError(
        f"{name!r} holds neither model_index.json (a diffusers pipeline) nor config.json (a transformers model); "
        "give the folder that save_pretrained wrote"
    )


def _top_level_files(name: str) -> set[str]:
    if os.path.isdir(name):
        return set(os.listdir(name))
    if os.path.exists(name):
        raise ModelLoadError(f"{name!r} is a file; give the folder that save_pretrained wrote")
    if not HUB_ID.match(name):
        raise ModelLoadError(
            f"{name!r} is neither a folder on this machine nor a Hugging Face Hub id like 'owner/model'; pick a "
            "model from the list, or give a folder saved with save_pretrained"
        )
    from huggingface_hub import HfApi
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = HfApi().model_info(name, timeout=10)
    except RepositoryNotFoundError:
        raise ModelLoadError(f"the Hugging Face Hub has no model {name!r} (or it is private); check the id") from None
    except Exception as err:  # noqa: BLE001  (no connection, offline mode, timeouts: all mean "not reachable")
        raise ModelLoadError(
            f"cannot reach the Hugging Face Hub to load {name!r} ({type(err).__name__}: {err}); this machine may be "
            "offline. Give a local folder saved with save_pretrained instead"
        ) from None
    return {sibling.rfilename for sibling in info.siblings or []}


def _check_supported(model, name: str) -> None:
    from accel.api import resolve_target
    from accel.pipelines import find_adapter

    try:
        find_adapter(resolve_target(model))
    except UnsupportedModelError as err:
        raise ModelLoadError(f"accel cannot accelerate {name!r}: {err}") from None


def _diffusers(name: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(name, dtype=dtype).to(device)
    _check_supported(pipe, name)
    params = inspect.signature(pipe.__call__).parameters
    kind = "video" if "num_frames" in params else "image"

    def default(key: str) -> int | None:
        value = params[key].default if key in params else None
        return value if isinstance(value, int) else None

    def run(request: Request, label: str) -> Output:
        kwargs = {"output_type": "pt", "generator": torch.Generator().manual_seed(request.seed)}
        if request.steps:
            kwargs["num_inference_steps"] = request.steps
        if request.size:
            kwargs.update(height=request.size, width=request.size)
        if kind == "video" and request.frames:
            kwargs["num_frames"] = request.frames
        show_progress(pipe, label)
        out = pipe(prompt=request.prompt, **kwargs)
        pixels = out.frames if kind == "video" else out.images
        return Output(pixels=torch.as_tensor(pixels).float().cpu())

    note = f"{name}: a {type(pipe).__name__} loaded with from_pretrained ({dtype}, {device})."
    frames = default("num_frames") if kind == "video" else None
    return LoadedModel(name, kind, "pretrained", pipe, run, default("num_inference_steps"), None, frames, note, device)


def _vlm(name: str, device: torch.device, dtype: torch.dtype) -> LoadedModel:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(name)
        model = AutoModelForImageTextToText.from_pretrained(name, dtype=dtype).to(device).eval()
    except (ValueError, OSError) as err:
        raise ModelLoadError(f"{name!r} is not a vision-language model transformers can load: {err}") from None
    _check_supported(model, name)

    run = chat_run(model, processor, device)
    note = f"{name}: a {type(model).__name__} loaded with from_pretrained ({dtype}, {device})."
    return LoadedModel(name, "vlm", "pretrained", model, run, note=note, device=device)


def chat_run(model, processor, device: torch.device, picture=None):
    """`run` of a VLM with a processor: the question (and the uploaded image or video) through the processor's
    chat template, then greedy `generate`. `picture(seed)`, when given, is the image asked about when nothing
    was uploaded."""

    def run(request: Request, label: str) -> Output:
        image, video = request.image, request.video
        if image is None and video is None and picture is not None:
            image = picture(request.seed)
        content = [{"type": "image", "image": image}] if image is not None else []
        if video is not None:
            content.append({"type": "video", "video": video})
        content.append({"type": "text", "text": request.prompt})
        inputs = processor.apply_chat_template(
            [{"role": "user", "content": content}],
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            return_tensors="pt",
        ).to(device)
        out = model.generate(**inputs, max_new_tokens=request.new_tokens, do_sample=False)
        tokens = out[0, inputs["input_ids"].shape[1] :].tolist()
        shown = image if image is not None else (video[0] if video else None)
        return Output(tokens=tokens, text=processor.decode(tokens, skip_special_tokens=True), picture=shown)

    return run
