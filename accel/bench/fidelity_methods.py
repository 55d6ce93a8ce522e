"""The method ladder of the fidelity benchmark (`accel.bench.fidelity`): every accelerator it compares, as data.

A `Method` is a name, a family (one line per family in the plot), `apply(pipe, setup) -> undo` that installs it on
a pipeline and returns what removes it, and where its count of passes computed comes from:

- "probe" (every method but accel's): a forward pre-hook on a module inside the transformer's LAST block
  (`last_block_probe`). A pass counts as computed when that block really ran; every cache here that reuses a step
  (accel, diffusers FBC / MagCache / TaylorSeer lite, cache-dit) skips the block without calling it. Methods that
  skip attention but still run every block's MLP (PAB, FasterCache, TaylorSeer outside lite mode) compute every
  pass by this count; the runner's second count, attention calls computed (`attention_probes`), shows their saving.
- "accel": accel's own report (`stats["cache"]["calls"][-1]["computed"]`, `accel/report.py`); the runner also runs
  the probe and notes a disagreement. Without a cache (sparse attention alone) the probe counts.

Settings that differ from a peer's defaults, and why: the peers' block counts are set for these tiny models
(cache-dit's DBCache `Fn_compute_blocks=1, Bn_compute_blocks=0`: the references have 6 and 4 blocks, its default 8
would be more than the model); cache-dit's warm-up is accel's (10% of the steps, at least 2); TaylorSeer keeps its
factors in the model's dtype (diffusers' default bfloat16 adds a rounding no other method has); MagCache is
calibrated first, as its docs say, with `MagCacheConfig(calibrate=True)` on one prompt that is not an evaluation
prompt, its printed per-branch ratios averaged.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from accel.attention.sparse import SparseConfig
from accel.errors import ConfigError


@dataclass
class Setup:
    """What a method may need beyond the pipeline: the run's steps and guidance, one pipeline call on the calibration
    prompt (`calibrate()`), and a memo shared by the methods of one model (calibrations done once)."""

    steps: int
    guidance: float
    calibrate: Callable[[], Any]
    memo: dict = field(default_factory=dict)


Undo = Callable[[], None]


@dataclass(frozen=True)
class Method:
    name: str
    family: str
    apply: Callable[[Any, Setup], Undo]
    counted_by: str = "probe"  # "probe" | "accel" (see the module docstring)
    settings: str = ""
    note: str = ""  # a caveat shown with every row of the method


class Unsupported(Exception):
    """A method that cannot run on this model or in this environment; the row says why."""


def last_block_probe(transformer: nn.Module) -> nn.Module:
    """A module in the transformer's last block that runs only when that block computes (as `accel.bench.scenarios`
    probes: FLUX's last single block's `proj_out`, Wan's last block's `ffn`)."""
    if hasattr(transformer, "single_transformer_blocks"):
        return transformer.single_transformer_blocks[-1].proj_out
    if hasattr(transformer, "blocks"):
        return transformer.blocks[-1].ffn
    raise Unsupported(f"no last-block probe for {type(transformer).__name__}")


def attention_probes(transformer: nn.Module) -> list[nn.Module]:
    """The `to_q` projection of every attention module: called once per attention computed."""
    return [m for name, m in transformer.named_modules() if name.endswith(".to_q")]


# --- how each kind of method is installed --------------------------------------------------------------------------


def _nothing(pipe, setup: Setup) -> Undo:
    return lambda: None


def _accel(make_kwargs: Callable[[], dict]) -> Callable[[Any, Setup], Undo]:
    def apply(pipe, setup: Setup) -> Undo:
        import accel

        accel.patch(pipe, **make_kwargs())
        return lambda: accel.unpatch(pipe)

    return apply


def _diffusers(make_config: Callable[[Any, Setup], Any]) -> Callable[[Any, Setup], Undo]:
    """`transformer.enable_cache(config)`, removed with `disable_cache()`; the config is built fresh each time
    (diffusers fills in some fields of the config it is given)."""

    def apply(pipe, setup: Setup) -> Undo:
        pipe.transformer.enable_cache(make_config(pipe, setup))
        return pipe.transformer.disable_cache

    return apply


def _cache_dit(threshold: float, taylor_order: int) -> Callable[[Any, Setup], Undo]:
    def apply(pipe, setup: Setup) -> Undo:
        os.environ.setdefault("CACHE_DIT_LOG_LEVEL", "error")  # its info log would break up the progress bar
        try:
            import cache_dit
        except ImportError as err:
            raise Unsupported(f"cache-dit is not importable ({err}); pip install cache-dit --no-deps") from None
        config = cache_dit.DBCacheConfig(
            Fn_compute_blocks=1,
            Bn_compute_blocks=0,
            residual_diff_threshold=threshold,
            max_warmup_steps=max(2, math.ceil(0.1 * setup.steps)),
            num_inference_steps=setup.steps,
            enable_separate_cfg=setup.guidance > 1,  # the references run CFG as two calls, cond first
        )
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=taylor_order) if taylor_order else None
        # cache-dit wraps the pipeline CLASS's __call__ while installed: put it back even if it fails halfway
        cls, call = type(pipe), type(pipe).__dict__.get("__call__")

        def undo() -> None:
            try:
                cache_dit.disable_cache(pipe)
            finally:
                if cls.__dict__.get("__call__") is not call and call is not None:
                    cls.__call__ = call

        try:
            cache_dit.enable_cache(pipe, cache_config=config, calibrator_config=calibrator)
        except Exception:
            undo()
            raise
        return undo

    return apply


_RATIOS = re.compile(r"\[\s*[-+0-9.eE]+(?:\s*,\s*[-+0-9.eE]+)*\s*\]")


def mag_ratios(pipe, setup: Setup) -> list[float]:
    """MagCache's magnitude ratios for this model and step count, calibrated once per model: one call on the
    calibration prompt under `MagCacheConfig(calibrate=True)`, which prints each CFG branch's ratios; averaged."""
    key = ("magcache", setup.steps)
    if key not in setup.memo:
        from diffusers.hooks import MagCacheConfig

        pipe.transformer.enable_cache(MagCacheConfig(calibrate=True, num_inference_steps=setup.steps))
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                setup.calibrate()
        finally:
            pipe.transformer.disable_cache()
        found = [[float(v) for v in m.strip("[] ").split(",")] for m in _RATIOS.findall(printed.getvalue())]
        found = [r for r in found if len(r) == setup.steps]
        if not found:
            raise Unsupported(f"MagCache calibration printed no ratios for {setup.steps} steps")
        setup.memo[key] = torch.tensor(found, dtype=torch.float64).mean(0).tolist()
    return setup.memo[key]


