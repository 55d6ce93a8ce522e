"""Sparse video attention for diffusion transformers: `accel.patch(pipe, sparse=SparseConfig(...))`.

What it does, per self/joint attention call of the denoiser (cross-attention is never touched):

1. The first `dense_fraction` of the denoising steps run dense: the layout of the video is still being
   decided there and errors would compound.
2. At a search step, for each attention module, CFG branch and batch row, every head first gets its own
   token order (`reorder="per-head"`, as Sparse VideoGen): frame tiles for spatial heads, position-major
   for temporal ones, 3-D tiles for local ones, or the model's own, whichever a cheap probe finds best.
   Then its block pattern is searched online (`accel.attention.pattern`): block importance from a cheap
   estimate, as many key blocks per query block as reach `target` of the attention mass, plus text and
   diagonal blocks. What is kept is only what the kernel reads (`BlockIndex`: the kept key-block ids,
   int16, and one offset per query block) plus the order chosen per head, and the sparsity reached.
3. Until the next search step (`search_interval` steps later) these are reused as they are: the pattern
   of a head hardly changes across denoising steps (AdaSpa's finding).
4. The block-sparse kernel (`accel.attention.sparse_kernel`) computes only the kept blocks, optionally
   with INT8 Q·Kᵀ (`int8=True`), on q/k/v gathered into each head's order; the output is put back in the
   model's token order exactly.

With `remainder` (default) a query block also sees each key block it skips through one stand-in key, the
block's mean key and value weighted by its key count: spread-out attention then loses far less than the
skipped mass. The search follows: the order chosen is the one whose skipped stand-ins err least, and the
blocks kept are those whose stand-ins would err most (measured on sampled rows, method "rows").

Pattern memory per attention module (and CFG branch) at 75% sparsity, 128x64 blocks: about 0.8 MB for
Wan2.1 480p (32,760 tokens, 12 heads; 48 MB for its 30 modules x 2 branches) and 20.9 MB for HunyuanVideo
720p (119,056 tokens, 24 heads; 1.25 GB for its 60 modules); 2 bytes per kept block pair, see
`accel.attention.sparse_kernel`. The report shows the figure reached (`pattern_bytes_per_module`).

The report (`handle.report().stats["sparse"]`) gives the sparsity reached per layer (and per head): the
share of (query block, key block) pairs skipped, averaged over the sparse calls only (dense warm-up steps
are not counted; the stand-ins are not blocks), the searches run and their time, the token orders the
heads chose, the pattern memory and the steps kept dense.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from .._unit import NotApplicable, PatchContext, Unit, register
from .._validate import check_bool, check_choice, check_float, check_int, fail
from ..report import Report
from . import route
from .pattern import METHODS, ORDERS, TokenOrders, candidate_orders, choose_orders, gather_tokens, search_pattern
from .sparse_kernel import BlockIndex, block_sparse_attention, block_sparse_attention_reference, triton_usable

REORDER = ("per-head", "tiles", "none")


@dataclass
class SparseConfig:
    """Sparse attention for video diffusion transformers.

    target: attention mass (0 < target <= 1) each query block must keep; the fewest key blocks reaching
        it are kept. 1.0 keeps every block (dense attention computed by the sparse kernel); lower keeps
        fewer blocks. Prior work, without the remainder, uses 0.9-0.95; 0.9 (default) keeps 45% of the
        blocks in the sparse steps at 32.6 dB on ref-wan (16x16 blocks, stride 4; 0.85 keeps 39% at 30.9 dB).
    block_q / block_k: query and key block sizes in tokens, the kernel's tiles and the pattern's
        granularity (powers of two >= 16). 128 x 64 suits H100-class GPUs at head dim 128.
    dense_fraction: share of the denoising steps at the start of each pipeline call that stay dense
        (prior work keeps roughly the first quarter). Needs a patched pipeline (steps are not known for a
        bare model, where every call is sparse).
    search_interval: steps between two pattern searches; the masks found are reused in between.
    method: block importance estimate: "rows" (default: the exact attention of every stride-th query row
        per query block, about 1/stride of a Q·Kᵀ; with `remainder`, plus the P·V of those rows to rank the
        blocks by their stand-ins' error), "antidiagonal" (XAttention-style, 1/stride of a Q·Kᵀ, coarser),
        "pooled" (mean-pooled blocks, cheapest, coarsest: it overrates the top blocks and keeps a few
        percent less mass than `target`) or "exact" (true block mass; one dense Q·Kᵀ per search).
    stride: sampling stride of "rows" and "antidiagonal" (divides block_q and block_k).
    reorder: token order of the video for the search and the kernel (undone exactly after); needs the
        adapter's video grid. "per-head" (default): each head takes, at each search, the model's order,
        3-D tiles, frame tiles (spatial heads) or position-major (temporal heads), whichever a cheap probe
        finds best (see above); "tiles": 3-D tiles of about block_q tokens for every head; "none": the
        model's order. True and False mean "per-head" and "none".
    int8: run Q·Kᵀ in INT8 inside the sparse kernel (SageAttention-style smoothing and scales). None
        (default) follows `attention=`: INT8 when the model's attention route is "int8".
    remainder: each query block also sees every key block it skips through one stand-in key (the block's
        mean key and value, weighted by its key count): one extra key per key block, 1/block_k of dense.
    """

    target: float = 0.9
    block_q: int = 128
    block_k: int = 64
    dense_fraction: float = 0.25
    search_interval: int = 10
    method: str = "rows"
    stride: int = 8
    reorder: str = "per-head"
    int8: bool | None = None
    remainder: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.reorder, bool):
            self.reorder = "per-head" if self.reorder else "none"
        check_float(self, "target", low=0, high=1, open_low=True, hint="the attention mass each query block keeps")
        for name in ("block_q", "block_k"):
            blk = check_int(self, name, low=16, hint="a power of two >= 16, the kernel's tile")
            if blk & (blk - 1):
                fail(self, name, blk, "must be a power of two >= 16 (the kernel's tile)")
        check_float(self, "dense_fraction", low=0, high=1)
        check_int(self, "search_interval", low=1, hint="steps between searches")
        check_choice(self, "method", METHODS)
        check_choice(self, "reorder", REORDER, hint="or True / False for 'per-head' / 'none'")
        check_bool(self, "int8", optional=True, hint="None follows the attention= route")
        check_bool(self, "remainder")
        check_int(self, "stride", low=1)
        if self.method in ("rows", "antidiagonal") and (self.block_q % self.stride or self.block_k % self.stride):
            fail(self, "stride", self.stride, f"must divide block_q={self.block_q} and block_k={self.block_k}")


@dataclass
class _Pattern:
    """What one search found, for one attention module and CFG branch: all a later call needs."""

    blocks: BlockIndex  # in the token order below
    order: int | torch.Tensor | None  # one order for all heads, long [B, Hkv] one per head, or None (model order)
    sparsity: torch.Tensor  # [H]: share of blocks skipped per head (on the device)
    step: int | None
    calls: int  # calls of this module and branch since the search (bare models count calls, not steps)


# The stage's constraints (`route.Route`): a call failing one stays dense, counted under the reason.
def _exempt_cross_attention(call) -> str | None:
    return "cross-attention" if call.role == "cross" else None


def _check_not_causal(call) -> str | None:
    return "causal attention" if call.is_causal else None


def _check_no_dropout(call) -> str | None:
    return "attention dropout" if call.dropout_p else None


def _check_square(call) -> str | None:
    return "query and key lengths differ" if call.query.shape[-2] != call.key.shape[-2] else None


def _check_kv_heads_divide(call) -> str | None:
    return "query heads not a multiple of key heads" if call.query.shape[1] % call.key.shape[1] else None


def _check_kernel_range(call) -> str | None:
    q = call.query
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32) or q.shape[-1] > 256:
        return "dtype or head dim outside the kernel's range"
    return None


def _check_key_padding_mask(call) -> str | None:
    mask = call.attn_mask
    if mask is None or (mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == 1):
        return None
    return "attention mask other than a boolean key-padding mask [B, 1, 1, S]"


class SparseUnit(Unit):
    def __init__(self, ctx: PatchContext, config: SparseConfig):
        self.ctx = ctx
        self.config = config
        self.patterns: dict[tuple, _Pattern] = {}
        self.orders: dict[tuple, TokenOrders] = {}
        self.order_counts = dict.fromkeys(ORDERS, 0)  # (batch row, head) choices over all searches
        self.pattern_bytes: dict[tuple[str, Any], int] = {}  # (module, branch) -> bytes of its latest pattern
        self.sparsity: dict[int, list] = {}  # layer -> [sum over calls of per-head sparsity (device), calls]
        self.searches = 0
        self.search_seconds = 0.0
        self._search_events: list[tuple[Any, Any]] = []  # CUDA events, read when the report is built
        self.sparse_calls = 0
        self.dense_steps = 0
        self.dense_calls = 0
        constraints = (
            _check_not_causal,
            _check_no_dropout,
            _check_square,
            _check_kv_heads_divide,
            _check_kernel_range,
            self._check_float32_on_gpu,
            _check_key_padding_mask,
        )
        self.stage = route.Route(
            "sparse", self.compute, constraints, exempt=_exempt_cross_attention, on_decline=self._warn_decline
        )
        self.router = route.get_or_install(ctx)
        self.router.add_stage(self.stage)

    # -- Unit ---------------------------------------------------------------------------------------
    def describe(self) -> str:
        c = self.config
        parts = [
            f"block-sparse attention, mass target {c.target}",
            f"{c.block_q}x{c.block_k} blocks",
            f"first {c.dense_fraction:.0%} of steps dense",
            f"{c.method} search every {c.search_interval} steps",
        ]
        if c.reorder != "none":
            parts.append("per-head token orders" if c.reorder == "per-head" else "3-D token tiles")
        if c.remainder:
            parts.append("skipped blocks through their means")
        if self._int8():
            parts.append("INT8 Q·Kᵀ")
        return ", ".join(parts)

    def _int8(self) -> bool:
        return self.config.int8 if self.config.int8 is not None else self.router.dense_kernel == "int8"

    def remove(self) -> None:
        self.router.remove_stage(self.stage)
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
            per_head[str(layer)] = [round(x, 4) for x in heads]
            per_layer[str(layer)] = round(sum(heads) / len(heads), 4)
        modules = {name for name, _ in self.pattern_bytes}
        total = sum(self.pattern_bytes.values())
        report.stats["sparse"] = {  # layout documented in accel.report
            "mean_sparsity": round(sum(per_layer.values()) / len(per_layer), 4) if per_layer else None,
            "sparsity_per_layer": per_layer,
            "sparsity_per_head": per_head,
            "sparse_calls": self.sparse_calls,
            "dense_warmup_steps": self.dense_steps,
            "dense_warmup_calls": self.dense_calls,
            "searches": self.searches,
            "search_s": round(self.search_seconds, 6),
            "head_orders": {name: n for name, n in self.order_counts.items() if n},
            "pattern_bytes_per_module": round(total / len(modules)) if modules else None,
            "pattern_bytes_total": total,
            "calls_left_dense": dict(self.stage.declined),
        }

    # -- the stage ----------------------------------------------------------------------------------
    def compute(self, call: route.AttentionCall) -> torch.Tensor | None:
        """Compute `call` block-sparsely, or return None to leave it to the dense route (warm-up steps)."""
        dense_steps = self._dense_steps(call)
        if call.step is not None and call.step < dense_steps:
            self.dense_calls += 1
            self.dense_steps = dense_steps
            return None

        query, key, value = call.query, call.key, call.value
        key_valid = self._key_valid(call)
        orders = self._orders(call)
        scale = call.scale if call.scale is not None else 1.0 / math.sqrt(query.shape[-1])
        state_key = (call.site.name, call.branch, tuple(query.shape), tuple(key.shape), orders is not None)
        found = self._reusable(state_key, call)
        if found is None:  # a search step: choose the token orders, reorder, search on the reordered tokens
            timer = self._start_timer(query.device)
            order = self._choose(orders, query, key, value, scale, key_valid)
            query, key, value, key_valid, undo = apply_orders(orders, order, query, key, value, key_valid)
            found = self._search(call, state_key, order, query, key, value, scale, key_valid)
            self._stop_timer(timer)
        else:
            query, key, value, key_valid, undo = apply_orders(orders, found.order, query, key, value, key_valid)
        self._count_sparsity(call.layer, found.sparsity)

        c = self.config
        kwargs = dict(sm_scale=scale, key_valid=key_valid, int8=self._int8(), block_q=c.block_q, block_k=c.block_k)
        kwargs["remainder"] = c.remainder
        if triton_usable(query.device):
            out = block_sparse_attention(query, key, value, found.blocks, **kwargs)
        else:
            self.ctx.warn_now(
                f"sparse: no Triton kernel on {query.device.type} (CUDA, or CPU with TRITON_INTERPRET=1); "
                "computing the same block-sparse attention with the PyTorch reference, which is slower than dense",
            )
            out = block_sparse_attention_reference(query, key, value, found.blocks, **kwargs)
        self.sparse_calls += 1
        return undo(out) if undo is not None else out

    def _check_float32_on_gpu(self, call) -> str | None:
        if call.query.is_cuda and call.query.dtype == torch.float32 and not self._int8():
            return "float32 inputs on a GPU (the kernel needs 16-bit there; run the model in bf16 or fp16)"
        return None

    def _warn_decline(self, reason: str) -> None:
        self.ctx.warn_now(f"sparse: calls with {reason} stay dense (counted in the report)")

    def _dense_steps(self, call) -> int:
        if call.step is None or call.num_steps is None:
            return 0
        return math.ceil(self.config.dense_fraction * call.num_steps)

    @staticmethod
    def _key_valid(call) -> torch.Tensor | None:
        if call.attn_mask is None:
            return None
        return call.attn_mask[:, 0, 0, :].expand(call.query.shape[0], -1).contiguous()

    def _orders(self, call) -> TokenOrders | None:
        """The candidate token orders of this call's sequence, or None (model order)."""
        if self.config.reorder == "none":
            return None
        grid = call.grid
        if grid is None:
            self.ctx.warn_now("sparse: the adapter gave no video grid for a call; tokens stay in model order")
            return None
        text = call.text_tokens if call.role == "joint" else 0
        if grid.tokens + text != call.key.shape[-2] or (text and call.text_position not in ("prefix", "suffix")):
            self.ctx.warn_now(
                f"sparse: sequence of {call.key.shape[-2]} tokens does not match the video grid "
                f"{grid.frames}x{grid.height}x{grid.width} plus {text} text tokens; tokens stay in model order",
            )
            return None
        key = (grid.frames, grid.height, grid.width, call.text_position, text, call.query.device)
        if key not in self.orders:
            names = ORDERS if self.config.reorder == "per-head" else ("tiles",)
            self.orders[key] = candidate_orders(
                grid, self.config.block_q, call.text_position, text, device=call.query.device, names=names
            )
        return self.orders[key]

    def _reusable(self, state_key, call) -> _Pattern | None:
        found = self.patterns.get(state_key)
        if found is None:
            return None
        found.calls += 1
        if call.step is not None and found.step is not None:
            fresh = call.step - found.step < self.config.search_interval
        else:
            fresh = found.calls < self.config.search_interval
        return found if fresh else None

    def _choose(self, orders, query, key, value, scale, key_valid) -> int | torch.Tensor | None:
        """The token order of every head: one index for all heads where they agree (a plain index_select
        then), else long [B, Hkv]."""
        c = self.config
        if orders is None or c.target >= 1.0:  # every block is kept: the order changes nothing
            return None
        choice = choose_orders(
            query,
            key,
            orders,
            block_q=c.block_q,
            block_k=c.block_k,
            target=c.target,
            sm_scale=scale,
            key_valid=key_valid,
            value=value if c.remainder else None,  # then the order whose stand-ins err least wins
        )
        picked = choice.flatten().tolist()  # a search step synchronises anyway (building the index)
        for i in picked:
            self.order_counts[orders.names[i]] += 1
        return picked[0] if len(set(picked)) == 1 else choice

    def _search(self, call, state_key, order, query, key, value, scale, key_valid) -> _Pattern:
        c = self.config
        text = call.text_tokens if call.role == "joint" else 0
        mask = search_pattern(
            query,
            key,
            target=c.target,
            block_q=c.block_q,
            block_k=c.block_k,
            sm_scale=scale,
            method=c.method,
            stride=c.stride,
            key_valid=key_valid,
            text_position=call.text_position if text else "none",
            text_tokens=text,
            value=value if c.remainder else None,  # "rows" then keeps the blocks whose stand-ins err most
        )
        blocks = BlockIndex.from_mask(mask)
        self.searches += 1
        found = _Pattern(blocks, order, blocks.sparsity_per_head(), call.step, 0)
        self.patterns[state_key] = found
        self.pattern_bytes[(call.site.name, call.branch)] = blocks.nbytes
        return found

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


def apply_orders(orders, order, query, key, value, key_valid):
    """q, k, v and key_valid in the chosen token order(s), and the function that puts an output back."""
    if order is None:
        return query, key, value, key_valid, None
    if isinstance(order, int):
        perm, inverse = orders.perms[order], orders.inverses[order]
        query, key, value = (t.index_select(2, perm) for t in (query, key, value))
        key_valid = key_valid.index_select(1, perm) if key_valid is not None else None
        return query, key, value, key_valid, lambda out: out.index_select(2, inverse)
    group = query.shape[1] // key.shape[1]
    kv_index = orders.perms[order]  # [B, Hkv, N]
    q_index = kv_index.repeat_interleave(group, dim=1) if group > 1 else kv_index
    query, key, value = gather_tokens(query, q_index), gather_tokens(key, kv_index), gather_tokens(value, kv_index)
    if key_valid is not None:
        key_valid = key_valid[:, None].expand(-1, kv_index.shape[1], -1).gather(2, kv_index)
    inverse = orders.inverses[order]
    inverse = inverse.repeat_interleave(group, dim=1) if group > 1 else inverse
    return query, key, value, key_valid, lambda out: gather_tokens(out, inverse)


@register("sparse", SparseConfig, order=30)
def install(ctx: PatchContext, config: SparseConfig) -> SparseUnit:
    if ctx.adapter.kind != "dit":
        raise NotApplicable(
            f"sparse video attention applies to diffusion transformers, not to {ctx.adapter.display_name}"
        )
    if ctx.pipeline is None and config.dense_fraction > 0:
        ctx.warn(
            "sparse: bare model, so denoising steps are unknown: no step stays dense, and patterns are searched "
            f"again every {config.search_interval} calls of each attention module; patch the pipeline instead"
        )
    return SparseUnit(ctx, config)
