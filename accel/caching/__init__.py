"""Step caching: reuse denoiser work across denoising steps."""

from __future__ import annotations

from .._unit import NotApplicable, PatchContext, Unit, register
from ..errors import AlreadyPatchedError, UnsupportedModelError
from ..pipelines.base import Adapter
from ..report import Report
from .base import CannotCache, StepCache
from .config import CacheConfig
from .controller import BranchStats, CacheController, CallStats
from .dit import DiTCache
from .unet import UNetCache


def build_cache(adapter: Adapter, config: CacheConfig, steps_hint) -> StepCache:
    """The cache for the adapter's kind of denoiser. Raises CannotCache for a denoiser too small for `config`,
    UnsupportedModelError (a TypeError) for models caching cannot serve."""
    if adapter.kind == "dit":
        return DiTCache(adapter, config, steps_hint)
    if adapter.kind == "unet":
        return UNetCache(adapter, config, steps_hint)
    raise UnsupportedModelError(f"step caching applies to diffusion denoisers, not to a {adapter.display_name} model")


class CacheUnit(Unit):
    def __init__(self, cache: StepCache, guard: _EnableCacheGuard):
        self.cache = cache
        self.guard = guard

    def describe(self) -> str:
        return self.cache.describe()

    def remove(self) -> None:
        self.cache.remove()
        self.guard.remove()

    def begin_call(self) -> None:
        self.cache.begin_call()

    def end_call(self) -> None:
        self.cache.end_call()

    def update_report(self, report: Report) -> None:
        report.stats["cache"] = {"calls": self.cache.calls()}


@register("cache", CacheConfig, order=40)
def install(ctx: PatchContext, config: CacheConfig) -> CacheUnit:
    if ctx.adapter.kind not in ("dit", "unet"):
        raise NotApplicable(f"step caching applies to diffusion denoisers, not to {ctx.adapter.display_name}")
    if getattr(ctx.model, "is_cache_enabled", False):
        raise AlreadyPatchedError(
            f"{type(ctx.model).__name__} has a diffusers cache enabled (enable_cache); call "
            "model.disable_cache() first, or pass cache=False to accel.patch"
        )
    try:
        cache = build_cache(ctx.adapter, config, ctx.steps_hint)
    except CannotCache as problem:
        raise NotApplicable(str(problem)) from None
    cache.install()
    guard = _EnableCacheGuard(ctx.model)
    if ctx.pipeline is None:
        ctx.warn(
            "bare model: call boundaries are found from the timestep (one host-device sync per denoiser "
            "call), and the step count (a threshold's final-step protection, a target's per-step budget) needs "
            "CacheConfig(num_steps=...); patch the pipeline to avoid both"
        )
    return CacheUnit(cache, guard)


class _EnableCacheGuard:
    """diffusers' own `enable_cache` on a model accel caches would stack two caches: refuse it on this
    instance (an instance attribute shadowing the method, removed on unpatch)."""

    def __init__(self, model):
        self.model = model
        self.had_own = "enable_cache" in model.__dict__
        if hasattr(model, "enable_cache") and not self.had_own:
            model.__dict__["enable_cache"] = self._refuse

    def _refuse(self, *args, **kwargs):
        raise AlreadyPatchedError(
            f"{type(self.model).__name__} is step-cached by accel; a diffusers cache on top would stack two "
            "caches. accel.unpatch it first, or patch it with cache=False to use diffusers' cache with accel's "
            "other accelerators"
        )

    def remove(self) -> None:
        if not self.had_own:
            self.model.__dict__.pop("enable_cache", None)


__all__ = [
    "BranchStats",
    "CacheConfig",
    "CacheController",
    "CacheUnit",
    "CallStats",
    "CannotCache",
    "DiTCache",
    "StepCache",
    "UNetCache",
    "build_cache",
    "install",
]
