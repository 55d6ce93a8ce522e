"""In-process checks of the step cache on tiny native ComfyUI models. Run by tests/test_comfy_native.py in a Python
process of their own (ComfyUI needs a stand-in torchvision that the rest of the suite must not see); run directly
with: PYTHONPATH=../shared/comfyui/shim python -m pytest -q tests/comfy_native_checks.py"""

from __future__ import annotations

import pytest
import torch
from comfy_tiny import sample

from accel.comfy.nodes import REPORT, STEP_CACHE, legacy_mappings, v3_node
from accel.comfy.report import report_data, report_text
from accel.comfy.step_cache import KEY, StepCacheSettings, apply_step_cache
from accel.pipelines.comfy_native import find_comfy_adapter
from accel.presets import preset_configs


def cached(model, **settings):
    return apply_step_cache(model, find_comfy_adapter(model.model.diffusion_model), StepCacheSettings(**settings))


def reused(model) -> int:
    return report_data(model)["runs"][-1]["reused"]


@pytest.mark.parametrize("mode", ["target", "threshold"])
def test_value_zero_is_bit_identical(base, family, mode):
    model, expected = base
    patched = cached(model, mode=mode, value=0.0)
    assert torch.equal(sample(patched, family), expected)
    assert reused(patched) == 0


def test_default_reuses_steps_and_stays_close(base, family):
    model, expected = base
    patched = cached(model)  # the node's default target (balanced)
    out = sample(patched, family)
    assert reused(patched) > 0
    assert not torch.equal(out, expected)
    assert (out - expected).abs().mean() < 0.2 * expected.abs().mean()


def test_a_larger_threshold_reuses_more(base, family):
    model, _ = base
    counts = []
    for value in (0.0005, 0.5, 2.0):
        patched = cached(model, mode="threshold", value=value)
        sample(patched, family)
        counts.append(reused(patched))
    assert counts == sorted(counts) and counts[-1] > counts[0]


def test_removing_the_node_restores_the_output(base, family):
    model, expected = base
    sample(cached(model, mode="threshold", value=2.0), family)
    assert torch.equal(sample(model, family), expected)
    assert "patches_replace" not in model.model_options["transformer_options"]
    assert model.get_attachment(KEY) is None


def test_two_clones_with_different_settings_do_not_interfere(base, family):
    model, _ = base
    alone_a = sample(cached(model, mode="threshold", value=0.3), family)
    alone_b = sample(cached(model, mode="target", value=1.6, taylor_order=0), family)
    a = cached(model, mode="threshold", value=0.3)
    b = cached(model, mode="target", value=1.6, taylor_order=0)
    for _ in range(2):  # interleaved, as two samplers in one graph run
        assert torch.equal(sample(a, family), alone_a)
        assert torch.equal(sample(b, family), alone_b)
    assert len(report_data(a)["runs"]) == len(report_data(b)["runs"]) == 2


def test_cond_and_uncond_run_separately(base, family, monkeypatch):
    model, expected = base
    # ComfyUI batches cond and uncond when it thinks memory allows, else runs them one by one.
    monkeypatch.setattr(model.model, "memory_required", lambda *args, **kwargs: float("inf"))
    patched = cached(model, mode="target", value=0.0)
    assert torch.allclose(sample(patched, family), expected, atol=1e-5)  # batch of 1 vs 2: rounding may differ
    assert set(report_data(patched)["runs"][-1]["branches"]) == {"cond", "uncond"}
    patched = cached(model, mode="threshold", value=2.0)
    sample(patched, family)
    branches = report_data(patched)["runs"][-1]["branches"]
    assert all(branch["reused"] for branch in branches.values())


def test_later_clones_share_the_session_and_a_second_node_replaces_the_first(base, family):
    model, _ = base
    patched = cached(model, mode="threshold", value=2.0)
    downstream = patched.clone()  # e.g. a LoRA loader after the Accel node
    sample(downstream, family)
    assert reused(patched) > 0
    again = cached(patched, mode="target", value=0.0)  # a second Accel Step Cache on the first's output
    assert torch.equal(sample(again, family), base[1])
    assert "target=0.0" in report_text(again)


def test_a_two_call_sampler_and_a_shorter_run(base, family):
    model, _ = base
    for steps, sampler in ((6, "heun"), (3, "euler")):
        baseline = sample(model, family, steps=steps, sampler=sampler)
        assert torch.equal(sample(cached(model, value=0.0), family, steps=steps, sampler=sampler), baseline)
        sample(cached(model, mode="threshold", value=2.0), family, steps=steps, sampler=sampler)


def test_both_node_apis(base, family):
    model, _ = base
    classes, names = legacy_mappings()
    assert set(names) == {"AccelStepCache", "AccelAttention", "AccelQuantizeW4", "AccelReport"}
    assert names["AccelStepCache"] == "Accel Step Cache" and names["AccelReport"] == "Accel Report"
    step_cache = classes["AccelStepCache"]
    inputs = step_cache.INPUT_TYPES()["required"]
    assert (
        inputs["mode"][0] == ["target", "threshold"]
        and inputs["value"][1]["default"] == preset_configs("balanced")["cache"].target
    )
    (patched,) = getattr(step_cache(), step_cache.FUNCTION)(
        model=model, mode="threshold", value=2.0, start_percent=0.1, end_percent=1.0, taylor_order=2, max_consecutive=3
    )
    latent = sample(patched, family)
    report = classes["AccelReport"]
    result = getattr(report(), report.FUNCTION)(model=patched, after=latent)
    assert "run 1: 10 steps" in result["ui"]["text"][0] and result["result"] == (result["ui"]["text"][0],)

    v3_cache, v3_report = v3_node(STEP_CACHE), v3_node(REPORT)
    schema = v3_cache.GET_SCHEMA()
    assert schema.node_id == "AccelStepCache" and [i.id for i in schema.inputs][:3] == ["model", "mode", "value"]
    out = v3_cache.execute(
        model=model, mode="target", value=0.0, start_percent=0.1, end_percent=1.0, taylor_order=2, max_consecutive=3
    )
    assert torch.equal(sample(out.args[0], family), base[1])
    shown = v3_report.execute(model=out.args[0], after=None)
    assert "target=0.0" in shown.args[0] and v3_report.GET_SCHEMA().is_output_node
