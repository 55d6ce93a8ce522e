"""The Triton W4A16 and W4A8 kernels equal their PyTorch references (Triton interpreter on CPU, odd shapes),
and the kernel path is chosen by device, compute capability and token count."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from accel.quant import (
    QuantConfig,
    dequantize,
    dequantize_triton,
    kernels,
    quantize,
    w4a8_matmul,
    w4a8_matmul_reference,
    w4a16_matmul,
    w4a16_matmul_reference,
)
from accel.quant.int4 import fit_int4, pack_int4
from accel.quant.kernels import (
    choose_path,
    describe_paths,
    quantize_activations_reference,
    quantize_activations_triton,
)

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


# ---- W4A8 ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "m,n,k,group,dtype,extras",
    [
        (1, 40, 64, 32, torch.float16, True),  # one token
        (37, 72, 96, 32, torch.float32, True),  # M, N ragged; K = 3 groups
        (19, 33, 256, 128, torch.bfloat16, True),  # odd N, one K-tile per group
        (5, 24, 512, 256, torch.float16, False),  # a group spanning two K-tiles of 128
    ],
)
def test_w4a8_gemm_matches_reference(m, n, k, group, dtype, extras):
    qweight, scales, offsets, in_scale, bias = _packed(n, k, group, dtype)
    if not extras:
        in_scale = bias = None
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(1)) * 3).to(dtype)
    x[0, 5] = 40.0  # an outlier sets its token's int8 step
    ours = quantize_activations_triton(x, in_scale, group)
    ref8 = quantize_activations_reference(x, in_scale, group)
    assert all(torch.equal(a, b) for a, b in zip(ours, ref8))  # same int8 codes, steps and group sums
    assert ref8[0].abs().max() == 127 and ref8[0].dtype == torch.int8
    y = w4a8_matmul(x, qweight, scales, offsets, in_scale, bias)
    ref = w4a8_matmul_reference(x, qweight, scales, offsets, in_scale, bias)
    assert y.shape == (m, n) and y.dtype == dtype
    # float32 results agree to rounding; 16-bit ones to one ulp of the output dtype
    err = (y.float() - ref.float()).abs().max() / ref.float().abs().max()
    assert err < {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype], err


def test_w4a8_reference_is_the_int8_rounded_w4a16_product():
    """The group math (scale * int dot + offset * int8 group sum, times the token step) is exactly the
    16-bit matmul of the rounded activations with the dequantized weight."""
    qweight, scales, offsets, in_scale, bias = _packed(24, 128, 32, torch.float32)
    x = torch.randn(2, 7, 128, generator=torch.Generator().manual_seed(2))
    x8, step, _ = quantize_activations_reference(x, in_scale, 32)
    rounded = (x8.double() * step.double()[:, None]).view(2, 7, 128)
    w = dequantize(qweight, scales, offsets, dtype=torch.float32).double()
    expected = rounded @ w.T + bias.double()
    y = w4a8_matmul_reference(x, qweight, scales, offsets, in_scale, bias)
    assert y.shape == (2, 7, 24) and torch.allclose(y.double(), expected, rtol=1e-5, atol=1e-5)
    zero_codes = quantize_activations_reference(torch.zeros(3, 64), None, 32)[0]
    assert torch.equal(zero_codes, torch.zeros(3, 64, dtype=torch.int8))


def test_w4a8_gemm_strided_input_and_too_small_groups():
    qweight, scales, offsets, in_scale, bias = _packed(24, 64, 32, torch.float32)
    x = torch.randn(2, 3, 128)[..., ::2]  # non-contiguous last dim
    y = w4a8_matmul(x, qweight, scales, offsets, in_scale, bias)
    assert y.shape == (2, 3, 24)
    assert torch.allclose(y, w4a8_matmul_reference(x, qweight, scales, offsets, in_scale, bias), atol=1e-5, rtol=1e-5)
    qweight, scales, offsets, _, _ = _packed(8, 64, 16, torch.float32)
    with pytest.raises(ValueError, match="groups of 32"):
        w4a8_matmul(torch.randn(2, 64), qweight, scales, offsets)


def test_w4linear_w4a8_kernel_matches_its_reference():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 24, bias=False)).to(torch.float16)
    x = torch.randn(2, 9, 64).to(torch.float16)
    quantize(model, QuantConfig(group_size=32, min_features=0, rank=2, activations="int8", kernel="w4a8-reference"))
    assert model[0].activations == "int8" and "activations=int8" in repr(model[0])
    expected = model(x)
    for layer in (model[0], model[2]):
        layer.kernel = "w4a8"
    assert torch.allclose(model(x).float(), expected.float(), atol=2e-3, rtol=2e-3)


def _fake_gpu(monkeypatch, capability):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    monkeypatch.setattr(kernels, "triton_available", lambda: True)


def test_auto_picks_w4a8_only_where_int8_tensor_cores_are_fast_and_tokens_many(monkeypatch):
    x_cpu = torch.randn(4096, 64)
    assert choose_path(x_cpu, "auto", "int8", 128) == "reference"  # no INT8 tensor cores on a CPU
    cpu_rule = describe_paths(torch.device("cpu"), "auto", "int8", 128)
    assert "activations stay 16-bit (no INT8 tensor cores on cpu)" in cpu_rule

    # The rule itself, on a pretend sm_90 GPU (a CPU tensor stands in for the input).
    gpu = torch.device("cuda")
    _fake_gpu(monkeypatch, (9, 0))
    monkeypatch.setattr(kernels, "gpu_supports_fused", lambda device: True)

    def path(tokens, activations="int8", group=128):
        return choose_path(torch.empty(tokens, 64), "auto", activations, group)

    assert path(16) == "triton"  # decode: weight bytes dominate, the W4A16 GEMM
    assert path(kernels.W4A8_MIN_M - 1) == "dequant"
    assert path(kernels.W4A8_MIN_M) == "w4a8"
    assert path(32768, activations="16bit") == "dequant"  # int8 activations are opt-in only
    assert path(32768, group=16) == "dequant"  # int8 tensor-core tiles need groups of 32+
    assert "Triton W4A8 GEMM (per-token int8 activations" in describe_paths(gpu, "auto", "int8", 128)
    assert "available with QuantConfig(activations='int8')" in describe_paths(gpu, "auto", "16bit", 128)

    # A GPU whose INT8 rate is not 2x bf16 (Blackwell Ultra) never gets the W4A8 path, nor the claim.
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (10, 3))
    assert path(32768) == "dequant"
    rule = describe_paths(gpu, "auto", "int8", 128)
    assert "W4A8 GEMM" not in rule and "sm_103 is not among" in rule
    assert "W4A8" not in describe_paths(gpu, "auto", "16bit", 128)
