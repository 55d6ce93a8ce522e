"""Fused W4A16 GEMM (Triton) and its launcher: x @ W^T with W unpacked from 4-bit codes in registers.

Each program loads a tile of activations and the matching packed 4-bit weight tile, dequantizes the
weights (code * scale + offset, times the optional per-input-channel factor), rounds them to x's dtype and
accumulates `tl.dot` in float32. The PyTorch reference is `accel.quant.kernels.w4a16_matmul_reference`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import cdiv
from .._triton_tiles import grouped_tile
from .kernels import _blocks


@triton.jit
def w4a16_gemm_kernel(
    X,
    QW,
    SC,
    OF,
    INS,
    BIAS,
    Y,
    M,
    N,
    K,
    stride_xm,
    stride_xk,
    stride_ym,
    stride_yn,
    GROUP: tl.constexpr,
    HAS_INS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SWIZZLE: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    offs_m, offs_n = grouped_tile(tl.program_id(0), M, N, BLOCK_M, BLOCK_N, SWIZZLE)
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


def w4a16_gemm(x2, qweight, scales, offsets, in_scale, bias, group):
    """x2 [M, K] (M > 0) times the packed weight (qweight uint8 [N, K/2], scales/offsets [N, K/group]) ->
    y [M, N] in x2's dtype."""
    m, k = x2.shape
    n = scales.shape[0]
    y = torch.empty(m, n, device=x2.device, dtype=x2.dtype)
    block_m, block_n, block_k = _blocks(m, group)
    w4a16_gemm_kernel[(cdiv(m, block_m) * cdiv(n, block_n),)](
        x2,
        qweight,
        scales,
        offsets,
        in_scale if in_scale is not None else scales,
        bias if bias is not None else scales,
        y,
        m,
        n,
        k,
        x2.stride(0),
        x2.stride(1),
        y.stride(0),
        y.stride(1),
        GROUP=group,
        HAS_INS=in_scale is not None,
        HAS_BIAS=bias is not None,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
        SWIZZLE=8,
        # The interpreter's tl.dot multiplies bf16 tensors' raw bits: upcast there only.
        DOT_FP32=x2.dtype == torch.bfloat16 and x2.device.type == "cpu",
    )
    return y