def _magcache(threshold: float):
    from diffusers.hooks import MagCacheConfig

    return lambda pipe, setup: MagCacheConfig(
        threshold=threshold, num_inference_steps=setup.steps, mag_ratios=mag_ratios(pipe, setup)
    )


def _taylorseer(interval: int, order: int, lite: bool):
    from diffusers.hooks import TaylorSeerCacheConfig

    return lambda pipe, setup: TaylorSeerCacheConfig(
        cache_interval=interval, max_order=order, use_lite_mode=lite, taylor_factors_dtype=pipe.transformer.dtype
    )


def _fastercache(skip: int, cfg_cache: bool):
    from diffusers.hooks import FasterCacheConfig

    return lambda pipe, setup: FasterCacheConfig(
        spatial_attention_block_skip_range=skip,
        is_guidance_distilled=not cfg_cache,
        current_timestep_callback=lambda: pipe.current_timestep,
    )


def _pab(skip: int):
    from diffusers.hooks import PyramidAttentionBroadcastConfig

    return lambda pipe, setup: PyramidAttentionBroadcastConfig(
        spatial_attention_block_skip_range=skip, current_timestep_callback=lambda: pipe.current_timestep
    )


# --- the ladder -------------------------------------------------------------------------------------------------

CACHE_THRESHOLDS = (0.05, 0.1, 0.2, 0.3)  # accel threshold, diffusers FBC, cache-dit DBCache
CACHE_TARGETS = (0.1, 0.2, 0.4, 0.8, 1.6, 3.2)
LOW_TARGET = 6.4
MAGCACHE_THRESHOLDS = (0.02, 0.06, 0.12, 0.24)
TAYLORSEER_INTERVALS = (2, 3, 4)
SKIP_RANGES = (2, 3)  # PAB and FasterCache: attention computed every N-th call
SPARSE_TARGETS = (0.95, 0.9, 0.85, 0.8)
# ref-wan: 320 tokens = 20 key blocks of 16 (CPU-sized tiles); every 4th row sampled (4 per block, as 8 of 64 would)
SPARSE_BLOCKS = dict(block_q=16, block_k=16, stride=4)
SPARSE_WITH_CACHE = SparseConfig.target

SHARED = (
    "one state per attention module for both CFG calls (diffusers): a skipped call reuses whichever branch ran last"
)
CFG_BATCHED = "its CFG cache splits a batched [uncond, cond] input; these pipelines make two calls"


