"""Block-sparse attention (accel's sparse route) for the self- and joint attention calls of ComfyUI's models.

Per attention module, CFG branch and shape, a block pattern is searched (`accel.attention.pattern.search_pattern`:
the fewest key blocks per query block that reach `target` of the attention mass, plus the diagonal and every block
holding text) at the first sparse step and again every `search_interval` steps, and the kept blocks are computed by
accel's block-sparse kernel (Triton on CUDA or in Triton's interpreter, its PyTorch reference elsewhere). The first
`dense_fraction` of the steps, cross-attention and calls the kernel cannot take go back to ComfyUI's attention.
Tokens stay in the model's order: the per-head token orders of `accel.patch(sparse=...)` are not used here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .. import _triton
from ..attention.pattern import search_pattern
from ..attention.route import AttentionCall
from ..attention.sparse import SparseConfig
from ..attention.sparse_kernel import BlockIndex, block_sparse_attention, block_sparse_attention_reference


@dataclass
class _Pattern:
    mask: torch.Tensor  # bool [B, H, blocks_q, blocks_k]
    index: BlockIndex
    step: int


class SparseStage:
    def __init__(self, config: SparseConfig, warn):
        self.config, self.warn = config, warn
        self.patterns: dict[tuple, _Pattern] = {}
        self.searches = 0
        self.sparse_calls = 0
        self.kept_blocks: list[float] = []  # fraction of blocks kept, per search

    def offer(self, call: AttentionCall, branch: str, grid) -> tuple[torch.Tensor | None, str | None]:
        """(output, None) when computed block-sparsely, else (None, why it goes back to ComfyUI)."""
        c, q, k = self.config, call.query, call.key
        if call.role == "cross":
            return None, "cross-attention (sparse takes self and joint attention)"
        if call.step is None or call.num_steps is None:
            return None, "no step known"
        if call.step < math.ceil(c.dense_fraction * call.num_steps):
            return None, "dense warm-up steps"
        if q.shape[-2] != k.shape[-2] or q.shape[1] % k.shape[1] or q.shape[-1] > 256:
            return None, "a shape the sparse kernel does not take"
        text = 0
        if call.role == "joint":
            text = q.shape[-2] - grid.tokens if grid is not None else -1
            if text < 0:
                return None, "token grid unknown"
        key = (call.site.name, branch, tuple(q.shape), tuple(k.shape))
        found = self.patterns.get(key)
        if found is None or not 0 <= call.step - found.step < c.search_interval:  # also a new run: step went back
            found = self.patterns[key] = self._search(call, text)
        kwargs = dict(block_q=c.block_q, block_k=c.block_k, remainder=c.remainder, int8=bool(c.int8))
        if q.is_cuda or _triton.interpreting():
            out = block_sparse_attention(q, k, call.value, found.index, **kwargs)
        else:
            self.warn(
                "attention route 'sparse' on CPU tensors runs the PyTorch reference of the block-sparse kernel "
                "(slow, to preview quality); the Triton kernel needs a CUDA GPU"
            )
            out = block_sparse_attention_reference(q, k, call.value, found.mask, **kwargs)
        self.sparse_calls += 1
        return out, None

    def _search(self, call: AttentionCall, text: int) -> _Pattern:
        c, q = self.config, call.query
        mask = search_pattern(
            q,
            call.key,
            target=c.target,
            block_q=c.block_q,
            block_k=c.block_k,
            sm_scale=1.0 / math.sqrt(q.shape[-1]),
            method=c.method,
            stride=c.stride,
            text_position=call.text_position if text else "none",
            text_tokens=text,
            value=call.value if c.remainder else None,
        )
        self.searches += 1
        self.kept_blocks.append(float(mask.float().mean()))  # a search synchronises anyway
        return _Pattern(mask, BlockIndex.from_mask(mask), call.step)

    def stats(self) -> dict:
        kept = sum(self.kept_blocks) / len(self.kept_blocks) if self.kept_blocks else None
        return {"sparse_calls": self.sparse_calls, "searches": self.searches, "mean_blocks_kept": kept}
