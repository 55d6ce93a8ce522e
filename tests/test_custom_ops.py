"""accel's Triton kernels as torch.library custom ops: opcheck on each, and torch.compile traces through them.

Everything runs on CPU in Triton's interpreter (TRITON_INTERPRET=1, set by conftest) with small shapes.
opcheck runs all of its checks here (schema, autograd registration, fake tensor, AOT dispatch with dynamic
shapes): none needs a GPU.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo
import torch.nn.functional as F
from torch import nn

from accel.attention.int8 import int8_attention
from accel.attention.sparse_kernel import BlockIndex, block_sparse_attention
from accel.quant import QuantConfig, quantize
from accel.quant.int4 import fit_int4, pack_int4
from accel.quant.kernels import (
    dequantize_triton,
    quantize_activations_triton,
    w4a8_matmul,
    w4a16_matmul,
)

OPS = (
    "int8_attention",
    "block_sparse_attention",
    "w4a16_matmul",
    "w4_dequantize",
    "quantize_activations_int8",
    "w4a8_matmul",
)


def _qkv(seed=0, n=20, hkv=2):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, 2, n, 64, generator=g).half()
    k, v = (torch.randn(1, hkv, n, 64, generator=g).half() for _ in range(2))
    return q, k, v


def _packed(n=24, k=64, group=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    codes, scales, offsets = fit_int4(torch.randn(n, k, generator=g), group, torch.float16, search=False)
    in_scale = (torch.rand(k, generator=g) + 0.5).half()
    return pack_int4(codes), scales, offsets, in_scale, torch.randn(n, generator=g).half()


def _opcheck_cases():
    q, k, v = _qkv()
    _, k1, v1 = _qkv(hkv=1)  # grouped-query attention: 2 query heads per key/value head
    key_valid = torch.ones(1, 20, dtype=torch.bool)
    key_valid[0, 15:] = False
    blocks = BlockIndex.from_mask(torch.tensor([[True, False], [True, True]]).expand(1, 2, 2, 2))
    qweight, scales, offsets, in_scale, bias = _packed()
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(1)).half()
    return {
        "int8_attention": (q, k, v, None, False, 0.125, True, False, "fp16", "block", 16, 16, None, None),
        "int8_attention fp8 P·V, per token, masked, causal, GQA": (
            q,
            k1,
            v1,
            key_valid,
            True,
            0.125,
            True,
            True,
            "fp8",
            "token",
            16,
            16,
            None,
            None,
        ),
        "block_sparse_attention": (q, k, v, blocks.index, blocks.offsets, None, True, 0.125, False, 16, 16, True),
        "block_sparse_attention int8, key_valid": (
            q,
            k,
            v,
            blocks.index,
            blocks.offsets,
            key_valid,
            True,
            0.125,
            True,
            16,
            16,
            True,
        ),
        "block_sparse_attention remainder, key_valid": (
            q,
            k,
            v,
            blocks.index,
            blocks.offsets,
            key_valid,
            True,
            0.125,
            False,
            16,
            16,
            True,
            True,
        ),
        "w4a16_matmul": (x, qweight, scales, offsets, in_scale, bias),
        "w4_dequantize": (qweight, scales, offsets, None, torch.float32),
        "quantize_activations_int8": (x, in_scale, 32),
        "w4a8_matmul": (x, qweight, scales, offsets, None, bias),
    }


@pytest.mark.parametrize("case", list(_opcheck_cases()))
def test_opcheck(case):
    args = _opcheck_cases()[case]
    op = getattr(torch.ops.accel, case.split()[0]).default
    result = torch.library.opcheck(op, args)
    assert set(result.values()) == {"SUCCESS"}, result


def _calls():
    """Each public wrapper on small inputs: name -> zero-argument callable."""
    q, k, v = _qkv(seed=2)
    blocks = BlockIndex.from_mask(torch.ones(1, 2, 2, 2, dtype=torch.bool).tril())
    qweight, scales, offsets, in_scale, bias = _packed(seed=3)
    x = torch.randn(7, 64, generator=torch.Generator().manual_seed(4)).half()
    return {
        "int8_attention": lambda: int8_attention(q, k, v, block_q=16, block_k=16, smooth_q=True),
        "block_sparse_attention": lambda: block_sparse_attention(q, k, v, blocks, int8=True, block_q=16, block_k=16),
        "w4a16_matmul": lambda: w4a16_matmul(x, qweight, scales, offsets, in_scale, bias),
        "w4_dequantize": lambda: dequantize_triton(qweight, scales, offsets, in_scale),
        "quantize_activations_int8": lambda: quantize_activations_triton(x, in_scale, 32),
        "w4a8_matmul": lambda: w4a8_matmul(x, qweight, scales, offsets, in_scale, bias),
    }


@pytest.mark.parametrize("name", OPS)
def test_fullgraph_compile_through_each_op(name):
    """One graph, the op inside it, the same bits as eager."""
    call = _calls()[name]

    def fn():
        return call()

    torch._dynamo.reset()
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compiled = torch.compile(fn, fullgraph=True, backend=backend)()
    assert len(graphs) == 1
    assert f"accel.{name}" in str(graphs[0].graph)
    eager = call()
    for a, b in zip(*(out if isinstance(out, tuple) else (out,) for out in (compiled, eager))):
        assert torch.equal(a, b)
    torch._dynamo.reset()


class _TinyAttention(nn.Module):
    """A transformer block's attention: projections around SDPA, or around the INT8 kernel when patched."""

    def __init__(self, kernel=None):
        super().__init__()
        self.qkv, self.out, self.kernel = nn.Linear(64, 3 * 64), nn.Linear(64, 64), kernel

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, 1, 64).permute(2, 0, 3, 1, 4)
        if self.kernel is None:
            o = F.scaled_dot_product_attention(q, k, v)
        else:
            o = self.kernel(q.half(), k.half(), v.half()).float()
        return self.out(o.transpose(1, 2).reshape(b, n, 64))


