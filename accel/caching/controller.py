"""When to reuse: the decision logic of step caching, independent of any model.

A `CacheController` sees, for each denoiser call, the output of the cheap head (first blocks, or the
shallow UNet block) and says "compute" or "reuse". Its state is kept per CFG branch ("cond",
"uncond", or the batched pair) and is reset at the start of every pipeline call.

GPU syncs: the change signal is a scalar on the device. With `decision="lagged"` (default) the
decision for step i uses the change measured at step i-1, whose value was copied to pinned host memory
asynchronously a whole step earlier, so reading it does not stall the GPU queue. `decision="current"`
reads this step's signal and so syncs once per step.

What a reused step gets instead of the computed values is the forecaster's part (`accel.caching.forecast`);
the controller prices a reuse with the forecaster's measured error per unit of change.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import distributed
from .config import CacheConfig
from .forecast import DeviceScalar, TaylorForecast, Values

MAX_CALLS_KEPT = 100  # per-call statistics of a long-running server stay bounded


def relative_l1(new: Sequence[torch.Tensor | None], old: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """sum |new - old| / sum |old| over matching tensors, as a 0-d float32 tensor on their device."""
    num = den = None
    for a, b in zip(new, old):
        if a is None or b is None:
            continue
        d = (a.float() - b.float()).abs().sum()
        n = b.float().abs().sum()
        num = d if num is None else num + d
        den = n if den is None else den + n
    return distributed.ratio(num, den)


@dataclass
class BranchStats:
    computed: list[int] = field(default_factory=list)
    reused: list[int] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)  # why steps were computed
    estimated_error: float = 0.0  # sum over reused steps (needs calibration; 0 until then)

    @property
    def steps(self) -> int:
        return len(self.computed) + len(self.reused)

    def to_dict(self) -> dict:
        """For the report (its layout is documented in `accel.report`)."""
        return {
            "computed": list(self.computed),
            "reused": list(self.reused),
            "compute_reasons": dict(self.reasons),
            "estimated_error": self.estimated_error,
        }


@dataclass
class CallStats:
    branches: dict[str, BranchStats] = field(default_factory=dict)
    num_steps: int | None = None

    @property
    def computed(self) -> int:
        return sum(len(b.computed) for b in self.branches.values())

    @property
    def reused(self) -> int:
        return sum(len(b.reused) for b in self.branches.values())

    def to_dict(self) -> dict:
        """For the report (its layout is documented in `accel.report`)."""
        return {
            "num_steps": self.num_steps,
            "computed": self.computed,
            "reused": self.reused,
            "branches": {name: b.to_dict() for name, b in self.branches.items()},
        }


class _Branch:
    def __init__(self, taylor_order: int):
        self.step = 0
        self.prev_signal_source: torch.Tensor | None = None
        self.signals: dict[int, float] = {}
        self.pending_signals: list[tuple[int, DeviceScalar]] = []
        self.forecast = TaylorForecast(taylor_order)
        self.last_computed = -1
        self.consecutive = 0
        self.reusing = False
        self.last_timestep: float | None = None
        self.extras: dict = {}  # hooks' own per-branch cache (e.g. outputs of skipped UNet blocks)
        self.stats = BranchStats()


class CacheController:
    def __init__(self, config: CacheConfig):
        self.config = config
        self.calls: deque[CallStats] = deque(maxlen=MAX_CALLS_KEPT)
        self._branches: dict[str, _Branch] = {}
        self._current: _Branch | None = None
        self._num_steps: int | None = None
        self._call_open = False
        self._auto_last_t: float | None = None
        self._auto_index = 0

    # -- call and branch boundaries -------------------------------------------------------------

    def begin_call(self) -> None:
        """A new pipeline call: forget every branch's state."""
        self._branches = {}
        self._num_steps = None
        self._auto_last_t = None
        self._auto_index = 0
        self.calls.append(CallStats())
        self._call_open = True

    def end_call(self) -> None:
        self._call_open = False
        self._current = None

    def reset(self) -> None:
        self.end_call()
        self._branches = {}

    def enter(
        self,
        branch: str | None,
        num_steps: int | None = None,
        step_index: int | None = None,
        timestep=None,
        managed: bool = False,
    ) -> None:
        """Start a denoiser call on `branch` ("cond", "uncond", ...; None when the pipeline names none).

        `managed`: a pipeline wrapper marks call boundaries with begin_call/end_call. Otherwise (a bare
        model) a new call is recognised from `step_index` going back, or from the timestep not decreasing.
        """
        if not managed:
            if branch is None:
                branch = self._auto_branch(timestep)
            elif self._restarted(branch, step_index, timestep):
                self.begin_call()
        branch = branch or "default"
        if not self._call_open:
            self.begin_call()
        if num_steps is None:
            num_steps = self.config.num_steps
        if num_steps is not None:
            self._num_steps = num_steps
            self.calls[-1].num_steps = num_steps
        state = self._branches.get(branch)
        if state is None:
            state = self._branches[branch] = _Branch(self.config.taylor_order)
            self.calls[-1].branches[branch] = state.stats
        state.reusing = False
        self._current = state

    def exit(self) -> None:
        if self._current is not None:
            self._current.step += 1
        self._current = None

    @property
    def active(self) -> bool:
        return self._current is not None

    @property
    def extras(self) -> dict:
        return self._current.extras

    @property
    def reusing(self) -> bool:
        return self._current is not None and self._current.reusing

    # Bare models only: reading the timestep costs one host-device sync per denoiser call. Pipelines
    # patched through accel.patch(pipe) mark call boundaries themselves and never read it.
    def _auto_branch(self, timestep) -> str:
        """No branch name: the i-th call with the same timestep is branch i; a timestep that does not
        decrease starts a new call."""
        if timestep is None:
            return "default"
        t = float(torch.as_tensor(timestep).flatten()[0])
        if self._auto_last_t is not None and t == self._auto_last_t:
            self._auto_index += 1
        else:
            if self._auto_last_t is not None and t > self._auto_last_t:
                self.begin_call()
            self._auto_index = 0
        self._auto_last_t = t
        return "default" if self._auto_index == 0 else f"branch{self._auto_index}"

    def _restarted(self, branch: str, step_index: int | None, timestep) -> bool:
        st = self._branches.get(branch)
        if st is None:
            return False
        if step_index is not None:
            return step_index < st.step
        if timestep is None:
            return False
        t = float(torch.as_tensor(timestep).flatten()[0])
        # Strictly larger: bf16 rounding can give two consecutive steps the same timestep.
        restarted = st.last_timestep is not None and t > st.last_timestep
        st.last_timestep = t
        return restarted

    # -- the decision ------------------------------------------------------------------------------

    def decide(self, signal_source: Sequence[torch.Tensor | None]) -> bool:
        """Called once per denoiser call after the head ran. Returns True to reuse the tail."""
        st = self._current
        assert st is not None, "decide() outside a denoiser call"
        cfg = self.config
        i = st.step
        signal_source = tuple(t.detach() for t in signal_source if t is not None)

        shape_changed = st.prev_signal_source is not None and any(
            a.shape != b.shape for a, b in zip(signal_source, st.prev_signal_source)
        )
        if st.prev_signal_source is not None and not shape_changed:
            st.pending_signals.append((i, DeviceScalar(relative_l1(signal_source, st.prev_signal_source))))
        st.prev_signal_source = signal_source
        self._read_pending(st, upto=i if cfg.decision == "current" else i - 1)

        reason = self._forced_reason(st, i, shape_changed)
        estimate = None
        if reason is None:
            predicted = self._predicted_change(st, i)
            if predicted is None:
                reason = "no change signal yet"
            else:
                ratio = st.forecast.error_per_change()
                estimate = ratio * predicted if ratio is not None else None
                if cfg.target is not None:
                    if estimate is None:
                        reason = "calibrating error estimate"
                    elif st.stats.estimated_error + estimate >= cfg.target * self._budget_fraction(i):
                        reason = "error budget"
                elif not predicted < cfg.threshold:
                    reason = "change above threshold"

        st.reusing = reason is None
        if st.reusing:
            st.consecutive += 1
            st.stats.reused.append(i)
            st.stats.estimated_error += estimate or 0.0
        else:
            st.stats.computed.append(i)
            st.stats.reasons[reason] = st.stats.reasons.get(reason, 0) + 1
        return st.reusing

    def _forced_reason(self, st: _Branch, i: int, shape_changed: bool) -> str | None:
        cfg = self.config
        n = self._num_steps
        if i < cfg.warmup_steps(n):
            return "warm-up"
        if n is not None and i >= n - cfg.cooldown_steps(n):
            return "final steps"
        if shape_changed:
            return "input shape changed"
        if not st.forecast.has_values():
            return "nothing cached"
        if st.consecutive >= cfg.max_consecutive:
            return "max consecutive reuses"
        return None

    def _predicted_change(self, st: _Branch, i: int) -> float | None:
        """Accumulated change from the last computed step to step i (step i's own change estimated by
        step i-1's in lagged mode)."""
        total = 0.0
        for j in range(st.last_computed + 1, i + 1):
            if j in st.signals:
                total += st.signals[j]
            elif j == i and (i - 1) in st.signals:
                total += st.signals[i - 1]
            else:
                return None
        return total

    def _budget_fraction(self, i: int) -> float:
        if self._num_steps is None:
            return 1.0
        return min(1.0, (i + 1) / self._num_steps)

    def _read_pending(self, st: _Branch, upto: int) -> None:
        keep = []
        for step, scalar in st.pending_signals:
            if step <= upto:
                st.signals[step] = scalar.get()
            else:
                keep.append((step, scalar))
        st.pending_signals = keep
        st.forecast.calibrate(st.signals)

    # -- the cached values -------------------------------------------------------------------------

    def cached(self) -> Values:
        """The forecast of the tail's contribution for the current (reused) step."""
        st = self._current
        return st.forecast.forecast(st.step)

    def store(self, values: Values, reference: Sequence[torch.Tensor | None]) -> None:
        """Record the tail's contribution at a computed step. `reference` is the full output that the
        contribution is part of, used to express the check's error relative to it."""
        st = self._current
        values = tuple(v.detach() if v is not None else None for v in values)
        st.forecast.update(st.step, values, reference, since=st.last_computed)
        st.last_computed = st.step
        st.consecutive = 0
