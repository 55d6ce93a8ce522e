"""In-process checks of Accel Attention on tiny native ComfyUI models (run with tests/comfy_native_checks.py by
tests/test_comfy_native.py, in a Python process of their own)."""

from __future__ import annotations

import pytest
import torch
from comfy_tiny import FAMILIES, sample, tiny_model

from accel.attention.config import AttentionConfig
from accel.comfy.attention import KEY, OVERRIDE, apply_attention
from accel.comfy.nodes import ATTENTION, legacy_mappings, v3_node
from accel.comfy.report import report_data, report_text
from accel.comfy.step_cache import StepCacheSettings, apply_step_cache
from accel.pipelines.comfy_native import find_comfy_adapter


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    return request.param


@pytest.fixture(scope="module")
def base(family):
    model = tiny_model(family)
    return model, sample(model, family)


def routed(model, **config):
    return apply_attention(model, find_comfy_adapter(model.model.diffusion_model), AttentionConfig(**config))


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
    assert node.INPUT_TYPES()["required"]["route"][0] == ["int8", "sdpa"]
    (patched,) = getattr(node(), node.FUNCTION)(model=model, route="sdpa", dense_first_steps=0, dense_last_steps=0)
    assert relative_error(sample(patched, family), expected) < 1e-5
    v3 = v3_node(ATTENTION)
    assert [i.id for i in v3.GET_SCHEMA().inputs] == ["model", "route", "dense_first_steps", "dense_last_steps"]
    out = v3.execute(model=model, route="int8", dense_first_steps=10, dense_last_steps=0)
    assert torch.equal(sample(out.args[0], family), expected)
