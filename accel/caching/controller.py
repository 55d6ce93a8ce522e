"""When to reuse: the decision logic of step caching, independent of any model.

A `CacheController` sees, for each denoiser call, the output of the cheap head (first blocks, or the
shallow UNet block) and says "compute" or "reuse". Its state is kept per CFG branch ("cond",
"uncond", or the batched pair) and is reset at the start of every pipeline call.

GPU syncs: the change signal is a scalar on the device. With `decision="lagged"` (default) the
decision for step i uses the change measured at step i-1, whose value was copied to pinned host memory
asynchronously a whole step earlier, so reading it does not stall the GPU queue. `decision="current"`
reads this step's signal and so syncs once per step.

CFG branches share one schedule: the first branch to reach a step decides it for all (guidance,
uncond + scale * (cond - uncond), would amplify the difference between forecasts made at different distances).
A reused step gets a forecast (`accel.caching.forecast`) of the order `_choose_order` picks from every order's
estimated error at that step; with a `target`, that estimate also decides whether to reuse.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from . import distributed
from .config import CacheConfig
from .forecast import DeviceScalar, ErrorModel, TaylorForecast, Values, sample

MAX_CALLS_KEPT = 100  # per-call statistics of a long-running server stay bounded
PREFERRED_ORDER = 1
SWITCH_MARGIN = 1.5
ROUGH = 0.15  # relative L1 error of an order-1 forecast beyond which it falls back to plain reuse
ASSUMED_STEPS = 20  # a target's allowance per run when the step count is unknown (a bare model)


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
        self.taylor_order = taylor_order
        self.forecast = TaylorForecast(taylor_order)
        self.errors = ErrorModel(taylor_order)
        self.order = 0  # of this step's forecast
        self.run_error = 0.0  # estimated error of the reused steps since the last computed one
        self.last_computed = -1
        self.consecutive = 0
        self.reusing = False
        self.last_timestep: float | None = None
        self.extras: dict = {}  # hooks' own per-branch cache (e.g. outputs of skipped UNet blocks)
        self.stats = BranchStats()


def _choose_order(estimates: list[float | None], orders: int) -> int:
    """The order a reuse forecasts with. Order 1 (the line through the last two computed steps) once two are stored:
    besides its single-step error, which the estimates rank, it keeps up with the trajectory's drift, which a
    repeated value (order 0) lags further behind at every reused step; on the reference models preferring it beat
    picking the lowest estimate. Another order where its estimate is SWITCH_MARGIN times lower; order 0 where order
    1 is estimated to miss by ROUGH or more: the trajectory is not smooth there, a line overshoots, a repeated value
    stays bounded (random weights; the first steps of trained models)."""
    preferred = min(PREFERRED_ORDER, orders - 1) if orders else 0
    known = sorted((e, k) for k, e in enumerate(estimates) if e is not None)
    if not known:
        return preferred
    if preferred >= len(estimates) or estimates[preferred] is None:
        return known[0][1]
    if estimates[preferred] >= ROUGH:
        return 0
    best_estimate, best = known[0]
    return best if best_estimate * SWITCH_MARGIN < estimates[preferred] else preferred


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
        self._decided: dict[int, tuple[_Branch, bool, int]] = {}  # step -> (the branch that decided it, reuse, order)

    # -- call and branch boundaries -------------------------------------------------------------

    def begin_call(self) -> None:
        """A new pipeline call: forget every branch's state."""
        self._branches = {}
        self._num_steps = None
        self._auto_last_t = None
        self._auto_index = 0
        self._decided = {}
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
        i = st.step
        signal_source = tuple(t.detach() for t in signal_source if t is not None)
        shape_changed = st.prev_signal_source is not None and any(
            a.shape != b.shape for a, b in zip(signal_source, st.prev_signal_source)
        )
        if shape_changed:  # values stored at the old shape cannot be extrapolated to the new one
            st.forecast = TaylorForecast(st.taylor_order)
            st.errors.restart()
        elif st.prev_signal_source is not None:
            st.pending_signals.append((i, DeviceScalar(relative_l1(signal_source, st.prev_signal_source))))
        st.prev_signal_source = signal_source
        head = sample(signal_source)
        st.errors.check_head(i, head)
        self._read_pending(st, upto=i if self.config.decision == "current" else i - 1)

        reason = self._forced_reason(st, i, shape_changed)
        estimates = st.errors.estimates(i, st.forecast.orders())
        decider, reuse, order = self._decided.setdefault(i, (st, False, _choose_order(estimates, st.forecast.orders())))
        # the deciding branch's order too: guidance combines the branches' forecasts, so they are made alike
        st.order = max(0, min(order, st.forecast.orders() - 1))
        known = st.order < len(estimates) and estimates[st.order] is not None
        estimate = estimates[st.order] * self._noise_left(i) if known else None
        if decider is st:
            reason = reason or self._reason(st, i, estimate)
            self._decided[i] = (st, reason is None, st.order)
        elif reason is None and not reuse:
            reason = "computed with another branch"

        st.reusing = reason is None
        if st.reusing:
            st.consecutive += 1
            st.stats.reused.append(i)
            st.run_error += estimate or 0.0
            st.stats.estimated_error += estimate or 0.0
        else:
            st.stats.computed.append(i)
            st.stats.reasons[reason] = st.stats.reasons.get(reason, 0) + 1
            st.errors.computed(i, head)
        return st.reusing

    def _reason(self, st: _Branch, i: int, estimate: float | None) -> str | None:
        """Why the deciding branch computes step i; None: it reuses."""
        cfg = self.config
        if cfg.target is not None:
            if estimate is None:
                return "calibrating error estimate"
            allowance = cfg.target / (self._num_steps or ASSUMED_STEPS)
            return None if st.run_error + estimate < allowance else "error budget"
        predicted = self._predicted_change(st, i)
        if predicted is None:
            return "no change signal yet"
        return None if predicted < cfg.threshold else "change above threshold"

    def _noise_left(self, i: int) -> float:
        """1 - i/num_steps, a stand-in for the noise level: the same relative error of the denoiser's prediction
        moves the predicted clean sample in proportion to the noise (x0 = x - sigma * v), so late errors cost less."""
        return 1.0 - i / self._num_steps if self._num_steps else 1.0

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

    def _read_pending(self, st: _Branch, upto: int) -> None:
        keep = []
        for step, scalar in st.pending_signals:
            if step <= upto:
                st.signals[step] = scalar.get()
            else:
                keep.append((step, scalar))
        st.pending_signals = keep
        st.errors.read(upto)

    # -- the cached values -------------------------------------------------------------------------

    def cached(self) -> Values:
        """The forecast of the cached values for the current (reused) step."""
        st = self._current
        return st.forecast.forecast(st.step, st.order)

    def store(self, values: Values, reference: Sequence[torch.Tensor | None]) -> None:
        """Record the cached values at a computed step. `reference` is the full output they are part of: the check
        of their forecasts at this step measures the error relative to it."""
        st = self._current
        values = tuple(v.detach() if v is not None else None for v in values)
        if st.forecast.has_values():
            st.errors.check_values(st.step, st.forecast.errors(st.step, values, reference))
        st.forecast.update(st.step, values)
        st.last_computed = st.step
        st.consecutive = 0
        st.run_error = 0.0
