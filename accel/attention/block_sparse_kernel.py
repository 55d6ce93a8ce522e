"""Block-sparse attention forward (Triton): a FlashAttention-style loop over the kept key blocks only,
optionally with INT8 Q·Kᵀ, and its launcher.

`accel.attention.sparse_kernel` holds the pattern (`BlockIndex`), the PyTorch reference
(`block_sparse_attention_reference`) and the custom op that calls `block_sparse_attention_forward`.
With REMAINDER, a second loop visits one stand-in key per key block the row skipped (`block_means`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._triton import cdiv
from .int8 import LOG2E, _pv_dtype, _quantize_qk
from .sparse_kernel import block_means


@triton.jit
def block_sparse_attention_kernel(
    Q,
    K,
    V,
    O,
    IDX,
    OFF,
    VALID,
    SQ,
    SK,
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
    rows_per_batch,
    svlb,
    svlh,
    Hq,
    GROUP,
    Nq,
    Nk,
    D,
    NBQ,
    NBK,
    qk_scale,
    INT8: tl.constexpr,
    HAS_VALID: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    KM=None,
    VM=None,
    LC=None,
    KEPT=None,
    REMAINDER: tl.constexpr = False,
    REST_N: tl.constexpr = 16,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // Hq
    h = pid_bh % Hq
    hk = h // GROUP

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < Nq
    d_ok = offs_d < D

    q = tl.load(
        Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
        mask=m_ok[:, None] & d_ok[None, :],
        other=0,
    )
    if INT8:
        q_scale = tl.load(SQ + (b * Hq + h) * NBQ + pid_m)  # sm_scale * log2(e) is folded in
    else:
        q_scale = qk_scale
        if UPCAST:
            q = q.to(tl.float32)
    k_base = K + b * skb + hk * skh
    v_base = V + b * svb + hk * svh
    row = b * rows_per_batch + h * NBQ + pid_m  # rows_per_batch is 0 for a batch-1 pattern
    first = tl.load(OFF + row)
    last = tl.load(OFF + row + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for j in range(first, last):
        block_n = tl.load(IDX + j).to(tl.int32)
        kn = block_n * BLOCK_N + offs_n
        n_ok = kn < Nk
        kt = tl.load(
            k_base + kn[None, :] * skn + offs_d[:, None] * skd, mask=n_ok[None, :] & d_ok[:, None], other=0
        )  # [D, N]: K transposed
        if INT8:
            k_scale = tl.load(SK + (b * (Hq // GROUP) + hk) * NBK + block_n)
            s = tl.dot(q, kt, out_dtype=tl.int32).to(tl.float32) * (q_scale * k_scale)
        else:
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=PRECISION, out_dtype=tl.float32) * q_scale
        keep = n_ok
        if HAS_VALID:
            keep = keep & (tl.load(VALID + b * svlb + hk * svlh + kn, mask=n_ok, other=0) != 0)
        s = tl.where(keep[None, :], s, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
        alpha = tl.math.exp2(m_i - m_use)
        p = tl.math.exp2(s - m_use[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + kn[:, None] * svn + offs_d[None, :] * svd, mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        p16 = p.to(v.dtype)
        if UPCAST:  # the interpreter's tl.dot reads bf16 as raw bits; 16-bit products are exact in fp32
            pv = tl.dot(p16.to(tl.float32), v.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
        else:
            pv = tl.dot(p16, v, input_precision=PRECISION, out_dtype=tl.float32)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    if REMAINDER:  # the skipped key blocks, one stand-in key each: mean key and value, log2 of its key count
        if INT8:  # dequantised to the P·V type: these are few products
            q = (q.to(tl.float32) * q_scale).to(V.dtype.element_ty)
            q_scale = 1.0
        if UPCAST:
            q = q.to(tl.float32)
        rest = (b * (Hq // GROUP) + hk) * NBK
        offs_r = tl.arange(0, REST_N)
        for start in range(0, NBK, REST_N):
            ids = start + offs_r
            id_ok = ids < NBK
            skipped = id_ok & (tl.load(KEPT + row * NBK + ids, mask=id_ok, other=1) == 0)
            kt = tl.load(KM + (rest + ids[None, :]) * D + offs_d[:, None], mask=id_ok[None, :] & d_ok[:, None], other=0)
            if UPCAST:
                kt = kt.to(tl.float32)
            s = tl.dot(q, kt, input_precision=PRECISION, out_dtype=tl.float32) * q_scale
            s = s + tl.load(LC + rest + ids, mask=id_ok, other=0.0)[None, :]
            s = tl.where(skipped[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(VM + (rest + ids[:, None]) * D + offs_d[None, :], mask=id_ok[:, None] & d_ok[None, :], other=0)
            p16 = p.to(v.dtype)
            if UPCAST:
                pv = tl.dot(p16.to(tl.float32), v.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
            else:
                pv = tl.dot(p16, v, input_precision=PRECISION, out_dtype=tl.float32)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

    acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows that saw no key: 0
    tl.store(
        O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
        acc.to(O.dtype.element_ty),
        mask=m_ok[:, None] & d_ok[None, :],
    )


def block_sparse_attention_forward(
    q, k, v, index, offsets, key_valid, *, shared_pattern, sm_scale, int8, block_q, block_k, smooth_k, remainder=False
):
    """Launch the kernel: q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D], the pattern as `BlockIndex.index` and
    `.offsets` (one row per batch row, or one for all with `shared_pattern`); returns [B, Hq, Nq, D] in q's
    dtype and memory layout. `remainder`: see `accel.attention.sparse_kernel.block_sparse_attention`."""
    B, Hq, Nq, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    nbq, nbk = cdiv(Nq, block_q), cdiv(Nk, block_k)
    if int8:
        q_in, sq, k_in, sk = _quantize_qk(q, k, sm_scale, smooth_k, block_q, block_k)
    else:
        q_in, k_in = q, k
        sq = sk = q.new_empty(1, dtype=torch.float32)  # unused
    if int8 or q.dtype != torch.float32:
        v = v if v.dtype == _pv_dtype(v.dtype) else v.to(_pv_dtype(v.dtype))
    valid = key_valid.to(torch.int8) if key_valid is not None else q.new_empty(1, dtype=torch.int8)
    valid_strides = (0, 0) if key_valid is None else (valid.stride(0), valid.stride(1) if valid.dim() == 3 else 0)
    rest = {}
    if remainder:
        rest = _remainder_inputs(k, v, index, offsets, key_valid, v.dtype, block_k, smooth_k and int8)
    o = torch.empty_like(q)
    block_d = max(16, 1 << (D - 1).bit_length())
    interpreted = q.device.type == "cpu"
    block_sparse_attention_kernel[(nbq, B * Hq)](
        q_in,
        k_in,
        v,
        o,
        index,
        offsets,
        valid,
        sq,
        sk,
        *q_in.stride(),
        *k_in.stride(),
        *v.stride(),
        *o.stride(),
        0 if shared_pattern else Hq * nbq,
        *valid_strides,
        Hq,
        Hq // Hkv,
        Nq,
        Nk,
        D,
        nbq,
        nbk,
        sm_scale * LOG2E,
        INT8=int8,
        HAS_VALID=key_valid is not None,
        UPCAST=interpreted and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_q,
        BLOCK_N=block_k,
        BLOCK_D=block_d,
        num_warps=8 if block_q * block_d >= 128 * 128 else 4,
        **rest,
    )
    return o


def _remainder_inputs(k, v, index, offsets, key_valid, dtype, block_k, smooth):
    """The kernel's remainder arguments: block means (contiguous, in the P·V type), log2 key counts, and the
    pattern as one byte per (row, key block), 1 = kept (made from the index on each call, then dropped)."""
    k_mean, v_mean, log_count = block_means(k, v, block_k, key_valid, smooth)
    nbk = k_mean.shape[2]
    rows = offsets.numel() - 1
    row_of = torch.repeat_interleave(torch.arange(rows, device=index.device), offsets.diff(), output_size=index.numel())
    kept = torch.zeros(rows * nbk, dtype=torch.uint8, device=index.device)
    kept[row_of * nbk + index.long()] = 1
    return dict(
        KM=k_mean.to(dtype).contiguous(),
        VM=v_mean.to(dtype).contiguous(),
        LC=log_count,
        KEPT=kept,
        REMAINDER=True,
        # stand-ins per tile: half a key block keeps the INT8 kernel within 255 registers on sm_89/sm_90
        # (benchmarks/compile_report.py); tl.dot needs at least 16
        REST_N=max(16, block_k // 2),
    )
