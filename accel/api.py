"""`accel.patch` and `accel.unpatch`."""

from __future__ import annotations

import importlib
import warnings
import weakref
from typing import Any

from torch import nn

from ._unit import NotApplicable, PatchContext, StepClock, Unit
from .errors import AlreadyPatchedError, NotPatchedError, UnsupportedModelError
from .pipelines import find_adapter
from .presets import default_config, preset_configs
from .report import Applied, Report, Skipped

# Handles by patched object (the user's pipeline or model, and the denoiser inside it). Nothing is
# stored on the user's objects except the hooks themselves.
_HANDLES: "weakref.WeakKeyDictionary[Any, Handle]" = weakref.WeakKeyDictionary()

_DENOISER_COMPONENTS = ("transformer", "unet")


# Accelerators in the order they are installed (unpatch removes them in reverse): weights first, then
# attention kernels, then step caching (which skips whole blocks), then visual token pruning.
_UNITS = (
    ("quant", "accel.quant"),
    ("attention", "accel.attention"),
    ("sparse", "accel.attention.sparse"),
    ("cache", "accel.caching"),
    ("prune", "accel.pruning"),
)


class Handle:
    """What `accel.patch` returns: the report, and the way back (`unpatch`)."""

    def __init__(self, target: Any, model: nn.Module, preset: str):
        self.target = target
        self.model = model
        self.preset = preset
        self.adapter = None
        self.units: list[Unit] = []
        self.clock: StepClock | None = None
        self._pipeline_class: type | None = None
        self._report = Report(model=type(model).__name__, family=None, preset=preset)

    def unit(self, name: str) -> Unit | None:
        """The installed accelerator called `name` ("cache", "attention", ...), or None."""
        return next((u for u in self.units if u.name == name), None)

    def report(self) -> Report:
        for unit in self.units:
            unit.update_report(self._report)
        return self._report

    def __str__(self) -> str:
        return str(self.report())

    __repr__ = __str__

    def unpatch(self) -> None:
        unpatch(self.target)

    # Called by the patched pipeline's __call__.
    def _begin_call(self) -> None:
        if self.clock is not None:
            self.clock.begin_call()
        for unit in self.units:
            unit.begin_call()

    def _end_call(self) -> None:
        for unit in reversed(self.units):
            unit.end_call()
        if self.clock is not None:
            self.clock.end_call()


def patch(
    target: Any,
    preset: str = "balanced",
    *,
    strict: bool = True,
    cache: Any = None,
    attention: Any = None,
    sparse: Any = None,
    prune: Any = None,
    quant: Any = None,
) -> Handle:
    """Accelerate a diffusers pipeline, a diffusers denoiser, or a transformers VLM (model or pipeline).

    `preset` picks defaults ("lossless", "balanced", "fast"); each keyword overrides one accelerator:
    `cache=CacheConfig(...)`, `attention="int8"|"sdpa"|"flash"|"xformers"|AttentionConfig(...)`,
    `sparse=SparseConfig(...)`, `prune=PruneConfig(...)`, `quant=QuantConfig(...)`; `False` turns one
    off, `True` asks for its defaults. Patching something already patched raises AlreadyPatchedError:
    call `accel.unpatch` first. Unsupported models raise UnsupportedModelError, or with `strict=False`
    warn and stay unchanged (an accelerator that does not support this model's layout: that one is
    skipped with a warning).
    """
    configs = preset_configs(preset)
    overrides = {"cache": cache, "attention": attention, "sparse": sparse, "prune": prune, "quant": quant}
    explicit = set()
    for name, value in overrides.items():
        if value is None:
            continue
        explicit.add(name)
        if value is True:
            value = configs.get(name) or default_config(name)
        configs[name] = value or None

    if target in _HANDLES:
        raise AlreadyPatchedError(
            f"{type(target).__name__} is already patched by accel; call accel.unpatch(...) before patching again"
        )
    model, pipeline = _resolve(target)
    if model in _HANDLES:
        raise AlreadyPatchedError(
            f"{type(model).__name__} is already patched by accel (through another object); call accel.unpatch first"
        )
    handle = Handle(target, model, preset)
    report = handle._report
    try:
        adapter = find_adapter(model)
    except UnsupportedModelError as err:
        if strict:
            raise
        warnings.warn(f"{err} Nothing was patched.", stacklevel=2)
        report.warnings.append(str(err))
        report.skipped.append(Skipped("all", f"unsupported model {type(model).__name__}"))
        _HANDLES[target] = _HANDLES[model] = handle  # so that unpatch works the same way
        return handle
    handle.adapter = adapter
    report.family = adapter.family
    steps_hint = _steps_hint(pipeline)
    handle.clock = StepClock(pipeline, steps_hint)
    ctx = PatchContext(adapter, model, pipeline, report, handle.clock, steps_hint, explicit)

    try:
        for name, module_path in _UNITS:
            config = configs.get(name)
            if config is None:
                why = f"{name}=False" if name in explicit else f"off in preset {preset!r}"
                report.skipped.append(Skipped(name, why))
                continue
            try:
                unit = importlib.import_module(module_path).install(ctx, config)
            except NotApplicable as reason:
                report.skipped.append(Skipped(name, str(reason)))
                continue
            except UnsupportedModelError as err:  # e.g. a model layout this accelerator does not know
                if strict:
                    raise
                report.warnings.append(f"{name}: {err}")
                report.skipped.append(Skipped(name, f"unsupported: {err}"))
                continue
            handle.units.append(unit)
            report.applied.append(Applied(name, type(model).__name__, unit.describe()))
    except BaseException:
        for unit in reversed(handle.units):
            unit.remove()
        raise

    if pipeline is not None:
        _wrap_pipeline_call(pipeline, handle)
    _HANDLES[target] = handle
    _HANDLES[model] = handle
    for message in report.warnings:
        warnings.warn(f"accel: {message}", stacklevel=2)
    return handle


