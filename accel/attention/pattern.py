"""Finding block-sparse attention patterns online, per head, without training or profiling data.

1. Estimate how much attention mass each query block sends to each key block (`accel.attention.sparse_estimate`:
   sampled exact rows, XAttention's antidiagonals, pooled blocks, or the exact mass).
2. `select_blocks`: per query block, keep the fewest key blocks whose estimated mass reaches `target`,
   plus the diagonal blocks and every block holding text (text tokens as queries and as keys). With a
   ranking (the stand-ins' errors) it keeps as many blocks, but the ones ranked highest: with the remainder
   a skipped block is approximated, not lost, so the blocks worth computing are those approximated worst.
3. `video_order`: a permutation of the sequence that lays the video grid out in tiles (frames x height x
   width), text untouched; `invert` undoes it exactly. A head attending to its own frame (spatial) is
   block-dense in frame-major order, one attending to its own position across frames (temporal) in
   position-major order, a local one in small 3-D tiles. `candidate_orders` builds those three and the
   model's own, and `choose_orders` picks one per head, as Sparse VideoGen does: the order in which a few
   probe query blocks need the fewest key blocks to reach the target mass, or, for the remainder, whose
   skipped blocks' stand-ins err least at equal kept blocks (exact attention of a handful of rows: cheap).
   `gather_tokens` applies per-head orders to q/k/v and undoes them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import KernelInputError
from .sparse_estimate import (  # noqa: F401 (the estimators are part of this module's interface)
    METHODS,
    _expand_kv,
    _StandIns,
    _visible,
    block_mass,
    block_mass_antidiagonal,
    block_mass_exact,
    block_mass_pooled,
    block_mass_rows,
    sampled_rows,
)
from .sparse_kernel import num_blocks


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


def select_blocks(mass, target: float, *, always_q=None, always_k=None, diagonal=None, rank=None):
    """Per query block, the fewest key blocks whose mass reaches `target` (>= 1 keeps all), plus forced
    blocks: whole rows for `always_q` [NBQ], whole columns for `always_k` [NBK], and `diagonal` [NBQ, NBK].
    With `rank` (same shape as `mass`) as many blocks are kept, but the ones ranked highest by it.

    `mass` [B, H, NBQ, NBK] with rows summing to 1. Returns bool of the same shape.
    """
    if target >= 1.0:
        return torch.ones_like(mass, dtype=torch.bool)
    sorted_mass, order = mass.sort(dim=-1, descending=True)
    before = sorted_mass.cumsum(-1) - sorted_mass  # mass of the blocks ranked above this one
    keep_sorted = before < target
    if rank is not None:
        order = rank.sort(dim=-1, descending=True, stable=True).indices
        keep_sorted = torch.arange(mass.shape[-1], device=mass.device) < keep_sorted.sum(-1, keepdim=True)
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
    value=None,
):
    """The block mask [B, H, NBQ, NBK] for one self/joint attention call (q, k in SDPA layout;
    key_valid [B, N] or [B, Hkv, N]). With `value` and method "rows" (for a kernel run with `remainder=True`):
    as many blocks as the mass target asks, but the ones whose stand-ins would err most (`block_mass_rows`)."""
    nq, nk = q.shape[2], k.shape[2]
    if target >= 1.0:
        return torch.ones(
            q.shape[0], q.shape[1], num_blocks(nq, block_q), num_blocks(nk, block_k), dtype=torch.bool, device=q.device
        )
    rank = None
    if value is not None and method == "rows":
        mass, rank = block_mass_rows(
            q, k, block_q, block_k, sm_scale=sm_scale, stride=stride, key_valid=key_valid, value=value
        )
    else:
        mass = block_mass(method, q, k, block_q, block_k, sm_scale=sm_scale, key_valid=key_valid, stride=stride)
    return select_blocks(
        mass,
        target,
        rank=rank,
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


ORDERS = ("model", "tiles", "frames", "positions")


def candidate_orders(
    grid, block_q: int, text_position: str = "none", text_tokens: int = 0, device=None, names=ORDERS
) -> TokenOrders:
    """The orders `choose_orders` picks from, per head:

    - "model": the model's own (frame-major) order, which no other order beats on some heads and which the
      kernel runs without a gather;
    - "tiles": 3-D tiles of about block_q tokens (`default_tile`): local heads;
    - "frames": frame by frame, 2-D tiles of about block_q tokens inside each frame: spatial heads;
    - "positions": position by position, its frames together (position-major): temporal heads.

    `names` picks some of them, in that order; orders that coincide on this grid (a single frame) are
    listed once.
    """
    f, h, w = grid.frames, grid.height, grid.width
    tiles = {
        "model": (1, h, w),  # whole frames, frame-major: the model's own order
        "tiles": default_tile(f, h, w, block_q),
        "frames": default_tile(1, h, w, block_q),
        "positions": (f, 1, 1),
    }
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
    q,
    k,
    orders: TokenOrders,
    *,
    block_q,
    block_k,
    target,
    sm_scale,
    key_valid=None,
    probe_blocks=8,
    probe_rows=8,
    value=None,
):
    """Per (batch row, key/value head), the index of the order in `orders` that concentrates the most
    attention mass into the fewest blocks: long [B, Hkv] (query heads sharing a key/value head vote).

    For each order, `probe_blocks` query blocks spread over the video (in that order) are probed with
    `probe_rows` of their rows: their exact attention over all keys, summed into that order's key blocks
    and averaged over the block's rows, gives the key blocks the block needs to reach `target`. Cost per
    order: probe_blocks * probe_rows query rows against all keys, in the inputs' dtype.

    With `value` (for a kernel run with `remainder=True`) the order whose skipped blocks' stand-ins err least
    wins instead: each probe block keeps as many blocks as the order needing fewest asks for, ranked by their
    stand-ins' error, and the error of the rest, relative to the rows' outputs, is the order's cost.
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
    k_heads = _expand_kv(k, H).transpose(-1, -2)
    visible = _visible(key_valid, H)
    nbk = num_blocks(N, block_k)
    probes = (B, H, blocks.numel(), rows.numel())
    counts, errors = [], []
    for o in range(n_orders):
        perm = orders.perms[o]
        q_probe = q.index_select(2, perm[positions]) * sm_scale
        s = q_probe @ k_heads  # [B, H, rows, N], model key order
        if visible is not None:
            s = s.masked_fill(~visible[:, :, None, :], float("-inf"))
        p = torch.softmax(s, dim=-1, dtype=torch.float32).nan_to_num_(0.0).index_select(-1, perm)
        p = F.pad(p, (0, nbk * block_k - N)).view(B, H, -1, nbk, block_k)
        counts.append(blocks_to_reach(p.sum(-1).view(*probes, nbk).mean(-2), target))  # [B, H, probe blocks]
        if value is not None:
            valid = key_valid.index_select(-1, perm) if key_valid is not None else None
            stand_ins = _StandIns(k.index_select(2, perm), value.index_select(2, perm), block_k, valid, H)
            error, out_norm = stand_ins.error(q_probe, s, p)
            errors.append((error.view(*probes, nbk).sum(-2), out_norm.view(probes).sum(-1)))
    if value is None:
        cost = torch.stack([c.float().mean(-1) for c in counts], -1)  # [B, H, orders]
    else:
        budget = torch.stack(counts).amin(0)  # [B, H, probe blocks]
        cost = []
        for error, out_norm in errors:
            ranked = error.sort(-1, descending=True).values
            skipped = ranked * (torch.arange(nbk, device=q.device) >= budget[..., None])
            cost.append((skipped.sum(-1) / out_norm.clamp_min(1e-30)).mean(-1))
        cost = torch.stack(cost, -1)
    return cost.view(B, Hkv, H // Hkv, n_orders).sum(2).argmin(-1)


def gather_tokens(x, index):
    """x [B, H, N, D] with the tokens of each (batch row, head) taken in `index` [B, H, N] order."""
    return x.gather(2, index[..., None].expand(*index.shape, x.shape[-1]))
