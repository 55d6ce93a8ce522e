"""Accelerators are registrations: the example in CONTRIBUTING.md installs as a sixth one, and `patch` applies
one rule to every installer that cannot serve a model (issue 11)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from helpers import tiny

import accel
from accel._unit import register, registrations, unregister
from accel.errors import AccelError, ConfigTypeError, NotApplicableError

CONTRIBUTING = Path(__file__).resolve().parent.parent / "CONTRIBUTING.md"


@pytest.fixture
def timing_accelerator():
    """The example unit of CONTRIBUTING.md, executed as written, registered for one test."""
    text = CONTRIBUTING.read_text()
    code = re.search(r"<!-- example-unit -->\s*```python\n(.*?)```", text, re.S).group(1)
    namespace: dict = {}
    exec(compile(code, str(CONTRIBUTING), "exec"), namespace)
    yield namespace["TimingConfig"]
    unregister("timing")


def test_the_contributing_example_installs_as_a_sixth_accelerator(timing_accelerator, patched):
    model = tiny("sd3")
    reference = model.run(0)
    handle = patched(model.obj, cache=accel.CacheConfig(threshold=0.0), timing=timing_accelerator(label="transformer"))
    out = model.run(0)
    assert torch.equal(out, reference)
    report = handle.report()
    assert [a.accelerator for a in report.applied] == ["cache", "timing"]  # after the built-ins, by order
    assert report.stats["timing"]["calls"] == model.default_steps * 1  # SD3 batches CFG: one call per step
    accel.unpatch(model.obj)
    assert not model.obj.transformer._forward_hooks and not model.obj.transformer._forward_pre_hooks
    handle = patched(model.obj, timing=True)  # True: the config's defaults
    assert "model" in handle.report().applied[-1].detail


def test_registered_order_is_the_install_order():
    names = [r.keyword for r in registrations()]
    assert names == ["quant", "attention", "sparse", "cache", "prune"]


def test_unknown_and_mistyped_keywords():
    with pytest.raises(ConfigTypeError, match="unknown accelerator keyword 'timinq'.*cache"):
        accel.patch(tiny("sd3").obj, timinq=True)
    with pytest.raises(ConfigTypeError, match="kernel name"):
        accel.patch(tiny("sd3").obj, attention=8)
    assert accel.get_handle(tiny("sd3").obj) is None


def test_a_registration_that_clashes_is_refused():
    from accel import CacheConfig

    with pytest.raises(AccelError, match="clashes"):
        register("cache2", CacheConfig, order=99)(lambda ctx, config: None)
    with pytest.raises(AccelError, match="clashes"):
        register("other", type("OtherConfig", (), {}), order=40)(lambda ctx, config: None)


@pytest.mark.parametrize(
    "keyword,config,family",
    [
        ("sparse", accel.SparseConfig(), "llava"),
        ("prune", accel.PruneConfig(keep=4), "wan"),
        ("cache", accel.CacheConfig(), "qwen2_vl"),
    ],
)
def test_asked_by_keyword_but_not_applicable_is_one_error(keyword, config, family):
    model = tiny(family).obj
    with pytest.raises(NotApplicableError, match=f"accel.patch\\({keyword}=...\\) cannot apply"):
        accel.patch(model, **{keyword: config})
    assert accel.get_handle(model) is None


def test_every_accel_exception_is_an_accel_error():
    import inspect

    import accel.attention.dense
    import accel.caching.dit
    import accel.errors
    import accel.pruning.unit
    import accel.quant.apply
    from accel import _unit

    modules = (accel.errors, _unit, accel.attention.dense, accel.caching.dit, accel.pruning.unit, accel.quant.apply)
    found = {
        cls
        for module in modules
        for _, cls in inspect.getmembers(module, inspect.isclass)
        if issubclass(cls, Exception) and cls.__module__.startswith("accel")
    }
    assert len(found) >= 10
    assert all(issubclass(cls, AccelError) for cls in found), [c for c in found if not issubclass(c, AccelError)]
