"""Finding block-sparse attention patterns online, per head, without training or profiling data.

1. Estimate how much attention mass each query block sends to each key block:
   - `block_mass_antidiagonal` (XAttention's idea): within every stride x stride sub-block of QKᵀ, the sum
     along one antidiagonal touches every query row and every key column once, so it is a cheap,
     unbiased-looking sample of the sub-block. One matmul of size (N/stride) x (N/stride) x (stride*D)
     gives all of them: about 1/stride of the Q·Kᵀ cost.
   - `block_mass_pooled` (SpargeAttn-like): mean-pooled Q and K blocks, one score per block pair; the
     cheapest, good where blocks are internally similar (which the 3-D reordering below helps with).
   - `block_mass_exact`: the true mass from the full softmax (chunked over query blocks); the cost of one
     dense Q·Kᵀ, affordable when searched rarely and reused, and the yardstick in tests.
2. `select_blocks`: per query block, keep the fewest key blocks whose estimated mass reaches `target`,
   plus the diagonal blocks and every block holding text (text tokens as queries and as keys).
3. `video_order`: a permutation of the sequence that lays the video grid out in small 3-D tiles
   (frames x height x width), text untouched, so that heads attending to a local 3-D neighbourhood, to
   their own frame (spatial) or to their own position across frames (temporal) all hit few, fuller
   blocks; `invert` undoes it exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .sparse_kernel import num_blocks

METHODS = ("antidiagonal", "pooled", "exact")


def _pad_tokens(x, multiple):
    n = x.shape[-2]
    return F.pad(x, (0, 0, 0, num_blocks(n, multiple) * multiple - n))


def _expand_kv(k, heads):
    return k.repeat_interleave(heads // k.shape[1], dim=1)


# Score matrices are built a chunk of query blocks at a time, at most this many fp32 elements each
# (1 GiB), so that a 100k-token video is searched in bounded memory.
CHUNK_ELEMENTS = 1 << 28


def _row_chunk(rows_per_block: int, elements_per_row: int) -> int:
    """Query blocks per chunk so that a chunk's score matrix stays under CHUNK_ELEMENTS."""
    return max(1, CHUNK_ELEMENTS // max(1, rows_per_block * elements_per_row))


def block_mass_exact(q, k, block_q, block_k, *, sm_scale, key_valid=None):
    """True attention mass [B, H, NBQ, NBK] (fp32, rows sum to 1 over visible keys), averaged over the
    query rows of each block."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    k = _expand_kv(k, H).float()
    nbq, nbk = num_blocks(Nq, block_q), num_blocks(Nk, block_k)
    out = q.new_zeros(B, H, nbq, nbk, dtype=torch.float32)
    rows = block_q * _row_chunk(block_q, B * H * Nk)
    for start in range(0, Nq, rows):
        qs = q[:, :, start : start + rows].float()
        s = (qs @ k.transpose(-1, -2)) * sm_scale
        if key_valid is not None:
            s = s.masked_fill(~key_valid[:, None, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num_(0.0)
        p = F.pad(p, (0, nbk * block_k - Nk)).view(B, H, -1, nbk, block_k).sum(-1)  # [B, H, rows, NBK]
        p = _pad_tokens(p, block_q).view(B, H, -1, block_q, nbk).sum(-2)
        out[:, :, start // block_q : start // block_q + p.shape[2]] = p
    counts = torch.full((nbq,), float(block_q), device=q.device)
    counts[-1] = Nq - (nbq - 1) * block_q
    return out / counts[:, None]


def block_mass_pooled(q, k, block_q, block_k, *, sm_scale, key_valid=None):
    """Mass estimate from mean-pooled Q/K blocks: softmax over key blocks of pooled scores, each block
    weighted by its number of visible keys."""
    B, H, Nq, _ = q.shape
    Nk = k.shape[2]
    k = _expand_kv(k, H).float()
    nbq, nbk = num_blocks(Nq, block_q), num_blocks(Nk, block_k)
    valid = torch.ones(B, Nk, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    w = F.pad(valid.float(), (0, nbk * block_k - Nk)).view(B, 1, nbk, block_k, 1)
    kp = (_pad_tokens(k, block_k).view(B, H, nbk, block_k, -1) * w).sum(-2) / w.sum(-2).clamp_min(1)
    qp = _pad_tokens(q.float(), block_q).view(B, H, nbq, block_q, -1).sum(-2)
    qcount = torch.full((nbq, 1), float(block_q), device=q.device)
    qcount[-1] = Nq - (nbq - 1) * block_q
    s = (qp / qcount) @ kp.transpose(-1, -2) * sm_scale + w.sum(-2).squeeze(-1)[:, :, None, :].log()
    return torch.softmax(s, dim=-1).nan_to_num_(0.0)


def block_mass_antidiagonal(q, k, block_q, block_k, *, sm_scale, stride=8, key_valid=None):
    """XAttention-style estimate: antidiagonal sums of stride x stride sub-blocks, softmax over them per
    strided query row, summed into blocks and averaged over the block's rows."""
    B, H, Nq, D = q.shape
    Nk = k.shape[2]
    if block_q % stride or block_k % stride:
        raise ValueError(f"antidiagonal stride {stride} must divide block_q {block_q} and block_k {block_k}")
    nbq, nbk = num_blocks(Nq, block_q), num_blocks(Nk, block_k)
    k = _expand_kv(k, H)
    # Row group i of Q in reverse order against column group j of K in order: the antidiagonal of (i, j).
    qr = _pad_tokens(q.float(), block_q).view(B, H, -1, stride, D).flip(-2).reshape(B, H, -1, stride * D)
    kr = _pad_tokens(k.float(), block_k).view(B, H, -1, stride * D)
    valid = torch.ones(B, Nk, dtype=torch.bool, device=q.device) if key_valid is None else key_valid
    group_ok = F.pad(valid, (0, nbk * block_k - Nk)).view(B, -1, stride).any(-1)
    groups_q = block_q // stride
    out = q.new_zeros(B, H, nbq, nbk, dtype=torch.float32)
    chunk = _row_chunk(groups_q, B * H * kr.shape[2])
    for first in range(0, nbq, chunk):
        rows = slice(first * groups_q, (first + chunk) * groups_q)
        s = (qr[:, :, rows] @ kr.transpose(-1, -2)) * (sm_scale / stride)  # mean score along the antidiagonal
        s = s.masked_fill(~group_ok[:, None, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num_(0.0)  # [B, H, rows, NBK*bk/stride]
        row_ok = torch.arange(rows.start, rows.start + p.shape[2], device=q.device) * stride < Nq
        p = p * row_ok[:, None]  # padded row groups do not vote
        n = p.shape[2] // groups_q
        out[:, :, first : first + n] = p.view(B, H, n, groups_q, nbk, block_k // stride).sum((-1, -3))
    return out / out.sum(-1, keepdim=True).clamp_min(1e-30)


def block_mass(method, q, k, block_q, block_k, *, sm_scale, key_valid=None, stride=8):
    if method == "antidiagonal":
        return block_mass_antidiagonal(q, k, block_q, block_k, sm_scale=sm_scale, stride=stride, key_valid=key_valid)
    if method == "pooled":
        return block_mass_pooled(q, k, block_q, block_k, sm_scale=sm_scale, key_valid=key_valid)
    if method == "exact":
        return block_mass_exact(q, k, block_q, block_k, sm_scale=sm_scale, key_valid=key_valid)
    raise ValueError(f"unknown search method {method!r}; choose one of {', '.join(METHODS)}")


def diagonal_blocks(nq: int, nk: int, block_q: int, block_k: int, device=None):
    """Bool [NBQ, NBK]: key blocks whose token range overlaps the query block's (the block diagonal)."""
    qs = torch.arange(num_blocks(nq, block_q), device=device)[:, None] * block_q
    ks = torch.arange(num_blocks(nk, block_k), device=device)[None, :] * block_k
    return (ks < qs + block_q) & (qs < ks + block_k)


def text_blocks(n: int, block: int, text_position: str, text_tokens: int, device=None):
    """Bool [ceil(n / block)]: blocks that hold at least one text token."""
    starts = torch.arange(num_blocks(n, block), device=device) * block
    ends = (starts + block).clamp_max(n)
    if text_position == "prefix" and text_tokens:
        return starts < text_tokens
    if text_position == "suffix" and text_tokens:
        return ends > n - text_tokens
    return torch.zeros_like(starts, dtype=torch.bool)


def select_blocks(mass, target: float, *, always_q=None, always_k=None, diagonal=None):
    """Per query block, the fewest key blocks whose mass reaches `target` (>= 1 keeps all), plus forced
    blocks: whole rows for `always_q` [NBQ], whole columns for `always_k` [NBK], and `diagonal` [NBQ, NBK].

    `mass` [B, H, NBQ, NBK] with rows summing to 1. Returns bool of the same shape.
    """
    if target >= 1.0:
        return torch.ones_like(mass, dtype=torch.bool)
    sorted_mass, order = mass.sort(dim=-1, descending=True)
    before = sorted_mass.cumsum(-1) - sorted_mass  # mass of the blocks ranked above this one
    keep_sorted = before < target
    keep = torch.zeros_like(keep_sorted).scatter_(-1, order, keep_sorted)
    if diagonal is not None:
        keep |= diagonal
    if always_k is not None:
        keep |= always_k[None, None, None, :]
    if always_q is not None:
        keep |= always_q[None, None, :, None]
    return keep


def search_pattern(
    q, k, *, target, block_q, block_k, sm_scale, method="antidiagonal", stride=8, key_valid=None,
    text_position="none", text_tokens=0,
):
    """The block mask [B, H, NBQ, NBK] for one self/joint attention call (q, k in SDPA layout)."""
    nq, nk = q.shape[2], k.shape[2]
    if target >= 1.0:
        return torch.ones(q.shape[0], q.shape[1], num_blocks(nq, block_q), num_blocks(nk, block_k),
                          dtype=torch.bool, device=q.device)
    mass = block_mass(method, q, k, block_q, block_k, sm_scale=sm_scale, key_valid=key_valid, stride=stride)
    return select_blocks(
        mass, target,
        always_q=text_blocks(nq, block_q, text_position, text_tokens, q.device),
        always_k=text_blocks(nk, block_k, text_position, text_tokens, q.device),
        diagonal=diagonal_blocks(nq, nk, block_q, block_k, q.device) if nq == nk else None,
    )


def default_tile(frames: int, height: int, width: int, tokens: int) -> tuple[int, int, int]:
    """A 3-D tile of about `tokens` tokens: double width, height, frames in turn, within the grid."""
    tile = [1, 1, 1]
    dims = (frames, height, width)
    while math.prod(tile) < tokens:
        grown = False
        for axis in (2, 1, 0):
            if tile[axis] * 2 <= dims[axis] and math.prod(tile) < tokens:
                tile[axis] *= 2
                grown = True
        if not grown:
            break
    return tuple(tile)


def video_order(grid, tile, text_position: str = "none", text_tokens: int = 0, device=None):
    """Permutation [text + video] of the sequence: video tokens (frame-major in the model) regrouped
    tile by tile, each tile frame-major inside; text tokens stay where they are."""
    f, h, w = grid.frames, grid.height, grid.width
    tf, th, tw = tile
    ff, hh, ww = torch.meshgrid(
        torch.arange(f, device=device), torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij"
    )
    tiles_h, tiles_w = num_blocks(h, th), num_blocks(w, tw)
    tile_id = ((ff // tf) * tiles_h + hh // th) * tiles_w + ww // tw
    inner = ((ff % tf) * th + hh % th) * tw + ww % tw
    video = torch.argsort((tile_id * (tf * th * tw) + inner).flatten())
    text = torch.arange(text_tokens, device=device)
    if text_position == "prefix":
        return torch.cat([text, video + text_tokens])
    if text_position == "suffix":
        return torch.cat([video, text + video.numel()])
    return video


def invert(order):
    """The inverse permutation: x[..., order, :][..., invert(order), :] == x."""
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel(), device=order.device)
    return inverse
