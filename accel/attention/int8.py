"""SageAttention-style attention: INT8 Q·Kᵀ, fp16/bf16 P·V, in Triton, with its exact PyTorch reference.

Why it is accurate enough: K is "smoothed" (its mean over tokens is subtracted per batch and
head). That changes every score in a row by the same amount, so softmax is unchanged, but it
removes the large channel-wise bias that real K tensors carry and that would otherwise eat the
INT8 range. Q and K are then quantised per block of rows with one absmax scale each, and the
product of the two block scales dequantises the int32 dot product exactly at tile granularity.

Why it is fast (on a GPU): Q·Kᵀ runs on the INT8 tensor cores (2x the fp16 rate), softmax uses
exp2 with `sm_scale * log2(e)` folded into Q's scale so it costs no extra multiply, and P·V
stays in 16-bit with an fp32 accumulator, which keeps the error small where it matters.

The quantisation itself uses torch ops (`_quantize_per_block`), shared by the kernel path and
the reference so both see identical INT8 tensors; a fused Triton quantisation kernel is left
for later. The reference then differs from the kernel only in accumulation order and in where
P is rounded to 16-bit (the kernel rounds against the running row max, the reference against
the final one).

Causal masking is bottom-right aligned (query i sees keys j <= i + Nk - Nq), the flash-attn
convention; for Nq == Nk this is the usual top-left mask. Causal needs Nq <= Nk.
"""

from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F

LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 80, 96, 128)  # 80 and 96 run as 128 with masked loads
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _check(q, k, v, causal, need_device):
    """Raise ValueError naming the problem and the fix; return (B, Hq, Hkv, Nq, Nk, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise ValueError(f"{name} must be 4-D [batch, heads, tokens, head_dim], got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise ValueError(
            f"int8_attention needs q, k, v of one dtype among float16/bfloat16/float32, got "
            f"{q.dtype}/{k.dtype}/{v.dtype}; cast them with .to(torch.float16) or .to(torch.bfloat16)"
        )
    B, Hq, Nq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise ValueError(f"k and v must be [B, Hkv, Nk, D] matching q {tuple(q.shape)}, got {tuple(k.shape)} and {tuple(v.shape)}")
    Hkv, Nk = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise ValueError(f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) for grouped-query attention")
    if D not in HEAD_DIMS:
        raise ValueError(f"int8_attention supports head dim {HEAD_DIMS}, got {D}; pad the head dim or use F.scaled_dot_product_attention")
    if causal and Nq > Nk:
        raise ValueError(f"causal attention needs Nq <= Nk (bottom-right aligned), got Nq={Nq}, Nk={Nk}")
    if need_device:
        devices = {q.device, k.device, v.device}
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        ok = len(devices) == 1 and (q.is_cuda or (q.device.type == "cpu" and interpret))
        if not ok:
            raise ValueError(
                f"int8_attention runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
                f"importing triton), got devices {sorted(str(d) for d in devices)}; move q, k, v with .cuda() "
                f"or use int8_attention_reference on CPU"
            )
    return B, Hq, Hkv, Nq, Nk, D


def _quantize_per_block(x: torch.Tensor, block: int, scale: float = 1.0):
    """INT8 per block of `block` rows along the token axis: one absmax/127 scale per block.

    Returns (x_int8 [B, H, N, D], scales [B, H, ceil(N/block)] fp32 with `scale` folded in).
    The ragged tail block gets a scale from its real rows only (padding is zeros).
    """
    B, H, N, D = x.shape
    nb = -(-N // block)
    xb = F.pad(x.float(), (0, 0, 0, nb * block - N)).view(B, H, nb, block, D)
    step = xb.abs().amax(dim=(-1, -2)).clamp_min(1e-8) / 127.0
    xq = torch.round(xb / step[..., None, None]).clamp_(-127, 127).to(torch.int8)
    return xq.view(B, H, nb * block, D)[:, :, :N], (step * scale).contiguous()


def _quantize_qk(q, k, sm_scale, smooth_k, block_q, block_k):
    """Smooth K, then quantise Q (with sm_scale*log2e folded into its scales) and K per block."""
    kf = k.float()
    if smooth_k:
        kf = kf - kf.mean(dim=-2, keepdim=True)  # softmax-invariant: shifts each score row by a constant
    q8, sq = _quantize_per_block(q, block_q, sm_scale * LOG2E)
    k8, sk = _quantize_per_block(kf, block_k)
    return q8, sq, k8, sk


def _pv_dtype(dtype):
    """P·V runs in 16-bit: the input's own 16-bit type, fp16 for fp32 inputs."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def int8_attention_reference(q, k, v, *, causal=False, sm_scale=None, smooth_k=True, block_q=128, block_k=64):
    """PyTorch model of `int8_attention`: same quantisation, same math, softmax done in one go.

    q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D]; returns [B, Hq, Nq, D] in q's dtype. Runs on any device.
    """
    B, Hq, Hkv, Nq, Nk, D = _check(q, k, v, causal, need_device=False)
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    q8, sq, k8, sk = _quantize_qk(q, k, sm_scale, smooth_k, block_q, block_k)
    g = Hq // Hkv
    k8, sk, v = (t.repeat_interleave(g, dim=1) for t in (k8, sk, v))
    # fp32 holds the int32 dot product exactly: |sum| <= 128 * 127^2 < 2^24.
    s = q8.float() @ k8.float().transpose(-1, -2)
    sq = sq.repeat_interleave(block_q, dim=-1)[..., :Nq, None]
    sk = sk.repeat_interleave(block_k, dim=-1)[..., None, :Nk]
    s = s * (sq * sk)  # log2-domain scores, scale product formed first as in the kernel
    if causal:
        s = s.masked_fill(torch.ones(Nq, Nk, dtype=torch.bool, device=s.device).triu(Nk - Nq + 1), float("-inf"))
    p = torch.exp2(s - s.amax(dim=-1, keepdim=True))
    dt = _pv_dtype(v.dtype)
    o = (p.to(dt).float() @ v.to(dt).float()) / p.sum(dim=-1, keepdim=True)
    return o.to(q.dtype)


