"""Which visual tokens of one image or video survive, and what the survivors carry.

Pure tensor functions on one segment (the visual tokens of one image or video in one row), no model
knowledge: the caller gives the token features, a score per token, and (videos) the frame length.
`select_segment` returns the kept indices, ascending, and the features to put there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .config import PruneConfig
from .errors import PruneError

_SIMILARITY_ROWS = 1024  # rows of the similarity matrix at a time: long videos have many thousand tokens


@dataclass
class Selection:
    index: torch.Tensor  # [m] kept positions within the segment, ascending
    features: torch.Tensor  # [m, D] what the language model sees at those positions
    temporal_merged: int = 0  # video tokens folded into the same place of an earlier frame


def sampled_attention(q: torch.Tensor, k: torch.Tensor, num_queries: int, scale: float) -> torch.Tensor:
    """Mean attention each of the n keys receives from `num_queries` evenly spaced queries.

    q: [H, n, d], k: [H, n, d] (heads already matched). Returns [n], a distribution.
    """
    n = q.shape[1]
    rows = torch.linspace(0, n - 1, min(num_queries, n), device=q.device).round().long().unique()
    logits = torch.einsum("hqd,hkd->hqk", q[:, rows].float(), k.float()) * scale
    return logits.softmax(-1).mean((0, 1))


def distinct_scores(x: torch.Tensor) -> torch.Tensor:
    """How far each of the n tokens x [n, D] is from the segment's per-channel median token, as a distribution [n].

    A median, not a mean: where most tokens are background the median is a background token, so the tokens that
    show something score high however large their share."""
    distance = (x.float() - x.float().median(0).values).norm(dim=-1)
    return distance / distance.sum().clamp_min(torch.finfo(torch.float32).tiny)


def temporal_merge(
    x: torch.Tensor, frame_len: int, threshold: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fold tokens that barely change from the previous frame into the earlier token at the same place.

    x: [F * frame_len, D]. Returns (survivor indices [s], summed features of each survivor's group [s, D],
    group sizes [s]). A token is compared with the running anchor at its place (the last survivor there).
    """
    frames = x.shape[0] // frame_len
    grid = x.view(frames, frame_len, -1)
    anchor = grid[0].clone()
    anchor_index = torch.arange(frame_len, device=x.device)
    keep = torch.ones(frames, frame_len, dtype=torch.bool, device=x.device)
    owner = torch.empty(frames, frame_len, dtype=torch.long, device=x.device)
    owner[0] = anchor_index
    for f in range(1, frames):
        similar = F.cosine_similarity(grid[f].float(), anchor.float(), dim=-1) > threshold
        keep[f] = ~similar
        here = torch.arange(frame_len, device=x.device) + f * frame_len
        anchor_index = torch.where(similar, anchor_index, here)
        owner[f] = anchor_index
        anchor = torch.where(similar[:, None], anchor, grid[f])
    survivors = keep.flatten().nonzero().squeeze(1)
    slot = torch.full((x.shape[0],), -1, dtype=torch.long, device=x.device)
    slot[survivors] = torch.arange(survivors.numel(), device=x.device)
    group = slot[owner.flatten()]
    sums = torch.zeros(survivors.numel(), x.shape[1], dtype=torch.float32, device=x.device)
    sums.index_add_(0, group, x.float())
    counts = torch.bincount(group, minlength=survivors.numel())
    return survivors, sums, counts


def keeps_all(config: PruneConfig) -> bool:
    """`keep_ratio=1.0`: every token stays as it is, not merged over time either (the identity)."""
    return config.keep_ratio is not None and config.keep_ratio >= 1.0


