"""All accelerators at once on one model: they install in order, run, report, and unpatch to the bit."""

import warnings

import pytest
import torch

import accel
from accel.attention.sparse import SparseConfig
from accel.pruning import PruneConfig
from accel.quant import QuantConfig
from accel.zoo import build


def _patch(obj, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return accel.patch(obj, "fast", **kwargs)


def _run(model, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model.run(seed=0, **kwargs)


@pytest.mark.parametrize("family", ["wan", "hunyuan_video"])
def test_video_dit_with_quant_int8_sparse_and_cache(family):
    model = build(family)  # its own instance: quantisation moves weights around
    base = _run(model)
    handle = _patch(
        model.obj,
        quant=QuantConfig(group_size=16, min_features=0),
        attention="int8",
        sparse=SparseConfig(target=0.9, block_q=16, block_k=16, stride=4, dense_fraction=0.2, int8=True),
    )
    out = _run(model)
    report = handle.report()
    assert [a.accelerator for a in report.applied] == ["quant", "attention", "sparse", "cache"]
    assert {"quant", "attention", "sparse"} <= set(report.stats)
    assert report.stats["cache"]["calls"][-1]["reused"] > 0
    assert torch.isfinite(out).all() and out.shape == base.shape
    accel.unpatch(model.obj)
    assert torch.equal(_run(model), base)


@pytest.mark.compat
@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_vlm_with_quant_int8_attention_and_pruning(family):
    model = build(family)
    base = _run(model, max_new_tokens=12)
    handle = _patch(
        model.obj, quant=QuantConfig(group_size=16, min_features=0), attention="int8", prune=PruneConfig(keep_ratio=0.5)
    )
    out = _run(model, max_new_tokens=12)
    report = handle.report()
    assert [a.accelerator for a in report.applied] == ["quant", "attention", "prune"]
    prune = report.stats["prune"]
    assert prune["visual_tokens_kept_total"] < prune["visual_tokens_in_total"]
    assert out.sequences.shape == base.sequences.shape
    accel.unpatch(model.obj)
    after = _run(model, max_new_tokens=12)
    assert torch.equal(after.sequences, base.sequences) and torch.equal(after.first_logits, base.first_logits)
