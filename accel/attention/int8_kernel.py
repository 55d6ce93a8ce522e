"""INT8 Q·Kᵀ / 16-bit or FP8 P·V attention forward (Triton) and its launcher.

`accel.attention.int8` prepares the operands (quantised Q and K, V, per-key bias) and holds the
PyTorch reference (`int8_attention_reference`) and the custom op that calls `int8_attention_forward`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import cdiv
from .int8 import _block_d


@triton.jit
def int8_attention_kernel(
    Q,
    K,
    V,
    SQ,
    SK,
    SV,
    MV,
    BIAS,
    O,
    sqb,
    sqh,
    sqn,
    sqd,
    skb,
    skh,
    skn,
    skd,
    svb,
    svh,
    svn,
    svd,
    sob,
    soh,
    son,
    sod,
    sbb,
    sbh,
    Hq,
    Hkv,
    GROUP,
    Nq,
    Nk,
    D,
    NBQ,
    NBK,
    CAUSAL_OFFSET,
    CAUSAL: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PER_TOKEN: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    PV_FP8: tl.constexpr,
    PV_FP32: tl.constexpr,
    EMULATE_FP8: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // GROUP  # GQA: query head h reads key/value head h // (Hq / Hkv)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Nq
    d_ok = offs_d < D  # head dims 80/96 run in a 128-wide tile

    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
        mask=m_ok[:, None] & d_ok[None, :],
        other=0,
    )
    if PER_TOKEN:  # NBQ = Nq, NBK = Nk: one scale per row
        q_scale = tl.load(SQ + (b * Hq + h) * NBQ + offs_m, mask=m_ok, other=0.0)[:, None]
    else:
        q_scale = tl.load(SQ + (b * Hq + h) * NBQ + pid_m)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    sk_base = SK + (b * Hkv + hk) * NBK
    bias_base = BIAS + b * sbb + h * sbh

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

    hi = Nk
    if CAUSAL:  # skip key blocks entirely above the diagonal
        hi = tl.minimum(Nk, (pid_m + 1) * BLOCK_M + CAUSAL_OFFSET)
    for start_n in range(0, hi, BLOCK_N):
        kn = start_n + offs_n
        n_ok = kn < Nk
        kt = tl.load(
            k_base + kn[None, :] * skn + offs_d[:, None] * skd, mask=n_ok[None, :] & d_ok[:, None], other=0
        )  # [D, N]: K transposed
        if PER_TOKEN:
            k_scale = tl.load(sk_base + kn, mask=n_ok, other=0.0)[None, :]
        else:
            k_scale = tl.load(sk_base + start_n // BLOCK_N)
        s = tl.dot(q, kt, out_dtype=tl.int32).to(tl.float32) * (q_scale * k_scale)
        if HAS_BIAS:
            s += tl.load(bias_base + kn, mask=n_ok, other=0.0)[None, :]
        keep = n_ok[None, :]
        if CAUSAL:
            keep = keep & (kn[None, :] <= offs_m[:, None] + CAUSAL_OFFSET)
        s = tl.where(keep, s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        if HAS_BIAS:  # a row masked so far has max -inf: shift by 0 instead (p = 0, no NaN)
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kn[:, None] * svn + offs_d[None, :] * svd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        if PV_FP8:
            p_scaled = p * 448.0
            if EMULATE_FP8:
                # The interpreter's fp32->fp8 cast drops the carry when rounding up to a new
                # power of two (126.5 -> 64); round to the e4m3 grid here so its cast is exact.
                bits = p_scaled.to(tl.int32, bitcast=True)
                bits = (bits + 0x7FFFF + ((bits >> 20) & 1)) & -0x100000  # 3 mantissa bits, ties to even
                p_scaled = tl.where(
                    p_scaled < 0.015625,
                    tl.floor(p_scaled * 512.0 + 0.5) / 512.0,  # subnormals
                    bits.to(tl.float32, bitcast=True),
                )
            pv = tl.dot(p_scaled.to(v.dtype), v, out_dtype=tl.float32)
        elif PV_FP32:  # exact: 16-bit values multiply exactly in fp32
            pv = tl.dot(p.to(v.dtype).to(tl.float32), v.to(tl.float32), out_dtype=tl.float32)
        else:
            pv = tl.dot(p.to(v.dtype), v, out_dtype=tl.float32)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if PV_FP8:  # undo V's per-channel scale and P's 448
        sv = tl.load(SV + (b * Hkv + hk) * D + offs_d, mask=d_ok, other=0.0)
        acc = acc * (sv / 448.0)[None, :]
    acc = acc / tl.where(l_i == 0, 1.0, l_i)[:, None]  # fully masked row: acc is 0, output 0
    if PV_FP8:  # add V's token mean back (not on fully masked rows)
        mv = tl.load(MV + (b * Hkv + hk) * D + offs_d, mask=d_ok, other=0.0)
        acc += tl.where(l_i > 0, 1.0, 0.0)[:, None] * mv[None, :]
    tl.store(
        O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
        acc.to(O.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )


def int8_attention_forward(p8, q, *, causal, per_token, block_q, block_k, num_warps=None, num_stages=None):
    """Launch the kernel on prepared operands `p8` (`int8._Prepared`) for queries shaped like q
    [B, Hq, Nq, D]; returns [B, Hq, Nq, D] in q's dtype and memory layout."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = p8.k8.shape[1], p8.k8.shape[2]
    pv_fp8 = p8.sv is not None
    o = torch.empty_like(q)  # keeps q's memory layout
    bias = p8.bias if p8.bias is not None else p8.sq  # dummy pointer, unused without HAS_BIAS
    sbb, sbh = (bias.stride(0), bias.stride(1) if bias.shape[1] > 1 else 0) if p8.bias is not None else (0, 0)
    grid = (cdiv(Nq, block_q), B * Hq)
    block_d = _block_d(D)
    options = {"num_warps": num_warps or (8 if block_q * block_d >= 128 * 128 else 4)}
    if num_stages is not None:
        options["num_stages"] = num_stages
    interpret = q.device.type == "cpu"
    int8_attention_kernel[grid](
        p8.q8,
        p8.k8,
        p8.v,
        p8.sq,
        p8.sk,
        *((p8.sv, p8.mv) if pv_fp8 else (p8.sq, p8.sq)),
        bias,
        o,  # sq: unused
        *p8.q8.stride(),
        *p8.k8.stride(),
        *p8.v.stride(),
        *o.stride(),
        sbb,
        sbh,
        Hq,
        Hkv,
        Hq // Hkv,
        Nq,
        Nk,
        D,
        p8.sq.shape[-1],
        p8.sk.shape[-1],
        Nk - Nq,
        CAUSAL=causal,
        BLOCK_M=block_q,
        BLOCK_N=block_k,
        BLOCK_D=block_d,
        PER_TOKEN=per_token,
        HAS_BIAS=p8.bias is not None,
        PV_FP8=pv_fp8,
        # The interpreter's tl.dot multiplies bf16 tensors' raw uint16 bits, and its fp8 cast
        # mis-rounds: work around both there only.
        PV_FP32=p8.v.dtype == torch.bfloat16 and interpret,
        EMULATE_FP8=interpret,
        **options,
    )
    return o
