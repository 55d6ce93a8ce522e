"""Save and load quantized models with safetensors (no pickle)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_model
from torch import nn

from .apply import _slots
from .config import ACTIVATIONS, KERNELS
from .layer import W4Linear

_META_KEY = "accel.quant"
_FORMAT = 1


def save_quantized(model: nn.Module, path: str | Path) -> None:
    """Write `model`'s whole state (4-bit layers included) to one safetensors file, with the layout of its
    4-bit layers in the file's metadata so `load_quantized` can rebuild them without re-quantizing."""
    layers = {name: m.spec() for name, m in model.named_modules() if isinstance(m, W4Linear)}
    if not layers:
        raise ValueError(f"{type(model).__name__} has no 4-bit layers; quantize it first with accel.quant.quantize")
    meta = {_META_KEY: json.dumps({"format": _FORMAT, "layers": layers})}
    save_model(model, str(path), metadata=meta)


def load_quantized(
    model: nn.Module, path: str | Path, *, kernel: str = "auto", activations: str = "16bit"
) -> nn.Module:
    """Load a file written by `save_quantized` into `model`, a fresh instance of the same architecture:
    its `nn.Linear` layers named in the file become `W4Linear`, then every tensor is loaded (strictly).
    Returns `model`. The 16-bit weights of the replaced layers are dropped. `kernel` and `activations`
    mean what they mean in `QuantConfig`."""
    if kernel not in KERNELS or activations not in ACTIVATIONS:
        raise ValueError(f"load_quantized takes kernel in {KERNELS} and activations in {ACTIVATIONS}")
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        if _META_KEY not in meta:
            raise ValueError(f"{path} was not written by accel.quant.save_quantized (no {_META_KEY!r} metadata)")
        info = json.loads(meta[_META_KEY])
        if info.get("format") != _FORMAT:
            raise ValueError(f"{path} has accel.quant format {info.get('format')}, this accel reads format {_FORMAT}")
        dtypes = {name: f.get_slice(f"{name}.scales").get_dtype() for name in info["layers"]}
    targets = {}
    for name, spec in info["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"{path} quantizes layer {name!r}, which {type(model).__name__} does not have") from None
        if not isinstance(module, nn.Linear) or (module.in_features, module.out_features) != (
            spec["in_features"],
            spec["out_features"],
        ):
            raise ValueError(
                f"{name} in {type(model).__name__} is {module}, but {path} holds a 4-bit "
                f"{spec['in_features']}->{spec['out_features']} linear layer: load into the same architecture"
            )
        targets[name] = module
    slots = _slots(model, {id(m) for m in targets.values()})
    for name, module in targets.items():
        spec = info["layers"][name]
        device = module.weight.device if module.weight.device.type != "meta" else torch.device("cpu")
        w4 = W4Linear(
            spec["in_features"],
            spec["out_features"],
            group_size=spec["group_size"],
            bias=spec["bias"],
            rank=spec["rank"],
            in_scale=spec["in_scale"],
            dtype=_DTYPES[dtypes[name]],
            device=device,
            kernel=kernel,
            activations=activations,
        )
        for parent, attr in slots[id(module)]:
            setattr(parent, attr, w4)
    device = next(iter(model.buffers())).device
    load_model(model, str(path), strict=True, device=str(device))
    return model


_DTYPES = {"F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32}