_kernel = None


def _get_kernel():
    """Import triton lazily so `import accel.attention` works without it (and so tests can set
    TRITON_INTERPRET first)."""
    global _kernel
    if _kernel is not None:
        return _kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _int8_attn_fwd(
        Q, K, V, SQ, SK, O,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
        Hq, Hkv, GROUP, Nq, Nk, D, NBQ, NBK, CAUSAL_OFFSET,
        CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
        PV_FP32: tl.constexpr,
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

        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0)
        q_scale = tl.load(SQ + (b * Hq + h) * NBQ + pid_m)
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
        sk_base = SK + (b * Hkv + hk) * NBK

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        hi = Nk
        if CAUSAL:  # skip key blocks entirely above the diagonal
            hi = tl.minimum(Nk, (pid_m + 1) * BLOCK_M + CAUSAL_OFFSET)
        for start_n in range(0, hi, BLOCK_N):
            kn = start_n + offs_n
            n_ok = kn < Nk
            kt = tl.load(k_base + kn[None, :] * skn + offs_d[:, None] * skd,
                         mask=n_ok[None, :] & d_ok[:, None], other=0)  # [D, N]: K transposed
            k_scale = tl.load(sk_base + start_n // BLOCK_N)
            s = tl.dot(q, kt, out_dtype=tl.int32).to(tl.float32) * (q_scale * k_scale)
            keep = n_ok[None, :]
            if CAUSAL:
                keep = keep & (kn[None, :] <= offs_m[:, None] + CAUSAL_OFFSET)
            s = tl.where(keep, s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))  # finite: key 0 is visible to every row
            alpha = tl.math.exp2(m_i - m_new)
            p = tl.math.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + kn[:, None] * svn + offs_d[None, :] * svd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            p16 = p.to(v.dtype)
            if PV_FP32:  # exact: 16-bit values multiply exactly in fp32
                pv = tl.dot(p16.to(tl.float32), v.to(tl.float32), out_dtype=tl.float32)
            else:
                pv = tl.dot(p16, v, out_dtype=tl.float32)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        acc = acc / l_i[:, None]
        tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
                 acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])

    _kernel = _int8_attn_fwd
    return _kernel


def int8_attention(q, k, v, *, causal=False, sm_scale=None, smooth_k=True, block_q=128, block_k=64):
    """INT8-QK / 16-bit-PV attention in Triton. Same contract as `int8_attention_reference`.

    q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] with any strides (a [B, N, H, D] tensor passed as
    `.transpose(1, 2)` is read in place; the output keeps q's layout). Head dims 64/80/96/128,
    fp16/bf16/fp32, CUDA tensors (CPU with TRITON_INTERPRET=1). block_q/block_k are both the
    quantisation granularity and the kernel's tile sizes (powers of two, >= 16).
    """
    B, Hq, Hkv, Nq, Nk, D = _check(q, k, v, causal, need_device=True)
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk < 16 or blk & (blk - 1):
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot tile), got {blk}")
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    q8, sq, k8, sk = _quantize_qk(q, k, sm_scale, smooth_k, block_q, block_k)
    v = v if v.dtype == _pv_dtype(v.dtype) else v.to(_pv_dtype(v.dtype))
    o = torch.empty_like(q)  # keeps q's memory layout
    grid = (sq.shape[-1], B * Hq)
    block_d = 64 if D == 64 else 128
    _get_kernel()[grid](
        q8, k8, v, sq, sk, o,
        *q8.stride(), *k8.stride(), *v.stride(), *o.stride(),
        Hq, Hkv, Hq // Hkv, Nq, Nk, D, sq.shape[-1], sk.shape[-1], Nk - Nq,
        CAUSAL=causal, BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=block_d,
        # The interpreter's tl.dot multiplies bf16 tensors' raw uint16 bits; upcast there only.
        PV_FP32=v.dtype == torch.bfloat16 and q.device.type == "cpu",
        num_warps=8 if block_q * block_d >= 128 * 128 else 4,
    )
    return o
