"""W4A16 kernels (Triton) with their PyTorch references, and which one runs where.

- `w4a16_matmul`: one fused GEMM. Each program loads a tile of activations and the matching packed
  4-bit weight tile, dequantizes the weights in registers (code * scale + offset, times the optional
  per-input-channel factor), and accumulates `tl.dot` on the tensor cores in float32. It reads 4x fewer
  weight bytes than a 16-bit matmul, which is what matters when few tokens are multiplied (decode).
- `dequantize_triton`: unpack a whole weight into a 16-bit buffer in one pass; cuBLAS then does the
  matmul. For many tokens (diffusion: thousands per call) the matmul is compute-bound, so paying one
  cheap pass over the weight beats a hand-written GEMM.
- The references (`w4a16_matmul_reference`, `int4.dequantize`) are plain PyTorch and run anywhere.

Paths (`choose_path`): on CUDA with compute capability 8.0+ (bf16 tensor cores), the fused GEMM for at
most `FUSED_MAX_M` tokens and dequantize + cuBLAS above; older GPUs and the CPU run the reference.
No FP8/INT8 activation path exists yet, so none is chosen on Hopper or Ada either.
"""

from __future__ import annotations

import functools
import os

import torch
import torch.nn.functional as F

from .int4 import dequantize

FUSED_MAX_M = 64  # tokens up to which the fused GEMM runs; a first guess, to be tuned with benchmarks/quant.py
MIN_CAPABILITY = (8, 0)
_BLOCK_K_MAX = 64


def w4a16_matmul_reference(x, qweight, scales, offsets, in_scale=None, bias=None):
    """x [..., K] @ dequantized weight [N, K]^T (+ bias): the weight is rounded to x's dtype first,
    exactly as the kernel does before its tensor-core dot."""
    w = dequantize(qweight, scales, offsets, in_scale, x.dtype)
    return F.linear(x, w, None if bias is None else bias.to(x.dtype))


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

    return gemm, dequant


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
    gemm, _ = _kernels()
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
    _, dequant = _kernels()
    grid = (triton_cdiv(n, block_n), triton_cdiv(k, block_k))
    dequant[grid](
        qweight, scales, offsets, in_scale if in_scale is not None else scales, w, n, k,
        GROUP=k // groups, HAS_INS=in_scale is not None, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return w


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


def gpu_supports_fused(device: torch.device) -> bool:
    return (
        device.type == "cuda" and triton_available() and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY
    )


def choose_path(x: torch.Tensor, kernel: str) -> str:
    """"triton", "dequant" or "reference" for this input (`kernel` is QuantConfig.kernel)."""
    if kernel != "auto":
        return kernel
    if not gpu_supports_fused(x.device):
        return "reference"
    tokens = x.numel() // x.shape[-1]
    return "triton" if tokens <= FUSED_MAX_M else "dequant"


def describe_paths(device: torch.device, kernel: str) -> str:
    """The kernel-path rule for a model on `device`, in words, for the report."""
    if kernel != "auto":
        return f"{kernel} (forced by QuantConfig.kernel)"
    if device.type != "cuda":
        return f"PyTorch reference (dequantize + matmul) on {device.type}: slow, no W4 kernel runs here"
    cc = torch.cuda.get_device_capability(device)
    name = f"{torch.cuda.get_device_name(device)} (sm_{cc[0]}{cc[1]})"
    if not gpu_supports_fused(device):
        why = "Triton is not installed" if not triton_available() else "the Triton kernels need sm_80+"
        return f"PyTorch reference (dequantize + matmul) on {name}: {why}"
    return (
        f"{name}: fused Triton W4A16 GEMM for <= {FUSED_MAX_M} tokens, Triton dequantize + cuBLAS 16-bit "
        "matmul above; no FP8/INT8 activation path yet"
    )