def _explain(model, *args):
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(*args)
    torch._dynamo.reset()
    return explained


def test_graph_breaks_unchanged_by_the_int8_and_sparse_kernels():
    """fullgraph=False, as a user would compile a patched model: the kernels add no graph break."""
    torch.manual_seed(0)
    x = torch.randn(1, 32, 64)
    before = _explain(_TinyAttention(), x)
    blocks = BlockIndex.from_mask(torch.ones(1, 1, 2, 2, dtype=torch.bool).tril())
    for kernel in (
        lambda q, k, v: int8_attention(q, k, v, block_q=16, block_k=16),
        lambda q, k, v: block_sparse_attention(q, k, v, blocks, block_q=16, block_k=16),
    ):
        after = _explain(_TinyAttention(kernel), x)
        assert (after.graph_count, after.graph_break_count) == (before.graph_count, before.graph_break_count) == (1, 0)


@pytest.mark.parametrize("kernel", ["triton", "dequant", "w4a8"])
def test_graph_breaks_unchanged_by_w4linear_kernels(kernel):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32))
    x = torch.randn(3, 64)
    before = _explain(model, x)
    quantize(model, QuantConfig(group_size=32, min_features=0))
    for layer in (model[0], model[2]):
        layer.kernel = kernel
    after = _explain(model, x)
    assert (after.graph_count, after.graph_break_count) == (before.graph_count, before.graph_break_count) == (1, 0)


def test_eager_calls_skip_the_op_dispatcher(monkeypatch):
    """Outside torch.compile the launchers run directly (the dispatcher costs tens of microseconds a call)."""
    from accel import _triton

    dispatched = []
    original = _triton.KernelOp.__call__

    def spy(self, *args):
        result = original(self, *args)
        dispatched.append(torch.compiler.is_compiling())
        return result

    monkeypatch.setattr(_triton.KernelOp, "__call__", spy)
    for op in _triton.KernelOp.registered:
        monkeypatch.setattr(op, "op", None)  # calling the op now would fail
    qweight, scales, offsets, in_scale, bias = _packed()
    x = torch.randn(2, 64).half()
    assert torch.equal(
        w4a16_matmul(x, qweight, scales, offsets, in_scale, bias),
        torch.ops.accel.w4a16_matmul(x, qweight, scales, offsets, in_scale, bias),
    )
    q, k, v = _qkv()
    int8_attention(q, k, v, block_q=16, block_k=16)
    assert dispatched == [False, False]
