"""Step caching under context parallelism: every rank takes the same decision.

Under diffusers' context parallelism (Ulysses or ring) each rank holds a slice of the sequence, so the head's
change and the forecast checks a rank measures are of its slice only. Decided per rank, one rank could reuse a
step that another computes, and the next all-to-all or ring exchange would mix stale and fresh activations.

Every quantity the controller decides from is a ratio of sums, sum |a - b| / sum |reference|. Inside `scope(group)`
(entered by the cache for each denoiser call of a context-parallel model), `ratio` sums numerator and denominator
over the group with one all-reduce of two numbers before dividing, so every rank gets the ratio of the whole
sequence: the number one unparallelised process would have measured, up to the order of the floating-point sums.
The all-reduce is queued on the device like any kernel; the controller then copies the result to the host
asynchronously as before, so the `lagged` decision still waits on nothing. Identical values on every rank and the
same control flow on every rank give the same decision everywhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
import torch.distributed as dist

_GROUP: ContextVar[dist.ProcessGroup | None] = ContextVar("accel_cache_group", default=None)


@contextmanager
def scope(group: dist.ProcessGroup | None) -> Iterator[None]:
    """Ratios computed inside are of the whole sequence spread over `group` (None: this process's tensors only)."""
    token = _GROUP.set(group)
    try:
        yield
    finally:
        _GROUP.reset(token)


def ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    """num / den as a 0-d float32 tensor; inside `scope(group)`, both summed over the group first."""
    group = _GROUP.get()
    if group is not None:
        both = torch.stack([torch.as_tensor(x, dtype=torch.float32, device=den.device) for x in (num, den)])
        dist.all_reduce(both, group=group)
        num, den = both[0], both[1]
    return num / den.clamp_min(1e-12)
