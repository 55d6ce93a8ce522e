"""Quantizing a model: which layers, swapping them for `W4Linear`, and putting the originals back."""

from __future__ import annotations

import fnmatch
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import _triton
from ..errors import AccelError, ConfigError, IrreversibleError, ModelStateError, QuantSaveError
from . import kernels
from .calibrate import calibrate
from .config import QuantConfig
from .layer import W4Linear
from .recipe import quantize_weight

# Adapter layers of PEFT/diffusers LoRA: tiny, and trained to sit beside a 16-bit base layer.
_ALWAYS_EXCLUDED = ("*.lora_A.*", "*.lora_B.*", "*.lora_A", "*.lora_B")


class NothingToQuantize(AccelError, ValueError):
    """Every linear layer of the model is excluded or too small."""


class _RefuseSave:
    """Stands in for `save_pretrained` on an object holding 4-bit layers (an instance attribute, so it
    shadows the class's method, pickles, and holds no reference to the object)."""

    def __init__(self, owner: str, how_back: str):
        self.owner = owner
        self.how_back = how_back

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        raise QuantSaveError(
            f"{self.owner}.save_pretrained would write accel's 4-bit tensors (qweight, scales, offsets) under the "
            "plain diffusers/transformers format, and from_pretrained would load them as uninitialised (NaN) "
            "weights. Save the 4-bit model with accel.quant.save_quantized(model, path) and reload it with "
            f"accel.quant.load_quantized; {self.how_back}"
        )


_MISSING = object()


def guard_saving(obj: Any, how_back: str) -> Callable[[], None] | None:
    """Make `obj.save_pretrained` (if it has one) raise QuantSaveError; returns the undo (None: nothing
    done). `how_back` ends the message: how to save 16-bit weights instead."""
    if not callable(getattr(type(obj), "save_pretrained", None)):
        return None
    prior = obj.__dict__.get("save_pretrained", _MISSING)
    if isinstance(prior, _RefuseSave):
        return None
    obj.__dict__["save_pretrained"] = _RefuseSave(type(obj).__name__, how_back)
    ref = weakref.ref(obj)

    def undo() -> None:
        target = ref()
        if target is None or not isinstance(target.__dict__.get("save_pretrained"), _RefuseSave):
            return
        if prior is _MISSING:
            del target.__dict__["save_pretrained"]
        else:
            target.__dict__["save_pretrained"] = prior

    return undo


@dataclass
class QuantizedLayer:
    name: str
    slots: list[tuple[weakref.ref, str]]  # (parent, attribute) pairs holding the layer (tied layers: several)
    original: nn.Linear | None  # kept for restore (None when freed)
    device: torch.device  # where the original lived
    dtype: torch.dtype  # the original's weight dtype when quantized (the 4-bit layer's compute dtype)
    quantized: W4Linear
    bytes_before: int
    weight_error: float
    output_error: float | None
    alpha: float | None
    int8_output_error: float | None  # with int8 activations (W4A8), on the calibration rows


