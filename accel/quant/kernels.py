"""W4A16 and W4A8 kernels (Triton) with their PyTorch references, and which one runs where.

- `w4a16_matmul`: one fused GEMM. Each program loads a tile of activations and the matching packed
  4-bit weight tile, dequantizes the weights in registers (code * scale + offset, times the optional
  per-input-channel factor), and accumulates `tl.dot` on the tensor cores in float32. It reads 4x fewer
  weight bytes than a 16-bit matmul, which is what matters when few tokens are multiplied (decode).
- `dequantize_triton`: unpack a whole weight into a 16-bit buffer in one pass; cuBLAS then does the
  matmul. For many tokens (diffusion: thousands per call) the matmul is compute-bound, so paying one
  cheap pass over the weight beats a hand-written GEMM.
- `w4a8_matmul` (opt-in, `QuantConfig(activations="int8")`): W4A8 for many tokens, where a 16-bit GEMM is
  compute-bound and W4A16 cannot beat it. A small kernel rounds each token's input to int8 with its own
  scale (after the activation-aware factor, if any) and sums the int8 values per weight group; the GEMM
  then takes, per group, an exact int32 dot of the int8 activations with the raw 4-bit codes on the INT8
  tensor cores (twice the bf16 rate on A100/H100) and adds
  step[m] * (scale[g, n] * dot + offset[g, n] * sum_g(x8)[m]) in float32, which is exactly
  x8 * step @ (code * scale + offset)^T (in_scale is folded into the activations before rounding).
- The references (`w4a16_matmul_reference`, `w4a8_matmul_reference`, `int4.dequantize`) are plain PyTorch
  and run anywhere.

The Triton functions run as custom ops (`torch.ops.accel.w4a16_matmul`, `w4_dequantize`,
`quantize_activations_int8`, `w4a8_matmul`), so torch.compile traces a quantized model without graph breaks
at them; each kernel and its launcher is a file of its own (`w4a16_kernel.py`, `w4_dequant_kernel.py`,
`int8_rows_kernel.py`, `w4a8_kernel.py`), loaded on first use.

Paths (`choose_path`): on CUDA with compute capability 8.0+ (bf16 tensor cores), the fused GEMM for at
most `FUSED_MAX_M` tokens and dequantize + cuBLAS above, or with int8 activations the W4A8 GEMM from
`W4A8_MIN_M` tokens on GPUs whose INT8 tensor cores run at least twice the bf16 rate (`INT8_FAST`);
older GPUs and the CPU run the W4A16 reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _triton
from .._triton import available as triton_available
from ..errors import KernelInputError
from .config import W4A8_MIN_GROUP
from .int4 import dequantize, unpack_int4

FUSED_MAX_M = 64  # tokens up to which the fused GEMM runs; a first guess, to be tuned with benchmarks/quant.py
W4A8_MIN_M = 1024  # tokens from which int8 activations run W4A8; a first guess, to be tuned likewise
MIN_CAPABILITY = (8, 0)
# Dense INT8 tensor-core rate >= 2x bf16 per the vendors' datasheets: A100/A10/Orin, Ada, H100, B200, RTX 50.
# Not listed (W4A16 only): anything unknown, e.g. Blackwell Ultra (sm_103), which cut INT8 throughput.
INT8_FAST = {(8, 0), (8, 6), (8, 7), (8, 9), (9, 0), (10, 0), (12, 0)}
_BLOCK_K_MAX = 64
_W4A8_BLOCK_K_MAX = 128
_AMAX_MIN = 1e-20  # an all-zero token gets a finite step (its codes are 0 either way)


def w4a16_matmul_reference(x, qweight, scales, offsets, in_scale=None, bias=None):
    """x [..., K] @ dequantized weight [N, K]^T (+ bias): the weight is rounded to x's dtype first,
    exactly as the kernel does before its tensor-core dot."""
    w = dequantize(qweight, scales, offsets, in_scale, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


def quantize_activations_reference(x, in_scale, group):
    """Per-token int8 activations: x [..., K] (times in_scale [K] when given, in float32) ->
    (x8 int8 [M, K], step float32 [M], per-group sums of x8 float32 [M, K/group]); x ~ x8 * step."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).float()
    if in_scale is not None:
        x2 = x2 * in_scale.float()
    step = x2.abs().amax(1).clamp_min(_AMAX_MIN) / 127.0
    t = x2 / step[:, None]
    r = torch.floor(t.abs() + 0.5).clamp_max(127.0)  # round half away from zero, as the kernel does
    r = torch.where(t < 0, -r, r)
    return r.to(torch.int8), step, r.view(len(r), k // group, group).sum(-1)


def w4a8_matmul_reference(x, qweight, scales, offsets, in_scale=None, bias=None):
    """PyTorch model of `w4a8_matmul`: the same int8 activations and the same per-group float32 math
    (integer dots are exact in float32: |dot| <= 256 * 127 * 15 < 2^24)."""
    n, groups = scales.shape
    k = x.shape[-1]
    group = k // groups
    x8, step, sums = quantize_activations_reference(x, in_scale, group)
    codes = unpack_int4(qweight).view(n, groups, group).float()
    xg = x8.float().view(-1, groups, group)
    sc, of = scales.float(), offsets.float()
    acc = torch.zeros(len(x8), n, device=x.device)
    for g in range(groups):
        acc += (xg[:, g] @ codes[:, g].T) * sc[:, g] + sums[:, g, None] * of[:, g]
    y = acc * step[:, None]
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype).view(*x.shape[:-1], n)