def _accel_methods() -> list[Method]:
    from accel.caching import CacheConfig
    from accel.presets import PRESET_NAMES, preset_configs

    presets = [p for p in PRESET_NAMES if preset_configs(p).get("cache") is not None]
    sparse = lambda t: SparseConfig(target=t, **SPARSE_BLOCKS)  # noqa: E731
    both = SPARSE_WITH_CACHE
    table = [  # name, family, accel.patch keywords (built fresh at each install), settings
        *[(f"accel {p}", "accel preset", lambda p=p: {"preset": p}, p) for p in presets],
        *[
            (f"accel thr {t:g}", "accel threshold", lambda t=t: {"cache": CacheConfig(threshold=t)}, f"threshold={t:g}")
            for t in CACHE_THRESHOLDS
        ],
        *[
            (f"accel target {t:g}", "accel target", lambda t=t: {"cache": CacheConfig(target=t)}, f"target={t:g}")
            for t in CACHE_TARGETS
        ],
        # below 40% of the passes, where max_consecutive=3 (3 warm-up steps + every 4th) stops the ladder above
        (
            f"accel target {LOW_TARGET:g} max 4",
            "accel target",
            lambda: {"cache": CacheConfig(target=LOW_TARGET, max_consecutive=4)},
            f"target={LOW_TARGET:g}, max_consecutive=4",
        ),
        *[
            (f"accel sparse {t:g}", "accel sparse", lambda t=t: {"sparse": sparse(t), "cache": False}, f"target={t:g}")
            for t in SPARSE_TARGETS
        ],
        *[
            (f"accel sparse {both:g} + {p}", "accel sparse+cache", lambda p=p: {"preset": p, "sparse": sparse(both)}, p)
            for p in presets
        ],
    ]
    return [Method(name, family, _accel(kwargs), "accel", settings) for name, family, kwargs, settings in table]


def _diffusers_methods() -> list[Method]:
    from diffusers.hooks import FirstBlockCacheConfig

    def fbc(t: float):
        return lambda pipe, setup: FirstBlockCacheConfig(threshold=t)

    table = [  # name, family, config factory, settings, note
        *[(f"diffusers FBC {t:g}", "diffusers FBC", fbc(t), f"threshold={t:g}", "") for t in CACHE_THRESHOLDS],
        *[
            (f"diffusers TaylorSeer {n}", "diffusers TaylorSeer", _taylorseer(n, 1, True), f"interval={n}, lite", "")
            for n in TAYLORSEER_INTERVALS
        ],
        ("diffusers TaylorSeer 2 attn", "diffusers TaylorSeer attn", _taylorseer(2, 1, False), "interval=2", ""),
        *[
            (f"diffusers MagCache {t:g}", "diffusers MagCache", _magcache(t), f"threshold={t:g}, calibrated", "")
            for t in MAGCACHE_THRESHOLDS
        ],
        ("diffusers FasterCache CFG", "diffusers FasterCache", _fastercache(2, True), "defaults", CFG_BATCHED),
        *[
            (f"diffusers FasterCache attn {n}", "diffusers FasterCache", _fastercache(n, False), f"skip {n}", SHARED)
            for n in SKIP_RANGES
        ],
        *[(f"diffusers PAB {n}", "diffusers PAB", _pab(n), f"spatial skip {n}", SHARED) for n in SKIP_RANGES],
    ]
    return [Method(name, family, _diffusers(make), "probe", s, note) for name, family, make, s, note in table]


def _cache_dit_methods() -> list[Method]:
    table = [  # name, family, threshold, TaylorSeer order (0: none)
        ("cache-dit DBCache 0.1", "cache-dit DBCache", 0.1, 0),
        *[(f"cache-dit DBCache+TS {t:g}", "cache-dit DBCache+TaylorSeer", t, 1) for t in CACHE_THRESHOLDS],
    ]
    return [
        Method(name, family, _cache_dit(t, order), "probe", f"F1B0, threshold={t:g}" + (", order 1" if order else ""))
        for name, family, t, order in table
    ]


def all_methods() -> list[Method]:
    """Every method, the baseline (a re-run of the unpatched pipeline) first."""
    baseline = Method("baseline", "baseline", _nothing, settings="unpatched")
    return [baseline, *_accel_methods(), *_diffusers_methods(), *_cache_dit_methods()]


def select(methods: list[Method], wanted: list[str] | None) -> list[Method]:
    """The methods whose name or family is in `wanted` (all when None), in ladder order."""
    if wanted is None:
        return list(methods)
    known = {m.name for m in methods} | {m.family for m in methods}
    unknown = [w for w in wanted if w not in known]
    if unknown:
        families = sorted({m.family for m in methods}, key=[m.family for m in methods].index)
        raise ConfigError(f"unknown method or family {unknown}; families: {', '.join(families)} (or a method name)")
    return [m for m in methods if m.name in wanted or m.family in wanted]


__all__ = [
    "Method",
    "Setup",
    "Unsupported",
    "all_methods",
    "attention_probes",
    "last_block_probe",
    "mag_ratios",
    "select",
]