@dataclass
class QuantResult:
    """What `quantize` did; `restore()` puts the original layers back (when they were kept)."""

    config: QuantConfig
    layers: list[QuantizedLayer]
    kept_16bit: dict[str, str]  # layer name -> why it was not quantized
    kernel_path: str
    model_bytes_before: int
    model_bytes_after: int
    warnings: list[str] = field(default_factory=list)
    restored: bool = False
    _undo: list[Callable[[], None]] = field(default_factory=list, repr=False)

    @property
    def reversible(self) -> bool:
        return all(layer.original is not None for layer in self.layers)

    def restore(self) -> None:
        """Put the original `nn.Linear` layers back: bit-identical weights, on the device and in the dtype
        the model has now (a `.to(dtype)`, `.half()` or `.to(device)` since quantizing cast the 4-bit
        layers; the originals, kept outside the module tree, get the same move here)."""
        if self.restored:
            return
        self.check_reversible()
        for layer in self.layers:
            now = layer.quantized.scales
            device = now.device if now.device.type != "meta" else layer.device
            layer.original.to(device=device, dtype=now.dtype if now.dtype != layer.dtype else None)
            for ref, attr in layer.slots:
                parent = ref()
                if parent is not None:
                    setattr(parent, attr, layer.original)
        for undo in self._undo:
            undo()
        self._undo.clear()
        self.restored = True

    def guard_saving(self, obj: Any) -> None:
        """Refuse `obj.save_pretrained` until `restore()` (for `obj` holding the quantized model)."""
        undo = guard_saving(
            obj,
            "to save the 16-bit weights, put the original layers back first (accel.unpatch, or restore() on "
            "the result of accel.quant.quantize)",
        )
        if undo is not None:
            self._undo.append(undo)

    def check_reversible(self) -> None:
        if not self.restored and not self.reversible:
            raise IrreversibleError(
                "accel quantization with QuantConfig(keep_original=False) is one-way: the 16-bit weights were "
                "freed. Reload the model to get them back, or quantize with keep_original=True (the default)"
            )

    def describe(self) -> str:
        """One line for the report: how many layers, the format, the bytes saved and the kernel path."""
        before = sum(layer.bytes_before for layer in self.layers)
        after = sum(layer.quantized.nbytes() for layer in self.layers)
        acts = ", int8 activations opted in" if self.config.activations == "int8" else ""
        return (
            f"{len(self.layers)} linear layers to int{self.config.bits} (group {self.config.group_size}{acts}), "
            f"{before / max(after, 1):.2f}x fewer bytes; {self.kernel_path}"
        )

    def stats(self) -> dict:
        """For `report.stats["quant"]` (its layout is documented in `accel.report`)."""
        calibrated = [layer for layer in self.layers if layer.output_error is not None]
        errors = {
            layer.name: round(layer.output_error if layer.output_error is not None else layer.weight_error, 5)
            for layer in self.layers
        }
        int8 = {
            layer.name: round(layer.int8_output_error, 5) for layer in calibrated if layer.int8_output_error is not None
        }
        reasons: dict[str, int] = {}
        for why in self.kept_16bit.values():
            reasons[why] = reasons.get(why, 0) + 1
        cfg = self.config
        return {
            "format": {
                "bits": cfg.bits,
                "group_size": cfg.group_size,
                "search": cfg.search,
                "rank": cfg.rank,
                "activations": cfg.activations,
            },
            "layers_quantized": len(self.layers),
            "layers_calibrated": len(calibrated),
            "layers_kept_16bit": reasons,
            "layer_bytes_before": sum(layer.bytes_before for layer in self.layers),
            "layer_bytes_after": sum(layer.quantized.nbytes() for layer in self.layers),
            "model_bytes_before": self.model_bytes_before,
            "model_bytes_after": self.model_bytes_after,
            "kernel_path": self.kernel_path,
            "originals_kept": self.reversible,
            "error": _error_summary("output" if calibrated else "weight", errors),
            "w4a8_error": _error_summary("output", int8) if int8 else None,
        }


def _error_summary(measure: str, per_layer: dict[str, float]) -> dict:
    worst = max(per_layer, key=per_layer.get) if per_layer else None
    return {
        "measure": measure,
        "mean": round(sum(per_layer.values()) / max(len(per_layer), 1), 5),
        "max": per_layer[worst] if worst else 0.0,
        "max_layer": worst,
        "per_layer": per_layer,
    }


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def select_layers(
    model: nn.Module, config: QuantConfig, family_exclude: tuple[str, ...] = (), named=None
) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """(layers to quantize by name, layers kept in 16-bit by name -> reason). Raises ConfigError for a
    selected layer whose in_features the group size does not divide, ModelStateError for a model that
    already has 4-bit layers. `named`: (name, module) pairs to choose from instead of `model.named_modules()`
    (ComfyUI: the original layers where another clone's patches are swapped in)."""
    selected: dict[str, nn.Linear] = {}
    kept: dict[str, str] = {}
    seen: set[int] = set()
    for name, module in named if named is not None else model.named_modules():
        if isinstance(module, W4Linear):
            raise ModelStateError(
                f"{type(model).__name__} already has 4-bit layers ({name}); it was quantized or loaded with "
                "accel.quant.load_quantized: use it as it is, without quant="
            )
        if not isinstance(module, nn.Linear) or id(module) in seen:
            continue
        seen.add(id(module))
        if _matches(name, _ALWAYS_EXCLUDED):
            kept[name] = "LoRA adapter"
        elif config.default_exclusions and _matches(name, family_exclude):
            kept[name] = "excluded by the model family's defaults"
        elif _matches(name, config.exclude):
            kept[name] = "excluded by QuantConfig.exclude"
        elif config.include is not None and not _matches(name, config.include):
            kept[name] = "not in QuantConfig.include"
        elif min(module.in_features, module.out_features) < config.min_features:
            kept[name] = f"smaller than min_features={config.min_features}"
        else:
            selected[name] = module
    bad = [f"{n} (in_features={m.in_features})" for n, m in selected.items() if m.in_features % config.group_size]
    if bad:
        raise ConfigError(
            f"QuantConfig(group_size={config.group_size}) does not divide in_features of {len(bad)} layer(s): "
            f"{', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}; choose a group_size that divides them or keep "
            "them in 16-bit with QuantConfig(exclude=(...))"
        )
    return selected, kept


def _slots(model: nn.Module, targets: set[int]) -> dict[int, list[tuple[nn.Module, str]]]:
    slots: dict[int, list[tuple[nn.Module, str]]] = {}
    for parent in model.modules():
        for attr, child in parent._modules.items():
            if child is not None and id(child) in targets:
                slots.setdefault(id(child), []).append((parent, attr))
    return slots