_W4A16, _DEQUANT, _INT8_ROWS, _W4A8 = (
    f"accel.quant.{m}" for m in ("w4a16_kernel", "w4_dequant_kernel", "int8_rows_kernel", "w4a8_kernel")
)


def _check_device(who, *tensors):
    _triton.check_device(who, tensors, "Use QuantConfig(kernel='reference') on this device.")


def _blocks(m: int, group: int):
    """(BLOCK_M, BLOCK_N, BLOCK_K) of the fused W4A16 GEMM for m tokens."""
    block_k = min(group, _BLOCK_K_MAX)
    if _triton.interpreting():  # the interpreter is slow per element: small tiles
        return 16, 32, block_k
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    return block_m, 128, block_k


def _check_packed(x, qweight, scales) -> int:
    """The weight group size; ValueError when x [..., K] does not fit the packed weight."""
    n, groups = scales.shape
    k = x.shape[-1]
    if qweight.shape != (n, k // 2) or k % groups:
        raise KernelInputError(
            f"x [..., {k}] does not match a packed weight {tuple(qweight.shape)} with {groups} groups per row"
        )
    return k // groups


def _matmul_fake(x, qweight, scales, offsets, in_scale=None, bias=None):
    return x.new_empty(*x.shape[:-1], scales.shape[0])


@_triton.custom_op("accel::w4a16_matmul")
def _w4a16_matmul_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    in_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32), qweight uint8 [N, K/2], scales/offsets [N, K/G], in_scale [K] or None,
    bias [N] or None -> [..., N] in x's dtype, contiguous."""
    _check_device("w4a16_matmul", x, qweight, scales, offsets, in_scale, bias)
    x2 = x.reshape(-1, x.shape[-1])
    if x2.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], scales.shape[0])
    group = x.shape[-1] // scales.shape[1]
    y = _triton.load(_W4A16).w4a16_gemm(x2, qweight, scales, offsets, in_scale, bias, group)
    return y.view(*x.shape[:-1], y.shape[1])


_w4a16_matmul_op.register_fake(_matmul_fake)


def w4a16_matmul(x, qweight, scales, offsets, in_scale=None, bias=None):
    """x [..., K] (fp16/bf16/fp32) times the packed 4-bit weight: x @ W^T (+ bias), in x's dtype.

    qweight uint8 [N, K/2], scales/offsets [N, K/G], in_scale [K] or None, bias [N] or None. Runs as the
    custom op `torch.ops.accel.w4a16_matmul` (no graph break under torch.compile)."""
    _check_packed(x, qweight, scales)
    return _w4a16_matmul_op(x, qweight, scales, offsets, in_scale, bias)


