"""Presets: named sets of accelerator configs.

- "lossless": only transforms that change no output bit. Step caching is approximate, so it is off.
- "balanced" (default): step caching with an online-calibrated error budget (`CacheConfig.target`),
  so no per-model threshold tuning is needed; VLMs: visual token pruning to half the tokens.
- "fast": a larger budget, longer runs of reused steps; VLMs: pruning to three eighths of the tokens.

A preset names configs; `accel.patch(..., name=...)` overrides any one of them. Accelerators a preset
asks for but the model or machine cannot serve are skipped with a reason in the report; the same
accelerator asked for by keyword is an error instead.
"""

from __future__ import annotations

from dataclasses import replace

from .caching import CacheConfig
from .errors import ConfigError
from .pruning.config import PruneConfig

_PRESETS = {
    "lossless": {"cache": None},
    # Chosen on the reference models (benchmarks/RESULTS.md, "Fidelity", 8 prompts): on ref-flux, target 0.8 computes
    # 51% of the passes at 47.9 dB and 3.2 computes 38% at 39.7 dB; on ref-wan 49% at 38.2 dB and 38% at 31.1 dB.
    # VLMs: pruning budgets from ref-vlm's table (benchmarks/RESULTS.md, "Visual token pruning").
    "balanced": {"cache": CacheConfig(target=0.8, max_consecutive=3), "prune": PruneConfig(keep_ratio=0.5)},
    "fast": {"cache": CacheConfig(target=3.2, max_consecutive=3), "prune": PruneConfig(keep_ratio=0.375)},
}

PRESET_NAMES = tuple(_PRESETS)


def preset_configs(name: str) -> dict:
    if name not in _PRESETS:
        raise ConfigError(f"unknown preset {name!r}; choose one of {', '.join(PRESET_NAMES)}")
    return {key: (replace(cfg) if cfg is not None else None) for key, cfg in _PRESETS[name].items()}
