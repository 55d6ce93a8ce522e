"""Unpack a 4-bit weight into a 16-bit (or fp32) buffer in one pass (Triton), and its launcher.

For many tokens (diffusion: thousands per call) the matmul is compute-bound, so one cheap pass over the
weight followed by cuBLAS beats a hand-written GEMM. The PyTorch reference is `accel.quant.int4.dequantize`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import cdiv, interpreting


@triton.jit
def w4_dequantize_kernel(
    QW,
    SC,
    OF,
    INS,
    W,
    N,
    K,
    GROUP: tl.constexpr,
    HAS_INS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
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


def w4_dequantize(qweight, scales, offsets, in_scale, dtype):
    """qweight uint8 [N, K/2], scales/offsets [N, K/G], in_scale [K] or None -> weight [N, K] in `dtype`."""
    n, groups = scales.shape
    k = qweight.shape[1] * 2
    w = torch.empty(n, k, device=qweight.device, dtype=dtype)
    block_n, block_k = (16, 32) if interpreting() else (32, 128)
    w4_dequantize_kernel[(cdiv(n, block_n), cdiv(k, block_k))](
        qweight,
        scales,
        offsets,
        in_scale if in_scale is not None else scales,
        w,
        n,
        k,
        GROUP=k // groups,
        HAS_INS=in_scale is not None,
        BLOCK_N=block_n,
        BLOCK_K=block_k,
    )
    return w
