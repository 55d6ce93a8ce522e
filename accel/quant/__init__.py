"""W4 weight quantization: 4-bit weights, 16-bit activations (W4A16) for denoisers and language models, and
opt-in int8 activations (W4A8) on GPUs with fast INT8 tensor cores.

`accel.patch(pipe, quant=QuantConfig(...))` swaps the model's `nn.Linear` layers for `W4Linear` (the
model family's sensitive layers stay in 16-bit) and `accel.unpatch` puts the originals back;
`quantize(model, config)` does the same outside `accel.patch`; `save_quantized` / `load_quantized`
store and reload a quantized model with safetensors.
"""

from __future__ import annotations

from torch import nn

from .._unit import NotApplicable, PatchContext, Unit, register
from ..errors import UnsupportedModelError
from ..report import Report
from .apply import NothingToQuantize, QuantResult, quantize_model
from .config import QuantConfig
from .int4 import dequantize, fit_int4, pack_int4, unpack_int4
from .io import load_quantized, save_quantized
from .kernels import dequantize_triton, w4a8_matmul, w4a8_matmul_reference, w4a16_matmul, w4a16_matmul_reference
from .layer import W4Linear
from .recipe import quantize_weight


def quantize(model: nn.Module, config: QuantConfig | None = None) -> QuantResult:
    """Quantize `model` (a diffusers denoiser such as `pipe.transformer`, or a transformers model) in
    place. The model family's default exclusions apply when accel knows the family. Returns what was
    done; `result.restore()` puts the original layers back (unless `keep_original=False`)."""
    from ..pipelines import find_adapter

    if not isinstance(model, nn.Module):
        raise UnsupportedModelError(
            f"accel.quant.quantize takes a torch module (e.g. pipe.transformer), got {type(model).__name__}"
        )
    config = config or QuantConfig()
    try:
        family_exclude = find_adapter(model).quant_exclude
    except UnsupportedModelError:
        family_exclude = ()
    return quantize_model(model, config, family_exclude)


class QuantUnit(Unit):
    def __init__(self, result: QuantResult):
        self.result = result

    def describe(self) -> str:
        return self.result.describe()

    def check_removable(self) -> None:
        self.result.check_reversible()

    def remove(self) -> None:
        self.result.restore()

    def update_report(self, report: Report) -> None:
        report.stats["quant"] = self.result.stats()


@register("quant", QuantConfig, order=10)
def install(ctx: PatchContext, config: QuantConfig) -> QuantUnit:
    try:
        result = quantize_model(ctx.model, config, ctx.adapter.quant_exclude, warn=ctx.warn)
    except NothingToQuantize as err:
        raise NotApplicable(str(err)) from None
    if ctx.pipeline is not None:
        result.guard_saving(ctx.pipeline)  # refuse before the pipeline writes any component
    return QuantUnit(result)


__all__ = [
    "QuantConfig",
    "QuantResult",
    "QuantUnit",
    "W4Linear",
    "dequantize",
    "dequantize_triton",
    "fit_int4",
    "install",
    "load_quantized",
    "pack_int4",
    "quantize",
    "quantize_weight",
    "save_quantized",
    "unpack_int4",
    "w4a8_matmul",
    "w4a8_matmul_reference",
    "w4a16_matmul",
    "w4a16_matmul_reference",
]
