"""Step caching: reuse denoiser work across denoising steps."""

from __future__ import annotations

from .._unit import NotApplicable, PatchContext, Unit
from ..pipelines.base import Adapter
from ..report import Report
from .config import CacheConfig
from .controller import BranchStats, CacheController, CallStats
from .dit import DiTCache
from .unet import UNetCache


def build_cache(adapter: Adapter, config: CacheConfig, steps_hint) -> DiTCache | UNetCache:
    """The cache for the adapter's kind of denoiser. Raises TypeError for models caching cannot serve."""
    if adapter.kind == "dit":
        return DiTCache(adapter, config, steps_hint)
    if adapter.kind == "unet":
        return UNetCache(adapter, config, steps_hint)
    raise TypeError(f"step caching applies to diffusion denoisers, not to a {adapter.display_name} model")


class CacheUnit(Unit):
    name = "cache"

    def __init__(self, cache: DiTCache | UNetCache):
        self.cache = cache

    def describe(self) -> str:
        return self.cache.describe()

    def remove(self) -> None:
        self.cache.hooks.remove()

    def begin_call(self) -> None:
        self.cache.controller.begin_call()
        self.cache.call_hook.managed = True

    def end_call(self) -> None:
        self.cache.controller.end_call()
        self.cache.call_hook.managed = False

    def update_report(self, report: Report) -> None:
        report.calls = list(self.cache.controller.calls)


def install(ctx: PatchContext, config: CacheConfig) -> CacheUnit:
    if ctx.adapter.kind not in ("dit", "unet"):
        raise NotApplicable(f"step caching applies to diffusion denoisers, not to {ctx.adapter.display_name}")
    if getattr(ctx.model, "is_cache_enabled", False):
        from ..errors import AlreadyPatchedError

        raise AlreadyPatchedError(
            f"{type(ctx.model).__name__} has a diffusers cache enabled (enable_cache); call "
            "model.disable_cache() first, or pass cache=False to accel.patch"
        )
    cache = build_cache(ctx.adapter, config, ctx.steps_hint)
    cache.hooks.install()
    if ctx.pipeline is None:
        ctx.warn(
            "bare model: call boundaries are found from the timestep (one host-device sync per denoiser "
            "call), and final-step protection needs CacheConfig(num_steps=...); patch the pipeline to avoid both"
        )
    return CacheUnit(cache)


__all__ = [
    "BranchStats",
    "CacheConfig",
    "CacheController",
    "CacheUnit",
    "CallStats",
    "DiTCache",
    "UNetCache",
    "build_cache",
    "install",
]
