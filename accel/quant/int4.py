"""Asymmetric group-wise int4: fitting codes, scales and offsets; packing; dequantizing.

A weight [N, K] is cut into groups of G consecutive input channels per row. A group stores 4-bit codes
q in 0..15, a scale and an offset (the value code 0 stands for): w = q * scale + offset. The offset
plays the part of the usual zero point, zero = -offset / scale, without rounding it to an integer, so a
group whose range does not straddle 0 loses nothing. Scales and offsets are rounded to the compute
dtype *before* the codes are chosen, so what is stored is exactly what was optimised.

Two codes share a byte: even input channel k in the low nibble, k + 1 in the high nibble.
"""

from __future__ import annotations

import functools

import torch

from ..errors import KernelInputError

LEVELS = 15  # codes 0..15
_REFITS = 2  # least-squares refits of (scale, offset) after the range search
_CHUNK = 1 << 24  # weights per chunk of rows while fitting (bounds temporary memory on big layers)


@functools.cache
def _search_ratios() -> list[float]:
    """Group range shrink factors tried by the search. Built on first use, on the CPU, in float32: no tensor
    work at import, which may happen under `with torch.device("meta")` or another default dtype."""
    return torch.linspace(1.0, 0.5, 21, dtype=torch.float32, device="cpu").tolist()


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """uint8 codes [..., K] (values 0..15, K even) -> uint8 [..., K // 2], two codes per byte."""
    if q.shape[-1] % 2:
        raise KernelInputError(f"pack_int4 needs an even number of codes in the last dim, got {q.shape[-1]}")
    q = q.to(torch.uint8)
    return q[..., 0::2] | (q[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 [..., K // 2] -> uint8 codes [..., K]."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).flatten(-2)


def dequantize(
    qweight: torch.Tensor,
    scales: torch.Tensor,
    offsets: torch.Tensor,
    in_scale: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Packed codes [N, K/2], scales/offsets [N, K/G] (and an optional per-input-channel factor [K])
    -> weight [N, K] in `dtype` (default: the scales' dtype). Computed in float32, rounded once."""
    n, groups = scales.shape
    q = unpack_int4(qweight).view(n, groups, -1).float()
    w = (q * scales.float()[..., None] + offsets.float()[..., None]).view(n, -1)
    if in_scale is not None:
        w = w * in_scale.float()
    return w.to(dtype or scales.dtype)


def _round_to(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return x.to(dtype).float()


def _codes(wg: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    return torch.round((wg - offset[..., None]) / scale[..., None]).clamp_(0, LEVELS)


def _group_error(wg, q, scale, offset, importance):
    err = (wg - (q * scale[..., None] + offset[..., None])) ** 2
    if importance is not None:
        err = err * importance
    return err.sum(-1)


def _range_params(lo: torch.Tensor, hi: torch.Tensor, dtype: torch.dtype):
    tiny = torch.finfo(dtype).tiny
    scale = _round_to(((hi - lo) / LEVELS).clamp_min(tiny), dtype)
    return scale, _round_to(lo, dtype)


def _least_squares(wg, q, importance):
    """(scale, offset) minimising sum imp * (w - (q * scale + offset))^2 for fixed codes; NaN where the
    codes are constant (no unique fit) or the fitted scale is not positive."""
    imp = torch.ones_like(wg) if importance is None else importance.expand_as(wg)
    s0 = imp.sum(-1)
    sq = (imp * q).sum(-1)
    sqq = (imp * q * q).sum(-1)
    sw = (imp * wg).sum(-1)
    sqw = (imp * q * wg).sum(-1)
    denom = s0 * sqq - sq * sq
    scale = (s0 * sqw - sq * sw) / denom
    offset = (sw - scale * sq) / s0
    bad = (denom <= 1e-12 * s0 * s0) | ~(scale > 0)
    return scale.masked_fill(bad, float("nan")), offset.masked_fill(bad, float("nan"))


def _fit_chunk(wg, importance, dtype, search):
    lo, hi = wg.amin(-1), wg.amax(-1)
    scale, offset = _range_params(lo, hi, dtype)
    q = _codes(wg, scale, offset)
    if not search:
        return q, scale, offset
    best = _group_error(wg, q, scale, offset, importance)
    best_lo, best_hi = lo, hi

    def keep_better(q_new, scale_new, offset_new, lo_new=None, hi_new=None):
        nonlocal q, scale, offset, best, best_lo, best_hi
        err = _group_error(wg, q_new, scale_new, offset_new, importance)
        better = err < best
        q = torch.where(better[..., None], q_new, q)
        scale = torch.where(better, scale_new, scale)
        offset = torch.where(better, offset_new, offset)
        best = torch.where(better, err, best)
        if lo_new is not None:
            best_lo, best_hi = torch.where(better, lo_new, best_lo), torch.where(better, hi_new, best_hi)

    def try_range(lo_new, hi_new):
        s, o = _range_params(lo_new, hi_new, dtype)
        keep_better(_codes(wg, s, o), s, o, lo_new, hi_new)

    # Clip the range (fewer, finer levels for the bulk of the group): both ends together, then each end
    # alone from the best so far, since a group's outlier usually sits on one side.
    for ratio in _search_ratios()[1:]:
        try_range(lo * ratio, hi * ratio)
    for ratio in _search_ratios()[1:]:
        try_range(lo * ratio, best_hi)
    for ratio in _search_ratios()[1:]:
        try_range(best_lo, hi * ratio)
    for _ in range(_REFITS):
        s, o = _least_squares(wg, q, importance)
        ok = torch.isfinite(s)
        s = torch.where(ok, _round_to(s.nan_to_num(1.0).clamp_min(torch.finfo(dtype).tiny), dtype), scale)
        o = torch.where(ok, _round_to(o.nan_to_num(0.0), dtype), offset)
        keep_better(_codes(wg, s, o), s, o)
    return q, scale, offset


def fit_int4(
    weight: torch.Tensor,
    group_size: int,
    dtype: torch.dtype,
    *,
    search: bool = True,
    importance: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Quantize `weight` [N, K] group-wise. Returns (codes uint8 [N, K], scales [N, K/G] and offsets
    [N, K/G] in `dtype`).

    `search=False` is plain round-to-nearest over each group's min..max. `search=True` also tries
    shrunken ranges (clipping outliers of a group) and least-squares refits of scale and offset for the
    chosen codes, and keeps per group whatever has the smallest error. `importance` [K] (e.g. the mean
    square of each input channel's activations) weights the error, so it approximates output error.
    """
    n, k = weight.shape
    if k % group_size:
        raise KernelInputError(f"group_size {group_size} does not divide in_features {k}")
    groups = k // group_size
    imp = None if importance is None else importance.float().view(1, groups, group_size)
    rows = max(1, _CHUNK // k)
    codes, scales, offsets = [], [], []
    for start in range(0, n, rows):
        wg = weight[start : start + rows].float().view(-1, groups, group_size)
        q, s, o = _fit_chunk(wg, imp, dtype, search)
        codes.append(q.to(torch.uint8).view(-1, k))
        scales.append(s.to(dtype))
        offsets.append(o.to(dtype))
    return torch.cat(codes), torch.cat(scales), torch.cat(offsets)
