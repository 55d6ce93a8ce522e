"""The Triton W4A16 kernels equal their PyTorch references (Triton interpreter on CPU, odd shapes)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from accel.quant import QuantConfig, dequantize, dequantize_triton, quantize, w4a16_matmul, w4a16_matmul_reference
from accel.quant.int4 import fit_int4, pack_int4
from accel.quant.kernels import choose_path, describe_paths

# fp32/fp16 differ only in accumulation order; the interpreter truncates fp32->bf16 where a GPU rounds.
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}


def _packed(n, k, group, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) * 0.1
    q, scales, offsets = fit_int4(w, group, dtype, search=False)
    in_scale = (torch.rand(k, generator=g) + 0.5).to(dtype)
    bias = torch.randn(n, generator=g).to(dtype)
    return pack_int4(q), scales, offsets, in_scale, bias


@pytest.mark.parametrize(
    "m,n,k,group,dtype,extras",
    [
        (1, 40, 64, 32, torch.float16, True),  # decode: one token
        (37, 72, 96, 32, torch.float32, True),  # M, N ragged; K = 3 groups, not a multiple of 64
        (19, 33, 48, 16, torch.bfloat16, False),  # odd N, K = 3 groups of 16
        (5, 24, 128, 128, torch.float16, False),  # one group spanning two K-tiles of 64
    ],
)
def test_w4a16_gemm_matches_reference(m, n, k, group, dtype, extras):
    qweight, scales, offsets, in_scale, bias = _packed(n, k, group, dtype)
    if not extras:
        in_scale = bias = None
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(1)).to(dtype)
    y = w4a16_matmul(x, qweight, scales, offsets, in_scale, bias)
    ref = w4a16_matmul_reference(x, qweight, scales, offsets, in_scale, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    err = (y.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert err < TOL[dtype], err


def test_w4a16_gemm_keeps_leading_dims_and_handles_strided_input():
    qweight, scales, offsets, in_scale, bias = _packed(24, 64, 32, torch.float32)
    x = torch.randn(2, 3, 128)[..., ::2]  # non-contiguous last dim
    y = w4a16_matmul(x, qweight, scales, offsets, in_scale, bias)
    ref = w4a16_matmul_reference(x, qweight, scales, offsets, in_scale, bias)
    assert y.shape == (2, 3, 24) and torch.allclose(y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_kernel_matches_reference(dtype):
    qweight, scales, offsets, in_scale, _ = _packed(37, 96, 32, dtype)
    ref = dequantize(qweight, scales, offsets, in_scale)
    out = dequantize_triton(qweight, scales, offsets, in_scale)
    if dtype == torch.bfloat16:
        assert torch.allclose(out.float(), ref.float(), rtol=1e-2, atol=1e-3)
    else:
        assert torch.equal(out, ref)


@pytest.mark.parametrize("kernel", ["triton", "dequant"])
def test_w4linear_forced_kernel_paths_match_reference(kernel):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 48), nn.GELU(), nn.Linear(48, 24, bias=False))
    x = torch.randn(2, 9, 64)
    quantize(model, QuantConfig(group_size=16, min_features=0, rank=2))
    expected = model(x)  # kernel="auto" on CPU: the reference path
    for layer in (model[0], model[2]):
        layer.kernel = kernel
    assert torch.allclose(model(x), expected, atol=1e-5, rtol=1e-5)


def test_path_choice_on_cpu_and_forced_kernel_errors(monkeypatch):
    x = torch.randn(4, 64)
    assert choose_path(x, "auto") == "reference"
    assert choose_path(x, "dequant") == "dequant"
    assert "on cpu" in describe_paths(torch.device("cpu"), "auto")
    qweight, scales, offsets, _, _ = _packed(8, 64, 32, torch.float32)
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(ValueError, match="kernel='reference'"):
        w4a16_matmul(x, qweight, scales, offsets)
    with pytest.raises(ValueError, match="runs on CUDA"):
        quantize(nn.Sequential(nn.Linear(64, 8)), QuantConfig(group_size=32, min_features=0, kernel="triton"))
