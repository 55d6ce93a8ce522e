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

Paths (`choose_path`): on CUDA with compute capability 8.0+ (bf16 tensor cores), the fused GEMM for at
most `FUSED_MAX_M` tokens and dequantize + cuBLAS above, or with int8 activations the W4A8 GEMM from
`W4A8_MIN_M` tokens on GPUs whose INT8 tensor cores run at least twice the bf16 rate (`INT8_FAST`);
older GPUs and the CPU run the W4A16 reference.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

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


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _check_device(*tensors):
    for t in tensors:
        if t is not None and not (t.is_cuda or (t.device.type == "cpu" and _interpreting())):
            raise ValueError(
                f"the Triton W4 kernels run on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
                f"importing triton), got a tensor on {t.device}; use QuantConfig(kernel='reference') on this device"
            )


@functools.cache
def _kernels():
    """Compile lazily, so `import accel.quant` works without Triton and tests can set TRITON_INTERPRET."""
    import triton
    import triton.language as tl

    @triton.jit
    def gemm(
        X, QW, SC, OF, INS, BIAS, Y,
        M, N, K, stride_xm, stride_xk, stride_ym, stride_yn,
        GROUP: tl.constexpr, HAS_INS: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWIZZLE: tl.constexpr,
        DOT_FP32: tl.constexpr,
    ):
        # Neighbouring programs share weight tiles (grouped ordering keeps them in L2 together).
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = SWIZZLE * num_n
        first_m = (pid // per_group) * SWIZZLE
        rows = tl.minimum(num_m - first_m, SWIZZLE)
        pid_m = first_m + (pid % per_group) % rows
        pid_n = (pid % per_group) // rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        shift = ((offs_k % 2) * 4)[:, None]  # even k: low nibble, odd k: high nibble
        groups = K // GROUP

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):  # K is a multiple of GROUP, and GROUP of BLOCK_K
            kk = k0 + offs_k
            a = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk, mask=m_ok[:, None], other=0.0)
            packed = tl.load(QW + offs_n[None, :] * (K // 2) + (kk // 2)[:, None], mask=n_ok[None, :], other=0)
            q = ((packed.to(tl.int32) >> shift) & 0xF).to(tl.float32)  # [BLOCK_K, BLOCK_N]
            g = k0 // GROUP  # one group per K-tile
            sc = tl.load(SC + offs_n * groups + g, mask=n_ok, other=0.0).to(tl.float32)
            of = tl.load(OF + offs_n * groups + g, mask=n_ok, other=0.0).to(tl.float32)
            w = q * sc[None, :] + of[None, :]
            if HAS_INS:
                w = w * tl.load(INS + kk).to(tl.float32)[:, None]
            w = w.to(a.dtype)
            if DOT_FP32:  # exact: 16-bit values multiply exactly in fp32
                acc = tl.dot(a.to(tl.float32), w.to(tl.float32), acc)
            else:
                acc = tl.dot(a, w, acc)
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y = Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    @triton.jit
    def dequant(
        QW, SC, OF, INS, W, N, K,
        GROUP: tl.constexpr, HAS_INS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
        ok = (offs_n < N)[:, None] & (offs_k < K)[None, :]
        packed = tl.load(QW + offs_n[:, None] * (K // 2) + (offs_k // 2)[None, :], mask=ok, other=0)
        q = ((packed.to(tl.int32) >> ((offs_k % 2) * 4)[None, :]) & 0xF).to(tl.float32)
        g = offs_n[:, None] * (K // GROUP) + (offs_k // GROUP)[None, :]
        w = q * tl.load(SC + g, mask=ok, other=0.0).to(tl.float32) + tl.load(OF + g, mask=ok, other=0.0).to(tl.float32)
        if HAS_INS:
            w = w * tl.load(INS + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)[None, :]
        tl.store(W + offs_n[:, None] * K + offs_k[None, :], w.to(W.dtype.element_ty), mask=ok)

    @triton.jit
    def quant_rows(
        X, INS, X8, XS, XSUM, M, K, stride_xm, stride_xk,
        HAS_INS: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, AMAX_MIN: tl.constexpr,
    ):
        # Two passes over each row: its absmax, then int8 codes and their sum per group.
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_k = tl.arange(0, GROUP)
        m_ok = offs_m < M
        groups = K // GROUP
        amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
        for k0 in range(0, K, GROUP):
            kk = k0 + offs_k
            x = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk, mask=m_ok[:, None], other=0.0)
            x = x.to(tl.float32)
            if HAS_INS:
                x = x * tl.load(INS + kk).to(tl.float32)[None, :]
            amax = tl.maximum(amax, tl.max(tl.abs(x), 1))
        step = tl.math.div_rn(tl.maximum(amax, AMAX_MIN), 127.0)  # IEEE division, as torch: same codes
        tl.store(XS + offs_m, step, mask=m_ok)
        for k0 in range(0, K, GROUP):
            kk = k0 + offs_k
            x = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk, mask=m_ok[:, None], other=0.0)
            x = x.to(tl.float32)
            if HAS_INS:
                x = x * tl.load(INS + kk).to(tl.float32)[None, :]
            t = tl.math.div_rn(x, step[:, None])
            r = tl.minimum(tl.floor(tl.abs(t) + 0.5), 127.0)
            r = tl.where(t < 0, -r, r)
            tl.store(X8 + offs_m[:, None] * K + kk[None, :], r.to(tl.int8), mask=m_ok[:, None])
            tl.store(XSUM + offs_m * groups + k0 // GROUP, tl.sum(r, 1), mask=m_ok)

    @triton.jit
    def gemm_w4a8(
        X8, XS, XSUM, QW, SC, OF, BIAS, Y, M, N, K, stride_ym, stride_yn,
        GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SWIZZLE: tl.constexpr,
    ):
        pid = tl.program_id(0)
        num_m = tl.cdiv(M, BLOCK_M)
        num_n = tl.cdiv(N, BLOCK_N)
        per_group = SWIZZLE * num_n
        first_m = (pid // per_group) * SWIZZLE
        rows = tl.minimum(num_m - first_m, SWIZZLE)
        pid_m = first_m + (pid % per_group) % rows
        pid_n = (pid % per_group) // rows

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_k = tl.arange(0, BLOCK_K)
        m_ok = offs_m < M
        n_ok = offs_n < N
        shift = ((offs_k % 2) * 4)[:, None]
        groups = K // GROUP

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for g in range(0, groups):
            dot = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)  # exact within a group
            for t in tl.static_range(GROUP // BLOCK_K):
                kk = g * GROUP + t * BLOCK_K + offs_k
                a = tl.load(X8 + offs_m[:, None] * K + kk[None, :], mask=m_ok[:, None], other=0)
                packed = tl.load(QW + offs_n[None, :] * (K // 2) + (kk // 2)[:, None], mask=n_ok[None, :], other=0)
                q = ((packed.to(tl.int32) >> shift) & 0xF).to(tl.int8)  # raw codes 0..15
                dot = tl.dot(a, q, dot, out_dtype=tl.int32)
            sc = tl.load(SC + offs_n * groups + g, mask=n_ok, other=0.0).to(tl.float32)
            of = tl.load(OF + offs_n * groups + g, mask=n_ok, other=0.0).to(tl.float32)
            xsum = tl.load(XSUM + offs_m * groups + g, mask=m_ok, other=0.0)
            acc += dot.to(tl.float32) * sc[None, :] + xsum[:, None] * of[None, :]
        acc = acc * tl.load(XS + offs_m, mask=m_ok, other=0.0)[:, None]
        if HAS_BIAS:
            acc += tl.load(BIAS + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
        y = Y + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        tl.store(y, acc.to(Y.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])

    return gemm, dequant, quant_rows, gemm_w4a8


def _blocks(m: int, group: int):
    block_k = min(group, _BLOCK_K_MAX)
    if _interpreting():  # the interpreter is slow per element: small tiles
        return 16, 32, block_k
    block_m = 16 if m <= 16 else 32 if m <= 32 else 64 if m <= 64 else 128
    return block_m, 128, block_k


def w4a16_matmul(x, qweight, scales, offsets, in_scale=None, bias=None):
    """x [..., K] (fp16/bf16/fp32) times the packed 4-bit weight: x @ W^T (+ bias), in x's dtype.

    qweight uint8 [N, K/2], scales/offsets [N, K/G], in_scale [K] or None, bias [N] or None."""
    _check_device(x, qweight, scales, offsets, in_scale, bias)
    n, groups = scales.shape
    k = x.shape[-1]
    if qweight.shape != (n, k // 2) or k % groups:
        raise ValueError(f"x [..., {k}] does not match a packed weight {tuple(qweight.shape)} with {groups} groups per row")
    group = k // groups
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return y.view(*x.shape[:-1], n)
    block_m, block_n, block_k = _blocks(m, group)
    gemm = _kernels()[0]
    grid = (triton_cdiv(m, block_m) * triton_cdiv(n, block_n),)
    gemm[grid](
        x2, qweight, scales, offsets,
        in_scale if in_scale is not None else scales, bias if bias is not None else scales, y,
        m, n, k, x2.stride(0), x2.stride(1), y.stride(0), y.stride(1),
        GROUP=group, HAS_INS=in_scale is not None, HAS_BIAS=bias is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SWIZZLE=8,
        # The interpreter's tl.dot multiplies bf16 tensors' raw bits: upcast there only.
        DOT_FP32=x.dtype == torch.bfloat16 and x.device.type == "cpu",
    )
    return y.view(*x.shape[:-1], n)


def dequantize_triton(qweight, scales, offsets, in_scale=None, dtype=None):
    """Triton version of `int4.dequantize`: weight [N, K] in `dtype` (default: the scales' dtype)."""
    _check_device(qweight, scales, offsets, in_scale)
    n, groups = scales.shape
    k = qweight.shape[1] * 2
    w = torch.empty(n, k, device=qweight.device, dtype=dtype or scales.dtype)
    block_n, block_k = (16, 32) if _interpreting() else (32, 128)
    dequant = _kernels()[1]
    grid = (triton_cdiv(n, block_n), triton_cdiv(k, block_k))
    dequant[grid](
        qweight, scales, offsets, in_scale if in_scale is not None else scales, w, n, k,
        GROUP=k // groups, HAS_INS=in_scale is not None, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return w


def quantize_activations_triton(x, in_scale, group):
    """Triton version of `quantize_activations_reference` (same outputs, bit for bit)."""
    _check_device(x, in_scale)
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    x8 = torch.empty(m, k, device=x.device, dtype=torch.int8)
    step = torch.empty(m, device=x.device, dtype=torch.float32)
    sums = torch.empty(m, k // group, device=x.device, dtype=torch.float32)
    if m:
        block_m = 16 if _interpreting() else 8
        _kernels()[2][(triton_cdiv(m, block_m),)](
            x2, in_scale if in_scale is not None else step, x8, step, sums, m, k, x2.stride(0), x2.stride(1),
            HAS_INS=in_scale is not None, GROUP=group, BLOCK_M=block_m, AMAX_MIN=_AMAX_MIN,
        )
    return x8, step, sums


def w4a8_matmul(x, qweight, scales, offsets, in_scale=None, bias=None):
    """x [..., K] (fp16/bf16/fp32) times the packed 4-bit weight with per-token int8 activations:
    ~ x @ W^T (+ bias), in x's dtype; exactly `w4a8_matmul_reference` up to float32 rounding.

    qweight uint8 [N, K/2], scales/offsets [N, K/G] with G >= 32, in_scale [K] or None, bias [N] or None."""
    _check_device(x, qweight, scales, offsets, in_scale, bias)
    n, groups = scales.shape
    k = x.shape[-1]
    if qweight.shape != (n, k // 2) or k % groups:
        raise ValueError(f"x [..., {k}] does not match a packed weight {tuple(qweight.shape)} with {groups} groups per row")
    group = k // groups
    if group < W4A8_MIN_GROUP:
        raise ValueError(
            f"the W4A8 GEMM needs weight groups of {W4A8_MIN_GROUP}+ input channels (int8 tensor-core tiles), got "
            f"{group}; quantize with a larger group_size or use a W4A16 kernel"
        )
    x8, step, sums = quantize_activations_triton(x, in_scale, group)
    m = x8.shape[0]
    y = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m == 0:
        return y.view(*x.shape[:-1], n)
    block_k = min(group, _W4A8_BLOCK_K_MAX)
    if _interpreting():
        block_m, block_n, launch = 16, 32, {}
    else:  # two accumulators (int32 group dot, float32 total): 64x128 fits 8 warps' registers, 128x128
        block_m = 32 if m <= 32 else 64  # spills ~1 KB per thread (benchmarks/compile_report.py)
        block_n, launch = 128, {"num_warps": 8, "num_stages": 3}
    grid = (triton_cdiv(m, block_m) * triton_cdiv(n, block_n),)
    _kernels()[3][grid](
        x8, step, sums, qweight, scales, offsets, bias if bias is not None else scales, y,
        m, n, k, y.stride(0), y.stride(1),
        GROUP=group, HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, SWIZZLE=8,
        **launch,
    )
    return y.view(*x.shape[:-1], n)


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gpu_supports_fused(device: torch.device) -> bool:
    return (
        device.type == "cuda" and triton_available() and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY
    )


def gpu_has_fast_int8(device: torch.device) -> bool:
    """The W4A8 GEMM compiles here and INT8 tensor cores run at least twice the bf16 rate."""
    return gpu_supports_fused(device) and torch.cuda.get_device_capability(device) in INT8_FAST


def choose_path(x: torch.Tensor, kernel: str, activations: str = "16bit", group_size: int = 0) -> str:
    """"triton", "dequant", "w4a8" or "reference" for this input (`kernel` and `activations` are
    QuantConfig's; `group_size` the layer's)."""
    if kernel != "auto":
        return kernel
    if not gpu_supports_fused(x.device):
        return "reference"
    tokens = x.numel() // x.shape[-1]
    if tokens <= FUSED_MAX_M:
        return "triton"
    if (
        activations == "int8"
        and tokens >= W4A8_MIN_M
        and group_size >= W4A8_MIN_GROUP
        and gpu_has_fast_int8(x.device)
    ):
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
