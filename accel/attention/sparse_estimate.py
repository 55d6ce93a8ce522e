"""Block importance for the sparse-attention search (`accel.attention.pattern`): how much attention mass each
query block sends to each key block, estimated online without training or profiling data.

Matmuls in the inputs' dtype (bf16 on a GPU), softmax in fp32, all heads in one batched op:

- `block_mass_rows`: the exact attention of every stride-th query row, over all keys, summed into key
  blocks and averaged per query block: unbiased, about 1/stride of the Q·Kᵀ cost. Given V as well, it
  also measures on those rows how far each key block's stand-in (the kernel's `remainder`) is from the
  block itself, the ranking `select_blocks` then uses. Sampled rows can miss a key block that only the
  other rows of a query block need (sharp local heads); the antidiagonal cannot.
- `block_mass_antidiagonal` (XAttention's idea): within every stride x stride sub-block of QKᵀ, the sum
  along one antidiagonal touches every query row and every key column once, so it is a cheap,
  unbiased-looking sample of the sub-block. One matmul of size (N/stride) x (N/stride) x (stride*D)
  gives all of them: about 1/stride of the Q·Kᵀ cost.
- `block_mass_pooled` (SpargeAttn-like): mean-pooled Q and K blocks, one score per block pair; the
  cheapest, good where blocks are internally similar (which the 3-D reordering helps with).
- `block_mass_exact`: the true mass from the full softmax (chunked over query blocks); the cost of one
  dense Q·Kᵀ, affordable when searched rarely and reused, and the yardstick in tests.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..errors import KernelInputError
from .sparse_kernel import block_means, num_blocks

METHODS = ("rows", "antidiagonal", "pooled", "exact")


def _pad_tokens(x, multiple):
    n = x.shape[-2]
    return F.pad(x, (0, 0, 0, num_blocks(n, multiple) * multiple - n))


def _expand_kv(k, heads):
    return k if k.shape[1] == heads else k.repeat_interleave(heads // k.shape[1], dim=1)


def _visible(key_valid, heads):
    """key_valid [B, N] or [B, Hkv, N] -> bool [B, 1 or heads, N] (None stays None)."""
    if key_valid is None:
        return None
    return key_valid[:, None] if key_valid.dim() == 2 else _expand_kv(key_valid, heads)


# Score matrices are built a chunk of query blocks at a time, at most this many fp32 elements each
# (1 GiB), so that a 100k-token video is searched in bounded memory.
CHUNK_ELEMENTS = 1 << 28


def _row_chunk(rows_per_block: int, elements_per_row: int) -> int:
    """Query blocks per chunk so that a chunk's score matrix stays under CHUNK_ELEMENTS."""
    return max(1, CHUNK_ELEMENTS // max(1, rows_per_block * elements_per_row))


def block_mass_exact(q, k, block_q, block_k, *, sm_scale, key_valid=None):
    """True attention mass [B, H, NBQ, NBK] (fp32, rows sum to 1 over visible keys), averaged over the
    query rows of each block. Q·Kᵀ in the inputs' dtype (exact for fp32 inputs), softmax in fp32."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    k = _expand_kv(k, H)
    visible = _visible(key_valid, H)
    nbq, nbk = num_blocks(Nq, block_q), num_blocks(Nk, block_k)
    out = q.new_zeros(B, H, nbq, nbk, dtype=torch.float32)
    rows = block_q * _row_chunk(block_q, B * H * Nk)
    for start in range(0, Nq, rows):
        s = (q[:, :, start : start + rows] * sm_scale) @ k.transpose(-1, -2)
        if visible is not None:
            s = s.masked_fill(~visible[:, :, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1, dtype=torch.float32).nan_to_num_(0.0)
        p = F.pad(p, (0, nbk * block_k - Nk)).view(B, H, -1, nbk, block_k).sum(-1)  # [B, H, rows, NBK]
        p = _pad_tokens(p, block_q).view(B, H, -1, block_q, nbk).sum(-2)
        out[:, :, start // block_q : start // block_q + p.shape[2]] = p
    counts = torch.full((nbq,), float(block_q), device=q.device)
    counts[-1] = Nq - (nbq - 1) * block_q
    return out / counts[:, None]


def sampled_rows(nq: int, block_q: int, stride: int, device=None):
    """Query rows `block_mass_rows` reads: in every query block, the middle row of each group of `stride` rows
    (the first row of a ragged last block too short to hold one)."""
    offset = stride // 2
    rows = torch.arange(nq, device=device)
    rows = rows[(rows % block_q) % stride == offset]
    last = (num_blocks(nq, block_q) - 1) * block_q
    if rows.numel() == 0 or rows[-1] < last:
        rows = torch.cat([rows, torch.tensor([last], device=device)])
    return rows


class _StandIns:
    """The kernel's stand-ins (`sparse_kernel.block_means`) of k, v [B, Hkv, Nk, D] for H query heads, and
    `error`: how far each key block's stand-in share of a row's output is from the block's exact share."""

    def __init__(self, k, v, block_k, key_valid, heads):
        k_mean, v_mean, log2_count = block_means(k, v, block_k, key_valid)
        self.k_mean, self.v_mean = _expand_kv(k_mean, heads), _expand_kv(v_mean, heads)
        self.log_count = _expand_kv(log2_count, heads)[:, :, None, :] * math.log(2)
        self.v_blocks = _expand_kv(_pad_tokens(v.float(), block_k), heads).view(*self.k_mean.shape[:3], block_k, -1)

    def error(self, q_scaled, scores, p):
        """q_scaled [B, H, R, D] (sm_scale folded in), their scores [B, H, R, Nk] (masked keys -inf) and
        softmax p [B, H, R, NBK, block_k] -> (error [B, H, R, NBK], norm of each row's output [B, H, R])."""
        exact = torch.einsum("bhrnk,bhnkd->bhrnd", p, self.v_blocks)
        log_z = torch.logsumexp(scores.float(), dim=-1, keepdim=True)  # -inf: a row that sees no key
        log_z = torch.where(torch.isfinite(log_z), log_z, float("inf"))  # its stand-ins weigh 0 too
        weight = (q_scaled.float() @ self.k_mean.transpose(-1, -2) + self.log_count - log_z).exp()
        error = (exact - weight[..., None] * self.v_mean[:, :, None]).norm(dim=-1)
        return error, exact.sum(-2).norm(dim=-1)


def block_mass_rows(q, k, block_q, block_k, *, sm_scale, stride=8, key_valid=None, value=None):
    """Exact attention of every `stride`-th query row (`sampled_rows`), summed into key blocks and averaged
    over each query block's sampled rows: an unbiased estimate of the block's mean mass (each sampled row is
    normalised over all keys), at 1/stride of a Q·Kᵀ. Matmul in the inputs' dtype, softmax in fp32.

    With `value` ([B, Hkv, Nk, D]) it returns (mass, error): error [B, H, NBQ, NBK] is, summed over the sampled
    rows, the norm of the difference between a key block's exact share of the row's output and its stand-in's
    (`sparse_kernel.block_means`: mean key and value, weighted by the key count), the error `remainder=True`
    makes where the block is skipped. The cost of P·V on those rows is added."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    nbq, nbk = num_blocks(Nq, block_q), num_blocks(Nk, block_k)
    stand_ins = _StandIns(k, value, block_k, key_valid, H) if value is not None else None
    k = _expand_kv(k, H)
    visible = _visible(key_valid, H)
    rows = sampled_rows(Nq, block_q, stride, q.device)
    owner = rows // block_q
    out = q.new_zeros(B, H, nbq, nbk, dtype=torch.float32)
    error = out.clone() if value is not None else None
    chunk = _row_chunk(1, B * H * (Nk + (nbk * value.shape[-1] if value is not None else 0)))
    for start in range(0, rows.numel(), chunk):
        part = rows[start : start + chunk]
        q_part = q.index_select(2, part) * sm_scale
        s = q_part @ k.transpose(-1, -2)
        if visible is not None:
            s = s.masked_fill(~visible[:, :, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1, dtype=torch.float32).nan_to_num_(0.0)
        p = F.pad(p, (0, nbk * block_k - Nk)).view(B, H, part.numel(), nbk, block_k)
        out.index_add_(2, owner[start : start + chunk], p.sum(-1))
        if value is not None:
            error.index_add_(2, owner[start : start + chunk], stand_ins.error(q_part, s, p)[0])
    mass = out / torch.bincount(owner, minlength=nbq).clamp_min(1)[:, None]
    return mass if value is None else (mass, error)


def block_mass_pooled(q, k, block_q, block_k, *, sm_scale, key_valid=None):
    """Mass estimate from mean-pooled Q/K blocks: softmax over key blocks of pooled scores, each block
    weighted by its number of visible keys."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    k = _expand_kv(k, H).float()
    nbq, nbk = num_blocks(Nq, block_q), num_blocks(Nk, block_k)
    visible = _visible(key_valid, H)
    if visible is None:
        visible = torch.ones(B, 1, Nk, dtype=torch.bool, device=q.device)
    w = F.pad(visible.float(), (0, nbk * block_k - Nk)).view(B, visible.shape[1], nbk, block_k, 1)
    kp = (_pad_tokens(k, block_k).reshape(B, H, nbk, block_k, -1) * w).sum(-2) / w.sum(-2).clamp_min(1)
    qp = _pad_tokens(q.float(), block_q).reshape(B, H, nbq, block_q, -1).sum(-2)
    qcount = torch.full((nbq, 1), float(block_q), device=q.device)
    qcount[-1] = Nq - (nbq - 1) * block_q
    s = (qp / qcount) @ kp.transpose(-1, -2) * sm_scale + w.sum(-2).squeeze(-1)[:, :, None, :].log()
    return torch.softmax(s, dim=-1).nan_to_num_(0.0)


def block_mass_antidiagonal(q, k, block_q, block_k, *, sm_scale, stride=8, key_valid=None):
    """XAttention-style estimate: antidiagonal sums of stride x stride sub-blocks, softmax over them per
    strided query row, summed into blocks and averaged over the block's rows.

    One batched matmul over all heads in the inputs' dtype (bf16 on a GPU: 1/stride of a Q·Kᵀ), softmax
    in fp32; the score matrix is never larger than CHUNK_ELEMENTS."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if block_q % stride or block_k % stride:
        raise KernelInputError(f"antidiagonal stride {stride} must divide block_q {block_q} and block_k {block_k}")
    nbq, nbk = num_blocks(Nq, block_q), num_blocks(Nk, block_k)
    k = _expand_kv(k, H)
    # Row group i of Q in reverse order against column group j of K in order: the antidiagonal of (i, j);
    # the scale (and 1/stride: the mean along the antidiagonal) is folded into the small Q.
    qr = (
        (_pad_tokens(q, block_q) * (sm_scale / stride))
        .reshape(B, H, -1, stride, D)
        .flip(-2)
        .reshape(B, H, -1, stride * D)
    )
    kr = _pad_tokens(k, block_k).reshape(B, H, -1, stride * D)
    visible = _visible(key_valid, H)
    group_ok = None
    if visible is not None:
        group_ok = F.pad(visible, (0, nbk * block_k - Nk)).view(B, visible.shape[1], -1, stride).any(-1)
    elif kr.shape[2] * stride > Nk:  # key groups made only of padding
        group_ok = (torch.arange(kr.shape[2], device=q.device) * stride < Nk)[None, None]
    groups_q = block_q // stride
    out = q.new_zeros(B, H, nbq, nbk, dtype=torch.float32)
    chunk = _row_chunk(groups_q, B * H * kr.shape[2])
    for first in range(0, nbq, chunk):
        rows = slice(first * groups_q, (first + chunk) * groups_q)
        s = qr[:, :, rows] @ kr.transpose(-1, -2)
        if group_ok is not None:
            s = s.masked_fill(~group_ok[:, :, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1, dtype=torch.float32).nan_to_num_(0.0)  # [B, H, rows, NBK*bk/stride]
        n = p.shape[2] // groups_q
        p = p.view(B, H, p.shape[2], nbk, block_k // stride).sum(-1)  # [B, H, rows, NBK]
        if (first + n) * block_q > Nq:  # padded row groups of the last block do not vote
            row_ok = torch.arange(rows.start, rows.start + p.shape[2], device=q.device) * stride < Nq
            p = p * row_ok[:, None]
        out[:, :, first : first + n] = p.view(B, H, n, groups_q, nbk).sum(-2)
    return out / out.sum(-1, keepdim=True).clamp_min(1e-30)


def block_mass(method, q, k, block_q, block_k, *, sm_scale, key_valid=None, stride=8):
    if method == "rows":
        return block_mass_rows(q, k, block_q, block_k, sm_scale=sm_scale, stride=stride, key_valid=key_valid)
    if method == "antidiagonal":
        return block_mass_antidiagonal(q, k, block_q, block_k, sm_scale=sm_scale, stride=stride, key_valid=key_valid)
    if method == "pooled":
        return block_mass_pooled(q, k, block_q, block_k, sm_scale=sm_scale, key_valid=key_valid)
    if method == "exact":
        return block_mass_exact(q, k, block_q, block_k, sm_scale=sm_scale, key_valid=key_valid)
    raise KernelInputError(f"unknown search method {method!r}; choose one of {', '.join(METHODS)}")