def select_segment(
    x: torch.Tensor,
    scores: torch.Tensor,
    config: PruneConfig,
    *,
    frame_len: int | None = None,
    structural: torch.Tensor | None = None,
) -> Selection:
    """Keep the budget's worth of one segment: dominant tokens by score plus merged contextual tokens.

    x: [n, D] features, scores: [n] (higher = more important). `structural` marks tokens that are always
    kept unchanged and do not count towards the budget (LLaVA-OneVision's newline tokens). With
    `frame_len`, videos are first merged over time (`config.temporal_threshold`), except at `keep_ratio=1.0`.
    """
    n = x.shape[0]
    device = x.device
    content = torch.arange(n, device=device)
    if structural is not None and structural.any():
        content = (~structural).nonzero().squeeze(1)
    cx, cscores = x[content], scores[content]
    sums, counts = None, None
    merged = 0
    threshold = config.temporal_threshold
    if frame_len and threshold is not None and threshold < 1.0 and not keeps_all(config):
        if cx.shape[0] % frame_len:
            raise PruneError(
                f"video segment of {cx.shape[0]} tokens is not a whole number of {frame_len}-token frames; the "
                "prompt's video placeholders do not match the video's frames"
            )
        survivors, sums, counts = temporal_merge(cx, frame_len, threshold)
        merged = cx.shape[0] - survivors.numel()
        content, cscores = content[survivors], cscores[survivors]
        cx = x[content]
    budget = config.budget(content.numel() + merged, cscores)
    budget = min(budget, content.numel())

    if budget >= content.numel():
        chosen = torch.arange(content.numel(), device=device)
        features = _group_mean(cx, sums, counts, chosen)
    else:
        n_ctx = min(round(budget * config.contextual), budget - 1) if budget > 1 else 0
        dominant = dominant_tokens(cx, cscores, budget - n_ctx, config.duplicate_similarity)
        rest = _complement(content.numel(), dominant, device)
        features_dom = _group_mean(cx, sums, counts, dominant)
        if n_ctx:
            pick = torch.linspace(0, rest.numel() - 1, n_ctx, device=device).round().long().unique()
            targets, others = rest[pick], rest[_complement(rest.numel(), pick, device)]
            features_ctx = _contextual(cx, sums, counts, targets, others)
            chosen = torch.cat([dominant, targets])
            features = torch.cat([features_dom, features_ctx])
        else:
            chosen, features = dominant, features_dom
        order = content[chosen].argsort()
        chosen, features = chosen[order], features[order]

    index = content[chosen]
    if structural is not None and structural.any():
        fixed = structural.nonzero().squeeze(1)
        index = torch.cat([index, fixed])
        features = torch.cat([features, x[fixed]])
        order = index.argsort()
        index, features = index[order], features[order]
    return Selection(index=index, features=features.to(x.dtype), temporal_merged=merged)


def dominant_tokens(x: torch.Tensor, scores: torch.Tensor, k: int, duplicate_similarity: float | None) -> torch.Tensor:
    """The `k` tokens of x [n, D] kept as they are. With `duplicate_similarity` None, the highest-scoring. Else
    greedy non-maximum suppression in feature space: going down the scores, a token is a duplicate when its cosine
    similarity to a higher-scoring token that is not itself a duplicate is above it; the tokens that are not come
    first (by score), then the duplicates (by score). So every distinct thing in the image keeps a token before any
    keeps a second, where the top scores alone can all fall on the largest or most salient object."""
    if duplicate_similarity is None:
        return scores.topk(k).indices
    order = scores.argsort(descending=True, stable=True)
    unit = F.normalize(x[order].float(), dim=-1)
    n = order.numel()
    similar = torch.empty(n, n, dtype=torch.bool, device=x.device)  # [j, i]: j ranks above i and is alike
    for start in range(0, n, _SIMILARITY_ROWS):
        similar[start : start + _SIMILARITY_ROWS] = (
            unit[start : start + _SIMILARITY_ROWS] @ unit.T > duplicate_similarity
        )
    similar.triu_(1)
    # The greedy pass as a fixed point, one matrix step per round instead of a step per token: after round t the
    # first t tokens are settled, and it ends at the first round that changes nothing (about as many rounds as the
    # longest chain of tokens suppressing the next, not n).
    kept = torch.ones(n, dtype=torch.bool, device=x.device)
    for _ in range(n):
        settled = ~(similar & kept[:, None]).any(0)
        if torch.equal(settled, kept):
            break
        kept = settled
    return torch.cat([order[kept], order[~kept]])[:k]


def _complement(n: int, pick: torch.Tensor, device) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool, device=device)
    keep[pick] = False
    return keep.nonzero().squeeze(1)


def _group_mean(x, sums, counts, idx) -> torch.Tensor:
    """Features of survivors `idx`: the token itself, or the mean over its temporal group when it has one."""
    if sums is None:
        return x[idx]
    c = counts[idx]
    merged = (sums[idx] / c[:, None]).to(x.dtype)
    return torch.where((c > 1)[:, None], merged, x[idx])  # untouched tokens stay bit-exact


def _contextual(x, sums, counts, targets, others) -> torch.Tensor:
    """Average every token in `others` into its most similar target (cosine); targets keep their own share."""
    tsum = sums[targets].clone() if sums is not None else x[targets].float().clone()
    tcount = (counts[targets] if counts is not None else torch.ones_like(targets)).float().clone()
    if others.numel():
        sim = F.normalize(x[others].float(), dim=-1) @ F.normalize(x[targets].float(), dim=-1).T
        nearest = sim.argmax(-1)
        osum = sums[others] if sums is not None else x[others].float()
        ocount = (counts[others] if counts is not None else torch.ones_like(others)).float()
        tsum.index_add_(0, nearest, osum)
        tcount.index_add_(0, nearest, ocount)
    return (tsum / tcount[:, None]).to(x.dtype)
