"""Configuration of step caching."""

from __future__ import annotations

import math
from dataclasses import dataclass

from .._validate import check_choice, check_float, check_int, fail, is_int

FORECASTS = ("output", "residual")


@dataclass
class CacheConfig:
    """Reuse the expensive part of the denoiser across denoising steps when it barely changes.

    DiTs (FLUX, SD3, Wan, HunyuanVideo, CogVideoX, LTX): the first `head_blocks` blocks run every step and decide
    whether the remaining blocks run or their contribution is forecast by a Taylor series through the last computed
    steps (order 0 = plain reuse of the last value, 1 = the line through the last two, up to `taylor_order`).
    UNets (SD1.5, SDXL): DeepCache-style, the shallowest down block runs every step and the deep branch
    (deeper down blocks, mid block, all but the last up block) is reused.

    How wrong a forecast would be is estimated at every step, before deciding: the head's own forecast (same order,
    same computed steps) is checked against the head just computed, and each computed step calibrates how a head
    error translates into error of the forecast values. A reused step is forecast at order 1, at another order where
    that one's estimate is 1.5 times lower, and by plain reuse where order 1 is estimated to miss by 15% or more. CFG
    branches run as separate calls share one schedule (the first branch of a step decides it for all).

    Two ways to say how aggressive it is:

    - `threshold` (raw): reuse while the accumulated relative L1 change of the first blocks' output since
      the last computed step stays below it. 0 never reuses. Typical values 0.05-0.2.
    - `target` (quality target, overrides `threshold`): an error budget for one generation, spread over its steps.
      A run of consecutive reused steps may add at most `target / num_steps` of estimated relative L1 error
      (weighted by the noise left, 1 - step/num_steps: the same error of the denoiser's prediction moves the
      predicted clean sample less late in denoising), so the whole generation stays under `target`. 0 never
      reuses; on the reference models 0.8 computes about 50% of the passes, 3.2 about 39% (benchmarks/RESULTS.md).

    What a reused step gets (DiTs; `forecast`): "output" (default) forecasts the denoiser's output, the
    prediction the scheduler steps with; "residual" forecasts the tail blocks' residual and adds it to this
    step's exact head output. On trained models the output is the smoother of the two to extrapolate (see
    benchmarks/RESULTS.md, "Reference models"); UNets always forecast their deep feature.

    Always computed: the first `warmup` steps (int: steps, float < 1: fraction of steps; at least 3, so an order-1
    forecast has been checked before the first reuse), the last `cooldown` steps, and any step after
    `max_consecutive` reuses in a row. `cooldown=None` (default) is 0 with a `target`, whose estimate already weighs
    the little noise left at the end (on the reference models computing the last step bought no PSNR: 39.2 dB at
    16.2 of 40 passes with it, 39.2 dB at 15.5 without), and 1 with a `threshold`.
    """

    threshold: float = 0.08
    target: float | None = None
    head_blocks: int = 1
    taylor_order: int = 2
    warmup: float | int = 0.1
    cooldown: float | int | None = None
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
        if self.cooldown is not None:
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
        return max(3, _as_steps(self.warmup, num_steps))

    def cooldown_steps(self, num_steps: int | None) -> int:
        if self.cooldown is None:
            return 0 if self.target is not None else 1
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
