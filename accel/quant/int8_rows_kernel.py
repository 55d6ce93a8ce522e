"""Per-token INT8 activations for the W4A8 GEMM (Triton), and its launcher.

Each row (times the optional per-input-channel factor) gets one absmax/127 step, its int8 codes and their
sum per weight group. The PyTorch reference is `accel.quant.kernels.quantize_activations_reference`
(identical outputs).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import cdiv, interpreting
from .kernels import _AMAX_MIN


@triton.jit
def _scaled_block(X, INS, offs_m, kk, m_ok, stride_xm, stride_xk, HAS_INS: tl.constexpr):
    """Rows offs_m, columns kk of x in float32, times in_scale[kk] when there is one."""
    x = tl.load(X + offs_m[:, None] * stride_xm + kk[None, :] * stride_xk, mask=m_ok[:, None], other=0.0)
    x = x.to(tl.float32)
    if HAS_INS:
        x = x * tl.load(INS + kk).to(tl.float32)[None, :]
    return x


@triton.jit
def quantize_rows_int8_kernel(
    X,
    INS,
    X8,
    XS,
    XSUM,
    M,
    K,
    stride_xm,
    stride_xk,
    HAS_INS: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr,
    AMAX_MIN: tl.constexpr,
):
    # Two passes over each row: its absmax, then int8 codes and their sum per group.
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = tl.arange(0, GROUP)
    m_ok = offs_m < M
    groups = K // GROUP
    amax = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for k0 in range(0, K, GROUP):
        kk = k0 + offs_k
        x = _scaled_block(X, INS, offs_m, kk, m_ok, stride_xm, stride_xk, HAS_INS)
        amax = tl.maximum(amax, tl.max(tl.abs(x), 1))
    step = tl.math.div_rn(tl.maximum(amax, AMAX_MIN), 127.0)  # IEEE division, as torch: same codes
    tl.store(XS + offs_m, step, mask=m_ok)
    for k0 in range(0, K, GROUP):
        kk = k0 + offs_k
        x = _scaled_block(X, INS, offs_m, kk, m_ok, stride_xm, stride_xk, HAS_INS)
        t = tl.math.div_rn(x, step[:, None])
        r = tl.minimum(tl.floor(tl.abs(t) + 0.5), 127.0)
        r = tl.where(t < 0, -r, r)
        tl.store(X8 + offs_m[:, None] * K + kk[None, :], r.to(tl.int8), mask=m_ok[:, None])
        tl.store(XSUM + offs_m * groups + k0 // GROUP, tl.sum(r, 1), mask=m_ok)


def quantize_rows_int8(x, in_scale, group):
    """x [..., K] -> (x8 int8 [M, K], step float32 [M], per-group sums of x8 float32 [M, K/group])."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    x8 = torch.empty(m, k, device=x.device, dtype=torch.int8)
    step = torch.empty(m, device=x.device, dtype=torch.float32)
    sums = torch.empty(m, k // group, device=x.device, dtype=torch.float32)
    if m:
        block_m = 16 if interpreting() else 8
        quantize_rows_int8_kernel[(cdiv(m, block_m),)](
            x2,
            in_scale if in_scale is not None else step,
            x8,
            step,
            sums,
            m,
            k,
            x2.stride(0),
            x2.stride(1),
            HAS_INS=in_scale is not None,
            GROUP=group,
            BLOCK_M=block_m,
            AMAX_MIN=_AMAX_MIN,
        )
    return x8, step, sums
