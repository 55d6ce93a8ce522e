"""Block-sparse attention: a FlashAttention-style Triton forward that visits only chosen key blocks,
optionally with INT8 Q·Kᵀ, and its exact PyTorch reference.

The pattern says, per (batch row, head, query block m), which key blocks n the query block attends to
(tokens m*block_q ... against tokens n*block_k ...). It is given either as a bool block mask
[B or 1, Hq, NBQ, NBK] or, as the kernel consumes it, as a `BlockIndex`: the kept key-block ids of every
row, concatenated (int16), with one offset per row (int32). Build the index once per pattern
(`BlockIndex.from_mask`) and pass it on every call: a mask is converted on each call. The kernel's cost is
proportional to the kept blocks, not to the sequence length squared, and so is the index's memory:
2 bytes per kept block pair (the bool mask: 1 byte per pair, kept or not), e.g. per attention module at
75% sparsity and 128x64 blocks:

    Wan2.1 480p (32,760 tokens, 12 heads):          0.80 MB per CFG branch (bool mask: 1.57 MB)
    HunyuanVideo 720p (119,056 tokens, 24 heads):  20.9 MB               (bool mask: 41.6 MB)

(2 bytes x 25% of 256 x 512 x 12 pairs plus 4 bytes x 3,072 offsets; 2 bytes x 25% of 931 x 1,861 x 24
plus 4 bytes x 22,344.) At 90% sparsity: 0.33 MB and 8.4 MB. Below 50% sparsity the index is larger than
the bool mask (twice at 0%).

Defined behaviour at the edges:
- A query row that sees no key (its block row is empty, or every key it may see is masked out by
  `key_valid`) gets an all-zero output, not NaN.
- `key_valid` [B, Nk] bool masks single keys (a key-padding mask such as HunyuanVideo's text mask);
  [B, Hkv, Nk] gives each key/value head its own (keys reordered per head).

INT8 path (`int8=True`): Q and K are smoothed and quantised exactly as in `accel.attention.int8`
(one scale per query tile and per key tile, so the quantisation blocks are the kernel's tiles), then
P·V runs in 16-bit. Its reference uses the same INT8 tensors, so kernel and reference differ only in
accumulation order and in where P is rounded.

Remainder (`remainder=True`): after its kept blocks a query block also visits one stand-in key per key block
it skipped (`block_means`: the block's mean key and value, its score raised by log of its key count), so
the mass of the skipped blocks is approximated rather than dropped; a row that keeps no block then sees
every block through its stand-in. The byte-per-pair "kept" map the kernel reads is made from the index on
each call and dropped after it.

Files: this module holds the pattern, the reference and the custom op `torch.ops.accel.block_sparse_attention`;
the kernel and its launcher are `block_sparse_kernel.py`, loaded on first use.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import _triton
from ..errors import KernelInputError
from .int8 import LOG2E, _pv_dtype, _quantize_qk, _token_mean, check_qkv

triton_usable = _triton.usable  # accel.attention.sparse picks the kernel or the reference with it


def num_blocks(tokens: int, block: int) -> int:
    return _triton.cdiv(tokens, block)


@dataclass
class BlockIndex:
    """The kept key blocks of a block mask, row by row (CSR): what the kernel reads.

    Row r = (b * H + h) * NBQ + m holds the key-block ids `index[offsets[r]:offsets[r + 1]]`, ascending.
    `shape` is the mask's (B or 1, H, NBQ, NBK); a batch of 1 serves every batch row.
    """

    index: torch.Tensor  # int16 [kept] (int32 beyond 32,767 key blocks)
    offsets: torch.Tensor  # int32 [B * H * NBQ + 1]
    shape: tuple[int, int, int, int]

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> BlockIndex:
        if mask.dtype != torch.bool or mask.dim() != 4:
            raise KernelInputError(
                f"BlockIndex.from_mask needs a bool mask [B, H, NBQ, NBK], got {mask.dtype} {tuple(mask.shape)}"
            )
        nbk = mask.shape[-1]
        counts = mask.sum(-1).flatten()
        if mask.numel() >= 2**31:
            raise KernelInputError(f"block mask {tuple(mask.shape)} too large for int32 offsets; use larger blocks")
        offsets = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        ids = torch.arange(nbk, dtype=torch.int16 if nbk <= 2**15 - 1 else torch.int32, device=mask.device)
        return cls(ids.expand(mask.shape)[mask], offsets, tuple(mask.shape))

    def counts(self) -> torch.Tensor:
        """Kept key blocks per row, int64 [B, H, NBQ]."""
        return self.offsets.diff().long().view(self.shape[:3])

    def to_mask(self) -> torch.Tensor:
        rows = torch.repeat_interleave(
            torch.arange(self.offsets.numel() - 1, device=self.index.device), self.counts().flatten()
        )
        mask = torch.zeros(math.prod(self.shape[:3]), self.shape[3], dtype=torch.bool, device=self.index.device)
        mask[rows, self.index.long()] = True
        return mask.view(self.shape)

    def sparsity_per_head(self) -> torch.Tensor:
        """Share of block pairs skipped, per head (fp32 [H], on the index's device)."""
        b, _, nbq, nbk = self.shape
        return 1.0 - self.counts().sum((0, 2)).float() / (b * nbq * nbk)

    @property
    def nbytes(self) -> int:
        return self.index.numel() * self.index.element_size() + self.offsets.numel() * self.offsets.element_size()


def _check(q, k, v, blocks, key_valid, block_q, block_k):
    """Raise ValueError naming the problem and the fix; return (B, Hq, Hkv, Nq, Nk, D)."""
    B, Hq, Hkv, Nq, Nk, D = check_qkv(q, k, v, "block_sparse_attention")
    for name, blk in (("block_q", block_q), ("block_k", block_k)):
        if blk < 16 or blk & (blk - 1):
            raise KernelInputError(f"{name} must be a power of two >= 16 (tl.dot tile), got {blk}")
    want = (Hq, num_blocks(Nq, block_q), num_blocks(Nk, block_k))
    if isinstance(blocks, BlockIndex):
        kind, shape = "BlockIndex", tuple(blocks.shape)
        ok = True
    else:
        kind, shape = f"{blocks.dtype} tensor", tuple(blocks.shape)
        ok = blocks.dtype == torch.bool and blocks.dim() == 4
    if not ok or shape[0] not in (1, B) or shape[1:] != want:
        raise KernelInputError(
            f"block_mask must be a bool tensor or BlockIndex of shape [{B} or 1, {want[0]}, {want[1]}, {want[2]}] "
            f"(batch, query heads, query blocks of {block_q}, key blocks of {block_k}), got {kind} {shape}"
        )
    if key_valid is not None and (
        key_valid.dtype != torch.bool or tuple(key_valid.shape) not in ((B, Nk), (B, Hkv, Nk))
    ):
        raise KernelInputError(
            f"key_valid must be a bool tensor [{B}, {Nk}] or [{B}, {Hkv}, {Nk}] (True = attend), "
            f"got {key_valid.dtype} {tuple(key_valid.shape)}"
        )
    return B, Hq, Hkv, Nq, Nk, D


def block_means(k, v, block_k, key_valid=None, smooth_k=False):
    """The skipped blocks' stand-ins of `remainder=True`: per key block, the mean of its visible keys and values
    (fp32 [B, Hkv, NBK, D]) and log2 of how many keys it holds (fp32 [B, Hkv, NBK], -inf where none is visible).
    With `smooth_k` the keys' token mean is subtracted, as the INT8 path does to the exact keys."""
    B, Hkv, Nk, D = k.shape
    nbk = num_blocks(Nk, block_k)
    if key_valid is None:
        w = k.new_ones(1, 1, Nk, 1, dtype=torch.float32)
    else:
        w = (key_valid if key_valid.dim() == 3 else key_valid[:, None]).float()[..., None]
    w = F.pad(w, (0, 0, 0, nbk * block_k - Nk)).view(w.shape[0], w.shape[1], nbk, block_k, 1)
    count = w.sum(-2)  # [B or 1, Hkv or 1, NBK, 1]

    def mean(x):
        x = F.pad(x.float(), (0, 0, 0, nbk * block_k - Nk)).view(B, Hkv, nbk, block_k, D)
        return (x * w).sum(-2) / count.clamp_min(1)

    k_mean = mean(k) - _token_mean(k) if smooth_k else mean(k)
    return k_mean, mean(v), count.squeeze(-1).log2().expand(B, Hkv, nbk).contiguous()


def token_mask(block_mask, nq: int, nk: int, block_q: int, block_k: int):
    """The block mask expanded to tokens: bool [B or 1, H, nq, nk]."""
    m = block_mask.repeat_interleave(block_q, dim=-2)[..., :nq, :]
    return m.repeat_interleave(block_k, dim=-1)[..., :nk]


def block_sparse_attention_reference(
    q,
    k,
    v,
    block_mask,
    *,
    sm_scale=None,
    key_valid=None,
    int8=False,
    block_q=128,
    block_k=64,
    smooth_k=True,
    remainder=False,
):
    """Dense attention restricted to the kept blocks, softmax in fp32; rows that see no key give 0.

    Same arguments as `block_sparse_attention`; runs on any device. With `int8=True` it is the model of
    the INT8 kernel path: same quantised tensors, P rounded to 16-bit before P·V.
    """
    B, Hq, Hkv, Nq, Nk, D = _check(q, k, v, block_mask, key_valid, block_q, block_k)
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    g = Hq // Hkv
    if isinstance(block_mask, BlockIndex):
        block_mask = block_mask.to_mask()
    if int8:
        q8, sq, k8, sk = _quantize_qk(q, k, sm_scale, smooth_k, block_q, block_k)
        k8, sk = k8.repeat_interleave(g, dim=1), sk.repeat_interleave(g, dim=1)
        # fp32 holds the int32 dot products exactly: |sum| <= D * 127^2 < 2^24 for D <= 1024.
        s = q8.float() @ k8.float().transpose(-1, -2)
        s = s * (
            sq.repeat_interleave(block_q, dim=-1)[..., :Nq, None]
            * sk.repeat_interleave(block_k, dim=-1)[..., None, :Nk]
        )
    else:
        s = (q.float() @ k.float().repeat_interleave(g, dim=1).transpose(-1, -2)) * (sm_scale * LOG2E)
    keep = token_mask(block_mask, Nq, Nk, block_q, block_k)
    if key_valid is not None:
        per_head = key_valid.repeat_interleave(g, dim=1) if key_valid.dim() == 3 else key_valid[:, None]
        keep = keep & per_head[:, :, None, :]
    s = s.masked_fill(~keep, float("-inf"))
    dt = _pv_dtype(v.dtype) if int8 or q.dtype != torch.float32 else torch.float32
    if remainder:  # one stand-in key per key block, seen by the query blocks that skip it
        k_mean, v_mean, log_count = block_means(k, v, block_k, key_valid, smooth_k and int8)
        k_mean, v_mean = (t.to(dt).float().repeat_interleave(g, dim=1) for t in (k_mean, v_mean))
        log_count = log_count.repeat_interleave(g, dim=1)
        if int8:  # the kernel dequantises Q to the P·V type for these few products
            q_rest = (q8.float() * sq.repeat_interleave(block_q, dim=-1)[..., :Nq, None]).to(dt).float()
            s_rest = q_rest @ k_mean.transpose(-1, -2)
        else:
            s_rest = (q.float() @ k_mean.transpose(-1, -2)) * (sm_scale * LOG2E)
        s_rest = s_rest + log_count[:, :, None, :]
        s_rest = s_rest.masked_fill(block_mask.repeat_interleave(block_q, dim=-2)[..., :Nq, :], float("-inf"))
        s = torch.cat([s, s_rest], dim=-1)
    row_max = s.amax(dim=-1, keepdim=True)
    p = torch.exp2(s - torch.where(torch.isinf(row_max), 0.0, row_max))  # empty rows: all zeros
    vv = v.repeat_interleave(g, dim=1).to(dt).float()
    p_v = p[..., :Nk].to(dt).float() @ vv
    if remainder:
        p_v = p_v + p[..., Nk:].to(dt).float() @ v_mean
    o = p_v / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return o.to(q.dtype)


_KERNEL = "accel.attention.block_sparse_kernel"


@_triton.custom_op("accel::block_sparse_attention")
def _block_sparse_attention_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    index: torch.Tensor,
    offsets: torch.Tensor,
    key_valid: torch.Tensor | None,
    shared_pattern: bool,
    sm_scale: float,
    int8: bool,
    block_q: int,
    block_k: int,
    smooth_k: bool,
    remainder: bool = False,
) -> torch.Tensor:
    """q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] (any strides, Hq a multiple of Hkv), index int16/int32 [kept] and
    offsets int32 [B' * Hq * ceil(Nq/block_q) + 1] of a `BlockIndex` (B' = 1 with `shared_pattern`, else B),
    key_valid None, bool [B, Nk] or [B, Hkv, Nk] -> [B, Hq, Nq, D] in q's dtype and memory layout. Arguments
    as `block_sparse_attention`'s, already checked there."""
    _triton.check_device("block_sparse_attention", (q, k, v, index), "Use block_sparse_attention_reference elsewhere")
    return _triton.load(_KERNEL).block_sparse_attention_forward(
        q,
        k,
        v,
        index,
        offsets,
        key_valid,
        shared_pattern=shared_pattern,
        sm_scale=sm_scale,
        int8=int8,
        block_q=block_q,
        block_k=block_k,
        smooth_k=smooth_k,
        remainder=remainder,
    )


