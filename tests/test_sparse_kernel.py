"""Block-sparse attention: Triton kernel (interpreted on CPU) vs its PyTorch reference, reference vs SDPA."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch
import torch.nn.functional as F

from accel.attention.sparse_kernel import (
    BlockIndex,
    block_sparse_attention,
    block_sparse_attention_reference,
    num_blocks,
    token_mask,
)

# Float path: same math, different accumulation order and P rounded to 16-bit against the running max.
TOL = {
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float32: dict(atol=1e-5, rtol=1e-5),
}
TOL_INT8 = {
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
    torch.float32: dict(atol=2e-3, rtol=2e-3),
}


def _qkv(b, hq, hkv, n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, n, d, generator=g)
    k = torch.randn(b, hkv, n, d, generator=g) + torch.randn(d, generator=g)  # a K channel bias
    v = torch.randn(b, hkv, n, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _random_mask(b, h, n, bq, bk, keep=0.4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, h, num_blocks(n, bq), num_blocks(n, bk), generator=g) < keep


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_all_blocks_kept_equals_dense_sdpa(dtype):
    q, k, v = _qkv(2, 4, 2, 70, 32, dtype)  # GQA, ragged last blocks
    full = torch.ones(1, 4, num_blocks(70, 32), num_blocks(70, 16), dtype=torch.bool)
    out = block_sparse_attention(q, k, v, full, block_q=32, block_k=16)
    gold = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out.float(), gold, **TOL[dtype])


@pytest.mark.parametrize("int8", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_random_masks_match_reference_with_empty_rows_and_key_padding(dtype, int8):
    b, h, n, d, bq, bk = 2, 2, 75, 32, 32, 16
    q, k, v = _qkv(b, h, 1, n, d, dtype, seed=1)
    mask = _random_mask(b, h, n, bq, bk, seed=2)
    mask[0, 1, 1] = False  # a query block that sees nothing
    key_valid = torch.ones(b, n, dtype=torch.bool)
    key_valid[1, 3 * bk :] = False  # key padding, as HunyuanVideo's text mask
    key_valid[0, 5:20] = False  # padding inside blocks
    mask[1, 0, 2] = False
    mask[1, 0, 2, 3:] = True  # a query block whose only kept key blocks are all padding
    kwargs = dict(key_valid=key_valid, int8=int8, block_q=bq, block_k=bk)
    out = block_sparse_attention(q, k, v, mask, **kwargs)
    ref = block_sparse_attention_reference(q, k, v, mask, **kwargs)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, ref, **(TOL_INT8 if int8 else TOL)[dtype])
    # Rows that see no key are defined as zero, in both.
    assert out[0, 1, bq : 2 * bq].abs().max() == 0 and ref[0, 1, bq : 2 * bq].abs().max() == 0
    assert out[1, 0, 2 * bq :].abs().max() == 0


def test_reference_equals_masked_sdpa():
    """The reference is dense SDPA with the token mask the blocks (and key padding) imply."""
    b, h, n, bq, bk = 1, 2, 50, 16, 32
    q, k, v = _qkv(b, h, h, n, 16, torch.float32, seed=3)
    mask = _random_mask(b, h, n, bq, bk, keep=0.6, seed=4)
    mask[..., 0] = True  # every row sees something, so SDPA is defined everywhere
    key_valid = torch.rand(b, n, generator=torch.Generator().manual_seed(5)) < 0.9
    key_valid[:, :bk] = True
    tokens = token_mask(mask, n, n, bq, bk) & key_valid[:, None, None, :]
    gold = F.scaled_dot_product_attention(q, k, v, attn_mask=tokens, scale=0.3)
    ref = block_sparse_attention_reference(q, k, v, mask, key_valid=key_valid, sm_scale=0.3, block_q=bq, block_k=bk)
    torch.testing.assert_close(ref, gold, atol=1e-5, rtol=1e-5)


def test_batch_one_mask_serves_every_row_and_strided_input():
    """A [1, H, ...] mask broadcasts over the batch; a [B, N, H, D] tensor seen as .transpose(1, 2)
    is read in place and the output keeps its layout."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(2, 2, 2, 48, 16, torch.float16, seed=6))
    mask = _random_mask(1, 2, 48, 16, 16, keep=0.5, seed=7)
    out = block_sparse_attention(q, k, v, mask, block_q=16, block_k=16)
    assert out.stride() == q.stride()
    ref = block_sparse_attention_reference(q, k, v, mask.expand(2, -1, -1, -1), block_q=16, block_k=16)
    torch.testing.assert_close(out, ref, **TOL[torch.float16])


