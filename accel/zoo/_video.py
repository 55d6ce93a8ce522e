"""What the video builders of `accel.zoo.video` share: the (fake) encoded prompt, the pipeline's default call,
and `run`, which calls the pipeline as a user would and returns float32 pixels [B, F, C, H, W]."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from accel.zoo._base import TinyModel, seeded
from accel.zoo._diffusers import cast_like_from_pretrained, prompt_embeds

DEFAULT_STEPS = 10

# The (fake) encoded prompt of every family: 16 tokens of 32 channels; where the pipeline takes a mask, 12 of
# them are valid (6 for the negative prompt).
TEXT_LEN, TEXT_DIM, _TEXT_VALID = 16, 32, 12


def _mask(valid: int) -> torch.Tensor:
    """Attention mask [1, TEXT_LEN] with `valid` leading ones, like a padded tokenizer output."""
    m = torch.zeros(1, TEXT_LEN, dtype=torch.long)
    m[:, :valid] = 1
    return m


def _to_pixels(frames: Any) -> Any:
    """Pipeline output -> float32 [B, F, C, H, W] in [0, 1] (for output_type "pt" / "np")."""
    if isinstance(frames, torch.Tensor):
        return frames.float().cpu()
    try:
        import numpy as np

        if isinstance(frames, np.ndarray):  # np: [B, F, H, W, C]
            return torch.from_numpy(frames).float().permute(0, 1, 4, 2, 3).contiguous()
    except ImportError:  # pragma: no cover
        pass
    return frames  # "pil" / "latent": return as the pipeline gave it


def _make_run(pipe, defaults: dict[str, Any]) -> Callable[..., Any]:
    """`run(seed, **overrides)`: call the pipeline as a user would; overrides win over defaults."""

    def _run(seed: int = 0, **overrides: Any) -> Any:
        # The stored embeddings live on CPU; follow the pipeline if it was moved (`pipe.to("cuda")`), since these
        # pipelines do not move user-given embeddings themselves. The generator stays on CPU (as in diffusers docs),
        # so the initial noise is the same on every device.
        device = pipe.device
        kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in defaults.items()}
        kwargs["output_type"] = "pt"
        kwargs.update(overrides)
        if "generator" not in overrides:
            kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
        # Not every pipeline repeats user-given embeddings by num_videos_per_prompt (CogVideoX does not):
        # repeat them here so a batch of n videos works the same for all families.
        copies = int(kwargs.pop("num_videos_per_prompt", None) or 1)
        if copies > 1:
            for key, value in list(kwargs.items()):
                if key != "latents" and isinstance(value, torch.Tensor) and ("embeds" in key or "mask" in key):
                    kwargs[key] = value.repeat_interleave(copies, dim=0)
        out = pipe(**kwargs)  # the pipelines' __call__ already runs under torch.no_grad()
        frames = out[0] if isinstance(out, tuple) else out.frames
        return _to_pixels(frames)

    return _run


def tiny_video(
    family: str,
    seed: int,
    dtype: torch.dtype,
    modules: Callable[[], tuple[nn.Module, nn.Module]],
    pipeline: Callable[[nn.Module, nn.Module], Any],
    pooled_dim: int | None = None,
    masks: bool = False,
    **call: Any,
) -> TinyModel:
    """The family's TinyModel: `modules()` builds (transformer, vae) with weights drawn from `seed`, cast as
    `from_pretrained(torch_dtype=dtype)` would; `pipeline(transformer, vae)` assembles the pipeline; the default
    call passes prompt embeddings drawn from `seed` (pooled ones with `pooled_dim`, attention masks with `masks`),
    9 frames, DEFAULT_STEPS steps and `call`."""
    transformer, vae = seeded(seed, modules)
    for module in (transformer, vae):
        # eval() only: parameters keep requires_grad=True, as from `from_pretrained`
        module.eval()
        cast_like_from_pretrained(module, dtype)
    gen = torch.Generator("cpu").manual_seed(seed)
    defaults = prompt_embeds(gen, TEXT_LEN, TEXT_DIM, dtype, pooled_dim)
    if masks:
        defaults["prompt_attention_mask"] = _mask(_TEXT_VALID)
        defaults["negative_prompt_attention_mask"] = _mask(_TEXT_VALID // 2)
    pipe = pipeline(transformer, vae)
    pipe.set_progress_bar_config(disable=True)
    defaults.update(num_frames=9, num_inference_steps=DEFAULT_STEPS, **call)
    return TinyModel.of(family, "video", pipe, _make_run(pipe, defaults), DEFAULT_STEPS)
