"""attention=...: the route into real diffusers and transformers models, policy, report, unpatch."""

import warnings

import pytest
import torch
from helpers import tiny

import accel
from accel._private import attention_implementations
from accel.attention import AttentionConfig
from accel.bench.metrics import psnr

DIT_AND_UNET = ["flux", "sd3", "wan", "hunyuan_video", "cogvideox", "ltx", "sd15"]
VLMS = ["llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl"]


def _same(a, b) -> bool:
    if hasattr(a, "first_logits"):
        return torch.equal(a.sequences, b.sequences) and torch.equal(a.first_logits, b.first_logits)
    return torch.equal(a, b)


def _quiet_patch(patched, obj, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return patched(obj, "lossless", **kwargs)


def _int8_calls(stats: dict) -> int:
    """Calls the INT8 route computed: the Triton kernel's on a GPU, its PyTorch reference's on CPU tensors."""
    return stats["calls"].get("int8", 0) + stats["calls"].get("int8_reference", 0)


@pytest.mark.compat
@pytest.mark.parametrize("family", DIT_AND_UNET + VLMS)
def test_sdpa_route_is_exact(family, patched):
    """Rerouting through accel with attention="sdpa" must compute exactly what the model computed."""
    model = tiny(family)
    base = model.run(seed=0, **({"batch_size": 2, "ragged": True} if family in VLMS else {}))
    handle = _quiet_patch(patched, model.obj, attention="sdpa")
    out = model.run(seed=0, **({"batch_size": 2, "ragged": True} if family in VLMS else {}))
    assert _same(out, base)
    calls = handle.report().stats["attention"]["calls"]
    assert calls.get("sdpa", 0) > 0


@pytest.mark.parametrize("family", DIT_AND_UNET + VLMS)
def test_int8_runs_end_to_end_close_to_baseline_and_unpatches_exactly(family):
    model = tiny(family)
    base = model.run(seed=0)
    with pytest.warns(UserWarning, match="PyTorch reference"):
        handle = accel.patch(model.obj, "lossless", attention="int8")
        out = model.run(seed=0)
    report = handle.report()
    accel.unpatch(model.obj)
    assert _int8_calls(report.stats["attention"]) > 0, report.stats["attention"]
    if family in VLMS:
        assert torch.allclose(out.first_logits, base.first_logits, atol=1e-2, rtol=0)
    else:
        assert psnr(out, base) > 50
        assert not torch.equal(out, base)  # the quantised kernel really ran
    assert _same(model.run(seed=0), base)
    assert "int8 attention on" in str(report)


def test_step_and_block_policy_counts(patched):
    model = tiny("flux")  # 12 steps, true CFG (2 transformer calls per step), 5 attention modules
    config = AttentionConfig("int8", dense_first_steps=2, dense_last_steps=1, dense_blocks=(0, -1))
    handle = _quiet_patch(patched, model.obj, attention=config)
    model.run(seed=0)
    stats = handle.report().stats["attention"]
    # Blocks 0 and 4 are checked first; steps apply to the 3 blocks in between.
    assert stats["sdpa_by_rule"] == {
        "first steps": 2 * 2 * 3,
        "block 0": 12 * 2,
        "block 4": 12 * 2,
        "last steps": 1 * 2 * 3,
    }
    assert _int8_calls(stats) == (12 - 3) * 2 * 3 and stats["sdpa_fallback"] == {}


def test_role_policy_keeps_cross_attention_dense(patched):
    model = tiny("wan")
    handle = _quiet_patch(patched, model.obj, attention=AttentionConfig("int8", dense_roles=("cross",)))
    model.run(seed=0)
    stats = handle.report().stats["attention"]
    assert stats["sdpa_by_rule"] == {"role cross": _int8_calls(stats)}  # one self and one cross attention per block


def test_vae_and_other_models_are_not_touched(patched):
    """Only the adapter's attention modules are rerouted: a direct SDPA call elsewhere is not counted."""
    model = tiny("cogvideox")
    handle = _quiet_patch(patched, model.obj, attention="sdpa")
    q = torch.randn(1, 2, 8, 16)
    torch.nn.functional.scaled_dot_product_attention(q, q, q)
    stats = handle.report().stats["attention"]
    assert stats["calls"] == stats["sdpa_by_rule"] == stats["sdpa_fallback"] == {}
    model.run(seed=0)
    assert handle.report().stats["attention"]["calls"]["sdpa"] == 10 * 3  # 10 steps, batched CFG, 3 blocks


def test_composes_with_step_cache(patched):
    model = tiny("wan")
    base = model.run(seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        handle = patched(model.obj, "fast", attention="int8")
    out = model.run(seed=0)
    report = handle.report()
    assert {a.accelerator for a in report.applied} == {"cache", "attention"}
    assert report.stats["cache"]["calls"][-1]["reused"] > 0
    assert psnr(out, base) > 30


@pytest.mark.compat
def test_transformers_attention_implementation_is_switched_and_restored():
    model = tiny("qwen2_vl")
    before = {id(config): implementation for config, implementation in attention_implementations(model.obj)}
    assert before
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        accel.patch(model.obj, "lossless", attention="int8")
    config, implementation = attention_implementations(model.obj)[0]  # the model's own config comes first
    assert config is model.obj.config and implementation == "accel"
    out = model.run(seed=0, max_new_tokens=20)
    assert out.sequences.shape[-1] >= 20
    accel.unpatch(model.obj)
    after = {id(config): implementation for config, implementation in attention_implementations(model.obj)}
    assert after == before


def test_missing_package_is_a_clear_error_for_explicit_requests():
    import importlib.util

    if importlib.util.find_spec("flash_attn") is not None:
        pytest.skip("flash-attn is installed here")
    model = tiny("wan")
    with pytest.raises(accel.NotApplicableError, match="pip install flash-attn"):
        accel.patch(model.obj, attention="flash")
    assert accel.get_handle(model.obj) is None
    with pytest.raises(ValueError, match="kernel"):
        AttentionConfig("int4")


def test_processor_without_sdpa_is_reported_not_hidden(patched):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    model = tiny("sd15")
    model.obj.unet.set_attn_processor(AttnProcessor())  # the classic processor: baddbmm, no SDPA
    try:
        with pytest.warns(UserWarning, match="made no scaled_dot_product_attention call"):
            handle = patched(model.obj, "lossless", attention="sdpa")
            model.run(seed=0)
        assert any("made no scaled_dot_product_attention" in w for w in handle.report().warnings)
    finally:
        accel.unpatch(model.obj)
        model.obj.unet.set_attn_processor(AttnProcessor2_0())


def test_non_default_diffusers_backend_is_an_error():
    model = tiny("wan")
    model.obj.transformer.set_attention_backend("_native_math")
    try:
        with pytest.raises(ValueError, match="reset_attention_backend"):
            accel.patch(model.obj, attention="int8")
        assert accel.get_handle(model.obj) is None
    finally:
        model.obj.transformer.reset_attention_backend()


def test_ragged_vlm_batch_keeps_int8_for_causal_plus_padding_masks(patched):
    """Batched prefill passes causal AND left padding as one mask; the kernel serves it (no fallback)."""
    model = tiny("llava")
    base = model.run(seed=0, batch_size=3, ragged=True)
    handle = _quiet_patch(patched, model.obj, attention="int8")
    out = model.run(seed=0, batch_size=3, ragged=True)
    stats = handle.report().stats["attention"]
    assert stats["sdpa_fallback"] == {}, stats
    assert _int8_calls(stats) == 3 + 2  # 3 vision, 2 LM layers
    assert torch.allclose(out.first_logits, base.first_logits, atol=1e-2, rtol=0)


def test_kernel_options_reach_the_kernel(patched):
    """smooth_q / pv / granularity change the computed attention (here through the CPU reference)."""
    model = tiny("hunyuan_video")  # masked joint attention
    base = model.run(seed=0)
    outs = {}
    for name, config in {
        "default": AttentionConfig("int8"),
        "block": AttentionConfig("int8", granularity="block"),
        "fp8": AttentionConfig("int8", pv="fp8", smooth_q=True),
    }.items():
        _quiet_patch(patched, model.obj, attention=config)
        outs[name] = model.run(seed=0)
        accel.unpatch(model.obj)
    assert not torch.equal(outs["default"], outs["block"]) and not torch.equal(outs["default"], outs["fp8"])
    assert all(psnr(out, base) > 40 for out in outs.values())
    with pytest.raises(ValueError, match="granularity"):
        AttentionConfig(granularity="head")


def _qkv(heads=2, kv_heads=2, q_len=32, k_len=32, dim=16, dtype=torch.float32, batch=1):
    g = torch.Generator().manual_seed(0)
    return tuple(
        torch.randn(batch, h, n, dim, generator=g).to(dtype)
        for h, n in ((heads, q_len), (kv_heads, k_len), (kv_heads, k_len))
    )


def _router_and_site(handle, unit="attention", role="self"):
    router = handle.unit(unit).router
    return router, next(s for s in router.sites if s.role == role)


def test_calls_a_kernel_cannot_take_run_sdpa_counted_under_the_first_failing_constraint(patched):
    handle = _quiet_patch(patched, tiny("wan").obj, attention="int8")
    router, site = _router_and_site(handle)
    q, k, v = _qkv(dtype=torch.float64)
    with pytest.warns(UserWarning, match="falls back to SDPA for some calls: dtype torch.float64"):
        out = router.dispatch(site, q, k, v)
    assert torch.equal(out, torch.nn.functional.scaled_dot_product_attention(q, k, v))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason warns once
        router.dispatch(site, q, k, v)
    q, k, v = _qkv(q_len=20, k_len=24, dim=300)  # both too wide and causal with unequal lengths
    mask = torch.randn(1, 1, 32, 32)  # an additive mask: neither key padding nor causal
    with pytest.warns(UserWarning, match="head dim 300"):
        router.dispatch(site, q, k, v, is_causal=True)
    with pytest.warns(UserWarning, match="neither key padding nor causal"):
        router.dispatch(site, *_qkv(), attn_mask=mask)
    router.dispatch(site, *_qkv(q_len=8, k_len=8))  # shorter than min_query_len: dense by rule, no warning
    stats = handle.report().stats["attention"]
    assert stats["sdpa_fallback"] == {
        "dtype torch.float64": 2,
        "head dim 300 > 128": 1,  # the first of its failing constraints
        "an attention mask that is neither key padding nor causal with key padding": 1,
    }
    assert stats["sdpa_by_rule"] == {"fewer than min_query_len=16 query tokens, e.g. decoding": 1}
    assert stats["calls"] == {}


def test_routes_plug_into_the_router_through_its_methods(patched):
    from accel.attention.route import Route

    handle = _quiet_patch(patched, tiny("wan").obj, attention="int8")
    router, site = _router_and_site(handle)
    assert router.dense_kernel == "int8"
    q, k, v = _qkv()
    seen = []
    stage = Route(
        "test",
        compute=lambda call: seen.append(call.layer) or (torch.zeros_like(call.query) if seen[1:] else None),
        constraints=(lambda call: "odd length" if call.query.shape[-2] % 2 else None,),
        exempt=lambda call: "cross" if call.role == "cross" else None,
        on_decline=seen.append,
    )
    router.add_stage(stage)
    first = router.dispatch(site, q, k, v)  # the stage passes (None): the dense route computes it
    assert torch.equal(router.dispatch(site, q, k, v), torch.zeros_like(q))
    odd = _qkv(q_len=33, k_len=33)
    router.dispatch(site, *odd)
    router.dispatch(next(s for s in router.sites if s.role == "cross"), *_qkv())
    assert seen == [site.block, site.block, "odd length"]
    assert stage.declined == {"odd length": 1} and stage.exempted == {"cross": 1}
    router.remove_stage(stage)
    assert torch.equal(router.dispatch(site, q, k, v), first)
    router.reset_dense()
    assert router.dense_kernel == "sdpa"
    assert torch.equal(router.dispatch(site, q, k, v), torch.nn.functional.scaled_dot_product_attention(q, k, v))


def _wan_inputs(transformer):
    config = transformer.config
    g = torch.Generator().manual_seed(0)
    return {
        "hidden_states": torch.randn(1, config.in_channels, 1, 8, 8, generator=g),
        "timestep": torch.tensor([500]),
        "encoder_hidden_states": torch.randn(1, 4, config.text_dim, generator=g),
    }


@pytest.mark.compat
def test_calls_carry_the_cfg_branch_the_pipeline_names(patched):
    """The router learns the branch from diffusers' cache_context (accel._private.ContextHook)."""
    from accel.attention.route import Route

    model = tiny("wan")
    handle = _quiet_patch(patched, model.obj, attention="sdpa")
    router, site = _router_and_site(handle)
    branches = set()
    router.add_stage(Route("probe", compute=lambda call: branches.add(call.branch)))
    model.run(seed=0, num_inference_steps=2)
    assert branches == {"cond", "uncond"}
    branches.clear()
    model.obj.transformer(**_wan_inputs(model.obj.transformer))  # a bare call: no cache_context around it
    assert branches == {None}
