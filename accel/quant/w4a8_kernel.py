"""W4A8 GEMM (Triton) and its launcher: int8 activations times raw 4-bit codes on the INT8 tensor cores.

Per weight group the kernel takes an exact int32 dot of the int8 activations (from `int8_rows_kernel`) with
the codes 0..15, then adds step[m] * (scale[g, n] * dot + offset[g, n] * sum_g(x8)[m]) in float32, which is
exactly x8 * step @ (code * scale + offset)^T. The PyTorch reference is
`accel.quant.kernels.w4a8_matmul_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import cdiv, interpreting
from .._triton_tiles import grouped_tile
from .kernels import _W4A8_BLOCK_K_MAX


@triton.jit
def w4a8_gemm_kernel(
    X8,
    XS,
    XSUM,
    QW,
    SC,
    OF,
    BIAS,
    Y,
    M,
    N,
    K,
    stride_ym,
    stride_yn,
    GROUP: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWIZZLE: tl.constexpr,
):
    offs_m, offs_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, SWIZZLE)
    offs_k = tl.arange(0, BLOCK_K)
    m_ok = offs_m < M
    n_ok = offs_n < N
    shift = ((offs_k % 2) * 4)[:, None]
    groups = K // GROUP

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for g in range(groups):
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


def w4a8_gemm(x8, step, sums, qweight, scales, offsets, bias, group, dtype):
    """x8 int8 [M, K] (M > 0) with its step [M] and group sums [M, K/group] times the packed weight
    (qweight uint8 [N, K/2], scales/offsets [N, K/group]) -> y [M, N] in `dtype`."""
    m, k = x8.shape
    n = scales.shape[0]
    y = torch.empty(m, n, device=x8.device, dtype=dtype)
    block_k = min(group, _W4A8_BLOCK_K_MAX)
    if interpreting():
        block_m, block_n, launch = 16, 32, {}
    else:  # two accumulators (int32 group dot, float32 total): 64x128 fits 8 warps' registers, 128x128
        block_m = 32 if m <= 32 else 64  # spills ~1 KB per thread (benchmarks/compile_report.py)
        block_n, launch = 128, {"num_warps": 8, "num_stages": 3}
    w4a8_gemm_kernel[(cdiv(m, block_m) * cdiv(n, block_n),)](
        x8,
        step,
        sums,
        qweight,
        scales,
        offsets,
        bias if bias is not None else scales,
        y,
        m,
        n,
        k,
        y.stride(0),
        y.stride(1),
        GROUP=group,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SWIZZLE=8,
        **launch,
    )
    return y
