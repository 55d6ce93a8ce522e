"""SageAttention-style attention: INT8 Q·Kᵀ, 16-bit or FP8 P·V, in Triton, with its exact PyTorch reference.

Why it is accurate enough: K is "smoothed" (its mean over tokens is subtracted per batch and
head). That changes every score in a row by the same amount, so softmax is unchanged, but it
removes the large channel-wise bias that real K tensors carry and that would otherwise eat the
INT8 range. Q and K are then quantised per block of rows with one absmax scale each, and the
product of the two block scales dequantises the int32 dot product exactly at tile granularity.
Optionally (`smooth_q=True`, SageAttention2's idea) Q's token mean is subtracted too; that does
change the scores, by mean_q·k_j for key j, so this term is computed in fp32 and added back as a
per-key bias, the same bias that carries the key padding mask.

Why it is fast (on a GPU): Q·Kᵀ runs on the INT8 tensor cores (2x the fp16 rate), softmax uses
exp2 with `sm_scale * log2(e)` folded into Q's scale so it costs no extra multiply, and P·V
stays in 16-bit with an fp32 accumulator, which keeps the error small where it matters. With
`pv="fp8"` (GPUs of compute capability 8.9 and up) P·V runs on the FP8 tensor cores: V is
scaled per channel into e4m3's range, P (in [0, 1]) is multiplied by 448, e4m3's largest value.

The quantisation of Q and K is one fused Triton kernel (mean subtraction, per-block absmax,
rounding, int8 store); the reference uses the same steps as torch ops and the two give identical
INT8 tensors. The reference then differs from the kernel only in accumulation order and in where
P is rounded to 16 (or 8) bits: the kernel rounds against the running row max, the reference
against the final one.

Causal masking is bottom-right aligned (query i sees keys j <= i + Nk - Nq), the flash-attn
convention; for Nq == Nk this is the usual top-left mask. Causal needs Nq <= Nk. A query row
whose keys are all masked out returns zeros (SDPA returns NaN there).

Files: this module prepares the operands and holds the references and the custom op
`torch.ops.accel.int8_attention`; the kernels and their launchers are `int8_kernel.py` (attention) and
`int8_quant_kernel.py` (quantisation), loaded on first use.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from .. import _triton
from ..errors import KernelInputError

LOG2E = 1.4426950408889634
HEAD_DIMS = (64, 80, 96, 128)  # 80 and 96 run as 128 with masked loads
DTYPES = (torch.float16, torch.bfloat16, torch.float32)
PV_MODES = ("fp16", "fp8")
GRANULARITIES = ("block", "token")  # one Q/K scale per tile, or per token
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def check_qkv(q, k, v, who: str):
    """Shapes and dtypes every attention kernel here needs; ValueError naming the problem and the fix.
    Returns (B, Hq, Hkv, Nq, Nk, D)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            raise KernelInputError(f"{name} must be 4-D [batch, heads, tokens, head_dim], got shape {tuple(t.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or q.dtype not in DTYPES:
        raise KernelInputError(
            f"{who} needs q, k, v of one dtype among float16/bfloat16/float32, got "
            f"{q.dtype}/{k.dtype}/{v.dtype}; cast them with .to(torch.float16) or .to(torch.bfloat16)"
        )
    B, Hq, Nq, D = q.shape
    if k.shape != v.shape or k.shape[0] != B or k.shape[3] != D:
        raise KernelInputError(
            f"k and v must be [B, Hkv, Nk, D] matching q {tuple(q.shape)}, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    Hkv, Nk = k.shape[1], k.shape[2]
    if Hq % Hkv:
        raise KernelInputError(
            f"query heads ({Hq}) must be a multiple of key/value heads ({Hkv}) for grouped-query attention"
        )
    return B, Hq, Hkv, Nq, Nk, D


def _check(q, k, v, causal):
    """Raise ValueError naming the problem and the fix; return (B, Hq, Hkv, Nq, Nk, D)."""
    B, Hq, Hkv, Nq, Nk, D = check_qkv(q, k, v, "int8_attention")
    if D not in HEAD_DIMS:
        raise KernelInputError(
            f"int8_attention supports head dim {HEAD_DIMS}, got {D}; pad the head dim or use F.scaled_dot_product_attention"
        )
    if causal and Nq > Nk:
        raise KernelInputError(f"causal attention needs Nq <= Nk (bottom-right aligned), got Nq={Nq}, Nk={Nk}")
    return B, Hq, Hkv, Nq, Nk, D


def _token_mean(x: torch.Tensor) -> torch.Tensor:
    """fp32 mean over tokens, [B, H, 1, D]; one function for kernel path and reference (same bits)."""
    return x.mean(dim=-2, keepdim=True, dtype=torch.float32)


def _quantize_per_block(x: torch.Tensor, block: int, scale: float = 1.0, mean: torch.Tensor | None = None):
    """INT8 per block of `block` rows along the token axis: one absmax/127 scale per block.

    `mean` ([B, H, 1, D] fp32), if given, is subtracted first (smoothing). Rounds half away from
    zero (the fused Triton kernel does the same, bit for bit).
    Returns (x_int8 [B, H, N, D], scales [B, H, ceil(N/block)] fp32 with `scale` folded in).
    The ragged tail block gets a scale from its real rows only (padding is zeros).
    """
    B, H, N, D = x.shape
    nb = -(-N // block)
    xf = x.float() if mean is None else x.float() - mean
    xb = F.pad(xf, (0, 0, 0, nb * block - N)).view(B, H, nb, block, D)
    step = xb.abs().amax(dim=(-1, -2)).clamp_min(1e-8) / 127.0
    t = xb / step[..., None, None]
    xq = torch.floor(t.abs() + 0.5).copysign(t).clamp_(-127, 127).to(torch.int8)
    return xq.view(B, H, nb * block, D)[:, :, :N], (step * scale).contiguous()


def _quantize_qk(q, k, sm_scale, smooth_k, block_q, block_k):
    """Smooth K, then quantise Q (with sm_scale*log2e folded into its scales) and K per block."""
    q8, sq = _quantize_per_block(q, block_q, sm_scale * LOG2E)
    k8, sk = _quantize_per_block(k, block_k, mean=_token_mean(k) if smooth_k else None)
    return q8, sq, k8, sk


def _pv_dtype(dtype):
    """P·V runs in 16-bit: the input's own 16-bit type, fp16 for fp32 inputs."""
    return dtype if dtype in (torch.float16, torch.bfloat16) else torch.float16


def _quantize_v_fp8(v: torch.Tensor):
    """V -> float8_e4m3fn, smoothed and scaled per (batch, head, channel).

    V's token mean is subtracted first and added back to the output (exact: each softmax row sums
    to 1). Without that, a large V channel bias (CogVideoX) takes e4m3's 3 mantissa bits and the
    part of V that differs between tokens is lost. Scale: absmax over tokens / 448. Stored
    transposed (tokens contiguous), the operand layout FP8 tensor cores want for the right-hand
    side of P·V; the returned view is still [B, H, N, D]. Returns (v8, scales, means), [B, H, D].
    """
    mv = _token_mean(v)
    vc = v.float() - mv
    sv = vc.abs().amax(dim=-2, keepdim=True).clamp_min(1e-8) / FP8_MAX  # [B, H, 1, D]
    v8 = (vc / sv).clamp_(-FP8_MAX, FP8_MAX).transpose(-1, -2).contiguous().to(torch.float8_e4m3fn)
    return v8.transpose(-1, -2), sv.squeeze(-2).contiguous(), mv.squeeze(-2).contiguous()


def key_padding_from_sdpa_mask(attn_mask: torch.Tensor, B: int, Nq: int, Nk: int) -> torch.Tensor | None:
    """Turn an SDPA `attn_mask` into the [B, Nk] additive fp32 bias `key_padding_mask` takes.

    Accepts what SDPA accepts (bool, True = attend, or an additive float bias; any shape that
    broadcasts to [B, H, Nq, Nk]) and returns None when the mask is not key-only, i.e. differs
    between queries or between heads (then use dense attention). HunyuanVideo's [B, 1, 1, N] bool
    mask converts without a host sync; a mask materialised over heads or queries (LTX repeats its
    [B, 1, Nk] bias per head) costs one sync to check that the copies are equal.
    """
    if not isinstance(attn_mask, torch.Tensor) or attn_mask.dim() > 4:
        got = tuple(attn_mask.shape) if isinstance(attn_mask, torch.Tensor) else type(attn_mask).__name__
        raise KernelInputError(
            f"attn_mask must be a tensor of at most 4 dims broadcastable to [B, H, Nq, Nk], got {got}"
        )
    m = attn_mask.reshape((1,) * (4 - attn_mask.dim()) + tuple(attn_mask.shape))
    b, _, nq, nk = m.shape
    if b not in (1, B) or nq not in (1, Nq) or nk != Nk:
        raise KernelInputError(
            f"attn_mask of shape {tuple(attn_mask.shape)} does not broadcast to [B={B}, H, Nq={Nq}, Nk={Nk}]"
        )
    for dim in (1, 2):  # heads, queries: every copy must equal the first
        if m.shape[dim] > 1 and m.stride(dim) != 0:
            first = m.narrow(dim, 0, 1)
            if not bool((m == first).all()):
                return None
        m = m.narrow(dim, 0, 1)
    m = m.reshape(b, Nk)
    bias = (
        torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(~m, float("-inf"))
        if m.dtype == torch.bool
        else m.float()
    )
    return bias.expand(B, Nk).contiguous()


def _key_bias(key_padding_mask, q, k, mean_q, mean_k, sm_scale):
    """Per-key score bias in the log2 domain, [B, 1 or Hq, Nk] fp32, or None when there is none.

    Sums the key padding mask (-inf or an additive bias, the same for every head) and, with Q
    smoothing, the exact correction sm_scale * mean_q · (k_j - mean_k) (per head and key).
    """
    B, Hq, _, D = q.shape
    Hkv, Nk = k.shape[1], k.shape[2]
    bias = None
    if key_padding_mask is not None:
        m = key_padding_mask
        if m.dim() == 4 and m.shape[1] == m.shape[2] == 1:
            m = m.reshape(m.shape[0], m.shape[3])
        if m.dim() != 2 or m.shape[0] not in (1, B) or m.shape[1] != Nk or m.device != q.device:
            raise KernelInputError(
                f"key_padding_mask must be [B, Nk] or [B, 1, 1, Nk] (B={B}, Nk={Nk}) on {q.device}, got "
                f"{tuple(key_padding_mask.shape)} on {key_padding_mask.device}; for a general SDPA mask use "
                f"key_padding_from_sdpa_mask(attn_mask, B, Nq, Nk)"
            )
        if m.dtype == torch.bool:
            m = torch.zeros(m.shape, dtype=torch.float32, device=m.device).masked_fill_(~m, float("-inf"))
        bias = (m.float() * LOG2E).expand(B, Nk)[:, None]
    if mean_q is not None:
        kc = k.float() if mean_k is None else k.float() - mean_k  # the K the int8 scores see
        g = Hq // Hkv
        corr = mean_q.view(B, Hkv, g, D) @ kc.transpose(-1, -2)  # [B, Hkv, g, Nk]
        corr = corr.reshape(B, Hq, Nk) * (sm_scale * LOG2E)
        bias = corr if bias is None else corr + bias
    return None if bias is None else bias.contiguous()


class _Prepared(NamedTuple):
    q8: torch.Tensor
    sq: torch.Tensor
    k8: torch.Tensor
    sk: torch.Tensor
    v: torch.Tensor  # 16-bit V, or float8 V (transposed storage) with pv="fp8"
    sv: torch.Tensor | None  # per-channel V scales [B, Hkv, D] with pv="fp8"
    mv: torch.Tensor | None  # V's token mean [B, Hkv, D], subtracted before FP8, with pv="fp8"
    bias: torch.Tensor | None  # [B, 1 or Hq, Nk] log2-domain per-key bias


def _prepare(q, k, v, quantize, *, sm_scale, smooth_k, smooth_q, key_padding_mask, pv, granularity, block_q, block_k):
    """Everything before the attention loop, shared by kernel path and reference (`quantize` differs)."""
    if pv not in PV_MODES:
        raise KernelInputError(f"pv must be one of {PV_MODES}, got {pv!r}")
    if granularity not in GRANULARITIES:
        raise KernelInputError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if granularity == "token":  # a scale per row: quantisation blocks of one token
        block_q = block_k = 1
    mean_q = _token_mean(q) if smooth_q else None
    mean_k = _token_mean(k) if smooth_k else None
    q8, sq = quantize(q, block_q, sm_scale * LOG2E, mean_q)
    k8, sk = quantize(k, block_k, 1.0, mean_k)
    bias = _key_bias(key_padding_mask, q, k, mean_q, mean_k, sm_scale)
    if pv == "fp8":
        v, sv, mv = _quantize_v_fp8(v)
    else:
        v, sv, mv = v.to(_pv_dtype(v.dtype)), None, None
    return _Prepared(q8, sq, k8, sk, v, sv, mv, bias)


def _block_d(D):
    """Head-dim tile of both int8 kernels: 80/96 run in a masked 128-wide tile."""
    return 64 if D == 64 else 128


def int8_attention_reference(
    q,
    k,
    v,
    *,
    causal=False,
    sm_scale=None,
    smooth_k=True,
    block_q=128,
    block_k=64,
    key_padding_mask=None,
    smooth_q=False,
    pv="fp16",
    granularity="block",
):
    """PyTorch model of `int8_attention`: same quantisation, same math, softmax done in one go.

    q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D]; returns [B, Hq, Nq, D] in q's dtype. Runs on any device;
    `pv="fp8"` is emulated (float8 rounding of P and V, exact products).
    """
    B, Hq, Hkv, Nq, Nk, D = _check(q, k, v, causal)
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    p8 = _prepare(
        q,
        k,
        v,
        _quantize_per_block,
        sm_scale=sm_scale,
        smooth_k=smooth_k,
        smooth_q=smooth_q,
        key_padding_mask=key_padding_mask,
        pv=pv,
        granularity=granularity,
        block_q=block_q,
        block_k=block_k,
    )
    if granularity == "token":
        block_q = block_k = 1
    g = Hq // Hkv
    k8, sk, vv = (t.repeat_interleave(g, dim=1) for t in (p8.k8, p8.sk, p8.v.float()))
    # fp32 holds the int32 dot product exactly: |sum| <= 128 * 127^2 < 2^24.
    s = p8.q8.float() @ k8.float().transpose(-1, -2)
    sq = p8.sq.repeat_interleave(block_q, dim=-1)[..., :Nq, None]
    sk = sk.repeat_interleave(block_k, dim=-1)[..., None, :Nk]
    s = s * (sq * sk)  # log2-domain scores, scale product formed first as in the kernel
    if p8.bias is not None:
        s = s + p8.bias[:, :, None, :]
    if causal:
        s = s.masked_fill(torch.ones(Nq, Nk, dtype=torch.bool, device=s.device).triu(Nk - Nq + 1), float("-inf"))
    m = s.amax(dim=-1, keepdim=True)
    m = m.masked_fill(m == float("-inf"), 0.0)  # fully masked row: p = 0 everywhere, output 0
    p = torch.exp2(s - m)
    if pv == "fp8":
        pr = (p * FP8_MAX).to(torch.float8_e4m3fn).float()
        o = (pr @ vv) * (p8.sv.repeat_interleave(g, dim=1)[:, :, None, :] / FP8_MAX)
    else:
        o = p.to(p8.v.dtype).float() @ vv
    row_sum = p.sum(dim=-1, keepdim=True)
    o = o / torch.where(row_sum == 0, 1.0, row_sum)
    if pv == "fp8":  # add V's mean back, except on fully masked rows (output 0)
        o = o + torch.where(row_sum > 0, p8.mv.repeat_interleave(g, dim=1)[:, :, None, :], 0.0)
    return o.to(q.dtype)


_KERNEL, _QUANT_KERNEL = "accel.attention.int8_kernel", "accel.attention.int8_quant_kernel"


@_triton.custom_op("accel::int8_attention")
def _int8_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    causal: bool,
    sm_scale: float,
    smooth_k: bool,
    smooth_q: bool,
    pv: str,
    granularity: str,
    block_q: int,
    block_k: int,
    num_warps: int | None,
    num_stages: int | None,
) -> torch.Tensor:
    """q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] (one dtype among fp16/bf16/fp32, any strides, Hq a multiple of
    Hkv), key_padding_mask None, [B, Nk] or [B, 1, 1, Nk] (bool or additive float) -> [B, Hq, Nq, D] in q's
    dtype and memory layout. Arguments as `int8_attention`'s, already checked there."""
    _triton.check_device(
        "int8_attention", (q, k, v), "Move q, k, v with .cuda() or use int8_attention_reference on CPU"
    )
    if pv == "fp8" and q.is_cuda and torch.cuda.get_device_capability(q.device) < (8, 9):
        cap = ".".join(map(str, torch.cuda.get_device_capability(q.device)))
        raise KernelInputError(
            f"pv='fp8' needs FP8 tensor cores (compute capability >= 8.9: Ada, Hopper), "
            f"{torch.cuda.get_device_name(q.device)} has {cap}; use pv='fp16'"
        )
    p8 = _prepare(
        q,
        k,
        v,
        _triton.load(_QUANT_KERNEL).quantize_int8,
        sm_scale=sm_scale,
        smooth_k=smooth_k,
        smooth_q=smooth_q,
        key_padding_mask=key_padding_mask,
        pv=pv,
        granularity=granularity,
        block_q=block_q,
        block_k=block_k,
    )
    return _triton.load(_KERNEL).int8_attention_forward(
        p8,
        q,
        causal=causal,
        per_token=granularity == "token",
        block_q=block_q,
        block_k=block_k,
        num_warps=num_warps,
        num_stages=num_stages,
    )


@_int8_attention_op.register_fake
def _(q, *_):  # the output has q's shape and dtype whatever the other arguments
    return torch.empty_like(q)


def int8_attention(
    q,
    k,
    v,
    *,
    causal=False,
    sm_scale=None,
    smooth_k=True,
    block_q=128,
    block_k=64,
    key_padding_mask=None,
    smooth_q=False,
    pv="fp16",
    granularity="block",
    num_warps=None,
    num_stages=None,
):
    """INT8-QK / 16-bit-PV attention in Triton. Same contract as `int8_attention_reference`.

    q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] with any strides (a [B, N, H, D] tensor passed as
    `.transpose(1, 2)` is read in place; the output keeps q's layout). Head dims 64/80/96/128,
    fp16/bf16/fp32, CUDA tensors (CPU with TRITON_INTERPRET=1). block_q/block_k are both the
    quantisation granularity and the kernel's tile sizes (powers of two, >= 16). Runs as the custom op
    `torch.ops.accel.int8_attention`, so torch.compile traces it without a graph break.

    key_padding_mask: bool [B, Nk] (True = attend) or an additive float bias of shape [B, Nk] or
        [B, 1, 1, Nk] (as SDPA adds it); `key_padding_from_sdpa_mask` converts other SDPA masks.
    smooth_q: also subtract Q's token mean, adding the exact per-key correction back in fp32.
    pv: "fp16" runs P·V in the inputs' 16-bit type (fp16 for fp32 inputs); "fp8" in float8 e4m3
        with V smoothed (token mean added back) and scaled per channel, on GPUs of compute capability
        >= 8.9 only.
    granularity: "block" (one Q/K scale per tile, SageAttention v1) or "token" (one per row: more
        accurate on heavy-tailed Q/K; the tiles stay block_q x block_k).
    num_warps / num_stages: Triton launch options for tuning (None: a default for the tile size).
    """
    D = _check(q, k, v, causal)[-1]
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk < 16 or blk & (blk - 1):
            raise KernelInputError(f"{name} must be a power of two >= 16 (tl.dot tile), got {blk}")
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    return _int8_attention_op(
        q,
        k,
        v,
        key_padding_mask,
        causal,
        sm_scale,
        smooth_k,
        smooth_q,
        pv,
        granularity,
        block_q,
        block_k,
        num_warps,
        num_stages,
    )
