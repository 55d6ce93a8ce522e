"""`accel.patch` and `accel.unpatch`."""

from __future__ import annotations

import warnings
import weakref
from typing import Any

from torch import nn

from .caching import CacheConfig, build_cache
from .errors import AlreadyPatchedError, NotPatchedError, UnsupportedModelError
from .pipelines import find_adapter
from .presets import preset_configs
from .report import Applied, Report, Skipped

# Handles by patched object (the user's pipeline or model, and the denoiser inside it). Nothing is
# stored on the user's objects except the hooks themselves.
_HANDLES: "weakref.WeakKeyDictionary[Any, Handle]" = weakref.WeakKeyDictionary()

_DENOISER_COMPONENTS = ("transformer", "unet")


class Handle:
    """What `accel.patch` returns: the report, and the way back (`unpatch`)."""

    def __init__(self, target: Any, model: nn.Module, preset: str):
        self.target = target
        self.model = model
        self.preset = preset
        self.adapter = None
        self.cache = None
        self._pipeline_class: type | None = None
        self._report = Report(model=type(model).__name__, family=None, preset=preset)

    def report(self) -> Report:
        if self.cache is not None:
            self._report.calls = list(self.cache.controller.calls)
        return self._report

    def __str__(self) -> str:
        return str(self.report())

    __repr__ = __str__

    def unpatch(self) -> None:
        unpatch(self.target)

    # Called by the patched pipeline's __call__.
    def _begin_call(self) -> None:
        if self.cache is not None:
            self.cache.controller.begin_call()
            self.cache.call_hook.managed = True

    def _end_call(self) -> None:
        if self.cache is not None:
            self.cache.controller.end_call()
            self.cache.call_hook.managed = False


def patch(
    target: Any,
    preset: str = "balanced",
    *,
    strict: bool = True,
    cache: CacheConfig | bool | None = None,
) -> Handle:
    """Accelerate a diffusers pipeline, a diffusers denoiser, or a transformers VLM (model or pipeline).

    `preset` picks defaults ("lossless", "balanced", "fast"); `cache=CacheConfig(...)` overrides the step
    cache, `cache=False` turns it off. Patching something already patched raises AlreadyPatchedError: call
    `accel.unpatch` first. Unsupported models raise UnsupportedModelError, or with `strict=False` warn and
    stay unchanged.
    """
    configs = preset_configs(preset)
    if cache is not None:
        if cache is True:
            cache = configs["cache"] or CacheConfig()
        configs["cache"] = cache or None

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

    cache_config = configs["cache"]
    if cache_config is None:
        report.skipped.append(Skipped("cache", f"off in preset {preset!r}" if cache is None else "cache=False"))
    elif adapter.kind not in ("dit", "unet"):
        report.skipped.append(Skipped("cache", f"step caching applies to diffusion denoisers, not to {adapter.display_name}"))
    else:
        if getattr(model, "is_cache_enabled", False):
            raise AlreadyPatchedError(
                f"{type(model).__name__} has a diffusers cache enabled (enable_cache); call "
                "model.disable_cache() first, or pass cache=False to accel.patch"
            )
        handle.cache = build_cache(adapter, cache_config, _steps_hint(pipeline))
        handle.cache.hooks.install()
        report.applied.append(Applied("cache", type(model).__name__, handle.cache.describe()))
        if pipeline is None:
            report.warnings.append(
                "bare model: call boundaries are found from the timestep (one host-device sync per denoiser "
                "call), and final-step protection needs CacheConfig(num_steps=...); patch the pipeline to avoid both"
            )

    if pipeline is not None:
        _wrap_pipeline_call(pipeline, handle)
    _HANDLES[target] = handle
    _HANDLES[model] = handle
    return handle


def unpatch(target: Any) -> None:
    """Remove everything accel installed on `target`; its outputs are then bit-identical to before."""
    handle = _HANDLES.get(target)
    if handle is None or handle.target is not target:
        raise NotPatchedError(f"{type(target).__name__} is not patched by accel (pass the object you patched)")
    if handle.cache is not None:
        handle.cache.hooks.remove()
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
