"""`W4Linear`: an `nn.Linear` whose weight is stored as packed 4-bit codes."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import KernelInputError
from . import kernels
from .int4 import dequantize
from .recipe import QuantizedWeight


class W4Linear(nn.Module):
    """y = x @ W^T + bias with W = dequantize(qweight, scales, offsets) * in_scale (+ lora_up @ lora_down).

    Buffers (all in the state dict, so safetensors can save and load them):
    `qweight` uint8 [N, K/2] (two codes per byte), `scales` and `offsets` [N, K/G] in the compute dtype,
    and when present `in_scale` [K] (activation-aware scaling), `lora_down` [r, K] / `lora_up` [N, r]
    (low-rank correction), `bias` [N]. The kernel is picked per call (`kernels.choose_path`); with
    `activations="int8"` it may round the input to int8 per token (W4A8). The low-rank branch stays 16-bit.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        group_size: int,
        bias: bool,
        rank: int = 0,
        in_scale: bool = False,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str | None = None,
        kernel: str = "auto",
        activations: str = "16bit",
    ):
        super().__init__()
        if in_features % group_size:
            raise KernelInputError(f"group_size {group_size} does not divide in_features {in_features}")
        self.in_features = in_features
        self.out_features = out_features
        self.group_size = group_size
        self.rank = rank
        self.kernel = kernel
        self.activations = activations
        groups = in_features // group_size

        def empty(*shape, dt=dtype):
            return torch.empty(*shape, dtype=dt, device=device)

        self.register_buffer("qweight", empty(out_features, in_features // 2, dt=torch.uint8))
        self.register_buffer("scales", empty(out_features, groups))
        self.register_buffer("offsets", empty(out_features, groups))
        self.register_buffer("in_scale", empty(in_features) if in_scale else None)
        self.register_buffer("lora_down", empty(rank, in_features) if rank else None)
        self.register_buffer("lora_up", empty(out_features, rank) if rank else None)
        self.register_buffer("bias", empty(out_features) if bias else None)

    @classmethod
    def from_quantized(
        cls, q: QuantizedWeight, bias: torch.Tensor | None, group_size: int, kernel: str, activations: str = "16bit"
    ) -> W4Linear:
        out_features, half = q.qweight.shape
        layer = cls(
            half * 2,
            out_features,
            group_size=group_size,
            bias=bias is not None,
            rank=0 if q.lora_up is None else q.lora_up.shape[1],
            in_scale=q.in_scale is not None,
            dtype=q.scales.dtype,
            device="meta",
            kernel=kernel,
            activations=activations,
        )
        for name in ("qweight", "scales", "offsets", "in_scale", "lora_down", "lora_up"):
            setattr(layer, name, getattr(q, name))
        if bias is not None:
            layer.bias = bias.detach().to(q.scales.dtype).clone()
        return layer

    @classmethod
    def from_spec(cls, spec: dict, **options) -> W4Linear:
        """An empty layer of the structure `spec()` describes; `options` are the other constructor arguments
        (dtype, device, kernel, activations)."""
        return cls(**spec, **options)

    def spec(self) -> dict:
        """What it takes to rebuild this layer's structure (saved as safetensors metadata)."""
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "group_size": self.group_size,
            "bias": self.bias is not None,
            "rank": self.rank,
            "in_scale": self.in_scale is not None,
        }

    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers())

    def dequantized_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The weight this layer computes with, [N, K] (a new tensor; the layer keeps only 4-bit codes)."""
        w = dequantize(self.qweight, self.scales, self.offsets, self.in_scale, torch.float32)
        if self.lora_up is not None:
            w = w + self.lora_up.float() @ self.lora_down.float()
        return w.to(dtype or self.scales.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        path = kernels.choose_path(x, self.kernel, self.activations, self.group_size)
        args = (x, self.qweight, self.scales, self.offsets, self.in_scale, self.bias)
        if path == "triton":
            y = kernels.w4a16_matmul(*args)
        elif path == "w4a8":
            y = kernels.w4a8_matmul(*args)
        elif path == "w4a8-reference":
            y = kernels.w4a8_matmul_reference(*args)
        else:
            unpack = kernels.dequantize_triton if path == "dequant" else dequantize
            w = unpack(self.qweight, self.scales, self.offsets, self.in_scale, x.dtype)
            y = F.linear(x, w, None if self.bias is None else self.bias.to(x.dtype))
        if self.lora_up is not None:
            y = y + F.linear(F.linear(x, self.lora_down.to(x.dtype)), self.lora_up.to(x.dtype))
        return y

    def extra_repr(self) -> str:
        extras = [
            f"in_features={self.in_features}",
            f"out_features={self.out_features}",
            f"group_size={self.group_size}",
        ]
        if self.rank:
            extras.append(f"rank={self.rank}")
        if self.in_scale is not None:
            extras.append("activation-aware")
        if self.activations != "16bit":
            extras.append(f"activations={self.activations}")
        extras.append(f"bias={self.bias is not None}")
        return ", ".join(extras)
