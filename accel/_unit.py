"""The contract between `accel.patch` and each accelerator, and the registry of accelerators.

An accelerator is one registration: `@register("keyword", ConfigClass, order=N)` on its
`install(ctx: PatchContext, config) -> Unit`. `patch` installs the registered units in `order` (weights
first, then attention, then caching, then pruning), and `unpatch` calls `Unit.remove()` in reverse order.
An installer that cannot serve this model raises `NotApplicable(reason)`: `patch` lists it as skipped when a
preset asked for it, and raises `NotApplicableError` when the user asked for it by keyword. Any other
exception undoes the units already installed and propagates.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from torch import nn

from .errors import AccelError

if TYPE_CHECKING:
    from .pipelines.base import Adapter
    from .report import Report


class NotApplicable(AccelError):
    """This accelerator does not apply to this model (the message says why); `patch` decides whether that
    is a skip or an error."""


@dataclass(frozen=True)
class Registration:
    """One accelerator as `patch` sees it."""

    keyword: str  # accel.patch(keyword=...), and the unit's name in reports
    config_class: type
    install: Callable[[PatchContext, Any], Unit]
    order: int  # install order; unpatch removes in reverse
    parse: Callable[[Any], Any] | None = None  # other values the keyword takes (e.g. a kernel name) -> config
    accepts: str = ""  # those other values, for error messages


_REGISTRY: dict[str, Registration] = {}


def register(
    keyword: str, config_class: type, *, order: int, parse: Callable[[Any], Any] | None = None, accepts: str = ""
):
    """Decorator for an accelerator's `install(ctx, config) -> Unit`: makes `accel.patch(keyword=config)` work."""

    def decorator(install: Callable[[PatchContext, Any], Unit]):
        for other in _REGISTRY.values():
            if other.keyword != keyword and (other.config_class is config_class or other.order == order):
                raise AccelError(f"accelerator {keyword!r} clashes with {other.keyword!r} (same config class or order)")
        _REGISTRY[keyword] = Registration(keyword, config_class, install, order, parse, accepts)
        return install

    return decorator


def registrations() -> list[Registration]:
    """Every registered accelerator, in install order."""
    return sorted(_REGISTRY.values(), key=lambda r: r.order)


def registration(keyword: str) -> Registration:
    try:
        return _REGISTRY[keyword]
    except KeyError:
        from .errors import ConfigTypeError

        raise ConfigTypeError(
            f"accel.patch got an unknown accelerator keyword {keyword!r}; known: {', '.join(_REGISTRY)}"
        ) from None


def unregister(keyword: str) -> None:
    """Remove a registration (for accelerators added at run time, e.g. in tests)."""
    _REGISTRY.pop(keyword, None)


class StepClock:
    """Which denoising step a pipeline call is at, without a host-device sync.

    Counts `scheduler.step` calls of the patched pipeline (every diffusers pipeline calls it once per
    denoising step, after the denoiser). `step` is None for a bare model, where no scheduler is seen.
    """

    def __init__(self, pipeline: Any | None, steps_hint: Callable[[], int | None]):
        self.pipeline = pipeline
        self._steps_hint = steps_hint
        self.step: int | None = None if pipeline is None else 0
        self._scheduler = None

    @property
    def num_steps(self) -> int | None:
        return self._steps_hint()

    @property
    def available(self) -> bool:
        return self.pipeline is not None

    def begin_call(self) -> None:
        if self.pipeline is None:
            return
        self.step = 0
        scheduler = getattr(self.pipeline, "scheduler", None)
        if scheduler is None or scheduler is self._scheduler:
            return
        self._unwrap()
        original = scheduler.step  # bound method; the instance attribute below shadows it

        # wraps: pipelines read `inspect.signature(scheduler.step)` to decide whether to pass `generator`
        # and `eta`; a bare (*args, **kwargs) would silently drop them and change seeded outputs.
        @functools.wraps(original)
        def step(*args, **kwargs):
            try:
                return original(*args, **kwargs)
            finally:
                self.step += 1

        scheduler.step = step
        self._scheduler = scheduler

    def end_call(self) -> None:
        self._unwrap()

    def _unwrap(self) -> None:
        if self._scheduler is not None:
            self._scheduler.__dict__.pop("step", None)
            self._scheduler = None


@dataclass
class PatchContext:
    """What an accelerator may look at when it installs itself."""

    adapter: Adapter
    model: nn.Module
    pipeline: Any | None  # the diffusers pipeline whose calls bracket denoising, if patched through one
    report: Report
    clock: StepClock
    steps_hint: Callable[[], int | None]
    shared: dict[str, Any] = field(default_factory=dict)  # objects units share (e.g. the attention router)

    def warn(self, message: str) -> None:
        """A warning found at install time: into the report, and shown once by `accel.patch`."""
        if message not in self.report.warnings:
            self.report.warnings.append(message)

    def warn_now(self, message: str) -> None:
        """A warning found during a call (a fallback, say): into the report and shown now, once."""
        if message not in self.report.warnings:
            self.report.warnings.append(message)
            warnings.warn(f"accel: {message}", stacklevel=4)


class Unit:
    """One installed accelerator. Subclasses override what they need."""

    name: str = "unit"  # set by `patch` to the registration's keyword

    def describe(self) -> str:
        """One line for the report's `applied` list."""
        return ""

    def check_removable(self) -> None:
        """Raise (saying why and what to do) if `remove` cannot restore the model; called for every unit
        before any is removed, so a refused unpatch changes nothing."""

    def remove(self) -> None:
        """Undo everything `install` did; the model then computes exactly what it did before."""

    def begin_call(self) -> None:
        """A patched pipeline call starts."""

    def end_call(self) -> None:
        """A patched pipeline call ended (also after an exception)."""

    def update_report(self, report: Report) -> None:
        """Copy statistics gathered during calls into the report (called by `handle.report()`)."""
