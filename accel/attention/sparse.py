"""Sparse video attention for diffusion transformers: `accel.patch(pipe, sparse=SparseConfig(...))`.

What it does, per self/joint attention call of the denoiser (cross-attention is never touched):

1. The first `dense_fraction` of the denoising steps run dense: the layout of the video is still being
   decided there and errors would compound.
2. At a search step, for each attention module, CFG branch and batch row, the block pattern of every
   head is searched online (`accel.attention.pattern`): block importance from a cheap estimate, then the
   fewest key blocks per query block that reach `target` of the attention mass, plus text and diagonal
   blocks. Tokens are first regrouped into small 3-D tiles of the video grid (`reorder`), so that
   spatial, temporal and local heads all become block-dense.
3. Until the next search step (`search_interval` steps later) the masks are reused: the pattern of a
   head hardly changes across denoising steps (AdaSpa's finding).
4. The block-sparse kernel (`accel.attention.sparse_kernel`) computes only the kept blocks, optionally
   with INT8 Q·Kᵀ (`int8=True`); the output is put back in the model's token order.

The report (`handle.report().stats["sparse"]`) gives the sparsity reached per layer (and per head)
averaged over the sparse calls, the searches run and their time, and the steps kept dense.
"""

from __future__ import annotations

import math
import time
import warnings
from dataclasses import dataclass
from typing import Any

import torch

from .._unit import NotApplicable, PatchContext, Unit
from ..report import Report
from . import route
from .pattern import METHODS, default_tile, invert, search_pattern, video_order
from .sparse_kernel import block_sparse_attention, block_sparse_attention_reference, triton_usable


@dataclass
class SparseConfig:
    """Sparse attention for video diffusion transformers.

    target: attention mass (0 < target <= 1) each query block must keep; the fewest key blocks reaching
        it are kept. 1.0 keeps every block (dense attention computed by the sparse kernel); lower keeps
        fewer blocks. Prior work uses 0.9-0.95.
    block_q / block_k: query and key block sizes in tokens, the kernel's tiles and the pattern's
        granularity (powers of two >= 16). 128 x 64 suits H100-class GPUs at head dim 128.
    dense_fraction: share of the denoising steps at the start of each pipeline call that stay dense
        (prior work keeps roughly the first quarter). Needs a patched pipeline (steps are not known for a
        bare model, where every call is sparse).
    search_interval: steps between two pattern searches; the masks found are reused in between.
    method: block importance estimate: "antidiagonal" (XAttention-style, about 1/stride of a Q·Kᵀ),
        "pooled" (mean-pooled blocks, cheapest, coarsest: it overrates the top blocks and keeps a few
        percent less mass than `target`) or "exact" (true block mass; one dense Q·Kᵀ per search).
    stride: antidiagonal stride (divides block_q and block_k).
    reorder: regroup the video tokens into 3-D tiles of about block_q tokens (frames x height x width)
        before the search and the kernel, and back after. Needs the adapter's video grid.
    int8: run Q·Kᵀ in INT8 inside the sparse kernel (SageAttention-style smoothing and scales).
    """

    target: float = 0.95
    block_q: int = 128
    block_k: int = 64
    dense_fraction: float = 0.25
    search_interval: int = 10
    method: str = "antidiagonal"
    stride: int = 8
    reorder: bool = True
    int8: bool = False

    def __post_init__(self) -> None:
        if not 0.0 < self.target <= 1.0:
            raise ValueError(f"SparseConfig.target={self.target}: the kept attention mass must be in (0, 1]")
        for name in ("block_q", "block_k"):
            blk = getattr(self, name)
            if blk < 16 or blk & (blk - 1):
                raise ValueError(f"SparseConfig.{name}={blk}: must be a power of two >= 16 (the kernel's tile)")
        if not 0.0 <= self.dense_fraction <= 1.0:
            raise ValueError(f"SparseConfig.dense_fraction={self.dense_fraction}: must be in [0, 1]")
        if self.search_interval < 1:
            raise ValueError(f"SparseConfig.search_interval={self.search_interval}: must be >= 1 (steps between searches)")
        if self.method not in METHODS:
            raise ValueError(f"SparseConfig.method={self.method!r}; choose one of {', '.join(METHODS)}")
        if self.method == "antidiagonal" and (self.stride < 1 or self.block_q % self.stride or self.block_k % self.stride):
            raise ValueError(
                f"SparseConfig.stride={self.stride} must divide block_q={self.block_q} and block_k={self.block_k}"
            )


@dataclass
class _Pattern:
    """Masks found at one search, for one attention module and CFG branch."""

    mask: torch.Tensor  # bool [B, H, NBQ, NBK], in the (possibly reordered) token order
    sparsity: torch.Tensor  # [H]: share of blocks skipped per head (on the device)
    step: int | None
    calls: int  # calls of this module and branch since the search (bare models count calls, not steps)


