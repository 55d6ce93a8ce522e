"""In-process checks of Accel W4 Weights on tiny native ComfyUI models (run with the other checks by
tests/test_comfy_native.py, in a Python process of their own)."""

from __future__ import annotations

import pytest
import torch
from comfy_tiny import import_comfy, sample, tiny_model

from accel.attention.config import AttentionConfig
from accel.comfy.attention import apply_attention
from accel.comfy.nodes import W4, legacy_mappings, v3_node
from accel.comfy.quant import KEY, apply_w4
from accel.comfy.report import report_text
from accel.comfy.step_cache import StepCacheSettings, apply_step_cache
from accel.pipelines.comfy_native import find_comfy_adapter
from accel.quant import NothingToQuantize, QuantConfig, W4Linear


def quantized(model, group_size=16, min_features=16):
    adapter = find_comfy_adapter(model.model.diffusion_model)
    return apply_w4(model, adapter, QuantConfig(group_size=group_size, min_features=min_features))


def w4_layers(model) -> int:
    return sum(isinstance(m, W4Linear) for m in model.model.diffusion_model.modules())


def relative_error(out, expected) -> float:
    return float((out - expected).abs().mean() / expected.abs().mean())


def test_w4_survives_load_unload_and_clone(base, family):
    model, expected = base
    comfy = import_comfy()
    patched = quantized(model)
    out = sample(patched, family)
    assert 0 < relative_error(out, expected) < 3e-2
    assert w4_layers(model) == patched.get_attachment(KEY).stats()["layers"] > 0  # swapped in while loaded
    assert patched.get_attachment(KEY).device == patched.load_device  # the 4-bit buffers follow the load
    comfy.model_management.unload_all_models()
    assert w4_layers(model) == 0  # unloading puts the 16-bit layers back
    assert torch.equal(sample(patched, family), out)
    assert torch.equal(sample(patched.clone(), family), out)
    assert torch.equal(sample(model, family), expected) and w4_layers(model) == 0


@pytest.mark.parametrize("name", ["flux", "wan"])  # the same ComfyUI mechanics for every family; 4 quantizations
def test_quantizing_again_while_a_w4_clone_is_loaded_starts_from_the_originals(name):
    family, model = name, tiny_model(name)
    comfy = import_comfy()
    first = quantized(model, group_size=16)
    sample(first, family)  # ComfyUI keeps it loaded, its 4-bit layers swapped in
    second = quantized(model, group_size=32)
    out = sample(second, family)
    comfy.model_management.unload_all_models()
    assert torch.equal(sample(quantized(model, group_size=32), family), out)
    replaced = quantized(first, group_size=32)  # on the first's output: its layers are replaced, not stacked
    assert torch.equal(sample(replaced, family), out)


def test_composes_with_attention_and_the_step_cache(base, family):
    model, _ = base
    adapter = find_comfy_adapter(model.model.diffusion_model)
    w4_sdpa = apply_attention(quantized(model), adapter, AttentionConfig(kernel="sdpa"))
    expected = sample(w4_sdpa, family)
    everything = apply_step_cache(w4_sdpa, adapter, StepCacheSettings(value=0.0))
    assert torch.equal(sample(everything, family), expected)
    text = report_text(everything)
    assert "W4 weights on" in text and "sdpa attention on" in text and "step cache on" in text


def test_too_small_layers_are_a_clear_error(base):
    model, _ = base
    with pytest.raises(NothingToQuantize, match="min_features"):
        quantized(model, group_size=16, min_features=4096)


def test_both_node_apis():
    family = "wan"
    model = tiny_model(family)
    classes, names = legacy_mappings()
    assert names["AccelQuantizeW4"] == "Accel W4 Weights"
    node = classes["AccelQuantizeW4"]
    assert set(node.INPUT_TYPES()["required"]) == {"model", "group_size", "min_features"}
    (patched,) = getattr(node(), node.FUNCTION)(model=model, group_size=16, min_features=16)
    out = sample(patched, family)
    v3 = v3_node(W4)
    assert v3.GET_SCHEMA().node_id == "AccelQuantizeW4"
    again = v3.execute(model=model, group_size=16, min_features=16).args[0]
    assert torch.equal(sample(again, family), out)
