"""`accel.patch` and `accel.unpatch`."""

from __future__ import annotations

import functools
import warnings
from typing import Any

from torch import nn

from . import parallel
from ._unit import NotApplicable, PatchContext, StepClock, Unit, registration, registrations
from ._versions import check_versions
from .errors import (
    AlreadyPatchedError,
    ConfigTypeError,
    CopyError,
    NotApplicableError,
    NotPatchedError,
    UnsupportedModelError,
)
from .pipelines import find_adapter
from .presets import preset_configs
from .report import Applied, Report, Skipped

# The handle lives on the patched objects themselves (the user's pipeline or model, and the denoiser inside
# it), not in a global table, so dropping the last reference to a patched object frees it and its memory.
_HANDLE_ATTR = "_accel_handle"
# Copying or pickling a patched object would copy hooks bound to the original (a deep copy would run the
# original's weights), so both are refused on the patched objects until `unpatch`.
_GUARDS = ("__deepcopy__", "__reduce_ex__", "enable_parallelism")

_DENOISER_COMPONENTS = ("transformer", "unet")


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
        self._saved_guards: list[tuple[Any, dict]] = []  # (object, its own attributes accel shadowed)
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
    **accelerators: Any,
) -> Handle:
    """Accelerate a diffusers pipeline, a diffusers denoiser, or a transformers VLM (model or pipeline).

    `preset` picks defaults ("lossless", "balanced", "fast"); each keyword overrides one accelerator:
    `cache=CacheConfig(...)`, `attention="int8"|"sdpa"|"flash"|"xformers"|AttentionConfig(...)`,
    `sparse=SparseConfig(...)`, `prune=PruneConfig(...)`, `quant=QuantConfig(...)`, and any accelerator
    registered with `accel._unit.register`; `False` turns one off, `True` asks for its defaults. An
    accelerator asked for by keyword that cannot serve this model raises NotApplicableError; one the
    preset asked for is skipped, with the reason in the report. Patching something already patched raises
    AlreadyPatchedError: call `accel.unpatch` first. Unsupported models raise UnsupportedModelError, or
    with `strict=False` warn and stay unchanged (an accelerator that does not support this model's layout:
    that one is skipped with a warning).
    """
    overrides = {"cache": cache, "attention": attention, "sparse": sparse, "prune": prune, "quant": quant}
    overrides.update(accelerators)
    configs, explicit = _requested_configs(preset, overrides)
    model, pipeline = _resolve_unpatched(target)
    handle = Handle(target, model, preset)
    report = handle._report
    report.warnings.extend(check_versions())
    try:
        adapter = find_adapter(model)
    except UnsupportedModelError as err:
        if strict:
            raise
        warnings.warn(f"{err} Nothing was patched.", stacklevel=2)
        report.warnings.append(str(err))
        report.skipped.append(Skipped("all", f"unsupported model {type(model).__name__}"))
        _attach(handle)  # so that unpatch works the same way
        return handle
    parallel.check_model(model)
    handle.adapter = adapter
    report.family = adapter.family
    steps_hint = _steps_hint(pipeline)
    handle.clock = StepClock(pipeline, steps_hint)
    ctx = PatchContext(adapter, model, pipeline, report, handle.clock, steps_hint)
    _install_units(handle, ctx, configs, explicit, strict)
    if pipeline is not None:
        _wrap_pipeline_call(pipeline, handle)
    _attach(handle)
    for message in report.warnings:
        warnings.warn(f"accel: {message}", stacklevel=2)
    return handle


def _requested_configs(preset: str, overrides: dict[str, Any]) -> tuple[dict[str, Any], set[str]]:
    """(config by accelerator keyword, the keywords the caller set): the preset's configs with the keywords
    that are not None applied over them."""
    configs = preset_configs(preset)
    explicit = set()
    for name, value in overrides.items():
        if value is None:
            continue
        explicit.add(name)
        configs[name] = keyword_config(name, value, configs.get(name))
    return configs, explicit


def _resolve_unpatched(target: Any) -> tuple[nn.Module, Any | None]:
    """`_resolve(target)`, after checking that neither `target` nor the model inside it is patched already."""
    existing = _handle_of(target)
    if existing is not None and existing.target is target:
        raise AlreadyPatchedError(
            f"{type(target).__name__} is already patched by accel; call accel.unpatch(...) on it before patching again"
        )
    model, pipeline = _resolve(target)
    existing = _handle_of(model) or existing
    if existing is not None:
        raise AlreadyPatchedError(
            f"{type(model).__name__} is already patched by accel through {_describe_target(existing)}; "
            f"call accel.unpatch on that object, or on the {type(model).__name__} itself, before patching again"
        )
    return model, pipeline


