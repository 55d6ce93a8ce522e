"""What to use on a reused step: a forecast of the cached values, independent of when to reuse.

A `Forecaster` keeps the values a cache stored at computed steps (the tail's residual, the deep UNet feature)
and predicts them for a reused step. It also checks itself: at every computed step it measures how far its
forecast would have been from the value just computed. `CacheController` only asks it for a forecast and for
that measured error per unit of change of the cheap signal, which prices a reuse.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Protocol

import torch

from . import distributed

Values = tuple[torch.Tensor | None, ...]


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


class Forecaster(Protocol):
    """The interface `CacheController` uses; one instance per CFG branch and pipeline call."""

    def has_values(self) -> bool:
        """Whether a computed step has been stored (nothing can be forecast before)."""

    def forecast(self, step: int) -> Values:
        """The values predicted for `step`, a reused step."""

    def update(self, step: int, values: Values, reference: Sequence[torch.Tensor | None], since: int) -> None:
        """Store the values computed at `step`; `since` is the previous computed step, `reference` the full output
        the values are part of (the self-check's error is relative to it)."""

    def calibrate(self, signals: dict[int, float]) -> None:
        """Relate the self-checks to the change signal, once `signals` (step -> change) covers their steps."""

    def error_per_change(self) -> float | None:
        """Recent forecast error per unit of accumulated change (None until calibrated)."""


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


class TaylorForecast:
    """Taylor-style forecast of order 0..`max_order` through the last computed steps. Each computed step checks
    every order's forecast of it; the order that has been closest lately forecasts (0 = plain reuse)."""

    def __init__(self, max_order: int):
        self.history: deque[tuple[int, Values]] = deque(maxlen=max_order + 1)
        # Per order: recent (forecast error / accumulated change) ratios from computed steps.
        self.ratios: list[deque[float]] = [deque(maxlen=3) for _ in range(max_order + 1)]
        # (previous computed step, step, forecast error of each order), until the change between them is known
        self.pending: list[tuple[int, int, list[DeviceScalar]]] = []

    def has_values(self) -> bool:
        return bool(self.history)

    def forecast(self, step: int) -> Values:
        order = min(self._best_order(), len(self.history) - 1)
        return extrapolate(list(self.history)[-(order + 1) :], step)

    def update(self, step: int, values: Values, reference: Sequence[torch.Tensor | None], since: int) -> None:
        if self.history:
            points = list(self.history)
            errors = []
            for order in range(len(points)):
                forecast = extrapolate(points[-(order + 1) :], step)
                diffs = [f - v for f, v in zip(forecast, values) if f is not None and v is not None]
                errors.append(DeviceScalar(_error(diffs, reference)))
            self.pending.append((since, step, errors))
        self.history.append((step, values))

    def calibrate(self, signals: dict[int, float]) -> None:
        waiting = []
        for prev, step, errors in self.pending:
            span = range(prev + 1, step + 1)
            if all(j in signals for j in span):
                change = sum(signals[j] for j in span)
                if change > 1e-8:
                    for order, error in enumerate(errors):
                        self.ratios[order].append(error.get() / change)
            else:
                waiting.append((prev, step, errors))
        self.pending = waiting

    def error_per_change(self) -> float | None:
        recent = self.ratios[self._best_order()]
        return max(recent) if recent else None

    def _best_order(self) -> int:
        """The order whose forecasts have been closest lately (lower order on ties or no data). Smooth
        trajectories favour order 1-2; noisy ones, plain reuse."""
        scored = [(sum(r) / len(r), order) for order, r in enumerate(self.ratios) if r]
        return min(scored)[1] if scored else 0


def _error(diffs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor | None]) -> torch.Tensor:
    num = sum(d.float().abs().sum() for d in diffs)
    den = sum(r.float().abs().sum() for r in reference if r is not None)
    return distributed.ratio(num, den)
