"""What every tiny model in the zoo looks like.

These models are built from tiny configs of the real architectures with seeded random weights. They are
not trained: they produce noise-like images and gibberish tokens. They exist so that tests, the demo and the
app can exercise the real diffusers/transformers classes offline, on CPU, in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from accel.errors import AccelError


class UnknownModelError(AccelError, ValueError):
    """A family, benchmark scenario or model the zoo does not know; the message lists the known ones."""


class UnsupportedInputError(AccelError, ValueError):
    """An input a tiny model's family does not take (e.g. a video for LLaVA); the message says what it takes."""


class UnknownOverrideError(UnsupportedInputError, TypeError):
    """`TinyModel.run` got a keyword its family does not know (also a TypeError, like any unknown keyword)."""


@dataclass
class VLMOutput:
    """Result of a greedy `generate()` on a tiny VLM."""

    sequences: torch.Tensor  # [B, prompt + new] token ids
    first_logits: torch.Tensor  # [B, vocab] float32 logits of the first generated token


@dataclass
class TinyModel:
    """A runnable tiny instance of one supported family.

    `obj` is what a user would hand to `accel.patch`: a diffusers `DiffusionPipeline` or a transformers
    `*ForConditionalGeneration` model. `run(seed, **overrides)` calls it the way a user would and returns
    float32 pixels in [0, 1] (`[B, C, H, W]` images or `[B, F, C, H, W]` videos) or a `VLMOutput`.
    """

    name: str  # e.g. "tiny-random-flux"; never a trained model's name
    family: str  # adapter family key, e.g. "flux"
    kind: str  # "image" | "video" | "vlm"
    obj: Any
    _run: Callable[..., Any] = field(repr=False)
    default_steps: int | None = None  # denoising steps of one run (diffusion only)

    def run(self, seed: int = 0, **overrides) -> Any:
        return self._run(seed, **overrides)

    @classmethod
    def of(cls, family: str, kind: str, obj: Any, run: Callable[..., Any], default_steps: int | None = None):
        """The zoo's model of `family`, named "tiny-random-<family>"."""
        return cls(f"tiny-random-{family}", family, kind, obj, run, default_steps)


def seeded(seed: int, build: Callable[[], Any]) -> Any:
    """Run `build` with torch's global RNG seeded to `seed`, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()
