"""Finding block-sparse attention patterns online, per head, without training or profiling data.

1. Estimate how much attention mass each query block sends to each key block (matmuls in the inputs'
   dtype, bf16 on a GPU, softmax in fp32; all heads in one batched op):
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
3. `video_order`: a permutation of the sequence that lays the video grid out in tiles (frames x height x
   width), text untouched; `invert` undoes it exactly. A head attending to its own frame (spatial) is
   block-dense in frame-major order, one attending to its own position across frames (temporal) in
   position-major order, a local one in small 3-D tiles. `candidate_orders` builds those three and
   `choose_orders` picks one per head, as Sparse VideoGen does: the order in which a few probe query blocks
   need the fewest key blocks to reach the target mass (exact attention of a handful of rows: cheap).
   `gather_tokens` applies per-head orders to q/k/v and undoes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import KernelInputError
from .sparse_kernel import num_blocks

METHODS = ("antidiagonal", "pooled", "exact")


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
    if method == "antidiagonal":
        return block_mass_antidiagonal(q, k, block_q, block_k, sm_scale=sm_scale, stride=stride, key_valid=key_valid)
    if method == "pooled":
        return block_mass_pooled(q, k, block_q, block_k, sm_scale=sm_scale, key_valid=key_valid)
    if method == "exact":
        return block_mass_exact(q, k, block_q, block_k, sm_scale=sm_scale, key_valid=key_valid)
    raise KernelInputError(f"unknown search method {method!r}; choose one of {', '.join(METHODS)}")


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


def blocks_to_reach(mass, target: float):
    """Per row of `mass` [..., NBK] (summing to 1), how many of its largest entries reach `target`."""
    sorted_mass = mass.sort(dim=-1, descending=True).values
    return ((sorted_mass.cumsum(-1) - sorted_mass) < target).sum(-1)


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
    q,
    k,
    *,
    target,
    block_q,
    block_k,
    sm_scale,
    method="antidiagonal",
    stride=8,
    key_valid=None,
    text_position="none",
    text_tokens=0,
):
    """The block mask [B, H, NBQ, NBK] for one self/joint attention call (q, k in SDPA layout;
    key_valid [B, N] or [B, Hkv, N])."""
    nq, nk = q.shape[2], k.shape[2]
    if target >= 1.0:
        return torch.ones(
            q.shape[0], q.shape[1], num_blocks(nq, block_q), num_blocks(nk, block_k), dtype=torch.bool, device=q.device
        )
    mass = block_mass(method, q, k, block_q, block_k, sm_scale=sm_scale, key_valid=key_valid, stride=stride)
    return select_blocks(
        mass,
        target,
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


@dataclass
class TokenOrders:
    """Candidate orders of one call's sequence (video grid plus text; text stays in place in each)."""

    names: tuple[str, ...]
    perms: torch.Tensor  # long [O, N]: position i of order o holds token perms[o, i]
    inverses: torch.Tensor  # long [O, N]
    video: tuple[int, int]  # [start, end) of the video tokens, the same positions in every order


ORDERS = ("tiles", "frames", "positions")


def candidate_orders(
    grid, block_q: int, text_position: str = "none", text_tokens: int = 0, device=None, names=ORDERS
) -> TokenOrders:
    """The orders `choose_orders` picks from, per head:

    - "tiles": 3-D tiles of about block_q tokens (`default_tile`): local heads;
    - "frames": frame by frame, 2-D tiles of about block_q tokens inside each frame: spatial heads;
    - "positions": position by position, its frames together (position-major): temporal heads.

    `names` picks some of them, in that order; orders that coincide on this grid (a single frame) are
    listed once.
    """
    f, h, w = grid.frames, grid.height, grid.width
    tiles = {"tiles": default_tile(f, h, w, block_q), "frames": default_tile(1, h, w, block_q), "positions": (f, 1, 1)}
    unknown = set(names) - set(tiles)
    if unknown:
        raise KernelInputError(f"unknown token orders {sorted(unknown)}; choose among {', '.join(ORDERS)}")
    kept, perms = [], []
    for name in names:
        tile = tiles[name]
        perm = video_order(grid, tile, text_position, text_tokens, device=device)
        if not any(torch.equal(perm, p) for p in perms):
            kept.append(name)
            perms.append(perm)
    perms = torch.stack(perms)
    start = text_tokens if text_position == "prefix" else 0
    return TokenOrders(tuple(kept), perms, torch.stack([invert(p) for p in perms]), (start, start + grid.tokens))


def choose_orders(
    q, k, orders: TokenOrders, *, block_q, block_k, target, sm_scale, key_valid=None, probe_blocks=8, probe_rows=8
):
    """Per (batch row, key/value head), the index of the order in `orders` that concentrates the most
    attention mass into the fewest blocks: long [B, Hkv] (query heads sharing a key/value head vote).

    For each order, `probe_blocks` query blocks spread over the video (in that order) are probed with
    `probe_rows` of their rows: their exact attention over all keys, summed into that order's key blocks
    and averaged over the block's rows, gives the key blocks the block needs to reach `target`. Cost per
    order: probe_blocks * probe_rows query rows against all keys, in the inputs' dtype.
    """
    B, H, N, _ = q.shape
    Hkv = k.shape[1]
    n_orders = orders.perms.shape[0]
    if n_orders == 1:
        return torch.zeros(B, Hkv, dtype=torch.long, device=q.device)
    start, end = orders.video
    first, last = num_blocks(start, block_q), (end // block_q) - 1  # query blocks made only of video
    if last < first:
        first, last = 0, num_blocks(N, block_q) - 1
    blocks = torch.linspace(first, last, probe_blocks).round().long().unique()
    rows = torch.arange(0, block_q, max(1, block_q // probe_rows))
    positions = (blocks[:, None] * block_q + rows).flatten().clamp_max(N - 1).to(q.device)
    k = _expand_kv(k, H).transpose(-1, -2)
    visible = _visible(key_valid, H)
    nbk = num_blocks(N, block_k)
    cost = []
    for o in range(n_orders):
        s = (q.index_select(2, orders.perms[o, positions]) * sm_scale) @ k  # [B, H, rows, N], model key order
        if visible is not None:
            s = s.masked_fill(~visible[:, :, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1, dtype=torch.float32).nan_to_num_(0.0).index_select(-1, orders.perms[o])
        p = F.pad(p, (0, nbk * block_k - N)).view(B, H, blocks.numel(), rows.numel(), nbk, block_k).sum(-1).mean(-2)
        cost.append(blocks_to_reach(p, target).float().mean(-1))  # [B, H]
    cost = torch.stack(cost, -1).view(B, Hkv, H // Hkv, n_orders).sum(2)
    return cost.argmin(-1)


def gather_tokens(x, index):
    """x [B, H, N, D] with the tokens of each (batch row, head) taken in `index` [B, H, N] order."""
    return x.gather(2, index[..., None].expand(*index.shape, x.shape[-1]))