def _install_units(
    handle: Handle, ctx: PatchContext, configs: dict[str, Any], explicit: set[str], strict: bool
) -> None:
    """Install every registered accelerator that has a config, in registration order, onto `handle`. One the
    caller asked for by keyword that cannot apply raises NotApplicableError; one from the preset is skipped.
    On any error the units installed so far are removed again."""
    report, model_name = handle._report, type(handle.model).__name__
    try:
        for registered in registrations():
            name = registered.keyword
            config = configs.get(name)
            if config is None:
                why = f"{name}=False" if name in explicit else f"off in preset {handle.preset!r}"
                report.skipped.append(Skipped(name, why))
                continue
            try:
                if (reason := parallel.refusal(ctx.model, name, ctx.adapter)) is not None:
                    raise NotApplicable(reason)
                unit = registered.install(ctx, config)
            except NotApplicable as reason:
                if name in explicit:
                    raise NotApplicableError(
                        f"accel.patch({name}=...) cannot apply to {model_name}: {reason}"
                    ) from None
                report.skipped.append(Skipped(name, str(reason)))
                continue
            except UnsupportedModelError as err:  # e.g. a model layout this accelerator does not know
                if strict:
                    raise
                report.warnings.append(f"{name}: {err}")
                report.skipped.append(Skipped(name, f"unsupported: {err}"))
                continue
            unit.name = name
            handle.units.append(unit)
            report.applied.append(Applied(name, model_name, unit.describe()))
    except BaseException:
        for unit in reversed(handle.units):
            unit.remove()
        raise


def unpatch(target: Any) -> None:
    """Remove everything accel installed on `target` (the object given to `accel.patch`, or the denoiser or
    model inside it); its outputs are then bit-identical to before."""
    handle = _handle_of(target)
    if handle is None:
        raise NotPatchedError(
            f"{type(target).__name__} is not patched by accel; accel.unpatch takes the object given to "
            "accel.patch (or the denoiser / model inside it)"
        )
    for unit in handle.units:
        unit.check_removable()
    for unit in reversed(handle.units):
        unit.remove()
    handle.units.clear()
    if handle.clock is not None:
        handle.clock.end_call()
    if handle._pipeline_class is not None:
        handle.target.__class__ = handle._pipeline_class
    _detach(handle)


def get_handle(target: Any) -> Handle | None:
    """The handle of the patch that covers `target` (the patched object or the model inside it), or None."""
    return _handle_of(target)


def keyword_config(name: str, value: Any, preset_config: Any = None) -> Any:
    """The config `accel.patch(name=value)` asks for (None: off). Takes True (the preset's config, else the
    defaults), False, the accelerator's config, or what its registration parses (attention: a kernel name)."""
    registered = registration(name)
    if value is False:
        return None
    if value is True:
        return preset_config or registered.config_class()
    if registered.parse is not None:
        value = registered.parse(value)
    if isinstance(value, registered.config_class):
        return value
    also = f" or {registered.accepts}" if registered.accepts else ""
    raise ConfigTypeError(
        f"accel.patch({name}=...) takes a {registered.config_class.__name__}{also}, True (its defaults) or False "
        f"(off); got {type(value).__name__} {value!r}"
    )


def _handle_of(obj: Any) -> Handle | None:
    try:
        return vars(obj).get(_HANDLE_ATTR)
    except TypeError:  # no __dict__: an int, a string, ...
        return None


def _describe_target(handle: Handle) -> str:
    if handle.target is handle.model:
        return "accel.patch on the model itself"
    return f"the {type(handle.target).__name__} that holds it"


def _attach(handle: Handle) -> None:
    for obj in dict.fromkeys((handle.target, handle.model)):  # the same object once
        saved = {key: obj.__dict__[key] for key in _GUARDS if key in obj.__dict__}
        handle._saved_guards.append((obj, saved))
        name = type(obj).__name__
        obj.__dict__["__deepcopy__"] = functools.partial(_refuse_copy, name)
        obj.__dict__["__reduce_ex__"] = functools.partial(_refuse_pickle, name)
        if hasattr(obj, "enable_parallelism"):  # enabled after patching, it would wrap accel's hooks (accel.parallel)
            obj.__dict__["enable_parallelism"] = functools.partial(parallel.refuse_enable_parallelism, name)
        obj.__dict__[_HANDLE_ATTR] = handle


def _detach(handle: Handle) -> None:
    for obj, saved in handle._saved_guards:
        for key in (*_GUARDS, _HANDLE_ATTR):
            obj.__dict__.pop(key, None)
        obj.__dict__.update(saved)
    handle._saved_guards.clear()


def _refuse_copy(name: str, memo: Any = None):
    raise CopyError(
        f"copy.deepcopy of a {name} patched by accel is not supported: the copy would share accel's hooks with "
        f"the original and run the original's weights. Copy it before patching, or accel.unpatch it, copy, and "
        f"accel.patch each copy"
    )


def _refuse_pickle(name: str, protocol: Any = None):
    raise CopyError(
        f"pickling a {name} patched by accel (pickle, torch.save) is not supported: accel's hooks are bound to "
        f"this instance. Save the weights instead (save_pretrained, or state_dict(); for 4-bit weights "
        f"accel.quant.save_quantized), or accel.unpatch first, then patch again after loading"
    )


def resolve_target(target: Any) -> nn.Module:
    """The model `accel.patch(target)` would patch: the denoiser of a diffusers pipeline, the model of a
    transformers pipeline, or `target` itself (unwrapped from torch.compile). UnsupportedModelError otherwise."""
    return _resolve(target)[0]


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
        raise UnsupportedModelError(f"{type(target).__name__} has no transformer or unet component for accel to patch")
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
            patched = _handle_of(self)
            if patched is None or patched.target is not self:
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
