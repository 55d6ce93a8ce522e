"""accel.patch / unpatch behaviour: errors, report, isolation, composition with what users turn on."""

import warnings

import pytest
import torch
from helpers import tiny
from torch import nn

import accel
from accel import AlreadyPatchedError, CacheConfig, NotPatchedError, UnsupportedModelError
from accel.zoo import build


def test_unsupported_model_error_names_class_and_families():
    with pytest.raises(UnsupportedModelError) as err:
        accel.patch(nn.Linear(2, 2))
    message = str(err.value)
    assert "torch.nn.modules.linear.Linear" in message
    for family in (
        "FluxTransformer2DModel",
        "UNet2DConditionModel",
        "WanTransformer3DModel",
        "Qwen2VLForConditionalGeneration",
    ):
        assert family in message
    assert "strict=False" in message


def test_unsupported_non_model_input():
    with pytest.raises(UnsupportedModelError):
        accel.patch("black-forest-labs/FLUX.1-dev")


def test_strict_false_warns_and_changes_nothing():
    layer = nn.Linear(2, 2)
    with pytest.warns(UserWarning, match="Nothing was patched"):
        handle = accel.patch(layer, strict=False)
    report = handle.report()
    assert not report.applied and report.skipped and report.warnings
    assert "nothing applied" in str(handle)
    accel.unpatch(layer)


def test_double_patch_is_an_error_and_unpatch_of_unpatched_too(patched):
    model = tiny("flux")
    patched(model.obj)
    with pytest.raises(AlreadyPatchedError, match="unpatch"):
        accel.patch(model.obj)
    with pytest.raises(AlreadyPatchedError, match="through the FluxPipeline"):
        accel.patch(model.obj.transformer)  # the same denoiser, through another object
    assert accel.get_handle(model.obj.transformer) is accel.get_handle(model.obj)
    with pytest.raises(NotPatchedError):
        accel.unpatch(nn.Linear(1, 1))


def test_unknown_preset_and_bad_config():
    with pytest.raises(ValueError, match="lossless, balanced, fast"):
        accel.patch(tiny("sd3").obj, preset="turbo")
    with pytest.raises(ValueError, match="threshold"):
        CacheConfig(threshold=-1)
    with pytest.raises(ValueError, match="decision"):
        CacheConfig(decision="sometimes")
    with pytest.raises(ValueError, match="head_blocks"):
        accel.patch(tiny("sd3").obj, cache=CacheConfig(head_blocks=99))
    assert accel.get_handle(tiny("sd3").obj) is None  # a failed patch leaves nothing behind


def test_cache_false_turns_the_cache_off(patched):
    model = tiny("sd3")
    handle = patched(model.obj, cache=False)
    assert not handle.report().applied
    assert any(s.accelerator == "cache" and "cache=False" in s.reason for s in handle.report().skipped)


def test_diffusers_cache_already_enabled_is_a_clear_error():
    from diffusers.hooks import FirstBlockCacheConfig

    model = tiny("wan")
    model.obj.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    try:
        with pytest.raises(AlreadyPatchedError, match="disable_cache"):
            accel.patch(model.obj)
    finally:
        model.obj.transformer.disable_cache()


@pytest.mark.compat
def test_report_lists_applied_modules_and_per_branch_stats(patched):
    model = tiny("flux")
    handle = patched(model.obj, preset="fast")
    model.run(0)
    report = handle.report()
    assert report.family == "flux" and report.applied[0].module == "FluxTransformer2DModel"
    text = str(handle)
    assert "cond" in text and "uncond" in text and "reused" in text
    data = report.to_dict()
    assert set(data["stats"]["cache"]["calls"][-1]["branches"]) == {"cond", "uncond"}


@pytest.mark.compat
def test_two_patched_pipelines_do_not_share_state():
    a, b = build("flux", seed=0), build("flux", seed=1)
    config = CacheConfig(threshold=0.5)
    alone = []
    for model in (a, b):
        accel.patch(model.obj, cache=config)
        alone.append(model.run(0))
        accel.unpatch(model.obj)
    accel.patch(a.obj, cache=config)
    accel.patch(b.obj, cache=config)
    try:
        out_a1, out_b1 = a.run(0), b.run(0)
        out_a2 = a.run(0)
    finally:
        accel.unpatch(a.obj)
        accel.unpatch(b.obj)
    assert torch.equal(out_a1, alone[0]) and torch.equal(out_b1, alone[1]) and torch.equal(out_a2, alone[0])


