"""Sparse video attention through `accel.patch` on tiny Wan, HunyuanVideo, CogVideoX and LTX pipelines.

Runs through the Triton kernel (interpreted) are kept to few steps; the tests about the search schedule and
sparsity levels use the PyTorch reference path (same block-sparse math, TRITON_INTERPRET unset), which the
stage takes, with a warning, wherever the kernel cannot run.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from helpers import TWO_CALL_CFG, baseline, tiny

import accel
from accel import CacheConfig
from accel.attention.sparse import SparseConfig

VIDEO = ["wan", "hunyuan_video", "cogvideox", "ltx"]
SMALL = dict(block_q=16, block_k=16, stride=8)  # tiny sequences: several blocks per sequence
FEW_STEPS = dict(num_inference_steps=3)
# Larger frames for the sparsity tests (the reference path is fast): LTX compresses 8x less in space.
BIG = {
    "wan": dict(height=128, width=128),
    "hunyuan_video": dict(height=128, width=128),
    "cogvideox": dict(height=128, width=128),
    "ltx": dict(height=256, width=256),
}


def _self_sites(handle):
    router = handle.unit("sparse").router
    return [s for s in router.sites if s.role != "cross"]


def _branches(family):
    return 2 if family in TWO_CALL_CFG else 1


@pytest.mark.parametrize("family", VIDEO + ["flux", "sd3"])  # image DiTs: joint attention, text prefix/suffix
def test_target_one_reproduces_dense_through_the_kernel(family, patched):
    model = tiny(family)
    base = baseline(family, **FEW_STEPS)
    handle = patched(model.obj, cache=False, sparse=SparseConfig(target=1.0, dense_fraction=0.0, **SMALL))
    out = model.run(0, **FEW_STEPS)
    torch.testing.assert_close(out, base, atol=1e-4, rtol=0)
    stats = handle.report().stats["sparse"]
    calls = 3 * _branches(family) * len(_self_sites(handle))
    assert stats["sparse_calls"] == calls  # every self/joint call, and no cross-attention call
    assert stats["mean_sparsity"] == 0.0 and stats["calls_left_dense"] == {}
    accel.unpatch(model.obj)
    assert torch.equal(model.run(0, **FEW_STEPS), base)


@pytest.fixture
def reference_path(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("family", VIDEO)
def test_lower_targets_give_monotone_sparsity(family, patched, reference_path):
    model = tiny(family)
    run = dict(BIG[family], **FEW_STEPS)
    base = baseline(family, **run)
    sparsity, error = [], []
    for target in (1.0, 0.95, 0.8, 0.5):
        with pytest.warns(UserWarning, match="PyTorch reference"):
            handle = patched(model.obj, cache=False, sparse=SparseConfig(target=target, dense_fraction=0.0, **SMALL))
            out = model.run(0, **run)
        stats = handle.report().stats["sparse"]
        assert any("PyTorch reference" in w for w in handle.report().warnings)
        sparsity.append(stats["mean_sparsity"])
        error.append((out - base).abs().mean().item())
        assert torch.isfinite(out).all()
        accel.unpatch(model.obj)
    print(f"\n{family}: sparsity {sparsity}, mean abs error {error}")
    assert error[0] < 1e-5 and sparsity[0] == 0.0
    assert all(a <= b for a, b in zip(sparsity, sparsity[1:])) and sparsity[-1] > 0.3
    assert error[-1] > error[0]


def test_schedule_dense_steps_search_interval_and_report(patched, reference_path):
    """10 steps, first 25% dense (3 steps), searches at steps 3, 6, 9 for each module and CFG branch."""
    model = tiny("wan")
    handle = patched(model.obj, cache=False, sparse=SparseConfig(target=0.7, search_interval=3, **SMALL))
    with pytest.warns(UserWarning, match="PyTorch reference"):
        model.run(0)
    stats = handle.report().stats["sparse"]
    per_step = 2 * 3  # two CFG calls x three self-attention modules (cross-attention is never counted)
    assert stats["dense_warmup_steps"] == 3
    assert stats["dense_warmup_calls"] == 3 * per_step
    assert stats["sparse_calls"] == 7 * per_step
    assert stats["searches"] == 3 * per_step
    assert stats["search_s"] > 0
    assert set(stats["sparsity_per_layer"]) == {"0", "1", "2"}
    assert all(len(heads) == 2 for heads in stats["sparsity_per_head"].values())
    assert sum(stats["head_orders"].values()) == stats["searches"] * 2  # one order per (batch row, head) and search
    # Only the kept block ids (int16) and one int32 offset per query block are stored, per module and branch.
    unit = handle.unit("sparse")
    for found in unit.patterns.values():
        kept = found.blocks.counts().sum().item()
        assert found.blocks.nbytes == 2 * kept + 4 * (found.blocks.counts().numel() + 1)
    total = sum(p.blocks.nbytes for p in unit.patterns.values())
    assert stats["pattern_bytes_total"] == total and stats["pattern_bytes_per_module"] == round(total / 3) > 0
    # A second call searches again from scratch (patterns do not leak between generations).
    model.run(0)
    assert handle.report().stats["sparse"]["searches"] == 6 * per_step
    assert "sparse" in str(handle)


def test_patterns_are_per_cfg_branch(patched, reference_path):
    model = tiny("wan")
    handle = patched(
        model.obj, cache=False, sparse=SparseConfig(target=0.5, dense_fraction=0.0, search_interval=100, **SMALL)
    )
    with pytest.warns(UserWarning):
        model.run(0, **FEW_STEPS)
    keys = handle.unit("sparse").patterns.keys()
    assert {key[1] for key in keys} == {"cond", "uncond"}
    assert len(keys) == 2 * 3


def test_sparse_int8_with_cache_and_int8_attention(patched):
    """Sparse + INT8 Q·Kᵀ in one kernel, INT8 dense attention for the warm-up steps, step caching on top."""
    model = tiny("wan")
    run = dict(num_inference_steps=4)
    base = baseline("wan", **run)
    handle = patched(
        model.obj,
        attention="int8",
        cache=CacheConfig(threshold=0.05),
        sparse=SparseConfig(target=0.9, dense_fraction=0.25, **SMALL),  # int8 follows attention="int8"
    )
    out = model.run(0, **run)
    names = [a.accelerator for a in handle.report().applied]
    assert names == ["attention", "sparse", "cache"]
    assert "INT8" in handle.report().applied[1].detail
    stats = handle.report().stats["sparse"]
    assert stats["sparse_calls"] > 0 and stats["dense_warmup_calls"] > 0
    assert torch.isfinite(out).all() and (out - base).abs().mean() < 0.05
    accel.unpatch(model.obj)
    assert torch.equal(model.run(0, **run), base)


def test_bare_model_warns_and_counts_calls(reference_path):
    model = tiny("ltx")
    transformer = model.obj.transformer
    with pytest.warns(UserWarning, match="bare model"):
        handle = accel.patch(transformer, cache=False, sparse=SparseConfig(target=0.5, search_interval=2, **SMALL))
    try:
        assert any("bare model" in w for w in handle.report().warnings)
        with pytest.warns(UserWarning, match="PyTorch reference"):
            model.run(0, **FEW_STEPS)
        stats = handle.report().stats["sparse"]
        assert stats["dense_warmup_calls"] == 0
        assert stats["searches"] == 2 * 3  # calls 1 and 3 of each module (every second call)
    finally:
        accel.unpatch(transformer)


def test_not_a_dit_and_bad_configs(patched):
    with pytest.raises(ValueError, match="diffusion transformers"):
        patched(tiny("sd15").obj, sparse=True)
    with pytest.raises(ValueError, match="target"):
        SparseConfig(target=0.0)
    with pytest.raises(ValueError, match="power of two"):
        SparseConfig(block_q=48)
    with pytest.raises(ValueError, match="stride"):
        SparseConfig(block_k=16, stride=32)
    with pytest.raises(ValueError, match="method"):
        SparseConfig(method="magic")
    with pytest.raises(ValueError, match="reorder"):
        SparseConfig(reorder="spiral")
    assert SparseConfig(reorder=False).reorder == "none" and SparseConfig(reorder=True).reorder == "per-head"
    with pytest.raises(TypeError, match="SparseConfig"):
        patched(tiny("wan").obj, sparse=0.9)


def test_int8_follows_the_attention_route_unless_set(patched):
    model = tiny("wan")
    assert "INT8" not in patched(model.obj, cache=False, sparse=SparseConfig(**SMALL)).report().applied[0].detail
    accel.unpatch(model.obj)
    handle = patched(model.obj, cache=False, attention="sdpa", sparse=SparseConfig(int8=True, **SMALL))
    assert "INT8" in handle.report().applied[1].detail


def test_calls_the_kernel_cannot_take_stay_dense_counted_per_reason(patched, reference_path):
    import warnings

    handle = patched(tiny("wan").obj, cache=False, sparse=SparseConfig(dense_fraction=0.0, reorder="none", **SMALL))
    router = handle.unit("sparse").router
    site = _self_sites(handle)[0]
    cross = next(s for s in router.sites if s.role == "cross")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 32, 16, generator=g) for _ in range(3))
    sdpa = torch.nn.functional.scaled_dot_product_attention
    with pytest.warns(UserWarning, match="sparse: calls with causal attention stay dense"):
        assert torch.equal(router.dispatch(site, q, k, v, is_causal=True), sdpa(q, k, v, is_causal=True))
    mask = torch.zeros(1, 1, 32, 32)  # additive: not a key-padding mask
    with pytest.warns(UserWarning, match="key-padding mask"):
        assert torch.equal(router.dispatch(site, q, k, v, attn_mask=mask), sdpa(q, k, v, attn_mask=mask))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        router.dispatch(site, q, k, v, is_causal=True)
        assert torch.equal(router.dispatch(cross, q, k, v), sdpa(q, k, v))  # cross-attention is not a decline
    stats = handle.report().stats["sparse"]
    assert stats["calls_left_dense"] == {
        "causal attention": 2,
        "attention mask other than a boolean key-padding mask [B, 1, 1, S]": 1,
    }
    assert stats["sparse_calls"] == 0