def test_block_index_is_compact_and_round_trips():
    mask = torch.tensor([[[[False, True, False, True], [False, False, False, False], [True, True, True, True]]]])
    blocks = BlockIndex.from_mask(mask)
    assert blocks.index.dtype == torch.int16 and blocks.offsets.dtype == torch.int32
    assert blocks.index.tolist() == [1, 3, 0, 1, 2, 3]  # kept ids only, ascending per row
    assert blocks.offsets.tolist() == [0, 2, 2, 6]
    assert blocks.counts().tolist() == [[[2, 0, 4]]]
    assert blocks.nbytes == 6 * 2 + 4 * 4
    assert torch.equal(blocks.to_mask(), mask)
    torch.testing.assert_close(blocks.sparsity_per_head(), torch.tensor([0.5]))
    big = _random_mask(2, 3, 100, 16, 16, seed=8)
    assert torch.equal(BlockIndex.from_mask(big).to_mask(), big)


def test_block_index_and_per_head_key_valid_through_the_kernel():
    """A prebuilt BlockIndex gives what the mask gives; key_valid [B, Hkv, N] masks each head's keys."""
    b, h, n, bq, bk = 2, 2, 64, 16, 16
    q, k, v = _qkv(b, h, h, n, 16, torch.float16, seed=9)
    mask = _random_mask(b, h, n, bq, bk, keep=0.5, seed=10)
    key_valid = torch.rand(b, h, n, generator=torch.Generator().manual_seed(11)) < 0.8
    kw = dict(key_valid=key_valid, block_q=bq, block_k=bk)
    out = block_sparse_attention(q, k, v, BlockIndex.from_mask(mask), **kw)
    torch.testing.assert_close(out, block_sparse_attention(q, k, v, mask, **kw), atol=0, rtol=0)
    ref = block_sparse_attention_reference(q, k, v, mask, **kw)
    torch.testing.assert_close(out, ref, **TOL[torch.float16])
    per_head = torch.stack(
        [
            block_sparse_attention_reference(
                q[:, i : i + 1],
                k[:, i : i + 1],
                v[:, i : i + 1],
                mask[:, i : i + 1],
                key_valid=key_valid[:, i],
                block_q=bq,
                block_k=bk,
            )
            for i in range(h)
        ],
        1,
    )[:, :, 0]
    torch.testing.assert_close(ref, per_head, atol=0, rtol=0)


def test_clear_errors(monkeypatch):
    q, k, v = _qkv(1, 2, 2, 32, 16, torch.float16)
    mask = torch.ones(1, 2, 2, 2, dtype=torch.bool)
    with pytest.raises(
        ValueError, match=r"block_mask must be a bool tensor or BlockIndex of shape \[1 or 1, 2, 2, 2\]"
    ):
        block_sparse_attention(q, k, v, mask[..., :1], block_q=16, block_k=16)
    with pytest.raises(ValueError, match="bool"):
        block_sparse_attention(q, k, v, mask.float(), block_q=16, block_k=16)
    with pytest.raises(ValueError, match="power of two"):
        block_sparse_attention(q, k, v, mask, block_q=24, block_k=16)
    with pytest.raises(ValueError, match="key_valid"):
        block_sparse_attention(q, k, v, mask, key_valid=torch.ones(1, 31, dtype=torch.bool), block_q=16, block_k=16)
    with pytest.raises(ValueError, match="dtype"):
        block_sparse_attention(q, k.float(), v, mask, block_q=16, block_k=16)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors.*TRITON_INTERPRET"):
        block_sparse_attention(q, k, v, mask, block_q=16, block_k=16)
    block_sparse_attention_reference(q, k, v, mask, block_q=16, block_k=16)  # the reference runs anywhere
