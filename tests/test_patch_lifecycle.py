"""The life of a patched object: it is freed when dropped, copies and pickles are refused with a way out,
shared denoisers, keyword types, presets that cannot be served, and diffusers' own cache on top (issue 10)."""

from __future__ import annotations

import copy
import gc
import io
import pickle
import weakref

import pytest
import torch
from helpers import tiny

import accel
from accel import AlreadyPatchedError, CacheConfig, NotPatchedError
from accel.errors import AccelError, ConfigError, CopyError
from accel.zoo import build

# ---- patched objects are freed (item 2) ---------------------------------------------------------------------


def _collected(make_and_patch) -> bool:
    ref = make_and_patch()
    gc.collect()
    return ref() is None


def test_dropped_patched_pipeline_is_freed():
    def run():
        model = build("flux")
        accel.patch(model.obj, attention="sdpa")
        model.run(0)
        return weakref.ref(model.obj)

    assert _collected(run)


def test_dropped_patched_bare_denoiser_is_freed():
    def run():
        model = build("wan")
        transformer = model.obj.transformer
        with pytest.warns(UserWarning, match="bare model"):
            accel.patch(transformer, cache=CacheConfig(threshold=0.5, num_steps=model.default_steps))
        model.run(0)
        return weakref.ref(transformer)

    assert _collected(run)


def test_dropped_patched_vlm_is_freed():
    from accel.pruning import PruneConfig

    def run():
        model = build("qwen2_vl").obj
        accel.patch(model, attention="sdpa", prune=PruneConfig(keep_ratio=1.0))
        with torch.no_grad():
            model(input_ids=torch.tensor([[1, 2, 3]]))
        return weakref.ref(model)

    assert _collected(run)


def test_unpatched_objects_carry_nothing_of_accel(patched):
    model = tiny("sd3")
    before = set(vars(model.obj)), set(vars(model.obj.transformer))
    patched(model.obj)
    accel.unpatch(model.obj)
    assert (set(vars(model.obj)), set(vars(model.obj.transformer))) == before


# ---- copies and pickles (item 3) ----------------------------------------------------------------------------


def test_copies_and_pickles_of_patched_objects_are_refused_with_the_way_out(patched):
    model = tiny("flux")
    patched(model.obj)
    for obj in (model.obj, model.obj.transformer):
        with pytest.raises(CopyError, match="unpatch"):
            copy.deepcopy(obj)
        with pytest.raises(CopyError, match="save_pretrained"):
            pickle.dumps(obj)
        with pytest.raises(CopyError):
            torch.save(obj, io.BytesIO())
    assert isinstance(CopyError("x"), AccelError)


def test_copies_work_again_after_unpatch():
    model = build("sd3")
    reference = model.run(0)
    original = model.obj.transformer
    accel.patch(model.obj)
    model.run(0)
    accel.unpatch(model.obj)
    assert type(copy.deepcopy(model.obj)) is type(model.obj)
    pickle.dumps(original)
    model.obj.transformer = copy.deepcopy(original)  # an independent copy, patched on its own
    accel.patch(model.obj, cache=CacheConfig(threshold=0.0))
    try:
        assert torch.equal(model.run(0), reference)
    finally:
        accel.unpatch(model.obj)
    assert accel.get_handle(original) is None


# ---- a denoiser shared by two pipelines (item 14) -----------------------------------------------------------


def test_shared_denoiser_error_and_way_out_agree():
    from diffusers import FluxPipeline

    model = build("flux")
    first = model.obj
    second = FluxPipeline(**first.components)
    accel.patch(first)
    with pytest.raises(AlreadyPatchedError, match="FluxPipeline") as err:
        accel.patch(second)
    assert "FluxTransformer2DModel itself" in str(err.value)
    accel.unpatch(second.transformer)  # the way out the message names
    assert accel.get_handle(first) is None and type(first) is FluxPipeline
    accel.patch(second)
    accel.unpatch(second)


# ---- keyword types and unpatch of non-patched things (items 8, 9) ---------------------------------------------


