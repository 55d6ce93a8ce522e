"""One comparison's settings: the accelerated side's `accel.patch` keywords, and what both sides run.

`Settings` holds the page's controls, or the `settings` JSON of the `compare` API endpoint (same names, every one
optional):

    preset         "lossless" | "balanced" | "fast" (default "balanced"): accel.patch(preset=...)
    cache          "preset" (the preset's cache) | "off" | "target" | "threshold"
    cache_value    the error budget (CacheConfig.target) or the threshold (CacheConfig.threshold)
    attention      "default" (the model's own attention) | "sdpa" | "int8" | "flash" | "xformers"
    sparse         true: block-sparse attention, SparseConfig(target=sparse_target)
    sparse_target  the attention mass each query block keeps (0 < t <= 1)
    prune          true: visual token pruning, PruneConfig(keep=prune_keep) (VLMs)
    prune_keep     visual tokens kept per image or video
    quant          true: 4-bit weights, QuantConfig()
    steps, size, frames   denoising steps, image side in pixels, clip frames; 0: the model's default
    seed           seed of the initial noise (VLMs: of the tiny models' random inputs)
    new_tokens     tokens a VLM generates

An accelerator set here that cannot serve the model is an error (accel.patch raises NotApplicableError), so a
request never silently runs something else than it asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from accel.app.limits import AppInputError, Limits, check_seed
from accel.app.models import LoadedModel, Request
from accel.attention.sparse import SparseConfig
from accel.presets import preset_configs

CACHE_MODES = ("preset", "off", "target", "threshold")
ATTENTION_CHOICES = ("default", "sdpa", "int8", "flash", "xformers")


@dataclass
class Settings:
    preset: str = "balanced"
    cache: str = "preset"
    cache_value: float = preset_configs("balanced")["cache"].target
    attention: str = "default"
    sparse: bool = False
    sparse_target: float = SparseConfig.target
    prune: bool = False
    prune_keep: int = 64
    quant: bool = False
    steps: int = 0
    size: int = 0
    frames: int = 0
    seed: int = 0
    new_tokens: int = 16

    @classmethod
    def from_json(cls, values: dict | None) -> Settings:
        values = dict(values or {})
        names = [f.name for f in fields(cls)]
        unknown = sorted(set(values) - set(names))
        if unknown:
            raise AppInputError(f"unknown settings {unknown}; the settings are: {', '.join(names)}")
        return cls(**values)

    def patch_kwargs(self) -> dict[str, Any]:
        """The keywords of `accel.patch` for the accelerated side."""
        from accel import CacheConfig, PruneConfig, QuantConfig, SparseConfig
        from accel.errors import ConfigError
        from accel.presets import PRESET_NAMES

        if self.preset not in PRESET_NAMES:
            raise AppInputError(f"unknown preset {self.preset!r}; choose one of: {', '.join(PRESET_NAMES)}")
        _choice("cache", self.cache, CACHE_MODES)
        _choice("attention", self.attention, ATTENTION_CHOICES)
        kwargs: dict[str, Any] = {"preset": self.preset}
        try:
            if self.cache == "off":
                kwargs["cache"] = False
            elif self.cache in ("target", "threshold"):
                kwargs["cache"] = CacheConfig(**{self.cache: float(self.cache_value)})
            if self.attention != "default":
                kwargs["attention"] = self.attention
            if self.sparse:
                kwargs["sparse"] = SparseConfig(target=float(self.sparse_target))
            if self.prune:
                kwargs["prune"] = PruneConfig(keep=int(self.prune_keep))
            if self.quant:
                kwargs["quant"] = QuantConfig()
        except (ConfigError, TypeError, ValueError) as err:
            raise AppInputError(str(err)) from None
        return kwargs

    def label(self) -> str:
        """A short name of the accelerated side, for the plot."""
        parts = [self.preset]
        if self.cache == "off":
            parts.append("no cache")
        elif self.cache != "preset":
            parts.append(f"cache {self.cache} {self.cache_value:g}")
        if self.attention != "default":
            parts.append(self.attention)
        if self.sparse:
            parts.append(f"sparse {self.sparse_target:g}")
        if self.prune:
            parts.append(f"keep {self.prune_keep}")
        if self.quant:
            parts.append("W4")
        return " + ".join(parts)

    def request(self, model: LoadedModel, prompt: str, limits: Limits, image=None, video=None) -> Request:
        """Both sides' inputs, checked against `limits`, 0 resolved to the model's defaults where known."""
        limits.check_prompt(prompt)
        steps = self.steps or model.default_steps
        if model.kind == "vlm":
            return Request(
                prompt, check_seed(self.seed), None, None, None, limits.check_new_tokens(self.new_tokens), image, video
            )
        if steps is not None:
            if not self.steps and steps > limits.max_steps:
                raise AppInputError(
                    f"{model.name} takes {steps} steps by default; the limit is {limits.max_steps}, so set steps"
                )
            limits.check_steps(steps)
        size = limits.check_size(self.size) if self.size else None
        frames = None
        if model.kind == "video":
            frames = limits.check_frames(self.frames) if self.frames else model.default_frames
        return Request(prompt, check_seed(self.seed), steps, size, frames, 0)


def _choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise AppInputError(f"{name}={value!r} is not one of: {', '.join(choices)}")
