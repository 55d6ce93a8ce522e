"""Block-sparse attention with `remainder=True`: skipped key blocks seen through their mean key and value.

Kernel (interpreted on CPU) against its PyTorch reference, the reference against the formula written out with
SDPA, and the cases where the stand-ins are exact.
"""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import math

import pytest
import torch
import torch.nn.functional as F

from accel.attention.sparse_kernel import (
    BlockIndex,
    block_means,
    block_sparse_attention,
    block_sparse_attention_reference,
    num_blocks,
    token_mask,
)

TOL = {
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
}
TOL_INT8 = {**TOL, torch.float32: dict(atol=2e-3, rtol=2e-3)}


def _qkv(b, hq, hkv, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g)
    k = torch.randn(b, hkv, n, d, generator=g) + torch.randn(d, generator=g)  # a K channel bias
    v = torch.randn(b, hkv, n, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _mask(b, h, n, bq, bk, keep=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, num_blocks(n, bq), num_blocks(n, bk), generator=g) < keep


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_kernel_matches_reference(dtype, int8):
    """GQA, ragged last blocks, key padding (inside a block and whole blocks), a row that keeps nothing."""
    b, hq, hkv, n, d, bq, bk = 2, 4, 2, 75, 32, 32, 16
    q, k, v = _qkv(b, hq, hkv, n, d, dtype, seed=1)
    mask = _mask(b, hq, n, bq, bk, seed=2)
    mask[0, 1, 1] = False
    key_valid = torch.ones(b, n, dtype=torch.bool)
    key_valid[1, 3 * bk :] = False
    key_valid[0, 5:20] = False
    kw = dict(key_valid=key_valid, int8=int8, block_q=bq, block_k=bk, remainder=True)
    out = block_sparse_attention(q, k, v, BlockIndex.from_mask(mask), **kw)
    ref = block_sparse_attention_reference(q, k, v, mask, **kw)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **(TOL_INT8 if int8 else TOL)[dtype])
    assert out[0, 1, bq : 2 * bq].abs().amax() > 0  # the row that keeps nothing still sees every block's mean
    plain = block_sparse_attention_reference(q, k, v, mask, **dict(kw, remainder=False))
    assert (plain - ref).abs().amax() > 1e-2


def test_batch_one_pattern_and_per_head_key_valid():
    b, h, n, bq, bk = 2, 2, 64, 16, 16
    q, k, v = _qkv(b, h, h, n, 16, torch.float16, seed=3)
    mask = _mask(1, h, n, bq, bk, keep=0.5, seed=4)
    key_valid = torch.rand(b, h, n, generator=torch.Generator().manual_seed(5)) < 0.8
    kw = dict(key_valid=key_valid, block_q=bq, block_k=bk, remainder=True)
    out = block_sparse_attention(q, k, v, mask, **kw)
    ref = block_sparse_attention_reference(q, k, v, mask.expand(b, -1, -1, -1), **kw)
    torch.testing.assert_close(out, ref, **TOL[torch.float16])