@pytest.mark.parametrize("keyword,value", [("cache", 5), ("attention", 3.0), ("prune", "keep"), ("quant", [4])])
def test_patch_keywords_of_a_wrong_type_are_config_errors(keyword, value):
    with pytest.raises(ConfigError, match=keyword):
        accel.patch(tiny("sd3").obj, **{keyword: value})
    assert accel.get_handle(tiny("sd3").obj) is None


def test_unpatch_of_anything_unpatched_is_a_clear_error():
    for obj in (5, "pipe", None, torch.nn.Linear(1, 1)):
        with pytest.raises(NotPatchedError, match="not patched by accel"):
            accel.unpatch(obj)


# ---- presets skip what they cannot serve (item 12) ----------------------------------------------------------


@pytest.fixture(scope="module")
def one_block_sd3():
    from diffusers import SD3Transformer2DModel

    model = build("sd3")
    config = dict(model.obj.transformer.config)
    config["num_layers"] = 1
    model.obj.transformer = SD3Transformer2DModel.from_config(config)
    return model


@pytest.mark.parametrize("preset", ["balanced", "fast", "lossless"])
def test_presets_skip_caching_on_a_one_block_transformer(one_block_sd3, preset):
    handle = accel.patch(one_block_sd3.obj, preset=preset)
    try:
        one_block_sd3.run(0)
        assert not any(a.accelerator == "cache" for a in handle.report().applied)
        if preset != "lossless":
            reason = next(s.reason for s in handle.report().skipped if s.accelerator == "cache")
            assert "leaves no blocks" in reason
    finally:
        accel.unpatch(one_block_sd3.obj)


def test_explicit_cache_on_a_one_block_transformer_is_an_error(one_block_sd3):
    with pytest.raises(accel.NotApplicableError, match="no blocks to cache"):
        accel.patch(one_block_sd3.obj, cache=CacheConfig(threshold=0.1))
    assert accel.get_handle(one_block_sd3.obj) is None


def test_diffusers_enable_cache_on_a_patched_model_is_refused():
    from diffusers.hooks import FirstBlockCacheConfig

    model = build("wan")
    transformer = model.obj.transformer
    accel.patch(model.obj)
    with pytest.raises(AlreadyPatchedError, match="stack two caches"):
        transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
    accel.unpatch(model.obj)
    assert "enable_cache" not in vars(transformer)
    transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))  # allowed again
    transformer.disable_cache()


def test_diffusers_cache_is_allowed_beside_accel_without_its_cache():
    from diffusers.hooks import FirstBlockCacheConfig

    model = build("wan")
    accel.patch(model.obj, cache=False, attention="sdpa")
    try:
        model.obj.transformer.enable_cache(FirstBlockCacheConfig(threshold=0.1))
        model.run(0)
        model.obj.transformer.disable_cache()
    finally:
        accel.unpatch(model.obj)


# ---- dependency versions outside the tested range (item 1) ---------------------------------------------------


def test_patch_warns_about_untested_dependency_versions(monkeypatch, patched):
    import accel.api

    message = "transformers 9.0.0 is newer than the versions accel is tested with (5.17.0 to 5.24.x)"
    monkeypatch.setattr(accel.api, "check_versions", lambda: [message])
    with pytest.warns(UserWarning, match="transformers 9.0.0 is newer"):
        handle = patched(tiny("sd3").obj)
    assert message in handle.report().warnings


def test_dense_blocks_that_name_no_block_are_a_config_error_and_leave_nothing_installed():
    from accel import AttentionConfig

    def hooks(module):
        from accel._private import hook_registry

        return {
            name: list(hook_registry(m).hooks) for name, m in module.named_modules() if hook_registry(m) is not None
        }

    model = tiny("wan")
    before = hooks(model.obj.transformer)
    with pytest.raises(ConfigError, match="dense_blocks"):
        accel.patch(model.obj, attention=AttentionConfig("sdpa", dense_blocks=(100,)))
    assert accel.get_handle(model.obj) is None
    assert hooks(model.obj.transformer) == before
