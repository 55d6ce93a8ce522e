"""Configuration of step caching."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._validate import check_choice, check_float, check_int, fail, is_int

FORECASTS = ("output", "residual")


@dataclass
class CacheConfig:
    """Reuse the expensive part of the denoiser across denoising steps when it barely changes.

    DiTs (FLUX, SD3, Wan, HunyuanVideo, CogVideoX, LTX): the first `head_blocks` blocks run every step;
    how much their output moved since the last fully computed step decides whether the remaining blocks
    run or their cached residual is reused, forecast by a Taylor series: at every computed step the cache
    checks how well each order up to `taylor_order` would have predicted it, and forecasts with the order
    that has been closest lately (0 = plain reuse of the last value).
    UNets (SD1.5, SDXL): DeepCache-style, the shallowest down block runs every step and the deep branch
    (deeper down blocks, mid block, all but the last up block) is reused.

    Two ways to say how aggressive it is:

    - `threshold` (raw): reuse while the accumulated relative L1 change of the first blocks' output since
      the last computed step stays below it. 0 never reuses. Typical values 0.05-0.2.
    - `target` (quality target, overrides `threshold`): an error budget for one generation. At computed
      steps the cache checks what its own prediction would have been and so learns, online, how a change
      of the first blocks translates into error of the denoiser's block output. A step is reused only if
      the estimated relative error of all reused steps so far, added up, stays under `target`, with the
      budget released evenly over the steps (half of it is available by the middle step). 0 never
      reuses; 0.1 means "at most about 10% relative L1 error summed over the reused steps".

    What a reused step gets (DiTs; `forecast`): "output" (default) forecasts the denoiser's output, the
    prediction the scheduler steps with; "residual" forecasts the tail blocks' residual and adds it to this
    step's exact head output. On trained models the output is the smoother of the two to extrapolate (see
    benchmarks/RESULTS.md, "Reference models"); UNets always forecast their deep feature.

    Always computed: the first `warmup` steps (int: steps, float < 1: fraction of steps; at least 2, so
    the first forecast can be checked), the last `cooldown` steps, and any step after `max_consecutive`
    reuses in a row.
    """

    threshold: float = 0.08
    target: float | None = None
    head_blocks: int = 1
    taylor_order: int = 2
    warmup: float | int = 0.1
    cooldown: float | int = 1
    max_consecutive: int = 3
    decision: str = "lagged"
    num_steps: int | None = None
    forecast: str = "output"

    def __post_init__(self) -> None:
        check_float(self, "threshold", low=0)
        check_float(self, "target", low=0, optional=True)
        check_int(self, "head_blocks", low=1)
        check_int(self, "taylor_order", low=0, high=3)
        _check_steps(self, "warmup")
        _check_steps(self, "cooldown")
        check_int(self, "max_consecutive", low=1)
        check_choice(
            self,
            "decision",
            ("lagged", "current"),
            hint="'lagged': no GPU sync per step; 'current': decides from this step's change, "
            "one host-device sync per step",
        )
        check_int(self, "num_steps", low=1, optional=True)
        check_choice(self, "forecast", FORECASTS, hint="what a reused DiT step forecasts")

    def warmup_steps(self, num_steps: int | None) -> int:
        return max(2, _as_steps(self.warmup, num_steps))

    def cooldown_steps(self, num_steps: int | None) -> int:
        return _as_steps(self.cooldown, num_steps)


def _as_steps(value: float | int, num_steps: int | None) -> int:
    if isinstance(value, int) or value >= 1:
        return int(value)
    if num_steps is None:
        return 1 if value > 0 else 0
    return math.ceil(value * num_steps)


def _check_steps(config: CacheConfig, name: str) -> None:
    """An int >= 0 counts steps; a float in [0, 1) is a fraction of the steps (a whole float, 3.0, counts steps)."""
    value = getattr(config, name)
    if is_int(value):
        check_int(config, name, low=0)
        return
    value = check_float(config, name, low=0, hint="an int counts steps, a float below 1 is a fraction of them")
    if value >= 1:
        if not value.is_integer():
            fail(config, name, value, "a float must be below 1 (a fraction of the steps); give whole steps as an int")
        setattr(config, name, int(value))
