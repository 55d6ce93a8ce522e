"""Step caching: reuse denoiser work across denoising steps."""

from __future__ import annotations

from ..pipelines.base import Adapter
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


__all__ = ["BranchStats", "CacheConfig", "CacheController", "CallStats", "DiTCache", "UNetCache", "build_cache"]