def test_bare_transformer_finds_call_boundaries_from_the_timestep():
    model = build("wan")
    transformer = model.obj.transformer
    config = CacheConfig(threshold=0.5, num_steps=model.default_steps)
    accel.patch(model.obj, cache=config)
    via_pipeline = model.run(0)
    accel.unpatch(model.obj)
    handle = accel.patch(transformer, cache=config)
    try:
        first, second = model.run(0), model.run(0)
        calls = handle.report().stats["cache"]["calls"]
    finally:
        accel.unpatch(transformer)
    assert torch.equal(first, via_pipeline) and torch.equal(second, via_pipeline)
    assert len(calls) == 2 and set(calls[-1]["branches"]) == {"cond", "uncond"}
    assert "bare model" in " ".join(handle.report().warnings)


@pytest.mark.compat
def test_composes_with_peft_lora(patched):
    peft = pytest.importorskip("peft")
    model = build("flux")
    transformer = model.obj.transformer
    transformer.add_adapter(
        peft.LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v"], init_lora_weights=False)
    )
    lora_baseline = model.run(0)
    patched(model.obj, cache=CacheConfig(threshold=0.0))
    assert torch.equal(model.run(0), lora_baseline)
    accel.unpatch(model.obj)
    patched(model.obj, cache=CacheConfig(threshold=1.0))
    model.run(0)
    assert accel.get_handle(model.obj).report().stats["cache"]["calls"][-1]["reused"] > 0
    accel.unpatch(model.obj)
    assert torch.equal(model.run(0), lora_baseline)


@pytest.mark.compat
def test_composes_with_diffusers_group_offloading(patched):
    # Group offloading installs its own hooks on the same blocks; on CPU both devices are the CPU.
    model = build("wan")
    baseline = model.run(0)
    model.obj.transformer.enable_group_offload(
        onload_device=torch.device("cpu"),
        offload_device=torch.device("cpu"),
        offload_type="block_level",
        num_blocks_per_group=1,
    )
    patched(model.obj, cache=CacheConfig(threshold=0.0))
    assert torch.equal(model.run(0), baseline)
    accel.unpatch(model.obj)
    patched(model.obj, cache=CacheConfig(threshold=1.0))
    model.run(0)
    assert accel.get_handle(model.obj).report().stats["cache"]["calls"][-1]["reused"] > 0


def test_composes_with_torch_compile(patched):
    model = build("sd3")
    baseline = model.run(0)
    config = CacheConfig(threshold=0.5)
    patched(model.obj, cache=config)
    eager_cached = model.run(0)
    accel.unpatch(model.obj)
    model.obj.transformer = torch.compile(model.obj.transformer, backend="eager")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = patched(model.obj, cache=config)
        assert torch.equal(model.run(0), eager_cached)
        assert handle.report().stats["cache"]["calls"][-1]["reused"] > 0
        accel.unpatch(model.obj)
        assert torch.equal(model.run(0), baseline)


def test_accelerator_that_does_not_know_the_layout_is_skipped_with_strict_false(monkeypatch):
    import accel.pruning
    from accel.pruning import PruneConfig

    def unknown_layout(adapter):
        raise UnsupportedModelError("visual token pruning does not know this layout")

    monkeypatch.setattr(accel.pruning, "_check_seams", unknown_layout)
    model = tiny("llava").obj
    with pytest.raises(UnsupportedModelError, match="does not know this layout"):
        accel.patch(model, prune=PruneConfig(keep=4))
    assert accel.get_handle(model) is None
    with pytest.warns(UserWarning, match="does not know this layout"):
        handle = accel.patch(model, prune=PruneConfig(keep=4), strict=False)
    try:
        assert any(s.accelerator == "prune" and "unsupported" in s.reason for s in handle.report().skipped)
        assert handle.unit("prune") is None
    finally:
        accel.unpatch(model)
