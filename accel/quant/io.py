"""Save and load quantized models with safetensors (no pickle).

The file holds the model's whole state dict (tensors shared by several names are stored once) and, in
the metadata under "accel.quant", a JSON object: the format version, the layout of every 4-bit layer, and
(from format 2) the sha256 of every stored tensor's bytes. `load_quantized` checks the whole file before
it touches the model, and puts the model back as it was if anything fails.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from ..errors import ConfigError, ModelStateError, QuantFileError
from .apply import _slots, guard_saving
from .config import ACTIVATIONS, GROUP_SIZES, KERNELS
from .layer import W4Linear

_META_KEY = "accel.quant"
_FORMAT = 2  # 1: no checksums (accel before per-tensor sha256); 2: "sha256" per stored tensor
_READS = (1, 2)
_SPEC = {"in_features": int, "out_features": int, "group_size": int, "bias": bool, "rank": int, "in_scale": bool}
_FLOAT_BUFFERS = ("scales", "offsets", "in_scale", "lora_down", "lora_up")
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _digest(t: torch.Tensor) -> str:
    """sha256 of a tensor's bytes as safetensors stores them (contiguous, native little-endian)."""
    data = t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()
    return hashlib.sha256(data).hexdigest()


def _share_key(t: torch.Tensor) -> tuple:
    """Equal for the names of one tensor (tied weights): same object, or the same view of one storage."""
    if t.device.type == "meta" or t.numel() == 0:
        return ("object", id(t))
    return ("view", t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _groups(state: dict[str, torch.Tensor]) -> list[list[str]]:
    """The state dict's names, grouped by the tensor they name, each group sorted."""
    groups: dict[tuple, list[str]] = {}
    for name, t in state.items():
        groups.setdefault(_share_key(t), []).append(name)
    return [sorted(names) for names in groups.values()]


def save_quantized(model: nn.Module, path: str | Path) -> None:
    """Write `model`'s whole state (4-bit layers included) to one safetensors file, with the layout of its
    4-bit layers and a checksum of every tensor in the file's metadata, so `load_quantized` can rebuild
    the layers without re-quantizing and detect damaged bytes. The file appears complete or not at all."""
    layers = {name: m.spec() for name, m in model.named_modules() if isinstance(m, W4Linear)}
    if not layers:
        raise ModelStateError(
            f"{type(model).__name__} has no 4-bit layers; quantize it first with accel.quant.quantize"
        )
    state = model.state_dict(keep_vars=True)
    tensors: dict[str, torch.Tensor] = {}
    storages: set[int] = set()
    for names in _groups(state):
        t = state[names[0]].detach().to("cpu").contiguous()
        if t.numel() and t.untyped_storage().data_ptr() in storages:
            t = t.clone()  # a different view of a stored tensor's memory: safetensors wants its own bytes
        storages.add(t.untyped_storage().data_ptr())
        tensors[names[0]] = t
    info = {"format": _FORMAT, "layers": layers, "sha256": {name: _digest(t) for name, t in tensors.items()}}
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    try:
        save_file(tensors, str(partial), metadata={_META_KEY: json.dumps(info)})
        os.replace(partial, path)
    finally:
        partial.unlink(missing_ok=True)


def _fail(path: Path, problem: str) -> QuantFileError:
    return QuantFileError(
        f"{path}: {problem}. The model was left unchanged; re-save the quantized model with "
        "accel.quant.save_quantized or use an intact copy of the file"
    )


def _read_header(path: Path) -> tuple[dict[str, Any], list[str]]:
    """The checked "accel.quant" metadata and the names of the stored tensors."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            names = list(f.keys())
    except SafetensorError as err:
        raise _fail(path, f"not a readable safetensors file ({err})") from None
    if _META_KEY not in meta:
        raise QuantFileError(f"{path} was not written by accel.quant.save_quantized (no {_META_KEY!r} metadata)")
    try:
        info = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as err:
        raise _fail(path, f"the {_META_KEY!r} metadata is not valid JSON ({err})") from None
    if not isinstance(info, dict):
        raise _fail(path, f"the {_META_KEY!r} metadata is a JSON {type(info).__name__}, not an object")
    fmt = info.get("format")
    if type(fmt) is not int or fmt not in _READS:
        raise _fail(path, f"accel.quant format {fmt!r}; this accel reads formats {', '.join(map(str, _READS))}")
    layers = info.get("layers")
    if not isinstance(layers, dict) or not layers:
        raise _fail(path, "metadata field 'layers' must map layer names to their layout")
    for name, spec in layers.items():
        _check_spec(path, name, spec)
    if fmt >= 2:
        sums = info.get("sha256")
        if not isinstance(sums, dict) or not all(
            isinstance(v, str) and len(v) == 64 and all(c in "0123456789abcdef" for c in v) for v in sums.values()
        ):
            raise _fail(path, "metadata field 'sha256' must map every tensor name to a hex sha256")
        unlisted = sorted(set(names) - sums.keys())
        extra = sorted(sums.keys() - set(names))
        if unlisted or extra:
            what = (
                f"tensor {unlisted[0]!r} has no checksum" if unlisted else f"checksum for missing tensor {extra[0]!r}"
            )
            raise _fail(path, f"metadata field 'sha256' does not match the stored tensors: {what}")
    return info, names


def _check_spec(path: Path, name: str, spec: Any) -> None:
    where = f"metadata 'layers' entry {name!r}"
    if not isinstance(spec, dict):
        raise _fail(path, f"{where} must be an object, got {type(spec).__name__}")
    if spec.keys() != _SPEC.keys():
        raise _fail(path, f"{where} must have exactly the fields {', '.join(_SPEC)}, has {', '.join(map(str, spec))}")
    for field, kind in _SPEC.items():
        if type(spec[field]) is not kind:
            raise _fail(path, f"{where}: field {field!r} must be {kind.__name__}, got {spec[field]!r}")
    k, n, g, r = spec["in_features"], spec["out_features"], spec["group_size"], spec["rank"]
    if k < 2 or k % 2 or n < 1 or r < 0:
        raise _fail(path, f"{where}: in_features={k}, out_features={n}, rank={r} are not a 4-bit layer's shape")
    if g not in GROUP_SIZES or k % g:
        raise _fail(path, f"{where}: group_size={g} must be one of {GROUP_SIZES} and divide in_features={k}")


def _read_tensors(path: Path, info: dict[str, Any], names: list[str]) -> dict[str, torch.Tensor]:
    """Every stored tensor (CPU), checked against its checksum (format 2+)."""
    sums = info.get("sha256")
    tensors = {}
    with safe_open(str(path), framework="pt") as f:
        for name in names:
            try:
                t = f.get_tensor(name)
            except SafetensorError as err:
                raise _fail(path, f"tensor {name!r} cannot be read ({err})") from None
            if sums is not None and _digest(t) != sums[name]:
                raise _fail(path, f"tensor {name!r} is corrupted (its bytes do not match the sha256 saved with it)")
            tensors[name] = t
    if sums is None:
        warnings.warn(
            f"accel.quant: {path} has format 1, which stores no checksums, so damaged tensor bytes cannot be "
            "detected; re-save it with accel.quant.save_quantized to add them",
            stacklevel=3,
        )
    return tensors


def _check_layer_tensors(path: Path, name: str, spec: dict, tensors: dict[str, torch.Tensor]) -> torch.dtype:
    """The layer's compute dtype; its codes must be uint8 and its scales, offsets and factors finite."""
    present = {
        "qweight": True,
        "scales": True,
        "offsets": True,
        "in_scale": spec["in_scale"],
        "lora_down": spec["rank"] > 0,
        "lora_up": spec["rank"] > 0,
    }
    for buffer, needed in present.items():
        key = f"{name}.{buffer}"
        if not needed:
            continue
        if key not in tensors:
            raise _fail(path, f"tensor {key!r} of 4-bit layer {name!r} is missing")
        t = tensors[key]
        if buffer == "qweight":
            if t.dtype != torch.uint8:
                raise _fail(path, f"tensor {key!r} must hold uint8 codes, got {t.dtype}")
        elif t.dtype not in _DTYPES:
            raise _fail(path, f"tensor {key!r} must be float16, bfloat16 or float32, got {t.dtype}")
        elif not torch.isfinite(t).all():
            raise _fail(path, f"tensor {key!r} holds non-finite values (NaN or inf)")
    return tensors[f"{name}.scales"].dtype


def load_quantized(
    model: nn.Module, path: str | Path, *, kernel: str = "auto", activations: str = "16bit"
) -> nn.Module:
    """Load a file written by `save_quantized` into `model`, a fresh instance of the same architecture:
    its `nn.Linear` layers named in the file become `W4Linear`, then every tensor is loaded (strictly).
    Returns `model`. The 16-bit weights of the replaced layers are dropped. `kernel` and `activations`
    mean what they mean in `QuantConfig`.

    All or nothing: the metadata, every tensor's checksum, names and shapes, and the finiteness of the
    4-bit layers' scales are checked before the model changes; a bad file raises QuantFileError naming
    the problem and leaves the model exactly as it was."""
    if kernel not in KERNELS or activations not in ACTIVATIONS:
        raise ConfigError(f"load_quantized takes kernel in {KERNELS} and activations in {ACTIVATIONS}")
    path = Path(path)
    info, names = _read_header(path)
    tensors = _read_tensors(path, info, names)

    targets: dict[str, nn.Linear] = {}
    owners: dict[int, str] = {}
    for name, spec in info["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise _fail(path, f"it quantizes layer {name!r}, which {type(model).__name__} does not have") from None
        shape = (spec["in_features"], spec["out_features"])
        if not isinstance(module, nn.Linear) or (module.in_features, module.out_features) != shape:
            raise _fail(
                path,
                f"{name} in {type(model).__name__} is {module}, but the file holds a 4-bit {shape[0]}->{shape[1]} "
                "linear layer: load into a fresh instance of the same architecture",
            )
        if id(module) in owners:
            raise _fail(path, f"layers {owners[id(module)]!r} and {name!r} are the same module of the model")
        owners[id(module)] = name
        targets[name] = module

    built = {}
    for name, module in targets.items():
        spec = info["layers"][name]
        dtype = _check_layer_tensors(path, name, spec, tensors)
        device = module.weight.device if module.weight.device.type != "meta" else torch.device("cpu")
        built[name] = W4Linear.from_spec(spec, dtype=dtype, device=device, kernel=kernel, activations=activations)

    slots = _slots(model, {id(m) for m in targets.values()})
    swapped: list[tuple[nn.Module, str, nn.Module]] = []
    try:
        for name, module in targets.items():
            for parent, attr in slots[id(module)]:
                swapped.append((parent, attr, module))
                setattr(parent, attr, built[name])
        state = _full_state(path, model, tensors)
        model.load_state_dict(state, strict=True)
    except BaseException:
        for parent, attr, module in reversed(swapped):
            setattr(parent, attr, module)
        raise
    guard_saving(model, "the 16-bit weights are not in this model: save those from the original checkpoint")
    return model


def _full_state(path: Path, model: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The file's tensors under every name of the (converted) model's state dict; a name the file does not
    store is filled from a name of the same tensor that it does (tied weights are stored once)."""
    state = model.state_dict(keep_vars=True)
    unexpected = sorted(tensors.keys() - state.keys())
    if unexpected:
        raise _fail(
            path,
            f"it holds {len(unexpected)} tensor(s) {type(model).__name__} does not have, e.g. {unexpected[0]!r}: "
            "load into the architecture it was saved from",
        )
    full = {}
    for group in _groups(state):
        stored = [name for name in group if name in tensors]
        if not stored:
            raise _fail(path, f"tensor {group[0]!r} of {type(model).__name__} is missing from the file")
        for name in group:
            full[name] = tensors[name if name in tensors else stored[0]]
    for name, t in full.items():
        if t.shape != state[name].shape:
            raise _fail(
                path,
                f"tensor {name!r} has shape {tuple(t.shape)} in the file but {tuple(state[name].shape)} in the model",
            )
    return full
