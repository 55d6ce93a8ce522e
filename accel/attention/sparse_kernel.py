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
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .int8 import LOG2E, _pv_dtype, _quantize_qk, check_qkv


def num_blocks(tokens: int, block: int) -> int:
    return -(-tokens // block)


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
    def from_mask(cls, mask: torch.Tensor) -> "BlockIndex":
        if mask.dtype != torch.bool or mask.dim() != 4:
            raise ValueError(f"BlockIndex.from_mask needs a bool mask [B, H, NBQ, NBK], got {mask.dtype} {tuple(mask.shape)}")
        nbk = mask.shape[-1]
        counts = mask.sum(-1).flatten()
        if mask.numel() >= 2**31:
            raise ValueError(f"block mask {tuple(mask.shape)} too large for int32 offsets; use larger blocks")
        offsets = F.pad(counts.cumsum(0), (1, 0)).to(torch.int32)
        ids = torch.arange(nbk, dtype=torch.int16 if nbk <= 2**15 - 1 else torch.int32, device=mask.device)
        return cls(ids.expand(mask.shape)[mask], offsets, tuple(mask.shape))

    def counts(self) -> torch.Tensor:
        """Kept key blocks per row, int64 [B, H, NBQ]."""
        return self.offsets.diff().long().view(self.shape[:3])

    def to_mask(self) -> torch.Tensor:
        rows = torch.repeat_interleave(torch.arange(self.offsets.numel() - 1, device=self.index.device), self.counts().flatten())
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
            raise ValueError(f"{name} must be a power of two >= 16 (tl.dot tile), got {blk}")
    want = (Hq, num_blocks(Nq, block_q), num_blocks(Nk, block_k))
    if isinstance(blocks, BlockIndex):
        kind, shape = "BlockIndex", tuple(blocks.shape)
        ok = True
    else:
        kind, shape = f"{blocks.dtype} tensor", tuple(blocks.shape)
        ok = blocks.dtype == torch.bool and blocks.dim() == 4
    if not ok or shape[0] not in (1, B) or shape[1:] != want:
        raise ValueError(
            f"block_mask must be a bool tensor or BlockIndex of shape [{B} or 1, {want[0]}, {want[1]}, {want[2]}] "
            f"(batch, query heads, query blocks of {block_q}, key blocks of {block_k}), got {kind} {shape}"
        )
    if key_valid is not None and (key_valid.dtype != torch.bool or tuple(key_valid.shape) not in ((B, Nk), (B, Hkv, Nk))):
        raise ValueError(
            f"key_valid must be a bool tensor [{B}, {Nk}] or [{B}, {Hkv}, {Nk}] (True = attend), "
            f"got {key_valid.dtype} {tuple(key_valid.shape)}"
        )
    return B, Hq, Hkv, Nq, Nk, D


def token_mask(block_mask, nq: int, nk: int, block_q: int, block_k: int):
    """The block mask expanded to tokens: bool [B or 1, H, nq, nk]."""
    m = block_mask.repeat_interleave(block_q, dim=-2)[..., :nq, :]
    return m.repeat_interleave(block_k, dim=-1)[..., :nk]


def block_sparse_attention_reference(
    q, k, v, block_mask, *, sm_scale=None, key_valid=None, int8=False, block_q=128, block_k=64, smooth_k=True
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
        s = s * (sq.repeat_interleave(block_q, dim=-1)[..., :Nq, None] * sk.repeat_interleave(block_k, dim=-1)[..., None, :Nk])
    else:
        s = (q.float() @ k.float().repeat_interleave(g, dim=1).transpose(-1, -2)) * (sm_scale * LOG2E)
    keep = token_mask(block_mask, Nq, Nk, block_q, block_k)
    if key_valid is not None:
        per_head = key_valid.repeat_interleave(g, dim=1) if key_valid.dim() == 3 else key_valid[:, None]
        keep = keep & per_head[:, :, None, :]
    s = s.masked_fill(~keep, float("-inf"))
    row_max = s.amax(dim=-1, keepdim=True)
    p = torch.exp2(s - torch.where(torch.isinf(row_max), 0.0, row_max))  # empty rows: all zeros
    vv = v.repeat_interleave(g, dim=1)
    if int8 or q.dtype != torch.float32:
        dt = _pv_dtype(v.dtype)
        p_v = p.to(dt).float() @ vv.to(dt).float()
    else:
        p_v = p @ vv.float()
    o = p_v / p.sum(dim=-1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    return o.to(q.dtype)


_kernel = None


def _get_kernel():
    """Import triton lazily (so tests can set TRITON_INTERPRET first, and the package imports without it)."""
    global _kernel
    if _kernel is not None:
        return _kernel
    import triton
    import triton.language as tl

    @triton.jit
    def _block_sparse_fwd(
        Q, K, V, O, IDX, OFF, VALID, SQ, SK,
        sqb, sqh, sqn, sqd, skb, skh, skn, skd, svb, svh, svn, svd, sob, soh, son, sod,
        rows_per_batch, svlb, svlh,
        Hq, GROUP, Nq, Nk, D, NBQ, NBK, qk_scale,
        INT8: tl.constexpr, HAS_VALID: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // Hq
        h = pid_bh % Hq
        hk = h // GROUP

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_ok = offs_m < Nq
        d_ok = offs_d < D

        q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                    mask=m_ok[:, None] & d_ok[None, :], other=0)
        if INT8:
            q_scale = tl.load(SQ + (b * Hq + h) * NBQ + pid_m)  # sm_scale * log2(e) is folded in
        else:
            q_scale = qk_scale
            if UPCAST:
                q = q.to(tl.float32)
        k_base = K + b * skb + hk * skh
        v_base = V + b * svb + hk * svh
        row = b * rows_per_batch + h * NBQ + pid_m  # rows_per_batch is 0 for a batch-1 pattern
        first = tl.load(OFF + row)
        last = tl.load(OFF + row + 1)

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for j in range(first, last):
            block_n = tl.load(IDX + j).to(tl.int32)
            kn = block_n * BLOCK_N + offs_n
            n_ok = kn < Nk
            kt = tl.load(k_base + kn[None, :] * skn + offs_d[:, None] * skd,
                         mask=n_ok[None, :] & d_ok[:, None], other=0)  # [D, N]: K transposed
            if INT8:
                k_scale = tl.load(SK + (b * (Hq // GROUP) + hk) * NBK + block_n)
                s = tl.dot(q, kt, out_dtype=tl.int32).to(tl.float32) * (q_scale * k_scale)
            else:
                if UPCAST:
                    kt = kt.to(tl.float32)
                s = tl.dot(q, kt, input_precision=PRECISION, out_dtype=tl.float32) * q_scale
            keep = n_ok
            if HAS_VALID:
                keep = keep & (tl.load(VALID + b * svlb + hk * svlh + kn, mask=n_ok, other=0) != 0)
            s = tl.where(keep[None, :], s, float("-inf"))

            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with no visible key yet
            alpha = tl.math.exp2(m_i - m_use)
            p = tl.math.exp2(s - m_use[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_base + kn[:, None] * svn + offs_d[None, :] * svd,
                        mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            p16 = p.to(v.dtype)
            if UPCAST:  # the interpreter's tl.dot reads bf16 as raw bits; 16-bit products are exact in fp32
                pv = tl.dot(p16.to(tl.float32), v.to(tl.float32), input_precision="ieee", out_dtype=tl.float32)
            else:
                pv = tl.dot(p16, v, input_precision=PRECISION, out_dtype=tl.float32)
            acc = acc * alpha[:, None] + pv
            m_i = m_new

        acc = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]  # rows that saw no key: 0
        tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
                 acc.to(O.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])

    _kernel = _block_sparse_fwd
    return _kernel


def triton_usable(device: torch.device) -> bool:
    """The Triton kernel runs on CUDA, or on CPU under TRITON_INTERPRET=1 (tests, small shapes)."""
    return device.type == "cuda" or (device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def block_sparse_attention(
    q, k, v, block_mask, *, sm_scale=None, key_valid=None, int8=False, block_q=128, block_k=64, smooth_k=True
):
    """Attention over the kept blocks only, in Triton. Returns [B, Hq, Nq, D] in q's dtype and layout.

    q [B, Hq, Nq, D], k/v [B, Hkv, Nk, D] (any strides; Hq a multiple of Hkv), `block_mask` a
    `BlockIndex` (build it once, reuse it) or a bool mask [B or 1, Hq, ceil(Nq/block_q), ceil(Nk/block_k)]
    (converted on every call), `key_valid` optional bool [B, Nk] or [B, Hkv, Nk]. Head dims up to 256. `int8=True` runs Q·Kᵀ on INT8 (SageAttention-style smoothing and per-tile scales).
    CUDA tensors, or CPU tensors with TRITON_INTERPRET=1; `block_sparse_attention_reference` elsewhere.
    """
    B, Hq, Hkv, Nq, Nk, D = _check(q, k, v, block_mask, key_valid, block_q, block_k)
    mask_device = block_mask.index.device if isinstance(block_mask, BlockIndex) else block_mask.device
    if len({q.device, k.device, v.device, mask_device}) != 1 or not triton_usable(q.device):
        raise ValueError(
            f"block_sparse_attention runs on CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before "
            f"importing triton), all on one device; got q on {q.device}, mask on {mask_device}. Use "
            f"block_sparse_attention_reference elsewhere"
        )
    if D > 256:
        raise ValueError(f"block_sparse_attention supports head dims up to 256, got {D}")
    if q.is_cuda and q.dtype == torch.float32 and not int8:
        # fp32 tiles at 128x64 need more shared memory than sm_80/sm_89 have and spill everywhere
        # (benchmarks/compile_report.py); the interpreter has no such limit.
        raise ValueError("block_sparse_attention on CUDA needs float16/bfloat16 q, k, v (or int8=True); cast them first")
    sm_scale = 1.0 / math.sqrt(D) if sm_scale is None else sm_scale
    blocks = block_mask if isinstance(block_mask, BlockIndex) else BlockIndex.from_mask(block_mask)
    nbq, nbk = blocks.shape[-2:]
    if int8:
        q_in, sq, k_in, sk = _quantize_qk(q, k, sm_scale, smooth_k, block_q, block_k)
    else:
        q_in, k_in = q, k
        sq = sk = q.new_empty(1, dtype=torch.float32)  # unused
    if int8 or q.dtype != torch.float32:
        v = v if v.dtype == _pv_dtype(v.dtype) else v.to(_pv_dtype(v.dtype))
    valid = key_valid.to(torch.int8) if key_valid is not None else q.new_empty(1, dtype=torch.int8)
    valid_strides = (0, 0) if key_valid is None else (valid.stride(0), valid.stride(1) if valid.dim() == 3 else 0)
    o = torch.empty_like(q)
    block_d = max(16, 1 << (D - 1).bit_length())
    interpreted = q.device.type == "cpu"
    _get_kernel()[(nbq, B * Hq)](
        q_in, k_in, v, o, blocks.index, blocks.offsets, valid, sq, sk,
        *q_in.stride(), *k_in.stride(), *v.stride(), *o.stride(),
        0 if blocks.shape[0] == 1 else Hq * nbq, *valid_strides,
        Hq, Hq // Hkv, Nq, Nk, D, nbq, nbk, sm_scale * LOG2E,
        INT8=int8, HAS_VALID=key_valid is not None,
        UPCAST=interpreted and q.dtype == torch.bfloat16,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=block_q, BLOCK_N=block_k, BLOCK_D=block_d,
        num_warps=8 if block_q * block_d >= 128 * 128 else 4,
    )
    return o