def unpatch(target: Any) -> None:
    """Remove everything accel installed on `target`; its outputs are then bit-identical to before."""
    handle = _HANDLES.get(target)
    if handle is None or handle.target is not target:
        raise NotPatchedError(f"{type(target).__name__} is not patched by accel (pass the object you patched)")
    for unit in handle.units:
        unit.check_removable()
    for unit in reversed(handle.units):
        unit.remove()
    handle.units.clear()
    if handle.clock is not None:
        handle.clock.end_call()
    if handle._pipeline_class is not None:
        handle.target.__class__ = handle._pipeline_class
    del _HANDLES[handle.target]
    _HANDLES.pop(handle.model, None)


def get_handle(target: Any) -> Handle | None:
    return _HANDLES.get(target)


def _resolve(target: Any) -> tuple[nn.Module, Any | None]:
    """(the model to patch, the pipeline whose calls bracket denoising, if any)."""
    try:
        from diffusers import DiffusionPipeline
    except ImportError:  # pragma: no cover - diffusers is a dependency
        DiffusionPipeline = ()
    if isinstance(target, DiffusionPipeline):
        for name in _DENOISER_COMPONENTS:
            model = getattr(target, name, None)
            if isinstance(model, nn.Module):
                return _unwrap_compiled(model), target
        raise UnsupportedModelError(
            f"{type(target).__name__} has no transformer or unet component for accel to patch"
        )
    model = getattr(target, "model", None)
    if not isinstance(target, nn.Module) and isinstance(model, nn.Module):
        return _unwrap_compiled(model), None  # a transformers pipeline
    if isinstance(target, nn.Module):
        return _unwrap_compiled(target), None
    raise UnsupportedModelError(
        f"accel.patch takes a diffusers pipeline, a diffusers model or a transformers model/pipeline, "
        f"got {type(target).__name__}"
    )


def _unwrap_compiled(model: nn.Module) -> nn.Module:
    # torch.compile(model) returns a wrapper; the hooks go on the module it compiles.
    return getattr(model, "_orig_mod", model)


def _steps_hint(pipeline: Any):
    def hint() -> int | None:
        if pipeline is None:
            return None
        num = getattr(pipeline, "_num_timesteps", None)  # set by most pipelines just before the loop
        if isinstance(num, int):
            return num
        timesteps = getattr(getattr(pipeline, "scheduler", None), "timesteps", None)
        return len(timesteps) if timesteps is not None else None

    return hint


_WRAPPED_CLASSES: dict[type, type] = {}


def _wrap_pipeline_call(pipeline: Any, handle: Handle) -> None:
    """Give this one pipeline instance a subclass whose __call__ marks call boundaries (state reset and
    per-call statistics). unpatch puts the original class back."""
    original = type(pipeline)
    wrapped = _WRAPPED_CLASSES.get(original)
    if wrapped is None:

        def __call__(self, *args, **kwargs):
            patched = _HANDLES.get(self)
            if patched is None:
                return original.__call__(self, *args, **kwargs)
            patched._begin_call()
            try:
                return original.__call__(self, *args, **kwargs)
            finally:
                patched._end_call()

        wrapped = type(original.__name__, (original,), {"__call__": __call__, "__module__": original.__module__})
        _WRAPPED_CLASSES[original] = wrapped
    handle._pipeline_class = original
    pipeline.__class__ = wrapped