def test_reference_is_attention_over_kept_keys_and_block_means():
    """Written out: SDPA over [K; mean keys] and [V; mean values], with the block means (bias: log of the block's
    key count) visible to the query blocks that skip them."""
    b, h, n, d, bq, bk = 1, 2, 70, 16, 32, 16
    q, k, v = _qkv(b, h, h, n, d, torch.float32, seed=6)
    mask = _mask(b, h, n, bq, bk, keep=0.5, seed=7)
    key_valid = torch.rand(b, n, generator=torch.Generator().manual_seed(8)) < 0.8
    nbk = num_blocks(n, bk)
    visible = F.pad(key_valid.float(), (0, nbk * bk - n)).view(b, nbk, bk)
    count = visible.sum(-1)  # [b, nbk]
    k_mean = (F.pad(k, (0, 0, 0, nbk * bk - n)).view(b, h, nbk, bk, d) * visible[:, None, :, :, None]).sum(-2)
    v_mean = (F.pad(v, (0, 0, 0, nbk * bk - n)).view(b, h, nbk, bk, d) * visible[:, None, :, :, None]).sum(-2)
    k_mean, v_mean = k_mean / count.clamp_min(1)[:, None, :, None], v_mean / count.clamp_min(1)[:, None, :, None]
    keys, values = torch.cat([k, k_mean], 2), torch.cat([v, v_mean], 2)
    scale = 0.3
    bias = torch.cat([torch.zeros(b, n), count.log()], 1)[:, None, None, :] / scale  # folded into the keys' score
    tokens = token_mask(mask, n, n, bq, bk) & key_valid[:, None, None, :]
    rest = ~mask.repeat_interleave(bq, dim=-2)[..., :n, :] & (count > 0)[:, None, None, :]
    allowed = torch.cat([tokens, rest], -1)
    scores = (q @ keys.transpose(-1, -2) + bias) * scale
    gold = torch.softmax(scores.masked_fill(~allowed, -math.inf), -1) @ values
    ref = block_sparse_attention_reference(
        q, k, v, mask, key_valid=key_valid, sm_scale=scale, block_q=bq, block_k=bk, remainder=True
    )
    torch.testing.assert_close(ref, gold, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("through", ["kernel", "reference"])
def test_exact_where_each_block_holds_one_key(through):
    """Keys constant within each key block: a skipped block's stand-in is exactly its keys, so any pattern (even
    nothing kept) gives dense attention."""
    b, h, n, d, bq, bk = 1, 2, 64, 16, 16, 16
    q, k, v = _qkv(b, h, h, n, d, torch.float32, seed=9)
    k = k[:, :, ::bk].repeat_interleave(bk, dim=2)
    dense = F.scaled_dot_product_attention(q, k, v)
    run = block_sparse_attention if through == "kernel" else block_sparse_attention_reference
    for keep in (0.0, 0.3, 1.0):
        mask = _mask(b, h, n, bq, bk, keep=keep, seed=10)
        out = run(q, k, v, mask, block_q=bq, block_k=bk, remainder=True)
        torch.testing.assert_close(out, dense, atol=1e-5, rtol=1e-5)


def test_all_blocks_kept_equals_plain():
    q, k, v = _qkv(2, 2, 1, 70, 32, torch.float16, seed=11)
    full = torch.ones(1, 2, num_blocks(70, 32), num_blocks(70, 16), dtype=torch.bool)
    kw = dict(block_q=32, block_k=16)
    out = block_sparse_attention(q, k, v, full, remainder=True, **kw)
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, full, **kw), atol=0, rtol=0)


def test_block_means_weights_visible_keys_and_smooths():
    k = torch.arange(12.0).view(1, 1, 6, 2)
    v = -k
    key_valid = torch.tensor([[True, False, True, True, False, False]])
    k_mean, v_mean, log_count = block_means(k, v, 4, key_valid)
    torch.testing.assert_close(log_count, torch.tensor([[[math.log2(3), -math.inf]]]))
    torch.testing.assert_close(k_mean[0, 0, 0], (k[0, 0, 0] + k[0, 0, 2] + k[0, 0, 3]) / 3)
    torch.testing.assert_close(v_mean, -k_mean)
    smoothed = block_means(k, v, 4, key_valid, smooth_k=True)[0]
    torch.testing.assert_close(smoothed, k_mean - k.mean(2, keepdim=True))


def test_orders_for_the_remainder_pick_the_one_whose_stand_ins_are_exact():
    """Keys constant along each row of a frame: in the model's order every 16-token block is one row, so its
    stand-in is exact and choose_orders(value=...) picks "model" for every head; tiles mix rows."""
    from accel.attention.pattern import candidate_orders, choose_orders
    from accel.pipelines.base import LatentGrid

    grid = LatentGrid(2, 4, 16)
    g = torch.Generator().manual_seed(12)
    rows = torch.randn(1, 3, grid.frames * grid.height, 16, generator=g)
    k = rows.repeat_interleave(grid.width, dim=2)  # [1, 3, 128, 16]
    q = torch.randn(1, 3, grid.tokens, 16, generator=g)
    v = torch.randn(1, 3, grid.tokens, 16, generator=g)
    orders = candidate_orders(grid, 16, names=("tiles", "frames", "model"))  # no tie goes to "model" by place
    assert orders.names == ("tiles", "frames", "model")
    kw = dict(block_q=16, block_k=16, target=0.5, sm_scale=1.0)
    assert choose_orders(q, k, orders, value=v, **kw).tolist() == [[2, 2, 2]]
