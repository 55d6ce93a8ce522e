"""Tiny random-weight instances of every supported family (see `accel.zoo._base`).

`build("flux")` returns a `TinyModel` whose `obj` is a real diffusers pipeline or transformers model with a tiny
config and seeded random weights: untrained, offline, CPU-friendly. `BUILDERS` maps family -> builder.
`load("ref-flux")` / `load("ref-wan")` return the reference pipelines trained on a toy domain (issue 12);
`load("ref-vlm")` returns `(model, processor)` of the reference VLM (issue 13, `accel.zoo.reference_vlm`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from accel.zoo import image, reference, video, vlm
from accel.zoo._base import (
    TinyModel,
    UnknownModelError,
    UnknownOverrideError,
    UnsupportedInputError,
    VLMOutput,
)

BUILDERS: dict[str, Callable[..., TinyModel]] = {**image.BUILDERS, **video.BUILDERS, **vlm.BUILDERS}

FAMILIES = tuple(BUILDERS)


def load(name: str, **kwargs):
    """A trained reference model: `load("ref-flux")` (FluxPipeline, 64x64 images) or `load("ref-wan")`
    (WanPipeline, 9-frame 64x64 clips), see `accel.zoo.reference.load`; or `load("ref-vlm")`, `(model,
    processor)` of a Qwen2-VL on 128x128 images and 4-frame videos, see `accel.zoo.reference_vlm.load`."""
    from accel.zoo import reference_vlm

    if name == reference_vlm.NAME:
        return reference_vlm.load(**kwargs)
    if name not in reference.NAMES:
        names = ", ".join((*reference.NAMES, reference_vlm.NAME))
        raise UnknownModelError(f"unknown reference model {name!r}; choose one of: {names}")
    return reference.load(name, **kwargs)


def build(family: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyModel:
    """Build the tiny model of `family` with weights drawn from `seed`."""
    try:
        builder = BUILDERS[family]
    except KeyError:
        raise UnknownModelError(f"unknown family {family!r}; choose one of: {', '.join(FAMILIES)}") from None
    return builder(seed=seed, dtype=dtype)


__all__ = [
    "BUILDERS",
    "FAMILIES",
    "TinyModel",
    "UnknownModelError",
    "UnknownOverrideError",
    "UnsupportedInputError",
    "VLMOutput",
    "build",
    "load",
]