class SparseAttention(Unit):
    name = "sparse"

    def __init__(self, ctx: PatchContext, config: SparseConfig):
        self.ctx = ctx
        self.config = config
        self.patterns: dict[tuple, _Pattern] = {}
        self.orders: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}
        self._warned: set[str] = set()
        self.sparsity: dict[int, list] = {}  # layer -> [sum over calls of per-head sparsity (device), calls]
        self.searches = 0
        self.search_seconds = 0.0
        self._search_events: list[tuple[Any, Any]] = []  # CUDA events, read when the report is built
        self.sparse_calls = 0
        self.dense_steps = 0
        self.dense_calls = 0
        self.declined: dict[str, int] = {}  # reason -> calls left to the dense route
        self.router = route.get_or_install(ctx)
        self.router.stages.append(self.stage)

    # -- Unit ---------------------------------------------------------------------------------------
    def describe(self) -> str:
        c = self.config
        parts = [f"block-sparse attention, mass target {c.target}", f"{c.block_q}x{c.block_k} blocks",
                 f"first {c.dense_fraction:.0%} of steps dense", f"{c.method} search every {c.search_interval} steps"]
        if c.reorder:
            parts.append("3-D token reordering")
        if c.int8:
            parts.append("INT8 Q·Kᵀ")
        return ", ".join(parts)

    def remove(self) -> None:
        self.router.stages.remove(self.stage)
        route.release(self.router)
        self.patterns.clear()

    def begin_call(self) -> None:
        self.patterns.clear()  # a new generation: search again

    def update_report(self, report: Report) -> None:
        for start, end in self._search_events:
            end.synchronize()
            self.search_seconds += start.elapsed_time(end) / 1000.0
        self._search_events.clear()
        per_layer, per_head = {}, {}
        for layer, (total, calls) in sorted(self.sparsity.items()):
            heads = (total / calls).tolist()
            per_head[layer] = [round(x, 4) for x in heads]
            per_layer[layer] = round(sum(heads) / len(heads), 4)
        report.stats["sparse"] = {
            "sparsity per layer": per_layer,
            "sparsity per head": per_head,
            "mean sparsity": round(sum(per_layer.values()) / len(per_layer), 4) if per_layer else None,
            "sparse calls": self.sparse_calls,
            "dense steps (warm-up)": self.dense_steps,
            "dense calls (warm-up)": self.dense_calls,
            "searches": self.searches,
            "search seconds": round(self.search_seconds, 6),
            "calls left dense": dict(self.declined),
        }

    # -- the stage ----------------------------------------------------------------------------------
    def stage(self, call: route.AttentionCall, dense) -> torch.Tensor | None:
        """Compute `call` block-sparsely, or return None to leave it to the dense route."""
        if call.role == "cross":
            return None
        reason = self._unsupported(call)
        if reason is not None:
            self._decline(reason)
            return None
        dense_steps = self._dense_steps(call)
        if call.step is not None and call.step < dense_steps:
            self.dense_calls += 1
            self.dense_steps = dense_steps
            return None

        query, key, value = call.query, call.key, call.value
        key_valid = self._key_valid(call)
        order = self._order(call)
        if order is not None:
            perm, inverse = order
            query, key, value = (t.index_select(2, perm) for t in (query, key, value))
            key_valid = key_valid.index_select(1, perm) if key_valid is not None else None
        scale = call.scale if call.scale is not None else 1.0 / math.sqrt(query.shape[-1])
        mask = self._pattern(call, query, key, scale, key_valid, order is not None)

        c = self.config
        kwargs = dict(sm_scale=scale, key_valid=key_valid, int8=c.int8, block_q=c.block_q, block_k=c.block_k)
        if triton_usable(query.device):
            out = block_sparse_attention(query, key, value, mask, **kwargs)
        else:
            self._warn_once(
                "reference",
                f"sparse: no Triton kernel on {query.device.type} (CUDA, or CPU with TRITON_INTERPRET=1); "
                "computing the same block-sparse attention with the PyTorch reference, which is slower than dense",
            )
            out = block_sparse_attention_reference(query, key, value, mask, **kwargs)
        self.sparse_calls += 1
        if order is not None:
            out = out.index_select(2, inverse)
        return out

    def _unsupported(self, call) -> str | None:
        q, k = call.query, call.key
        if call.is_causal:
            return "causal attention"
        if call.dropout_p:
            return "attention dropout"
        if q.shape[-2] != k.shape[-2]:
            return "query and key lengths differ"
        if q.shape[1] % k.shape[1]:
            return "query heads not a multiple of key heads"
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or q.shape[-1] > 256:
            return "dtype or head dim outside the kernel's range"
        mask = call.attn_mask
        if mask is not None and not (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1):
            return "attention mask other than a boolean key-padding mask [B, 1, 1, S]"
        return None

    def _decline(self, reason: str) -> None:
        self.declined[reason] = self.declined.get(reason, 0) + 1
        self._warn_once(reason, f"sparse: calls with {reason} stay dense (counted in the report)")

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(f"accel: {message}", stacklevel=4)
            if message not in self.ctx.report.warnings:
                self.ctx.report.warnings.append(message)

    def _dense_steps(self, call) -> int:
        if call.step is None or call.num_steps is None:
            return 0
        return math.ceil(self.config.dense_fraction * call.num_steps)

    @staticmethod
    def _key_valid(call) -> torch.Tensor | None:
        if call.attn_mask is None:
            return None
        return call.attn_mask[:, 0, 0, :].expand(call.query.shape[0], -1).contiguous()

    def _order(self, call) -> tuple[torch.Tensor, torch.Tensor] | None:
        """(permutation, inverse) that regroups the video tokens in 3-D tiles, or None."""
        if not self.config.reorder:
            return None
        grid = call.grid
        if grid is None:
            self._warn_once("no-grid", "sparse: the adapter gave no video grid for a call; tokens stay in model order")
            return None
        text = call.text_tokens if call.role == "joint" else 0
        if grid.tokens + text != call.key.shape[-2] or (text and call.text_position not in ("prefix", "suffix")):
            self._warn_once(
                "grid-mismatch",
                f"sparse: sequence of {call.key.shape[-2]} tokens does not match the video grid "
                f"{grid.frames}x{grid.height}x{grid.width} plus {text} text tokens; tokens stay in model order",
            )
            return None
        key = (grid.frames, grid.height, grid.width, call.text_position, text, call.query.device)
        if key not in self.orders:
            tile = default_tile(grid.frames, grid.height, grid.width, self.config.block_q)
            perm = video_order(grid, tile, call.text_position, text, device=call.query.device)
            self.orders[key] = (perm, invert(perm))
        return self.orders[key]

    def _pattern(self, call, query, key, scale, key_valid, reordered) -> torch.Tensor:
        c = self.config
        state_key = (call.site.name, call.branch, tuple(query.shape), tuple(key.shape), reordered)
        found = self.patterns.get(state_key)
        if found is not None:
            found.calls += 1
            if call.step is not None and found.step is not None:
                fresh = call.step - found.step < c.search_interval
            else:
                fresh = found.calls < c.search_interval
            if fresh:
                self._count_sparsity(call.layer, found.sparsity)
                return found.mask
        text = call.text_tokens if call.role == "joint" else 0
        timer = self._start_timer(query.device)
        mask = search_pattern(
            query, key, target=c.target, block_q=c.block_q, block_k=c.block_k, sm_scale=scale, method=c.method,
            stride=c.stride, key_valid=key_valid, text_position=call.text_position if text else "none",
            text_tokens=text,
        )
        self._stop_timer(timer)
        self.searches += 1
        found = _Pattern(mask, 1.0 - mask.float().mean(dim=(0, 2, 3)), call.step, 0)
        self.patterns[state_key] = found
        self._count_sparsity(call.layer, found.sparsity)
        return mask

    def _count_sparsity(self, layer: int, per_head: torch.Tensor) -> None:
        # Summed on the device: no host-device sync per call; read when the report is built.
        entry = self.sparsity.get(layer)
        if entry is None or entry[0].shape != per_head.shape:
            self.sparsity[layer] = [per_head, 1]
        else:
            entry[0] = entry[0] + per_head
            entry[1] += 1

    def _start_timer(self, device):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            return start, end
        return time.perf_counter()

    def _stop_timer(self, timer) -> None:
        if isinstance(timer, tuple):
            timer[1].record()
            self._search_events.append(timer)
        else:
            self.search_seconds += time.perf_counter() - timer


def install(ctx: PatchContext, config: SparseConfig) -> SparseAttention:
    if not isinstance(config, SparseConfig):
        raise TypeError(f"sparse= takes a SparseConfig (or True/False), got {type(config).__name__}")
    if ctx.adapter.kind != "dit":
        reason = f"sparse video attention applies to diffusion transformers, not to {ctx.adapter.display_name}"
        if "sparse" in ctx.explicit:
            raise ValueError(f"{reason}; drop sparse= for this model")
        raise NotApplicable(reason)
    if ctx.pipeline is None and config.dense_fraction > 0:
        ctx.warn(
            "sparse: bare model, so denoising steps are unknown: no step stays dense, and patterns are searched "
            f"again every {config.search_interval} calls of each attention module; patch the pipeline instead"
        )
    return SparseAttention(ctx, config)
