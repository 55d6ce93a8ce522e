"""What to use on a reused step, and how wrong it would be: Taylor forecasts of the cached values and their estimated
error, independent of when to reuse.

`TaylorForecast` keeps values stored at computed steps (the denoiser's output, the tail's residual, the deep UNet
feature) and extrapolates them to a reused step. `ErrorModel` prices a reuse without running the expensive part: the
head (the cheap blocks that run every step) is forecast the same way, from its values at the same computed steps, and
its forecast error is measured at every step; at computed steps the cached values' own forecast error is measured too,
and the ratio of the two calibrates the head's error to the cached values'. `CacheController` asks it for every
order's estimate and decides.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence

import torch

from . import distributed

Values = tuple[torch.Tensor | None, ...]
SAMPLED = 1 << 20  # elements of the head kept per stored step (a strided sample of a larger head)


class DeviceScalar:
    """A 0-d tensor whose value is fetched to the host without blocking the device queue."""

    def __init__(self, value: torch.Tensor):
        value = value.detach().float()
        if value.is_cuda:
            self._host = torch.empty((), dtype=torch.float32, pin_memory=True)
            self._host.copy_(value, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host = value
            self._event = None

    def get(self) -> float:
        if self._event is not None:
            self._event.synchronize()  # usually long done: recorded a step ago
        return float(self._host)


def extrapolate(points: Sequence[tuple[int, Values]], x: int) -> Values:
    """Lagrange extrapolation through (step, values) points to step `x` (Taylor-style forecast)."""
    if len(points) == 1:
        return points[0][1]
    xs = [p[0] for p in points]
    weights = []
    for k, xk in enumerate(xs):
        w = 1.0
        for j, xj in enumerate(xs):
            if j != k:
                w *= (x - xj) / (xk - xj)
        weights.append(w)
    out = []
    for slot in range(len(points[0][1])):
        tensors = [p[1][slot] for p in points]
        if any(t is None for t in tensors):
            out.append(tensors[-1])
            continue
        acc = tensors[0] * weights[0]
        for t, w in zip(tensors[1:], weights[1:]):
            acc = acc + t * w
        out.append(acc)
    return tuple(out)


def spread(xs: Sequence[int], x: int) -> float:
    """prod |x - x_j| over a forecast's points: the error of an order-k extrapolation of a smooth trajectory grows in
    proportion to it (the Lagrange remainder), which carries an error measured at one step to another."""
    out = 1.0
    for xj in xs:
        out *= abs(x - xj)
    return out


def forecast_error(forecast: Values, values: Values, reference: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """sum |forecast - values| / sum |reference| (0-d float32, on the values' device): the error relative to the
    output the values are part of."""
    num = sum((f.float() - v.float()).abs().sum() for f, v in zip(forecast, values) if f is not None and v is not None)
    den = sum(r.float().abs().sum() for r in reference if r is not None)
    return distributed.ratio(num, den)


class TaylorForecast:
    """Values stored at computed steps and their Taylor-style forecasts of order 0..`max_order` (0: the last value
    again, 1: the line through the last two, ...)."""

    def __init__(self, max_order: int):
        self.history: deque[tuple[int, Values]] = deque(maxlen=max_order + 1)

    def has_values(self) -> bool:
        return bool(self.history)

    def orders(self) -> int:
        """How many orders the stored values allow (0 before the first store)."""
        return len(self.history)

    def forecast(self, step: int, order: int) -> Values:
        return extrapolate(list(self.history)[-(min(order, len(self.history) - 1) + 1) :], step)

    def spread(self, step: int, order: int) -> float:
        return spread([s for s, _ in list(self.history)[-(order + 1) :]], step)

    def errors(self, step: int, values: Values, reference: Values) -> list[torch.Tensor]:
        """Per order: the relative error of its forecast of `values` at `step` (relative to `reference`)."""
        return [forecast_error(self.forecast(step, order), values, reference) for order in range(self.orders())]

    def update(self, step: int, values: Values) -> None:
        self.history.append((step, values))


def sample(values: Values) -> Values:
    """The head as the error model keeps it: a strided sample of at most SAMPLED elements per tensor (a copy, so
    that the full tensor is not kept alive). Its relative errors estimate the full tensor's."""
    out = []
    for t in values:
        if t is None or t.numel() <= SAMPLED:
            out.append(t)
        else:
            out.append(t.reshape(-1)[:: -(-t.numel() // SAMPLED)].clone())
    return tuple(out)


class ErrorModel:
    """Estimates, per order, the relative error of forecasting the cached values at a step, before deciding.

    At every step the head's own forecast (same orders, same computed steps) is checked against the head just
    computed; at computed steps the cached values' forecast is checked too. The latest ratio of the two calibrates a
    head error to a cached-value error, and the spread carries the latest head check to the step asked about (a lagged
    decision reads the previous step's check: its value was copied to the host asynchronously a step earlier)."""

    def __init__(self, max_order: int):
        self.max_order = max_order
        self.head = TaylorForecast(max_order)
        self.ratios: list[float | None] = [None] * (max_order + 1)  # per order, from the latest computed step
        self.head_errors: dict[int, list[float]] = {}  # step -> per order, once read
        self.latest: list[float] = []  # per order: the latest head check's error / its spread
        self._head_pending: list[tuple[int, list[DeviceScalar], list[float]]] = []
        self._value_pending: list[tuple[int, list[DeviceScalar]]] = []

    def restart(self) -> None:
        """The head's shape changed: its stored values cannot be extrapolated any more (the ratios stay)."""
        self.head = TaylorForecast(self.max_order)
        self.latest = []

    def check_head(self, step: int, head: Values) -> None:
        """Every step, before the decision: check each order's head forecast against the head just computed."""
        if self.head.has_values():
            errors = [DeviceScalar(e) for e in self.head.errors(step, head, head)]
            self._head_pending.append((step, errors, [self.head.spread(step, k) for k in range(len(errors))]))

    def computed(self, step: int, head: Values) -> None:
        """Step `step` is computed: its head becomes a point of the head's forecasts."""
        self.head.update(step, head)

    def check_values(self, step: int, errors: list[torch.Tensor]) -> None:
        """A computed step's check of the cached values' forecasts (per order)."""
        self._value_pending.append((step, [DeviceScalar(e) for e in errors]))

    def read(self, upto: int) -> None:
        """Fetch the checks of steps up to `upto` and calibrate."""
        waiting = []
        for step, errors, spreads in self._head_pending:
            if step > upto:
                waiting.append((step, errors, spreads))
                continue
            self.head_errors[step] = [e.get() for e in errors]
            self.latest = [e / max(s, 1e-12) for e, s in zip(self.head_errors[step], spreads)]
        self._head_pending = waiting
        waiting = []
        for step, errors in self._value_pending:
            if step > upto:
                waiting.append((step, errors))
                continue
            for order, (error, head) in enumerate(zip([e.get() for e in errors], self.head_errors.get(step, []))):
                # both exact (a line forecast at order 1): 1, as uninformative as it gets
                self.ratios[order] = (error + 1e-8) / (head + 1e-8)
        self._value_pending = waiting

    def estimates(self, step: int, orders: int) -> list[float | None]:
        """Per order below `orders` (what the cached values allow): the estimated error of a forecast of `step`, the
        latest ratio times the latest head check carried to `step`; None while uncalibrated. (The latest ratio:
        ratios drift along the trajectory, and on the reference models the latest one estimates best.)"""
        out: list[float | None] = []
        for order in range(orders):
            ratio = self.ratios[order]
            known = ratio is not None and order < len(self.latest) and order < self.head.orders()
            out.append(ratio * self.latest[order] * self.head.spread(step, order) if known else None)
        return out
