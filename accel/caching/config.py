"""Configuration of step caching."""

from __future__ import annotations

import math
from dataclasses import dataclass


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

    def __post_init__(self):
        if self.threshold < 0:
            raise ValueError(f"CacheConfig.threshold must be >= 0, got {self.threshold}")
        if self.target is not None and self.target < 0:
            raise ValueError(f"CacheConfig.target must be >= 0 or None, got {self.target}")
        if self.head_blocks < 1:
            raise ValueError(f"CacheConfig.head_blocks must be >= 1, got {self.head_blocks}")
        if not 0 <= self.taylor_order <= 3:
            raise ValueError(f"CacheConfig.taylor_order must be 0..3, got {self.taylor_order}")
        if self.max_consecutive < 1:
            raise ValueError(f"CacheConfig.max_consecutive must be >= 1, got {self.max_consecutive}")
        if self.decision not in ("lagged", "current"):
            raise ValueError(
                f"CacheConfig.decision must be 'lagged' (no GPU sync per step) or 'current' "
                f"(decides from this step's change, one host-device sync per step), got {self.decision!r}"
            )

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
