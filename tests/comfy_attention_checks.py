"""In-process checks of Accel Attention on tiny native ComfyUI models (run with tests/comfy_native_checks.py by
tests/test_comfy_native.py, in a Python process of their own)."""

from __future__ import annotations

import pytest
import torch
from comfy_tiny import sample, tiny_model

from accel.attention.config import AttentionConfig
from accel.attention.sparse import SparseConfig
from accel.comfy.attention import KEY, OVERRIDE, apply_attention
from accel.comfy.nodes import ATTENTION, legacy_mappings, v3_node
from accel.comfy.report import report_data, report_text
from accel.comfy.step_cache import StepCacheSettings, apply_step_cache
from accel.pipelines.comfy_native import find_comfy_adapter


def routed(model, sparse=None, **config):
    adapter = find_comfy_adapter(model.model.diffusion_model)
    return apply_attention(model, adapter, AttentionConfig(**config), sparse)


def relative_error(out, expected) -> float:
    return float((out - expected).abs().mean() / expected.abs().mean())


def test_sdpa_route_matches_comfyui_and_unpatching_restores(base, family):
    model, expected = base
    patched = routed(model, kernel="sdpa")
    assert relative_error(sample(patched, family), expected) < 1e-5
    assert patched.get_attachment(KEY).stats()["calls"]["sdpa"] > 0
    assert torch.equal(sample(model, family), expected)
    assert OVERRIDE not in model.model_options["transformer_options"] and model.get_attachment(KEY) is None


def test_int8_runs_its_reference_on_the_cpu(family):
    model = tiny_model(family, dtype="bfloat16")
    expected = sample(model, family)
    patched = routed(model, kernel="int8")
    assert relative_error(sample(patched, family), expected) < 2e-2
    stats = report_data(patched)["attention"]
    assert stats["calls"]["int8_reference"] > 0 and "PyTorch reference" in " ".join(stats["warnings"])


def test_calls_the_route_does_not_take_go_back_to_comfyui(base, family):
    model, expected = base
    everything_dense = routed(model, kernel="int8", dense_first_steps=10)  # every step keeps ComfyUI's attention
    assert torch.equal(sample(everything_dense, family), expected)
    assert not everything_dense.get_attachment(KEY).stats()["calls"]
    patched = routed(model, kernel="sdpa", dense_first_steps=1, dense_last_steps=1)
    sample(patched, family)
    back = patched.get_attachment(KEY).stats()["back_to_comfyui"]
    assert back["first steps"] > 0 and back["last steps"] > 0
    if family == "hunyuan_video":  # its token refiner attends before the blocks
        assert back["outside the blocks"] > 0
    if family == "ltxv":  # text padding mask of its cross-attention
        assert back["a mask (ComfyUI computes it)"] > 0


def test_two_routes_do_not_interfere_and_compose_with_the_step_cache(base, family):
    model, _ = base
    alone_sdpa = sample(routed(model, kernel="sdpa"), family)
    alone_int8 = sample(routed(model, kernel="int8"), family)
    a, b = routed(model, kernel="sdpa"), routed(model, kernel="int8")
    for _ in range(2):
        assert torch.equal(sample(a, family), alone_sdpa)
        assert torch.equal(sample(b, family), alone_int8)
    adapter = find_comfy_adapter(model.model.diffusion_model)
    both = apply_step_cache(b, adapter, StepCacheSettings(value=0.0))
    assert torch.equal(sample(both, family), alone_int8)
    text = report_text(both)
    assert "int8 attention on" in text and "step cache on" in text


def test_another_nodes_override_still_runs_behind(base, family):
    model, expected = base
    seen = []

    def other(func, *args, **kwargs):
        seen.append(1)
        return func(*args, **kwargs)

    theirs = model.clone()
    theirs.model_options["transformer_options"][OVERRIDE] = other
    ours = routed(theirs, kernel="sdpa", dense_first_steps=10)
    assert torch.equal(sample(ours, family), expected) and seen
    again = routed(ours, kernel="sdpa", dense_first_steps=10)  # a second Accel Attention replaces the first
    assert again.get_attachment(KEY).previous is other


def test_both_node_apis(base, family):
    model, expected = base
    classes, names = legacy_mappings()
    assert names["AccelAttention"] == "Accel Attention"
    node = classes["AccelAttention"]
    assert node.INPUT_TYPES()["required"]["route"][0] == ["int8", "sdpa", "sparse"]
    sparse = dict(sparse_target=0.85, sparse_block_q=128, sparse_block_k=64)
    (patched,) = getattr(node(), node.FUNCTION)(
        model=model, route="sdpa", dense_first_steps=0, dense_last_steps=0, **sparse
    )
    assert relative_error(sample(patched, family), expected) < 1e-5
    v3 = v3_node(ATTENTION)
    assert [i.id for i in v3.GET_SCHEMA().inputs][:4] == ["model", "route", "dense_first_steps", "dense_last_steps"]
    out = v3.execute(model=model, route="int8", dense_first_steps=10, dense_last_steps=0, **sparse)
    assert torch.equal(sample(out.args[0], family), expected)


@pytest.fixture
def cpu_reference(monkeypatch):
    """The block-sparse kernel's PyTorch reference, as a CPU user gets it (the Triton kernel itself is tested in
    Triton's interpreter in tests/test_sparse_kernel.py; here it would only be slow)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


def test_sparse_route_at_full_mass_matches_comfyui_and_declines_back(base, family, cpu_reference):
    model, expected = base
    patched = routed(model, sparse=SparseConfig(target=1.0, block_q=16, block_k=16))
    assert relative_error(sample(patched, family), expected) < 1e-5
    stats = patched.get_attachment(KEY).stats()
    assert stats["sparse"]["sparse_calls"] > 0 and stats["sparse"]["mean_blocks_kept"] == 1.0
    back = stats["back_to_comfyui"]
    assert back["dense warm-up steps"] > 0  # the first quarter of the steps
    if family in ("wan", "ltxv"):
        assert back.get("cross-attention (sparse takes self and joint attention)", 0) + back.get(
            "a mask (ComfyUI computes it)", 0
        )
    assert "sparse attention on" in report_text(patched) and "PyTorch reference" in " ".join(stats["warnings"])


@pytest.mark.parametrize("name", ["wan", "ltxv"])  # enough visual tokens for 16-token blocks to be skipped
def test_sparse_route_skips_blocks_at_a_lower_target(name, cpu_reference):
    model = tiny_model(name)
    expected = sample(model, name)
    patched = routed(model, sparse=SparseConfig(target=0.5, block_q=16, block_k=16))
    assert relative_error(sample(patched, name), expected) < 5e-2
    assert patched.get_attachment(KEY).stats()["sparse"]["mean_blocks_kept"] < 1.0
