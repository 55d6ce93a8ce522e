"""Fused INT8 quantisation of attention Q or K (Triton) and its launcher.

The PyTorch model is `accel.attention.int8._quantize_per_block` (same arguments): both give identical int8
values and fp32 scales. The kernel reads x once in its own dtype and layout and writes int8 once, instead
of the reference's several fp32 temporaries.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import cdiv
from .int8 import _block_d


@triton.jit
def quantize_int8_kernel(
    X,
    MEAN,
    XQ,
    S,
    sxb,
    sxh,
    sxn,
    sxd,
    H,
    N,
    D,
    NB,
    scale,
    HAS_MEAN: tl.constexpr,
    PER_ROW: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (row block, batch*head): subtract the mean, absmax, round, store int8.
    One scale for the block, or with PER_ROW one per row (the block is then only a tile)."""
    pid = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid * BLOCK + tl.arange(0, BLOCK)
    offs_d = tl.arange(0, BLOCK_D)
    ok = (offs_n < N)[:, None] & (offs_d < D)[None, :]
    x = tl.load(X + b * sxb + h * sxh + offs_n[:, None] * sxn + offs_d[None, :] * sxd, mask=ok, other=0).to(tl.float32)
    if HAS_MEAN:
        mean = tl.load(MEAN + bh * D + offs_d, mask=offs_d < D, other=0.0)
        x = tl.where(ok, x - mean[None, :], 0.0)
    amax = tl.max(tl.abs(x), 1)
    # IEEE divisions (div_rn), as torch does: identical int8 and scales
    if PER_ROW:
        step = tl.math.div_rn(tl.maximum(amax, 1e-8), 127.0)
        t = tl.math.div_rn(x, step[:, None])
        tl.store(S + bh * N + offs_n, step * scale, mask=offs_n < N)
    else:
        step = tl.math.div_rn(tl.maximum(tl.max(amax, 0), 1e-8), 127.0)
        t = tl.math.div_rn(x, step)
        tl.store(S + bh * NB + pid, step * scale)
    r = tl.minimum(tl.floor(tl.abs(t) + 0.5), 127.0)
    r = tl.where(t < 0, -r, r)
    tl.store(XQ + bh * N * D + offs_n[:, None] * D + offs_d[None, :], r.to(tl.int8), mask=ok)


def quantize_int8(x: torch.Tensor, block: int, scale: float = 1.0, mean: torch.Tensor | None = None):
    """x [B, H, N, D] -> (int8 [B, H, N, D] contiguous, fp32 scales [B, H, ceil(N/block)] with `scale`
    folded in); `mean` [B, H, 1, D] fp32 is subtracted first. block 1 = one scale per token."""
    B, H, N, D = x.shape
    nb = cdiv(N, block)
    xq = torch.empty(B, H, N, D, dtype=torch.int8, device=x.device)
    s = torch.empty(B, H, nb, dtype=torch.float32, device=x.device)
    mean_arg = mean.contiguous() if mean is not None else s  # dummy pointer, unused without HAS_MEAN
    tile = 32 if block == 1 else block  # block 1 = per-token scales, computed 32 rows per program
    quantize_int8_kernel[(cdiv(N, tile), B * H)](
        x,
        mean_arg,
        xq,
        s,
        *x.stride(),
        H,
        N,
        D,
        nb,
        scale,
        HAS_MEAN=mean is not None,
        PER_ROW=block == 1,
        BLOCK=tile,
        BLOCK_D=_block_d(D),
        num_warps=4,
    )
    return xq, s