@_block_sparse_attention_op.register_fake
def _(q, k, v, index, offsets, key_valid, shared_pattern, sm_scale, int8, block_q, block_k, smooth_k, remainder=False):
    return torch.empty_like(q)


def block_sparse_attention(
    q,
    k,
    v,
    block_mask,
    *,
    sm_scale=None,
    key_valid=None,
    int8=False,
    block_q=128,
    block_k=64,
    smooth_k=True,
    remainder=False,
):
    """Attention over the kept blocks only, in Triton. Returns [B, Hq, Nq, D] in q's dtype and layout.

    q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] (any strides; Hq a multiple of Hkv), `block_mask` a
    `BlockIndex` (build it once, reuse it) or a bool mask [B or 1, Hq, ceil(Nq/block_q), ceil(Nk/block_k)]
    (converted on every call), `key_valid` optional bool [B, Nk] or [B, Hkv, Nk]. Head dims up to 256.
    `int8=True` runs Q·Kᵀ on INT8 (SageAttention-style smoothing and per-tile scales). `remainder=True` lets
    every query block also see each key block it skips through one stand-in key (`block_means`: the block's mean
    key and value, weighted by its number of keys), so the mass of the skipped blocks is approximated instead of
    dropped; it costs ceil(Nk/block_k) extra keys per query block. CUDA tensors, or CPU
    tensors with TRITON_INTERPRET=1; `block_sparse_attention_reference` elsewhere. Runs as the custom op
    `torch.ops.accel.block_sparse_attention`: with a `BlockIndex`, torch.compile traces it without a graph break.
    """
    D = _check(q, k, v, block_mask, key_valid, block_q, block_k)[-1]
    if D > 256:
        raise KernelInputError(f"block_sparse_attention supports head dims up to 256, got {D}")
    if q.is_cuda and q.dtype == torch.float32 and not int8:
        # fp32 tiles at 128x64 need more shared memory than sm_80/sm_89 have and spill everywhere
        # (benchmarks/compile_report.py); the interpreter has no such limit.
        raise KernelInputError(
            "block_sparse_attention on CUDA needs float16/bfloat16 q, k, v (or int8=True); cast them first"
        )
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    blocks = block_mask if isinstance(block_mask, BlockIndex) else BlockIndex.from_mask(block_mask)
    return _block_sparse_attention_op(
        q,
        k,
        v,
        blocks.index,
        blocks.offsets,
        key_valid,
        blocks.shape[0] == 1,
        sm_scale,
        int8,
        block_q,
        block_k,
        smooth_k,
        remainder,
    )