@_triton.custom_op("accel::w4_dequantize")
def _w4_dequantize_op(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    in_scale: torch.Tensor | None,
    dtype: torch.dtype,
) -> torch.Tensor:
    """qweight uint8 [N, K/2], scales/offsets [N, K/G], in_scale [K] or None -> weight [N, K] in `dtype`."""
    _check_device("dequantize_triton", qweight, scales, offsets, in_scale)
    return _triton.load(_DEQUANT).w4_dequantize(qweight, scales, offsets, in_scale, dtype)


@_w4_dequantize_op.register_fake
def _(qweight, scales, offsets, in_scale, dtype):
    return qweight.new_empty(qweight.shape[0], qweight.shape[1] * 2, dtype=dtype)


def dequantize_triton(qweight, scales, offsets, in_scale=None, dtype=None):
    """Triton version of `int4.dequantize`: weight [N, K] in `dtype` (default: the scales' dtype). Runs as
    the custom op `torch.ops.accel.w4_dequantize`."""
    return _w4_dequantize_op(qweight, scales, offsets, in_scale, dtype or scales.dtype)


@_triton.custom_op("accel::quantize_activations_int8")
def _quantize_activations_op(
    x: torch.Tensor, in_scale: torch.Tensor | None, group: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x [..., K], in_scale [K] or None -> (x8 int8 [M, K], step float32 [M], per-group sums of x8 float32
    [M, K/group]) with M = x.numel() / K; x ~ x8 * step."""
    _check_device("quantize_activations_triton", x, in_scale)
    return _triton.load(_INT8_ROWS).quantize_rows_int8(x, in_scale, group)


@_quantize_activations_op.register_fake
def _(x, in_scale, group):
    k = x.shape[-1]
    m = x.numel() // k
    return (
        x.new_empty(m, k, dtype=torch.int8),
        x.new_empty(m, dtype=torch.float32),
        x.new_empty(m, k // group, dtype=torch.float32),
    )


def quantize_activations_triton(x, in_scale, group):
    """Triton version of `quantize_activations_reference` (same outputs, bit for bit). Runs as the custom op
    `torch.ops.accel.quantize_activations_int8`."""
    return _quantize_activations_op(x, in_scale, group)


@_triton.custom_op("accel::w4a8_matmul")
def _w4a8_matmul_op(
    x: torch.Tensor,
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    in_scale: torch.Tensor | None,
    bias: torch.Tensor | None,
) -> torch.Tensor:
    """x [..., K] (fp16/bf16/fp32), qweight uint8 [N, K/2], scales/offsets [N, K/G] with G >= 32, in_scale [K]
    or None, bias [N] or None -> [..., N] in x's dtype, contiguous."""
    _check_device("w4a8_matmul", x, qweight, scales, offsets, in_scale, bias)
    group = x.shape[-1] // scales.shape[1]
    x8, step, sums = _triton.load(_INT8_ROWS).quantize_rows_int8(x, in_scale, group)
    if x8.shape[0] == 0:
        return x.new_empty(*x.shape[:-1], scales.shape[0])
    y = _triton.load(_W4A8).w4a8_gemm(x8, step, sums, qweight, scales, offsets, bias, group, x.dtype)
    return y.view(*x.shape[:-1], y.shape[1])


_w4a8_matmul_op.register_fake(_matmul_fake)


def w4a8_matmul(x, qweight, scales, offsets, in_scale=None, bias=None):
    """x [..., K] (fp16/bf16/fp32) times the packed 4-bit weight with per-token int8 activations:
    ~ x @ W^T (+ bias), in x's dtype; exactly `w4a8_matmul_reference` up to float32 rounding.

    qweight uint8 [N, K/2], scales/offsets [N, K/G] with G >= 32, in_scale [K] or None, bias [N] or None.
    Runs as the custom op `torch.ops.accel.w4a8_matmul`."""
    group = _check_packed(x, qweight, scales)
    if group < W4A8_MIN_GROUP:
        raise KernelInputError(
            f"the W4A8 GEMM needs weight groups of {W4A8_MIN_GROUP}+ input channels (int8 tensor-core tiles), got "
            f"{group}; quantize with a larger group_size or use a W4A16 kernel"
        )
    return _w4a8_matmul_op(x, qweight, scales, offsets, in_scale, bias)


def gpu_supports_fused(device: torch.device) -> bool:
    return device.type == "cuda" and triton_available() and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY


def gpu_has_fast_int8(device: torch.device) -> bool:
    """The W4A8 GEMM compiles here and INT8 tensor cores run at least twice the bf16 rate."""
    return gpu_supports_fused(device) and torch.cuda.get_device_capability(device) in INT8_FAST


def choose_path(x: torch.Tensor, kernel: str, activations: str = "16bit", group_size: int = 0) -> str:
    """ "triton", "dequant", "w4a8" or "reference" for this input (`kernel` and `activations` are
    QuantConfig's; `group_size` the layer's)."""
    if kernel != "auto":
        return kernel
    if not gpu_supports_fused(x.device):
        return "reference"
    tokens = x.numel() // x.shape[-1]
    if tokens <= FUSED_MAX_M:
        return "triton"
    if activations == "int8" and tokens >= W4A8_MIN_M and group_size >= W4A8_MIN_GROUP and gpu_has_fast_int8(x.device):
        return "w4a8"
    return "dequant"


def int8_unavailable(device: torch.device, group_size: int) -> str | None:
    """Why `activations="int8"` cannot run W4A8 with kernel "auto" on `device` (None: it can)."""
    if group_size < W4A8_MIN_GROUP:
        return f"the W4A8 GEMM needs group_size >= {W4A8_MIN_GROUP}, got {group_size}"
    if device.type != "cuda":
        return f"no INT8 tensor cores on {device.type}"
    if not gpu_supports_fused(device):
        return "Triton is not installed" if not triton_available() else "the Triton kernels need sm_80+"
    if not gpu_has_fast_int8(device):
        cc = torch.cuda.get_device_capability(device)
        return f"sm_{cc[0]}{cc[1]} is not among the GPUs whose INT8 tensor cores run at 2x bf16"
    return None


def describe_paths(device: torch.device, kernel: str, activations: str = "16bit", group_size: int = 128) -> str:
    """The kernel-path rule for a model on `device`, in words, for the report."""
    if kernel != "auto":
        return f"{kernel} (forced by QuantConfig.kernel)"
    no_int8 = int8_unavailable(device, group_size)
    int8_note = f"; activations stay 16-bit ({no_int8})" if activations == "int8" and no_int8 else ""
    if device.type != "cuda":
        return f"PyTorch reference (dequantize + matmul) on {device.type}: slow, no W4 kernel runs here{int8_note}"
    cc = torch.cuda.get_device_capability(device)
    name = f"{torch.cuda.get_device_name(device)} (sm_{cc[0]}{cc[1]})"
    if not gpu_supports_fused(device):
        why = "Triton is not installed" if not triton_available() else "the Triton kernels need sm_80+"
        return f"PyTorch reference (dequantize + matmul) on {name}: {why}{int8_note}"
    rule = f"{name}: fused Triton W4A16 GEMM for <= {FUSED_MAX_M} tokens, "
    if activations == "int8" and not no_int8:
        return rule + (
            f"Triton dequantize + cuBLAS 16-bit matmul up to {W4A8_MIN_M - 1}, Triton W4A8 GEMM (per-token int8 "
            f"activations, INT8 tensor cores) from {W4A8_MIN_M} tokens"
        )
    offer = "; W4A8 (INT8 tensor cores) available with QuantConfig(activations='int8')" if not no_int8 else ""
    return rule + f"Triton dequantize + cuBLAS 16-bit matmul above{offer}{int8_note}"
