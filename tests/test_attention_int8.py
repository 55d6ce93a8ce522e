"""INT8 attention: Triton kernel (interpreted on CPU) vs its PyTorch reference, reference vs SDPA."""

import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported anywhere

import pytest
import torch
import torch.nn.functional as F

from accel.attention import int8_attention, int8_attention_reference

BLOCKS = dict(block_q=16, block_k=16)  # small tiles: ragged tails and several K blocks on tiny shapes
# Same INT8 tensors on both sides; the rest is accumulation order and P's 16-bit rounding against the
# running vs the final row max (the interpreter also truncates fp32->bf16 where a GPU rounds).
TOL = {torch.float16: dict(atol=2e-3, rtol=2e-3), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float32: dict(atol=2e-3, rtol=2e-3)}


def _qkv(b, hq, hkv, nq, nk, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g)
    k = torch.randn(b, hkv, nk, d, generator=g) + 2.0 * torch.randn(d, generator=g)  # a K channel bias
    v = torch.randn(b, hkv, nk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("b,hq,hkv,n", [(1, 2, 2, 37), (2, 4, 2, 70)])  # second case is GQA
def test_kernel_matches_reference(dtype, causal, b, hq, hkv, n):
    q, k, v = _qkv(b, hq, hkv, n, n, 64, dtype)
    out = int8_attention(q, k, v, causal=causal, **BLOCKS)
    ref = int8_attention_reference(q, k, v, causal=causal, **BLOCKS)
    assert out.dtype == dtype and out.shape == q.shape
    torch.testing.assert_close(out, ref, **TOL[dtype])


@pytest.mark.parametrize("d,dtype", [(128, torch.float16), (96, torch.float16), (80, torch.bfloat16), (64, torch.float32)])
def test_kernel_head_dims_and_fp32(d, dtype):
    """128 natively, 96 (and 80) as masked 128-wide tiles; fp32 inputs run P·V in fp16."""
    q, k, v = _qkv(1, 2, 1, 33, 33, d, dtype, seed=1)
    out = int8_attention(q, k, v, causal=True, **BLOCKS)
    torch.testing.assert_close(out, int8_attention_reference(q, k, v, causal=True, **BLOCKS), **TOL[dtype])


def test_causal_bottom_right_when_fewer_queries():
    """Nq < Nk (e.g. decoding with a cache): query i sees keys j <= i + Nk - Nq."""
    q, k, v = _qkv(1, 2, 2, 20, 45, 64, torch.float16, seed=2)
    out = int8_attention(q, k, v, causal=True, **BLOCKS)
    ref = int8_attention_reference(q, k, v, causal=True, **BLOCKS)
    torch.testing.assert_close(out, ref, **TOL[torch.float16])
    # The last query sees every key, so it matches the non-causal result.
    full = int8_attention_reference(q, k, v, **BLOCKS)
    torch.testing.assert_close(ref[:, :, -1], full[:, :, -1])


def test_strided_bnhd_input_is_read_in_place():
    """A [B, N, H, D] tensor passed as .transpose(1, 2) works, and the output keeps that layout."""
    q, k, v = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in _qkv(1, 2, 2, 40, 40, 64, torch.float16, seed=3))
    assert not q.is_contiguous()
    out = int8_attention(q, k, v, **BLOCKS)
    assert out.stride() == q.stride()
    torch.testing.assert_close(out, int8_attention(q.contiguous(), k.contiguous(), v.contiguous(), **BLOCKS))


def _student_t(g, shape, df=5):
    """Heavy-tailed values, as real Q/K activations have."""
    chi2 = (torch.randn(shape + (df,), generator=g) ** 2).sum(-1)
    return torch.randn(shape, generator=g) / torch.sqrt(chi2 / df)


def _accuracy(out, gold):
    out, gold = out.float().flatten(), gold.float().flatten()
    return F.cosine_similarity(out, gold, dim=0).item(), ((out - gold).abs().sum() / gold.abs().sum()).item()


def test_reference_accuracy_vs_sdpa_and_smoothing_matters():
    """Heavy-tailed Q/K with a large shared per-channel K bias: smoothed INT8 stays at cos >= 0.999;
    without smoothing the bias inflates K's block absmax and the error clearly grows."""
    g = torch.Generator().manual_seed(0)
    b, h, n, d = 1, 2, 256, 64
    q = _student_t(g, (b, h, n, d)).half()
    k = (_student_t(g, (b, h, n, d)) + 8.0 * torch.randn(d, generator=g)).half()
    v = torch.randn(b, h, n, d, generator=g).half()
    gold = F.scaled_dot_product_attention(q.float(), k.float(), v.float())

    cos_s, l1_s = _accuracy(int8_attention_reference(q, k, v), gold)
    cos_n, l1_n = _accuracy(int8_attention_reference(q, k, v, smooth_k=False), gold)
    print(f"\nsmoothed: cos={cos_s:.6f} relL1={l1_s:.4f}  unsmoothed: cos={cos_n:.6f} relL1={l1_n:.4f}")
    assert cos_s >= 0.999
    assert cos_n < 0.999 and (1 - cos_n) > 2 * (1 - cos_s) and l1_n > 1.3 * l1_s


def test_kernel_accuracy_vs_sdpa():
    """End to end through the kernel (small, for the interpreter's sake)."""
    g = torch.Generator().manual_seed(1)
    q = _student_t(g, (1, 1, 64, 64)).half()
    k = (_student_t(g, (1, 1, 64, 64)) + 8.0 * torch.randn(64, generator=g)).half()
    v = torch.randn(1, 1, 64, 64, generator=g).half()
    cos, l1 = _accuracy(int8_attention(q, k, v, block_q=32, block_k=32), F.scaled_dot_product_attention(q.float(), k.float(), v.float()))
    print(f"\nkernel: cos={cos:.6f} relL1={l1:.4f}")
    assert cos >= 0.999


def test_clear_errors(monkeypatch):
    q, k, v = _qkv(1, 2, 2, 16, 16, 64, torch.float16)
    with pytest.raises(ValueError, match="head dim"):
        int8_attention(*_qkv(1, 2, 2, 16, 16, 48, torch.float16))
    with pytest.raises(ValueError, match="dtype"):
        int8_attention(q.double(), k.double(), v.double())
    with pytest.raises(ValueError, match="dtype"):
        int8_attention(q, k.float(), v)
    with pytest.raises(ValueError, match="multiple"):
        int8_attention(q[:, :1].repeat(1, 3, 1, 1), k, v)
    with pytest.raises(ValueError, match="Nq <= Nk"):
        int8_attention(q, k[:, :, :8], v[:, :, :8], causal=True)
    with pytest.raises(ValueError, match="power of two"):
        int8_attention(q, k, v, block_q=24)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="CUDA tensors.*TRITON_INTERPRET"):
        int8_attention(q, k, v)
    int8_attention_reference(q, k, v)  # the reference runs anywhere