def _model_bytes(model: nn.Module) -> int:
    tensors = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def quantize_model(
    model: nn.Module,
    config: QuantConfig,
    family_exclude: tuple[str, ...] = (),
    warn: Callable[[str], None] | None = None,
) -> QuantResult:
    """Swap the selected `nn.Linear` layers of `model` for `W4Linear` (see `accel.quant.quantize`)."""
    layers, kept = select_layers(model, config, family_exclude)
    device = _check_quantizable(model, config, layers, kept)
    path_rule = kernels.describe_paths(device, config.kernel, config.activations, config.group_size)
    messages = _path_warnings(device, config, path_rule)
    stats = {}
    if config.calibration is not None:
        stats = calibrate(layers, config.calibration, config.calibration_tokens)
        missing = len(layers) - len(stats)
        if missing:
            messages.append(
                f"{missing} layer(s) saw no input during calibration; they are quantized without activation-aware scaling"
            )
    for message in messages:
        (warn or _warn_once)(message)

    model_before = _model_bytes(model)
    slots = _slots(model, {id(m) for m in layers.values()})
    with torch.no_grad():
        done = [
            _swap_layer(name, module, config, stats.get(name), slots[id(module)]) for name, module in layers.items()
        ]
    result = QuantResult(config, done, kept, path_rule, model_before, _model_bytes(model), warnings=messages)
    result.guard_saving(model)
    return result


def _check_quantizable(model: nn.Module, config: QuantConfig, layers: dict[str, nn.Linear], kept: dict[str, str]):
    """The device of the selected `layers`, after checking that there are some, that their weights are
    loaded, and that the kernel asked for runs there."""
    if not layers:
        raise NothingToQuantize(
            f"no nn.Linear layer of {type(model).__name__} is left to quantize ({len(kept)} kept in 16-bit: "
            f"{', '.join(sorted(set(kept.values()))) or 'the model has none'}); lower QuantConfig.min_features "
            "or adjust include/exclude"
        )
    for name, module in layers.items():
        if module.weight.device.type == "meta":
            raise ModelStateError(
                f"{name} has its weights offloaded (meta device); quantize before enabling CPU offload or device_map"
            )
    device = next(iter(layers.values())).weight.device
    if config.kernel in ("triton", "dequant", "w4a8") and device.type != "cuda" and not _triton.interpreting():
        raise ConfigError(
            f"QuantConfig(kernel={config.kernel!r}) runs on CUDA, but the model is on {device.type}; "
            "use kernel='auto' or 'reference' ('w4a8-reference' for int8 activations)"
        )
    return device


def _path_warnings(device: torch.device, config: QuantConfig, path_rule: str) -> list[str]:
    """Warnings for `kernel='auto'` settling on a slower path than the config suggests."""
    if config.kernel != "auto":
        return []
    if not kernels.gpu_supports_fused(device):
        return [f"4-bit layers run the slow PyTorch reference path: {path_rule}"]
    if config.activations == "int8" and kernels.int8_unavailable(device, config.group_size):
        return [f"QuantConfig(activations='int8') has no effect here: {path_rule}"]
    return []


def _swap_layer(
    name: str, module: nn.Linear, config: QuantConfig, stats: Any, slots: list[tuple[nn.Module, str]]
) -> QuantizedLayer:
    """Quantize `module`'s weight, put the `W4Linear` in every slot that held `module`, and keep the original
    (moved to the CPU) when the config asks for it."""
    q = quantize_weight(
        module.weight,
        group_size=config.group_size,
        dtype=module.weight.dtype,
        search=config.search,
        rank=config.rank,
        stats=stats,
        int8_activations=config.activations == "int8",
    )
    w4 = W4Linear.from_quantized(q, module.bias, config.group_size, config.kernel, config.activations)
    for parent, attr in slots:
        setattr(parent, attr, w4)
    original_device = module.weight.device
    if config.keep_original and original_device.type != "cpu":
        module.to("cpu")  # frees accelerator memory; restore moves it back bit for bit
    return QuantizedLayer(
        name=name,
        slots=[(weakref.ref(parent), attr) for parent, attr in slots],
        original=module if config.keep_original else None,
        device=original_device,
        dtype=module.weight.dtype,
        quantized=w4,
        bytes_before=sum(t.numel() * t.element_size() for t in module.parameters()),
        weight_error=q.weight_error,
        output_error=q.output_error,
        alpha=q.alpha,
        int8_output_error=q.int8_output_error,
    )


_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    import warnings

    if message not in _WARNED:
        _WARNED.add(message)
        warnings.warn(f"accel.quant: {message}", stacklevel=3)
