"""What diffusers' own pipeline tests check, on patched pipelines that must change nothing (issue 10):
`preset="lossless"` and `CacheConfig(threshold=0)` give the unpatched output bit for bit with every scheduler
(stochastic ones included: the pipeline must still hand them `generator` and `eta`), and under the pipeline
options those tests exercise (several images per prompt, latents out, step callbacks, tuples, given latents)."""

from __future__ import annotations

import pytest
import torch
from helpers import DIFFUSION_FAMILIES, tiny

import accel
from accel import CacheConfig

LOSSLESS = [("lossless", {}), ("threshold0", {"cache": CacheConfig(threshold=0.0)})]
LOSSLESS_IDS = [name for name, _ in LOSSLESS]


def _same_patched_and_not(model, patched, kwargs, **run):
    reference = model.run(0, **run)
    handle = patched(model.obj, preset="lossless", **kwargs)
    try:
        out = model.run(0, **run)
    finally:
        accel.unpatch(model.obj)
    assert handle is not None
    return reference, out


def _equal(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b))
    return a == b


# ---- every scheduler, stochastic ones included ----------------------------------------------------------------

# (family, scheduler class, extra scheduler config, pipeline kwargs)
SCHEDULERS = [
    ("sd15", "DDIMScheduler", {}, {"eta": 1.0}),
    ("sd15", "EulerAncestralDiscreteScheduler", {}, {}),
    ("sd15", "LCMScheduler", {}, {"guidance_scale": 1.0}),
    ("sd15", "TCDScheduler", {}, {"eta": 0.7, "guidance_scale": 1.0}),
    ("sd15", "DDPMScheduler", {}, {}),
    ("sd15", "KDPM2AncestralDiscreteScheduler", {}, {}),
    ("sd15", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("sd15", "UniPCMultistepScheduler", {}, {}),
    ("sdxl", "EulerAncestralDiscreteScheduler", {}, {}),
    ("sdxl", "DDIMScheduler", {}, {"eta": 1.0}),
    ("cogvideox", "CogVideoXDDIMScheduler", {}, {"eta": 1.0}),
]


@pytest.fixture
def scheduler_swap():
    """Swap a tiny pipeline's scheduler for the test; the original comes back afterwards."""
    swapped = []

    def swap(model, name, extra):
        import diffusers

        original = model.obj.scheduler
        swapped.append((model, original))
        model.obj.scheduler = getattr(diffusers, name).from_config({**original.config, **extra})

    yield swap
    for model, original in swapped:
        model.obj.scheduler = original


@pytest.mark.compat
@pytest.mark.parametrize("variant,kwargs", LOSSLESS, ids=LOSSLESS_IDS)
@pytest.mark.parametrize("family,scheduler,extra,call", SCHEDULERS, ids=[f"{f}-{s}" for f, s, _, _ in SCHEDULERS])
def test_seeded_output_is_unchanged_with_every_scheduler(
    family, scheduler, extra, call, variant, kwargs, patched, scheduler_swap
):
    model = tiny(family)
    scheduler_swap(model, scheduler, extra)
    reference, out = _same_patched_and_not(model, patched, kwargs, **call)
    assert torch.equal(out, reference)


@pytest.mark.compat
def test_the_scheduler_step_keeps_its_signature_while_patched(patched):
    import inspect

    model = tiny("sd15")
    expected = inspect.signature(model.obj.scheduler.step)
    seen = []
    original = model.obj.prepare_extra_step_kwargs

    def spy(generator, eta):
        seen.append(inspect.signature(model.obj.scheduler.step))
        return original(generator, eta)

    model.obj.prepare_extra_step_kwargs = spy
    try:
        patched(model.obj, preset="lossless")
        model.run(0)
    finally:
        del model.obj.prepare_extra_step_kwargs
    assert seen == [expected]
    assert "step" not in vars(model.obj.scheduler)  # unwrapped after the call


# ---- pipeline options ---------------------------------------------------------------------------------------


def _with_callback(model):
    seen = []

    def callback(pipe, step, timestep, tensors):
        seen.append(step)
        return {"latents": tensors["latents"] * 0.999}

    return {"callback_on_step_end": callback, "callback_on_step_end_tensor_inputs": ["latents"]}, seen


@pytest.mark.parametrize("family", DIFFUSION_FAMILIES)
def test_pipeline_options_are_unchanged(family, patched):
    # threshold 0 installs every cache hook yet must change nothing; "lossless" installs less.
    kwargs = {"cache": CacheConfig(threshold=0.0)}
    model = tiny(family)
    per_prompt = "num_images_per_prompt" if model.kind == "image" else "num_videos_per_prompt"
    options = [{per_prompt: 2}, {"output_type": "latent"}]
    for run in options:
        reference, out = _same_patched_and_not(model, patched, kwargs, **run)
        assert _equal(out, reference), run
    # A callback that edits the latents at every step: both runs see every step and end the same.
    callback_kwargs, seen = _with_callback(model)
    reference = model.run(0, **callback_kwargs)
    steps = list(seen)
    seen.clear()
    patched(model.obj, preset="lossless", **kwargs)
    try:
        out = model.run(0, **callback_kwargs)
    finally:
        accel.unpatch(model.obj)
    assert seen == steps and torch.equal(out, reference)


def test_an_exception_inside_a_call_leaves_the_patched_pipeline_usable(patched):
    model = tiny("flux")
    reference = model.run(0)
    handle = patched(model.obj, cache=CacheConfig(threshold=0.0))

    def boom(pipe, step, timestep, tensors):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"):
        model.run(0, callback_on_step_end=boom)
    assert "step" not in vars(model.obj.scheduler)
    assert torch.equal(model.run(0), reference)
    assert handle.report().stats["cache"]["calls"][-1]["reused"] == 0
