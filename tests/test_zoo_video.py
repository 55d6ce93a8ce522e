"""Tiny random-weight video pipelines of the zoo: real classes, shapes, determinism, overrides, CFG on."""

from __future__ import annotations

import pytest
import torch

from accel.zoo._base import TinyModel
from accel.zoo.video import BUILDERS

# family -> (pipeline class, denoiser class, VAE class, CFG batched in one call?, alt num_frames, alt (h, w))
SPECS = {
    "wan": ("WanPipeline", "WanTransformer3DModel", "AutoencoderKLWan", False, 5, (32, 48)),
    "hunyuan_video": (
        "HunyuanVideoPipeline",
        "HunyuanVideoTransformer3DModel",
        "AutoencoderKLHunyuanVideo",
        False,
        5,
        (32, 48),
    ),
    # CogVideoX 1.0's causal VAE wants an odd latent frame count -> num_frames = 8k + 1
    "cogvideox": ("CogVideoXPipeline", "CogVideoXTransformer3DModel", "AutoencoderKLCogVideoX", True, 17, (32, 48)),
    # LTX: x8 temporal / x32 spatial compression
    "ltx": ("LTXPipeline", "LTXVideoTransformer3DModel", "AutoencoderKLLTXVideo", True, 17, (64, 96)),
}
DEFAULT_FHW = {"wan": (9, 64, 64), "hunyuan_video": (9, 64, 64), "cogvideox": (9, 64, 64), "ltx": (9, 128, 128)}


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """These models are tiny: intra-op threading only adds overhead, and on a shared 2-core box spinning OpenMP
    workers can make a 0.2 s run take seconds. Restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_builders_keys():
    assert set(BUILDERS) == set(SPECS)


@pytest.fixture(scope="module", params=sorted(SPECS))
def built(request):
    family = request.param
    torch.manual_seed(1234)
    state = torch.get_rng_state()
    model = BUILDERS[family](seed=0)
    assert torch.equal(torch.get_rng_state(), state), "building must not touch the global RNG"
    out = model.run(0)
    return family, model, out


def _count_calls(transformer):
    calls = []

    def pre(_mod, args, kwargs):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        calls.append(hs.shape[0])

    return calls, transformer.register_forward_pre_hook(pre, with_kwargs=True)


def test_build_real_classes(built):
    import diffusers

    family, model, _ = built
    pipe_cls, den_cls, vae_cls, *_ = SPECS[family]
    assert isinstance(model, TinyModel)
    assert model.name == f"tiny-random-{family}"
    assert model.family == family and model.kind == "video"
    assert model.default_steps == 10
    pipe = model.obj
    assert isinstance(pipe, getattr(diffusers, pipe_cls))
    assert isinstance(pipe.transformer, getattr(diffusers, den_cls))
    assert isinstance(pipe.vae, getattr(diffusers, vae_cls))
    assert not pipe.transformer.training and not pipe.vae.training
    assert all(p.dtype == torch.float32 for p in pipe.transformer.parameters())


def test_default_run(built):
    family, model, out = built
    f, h, w = DEFAULT_FHW[family]
    assert out.shape == (1, f, 3, h, w)
    assert out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert out.std() > 0  # not a constant image


def test_deterministic_and_seed_sensitive(built):
    family, model, out = built
    again = model.run(0)
    assert torch.equal(out, again)
    other = model.run(1)
    assert not torch.equal(out, other)


def test_cfg_on_by_default(built):
    family, model, _ = built
    batched = SPECS[family][3]
    calls, handle = _count_calls(model.obj.transformer)
    try:
        model.run(0, num_inference_steps=2)
    finally:
        handle.remove()
    # two denoising steps, each with cond + uncond: two calls of batch 1, or one call of batch 2
    assert calls == ([2, 2] if batched else [1, 1, 1, 1])


def test_step_override(built):
    family, model, _ = built
    batched = SPECS[family][3]
    calls, handle = _count_calls(model.obj.transformer)
    try:
        out = model.run(0, num_inference_steps=3)
    finally:
        handle.remove()
    assert len(calls) == (3 if batched else 6)
    assert torch.isfinite(out).all()


def test_frames_override(built):
    family, model, _ = built
    frames = SPECS[family][4]
    _, h, w = DEFAULT_FHW[family]
    out = model.run(0, num_inference_steps=2, num_frames=frames)
    assert out.shape == (1, frames, 3, h, w)
    assert torch.isfinite(out).all()


def test_resolution_override(built):
    family, model, _ = built
    f, _, _ = DEFAULT_FHW[family]
    h, w = SPECS[family][5]
    out = model.run(0, num_inference_steps=2, height=h, width=w)
    assert out.shape == (1, f, 3, h, w)
    assert torch.isfinite(out).all()


def test_guidance_override(built):
    family, model, out = built
    changed = model.run(0, guidance_scale=2.0)
    assert changed.shape == out.shape
    assert not torch.equal(changed, out)
    if family != "hunyuan_video":  # HunyuanVideo: guidance_scale is embedded guidance; CFG is true_cfg_scale
        calls, handle = _count_calls(model.obj.transformer)
        try:
            model.run(0, num_inference_steps=2, guidance_scale=1.0)
        finally:
            handle.remove()
        assert calls == [1, 1]
    else:
        calls, handle = _count_calls(model.obj.transformer)
        try:
            model.run(0, num_inference_steps=2, true_cfg_scale=1.0)
        finally:
            handle.remove()
        assert calls == [1, 1]


def test_build_seed_changes_weights():
    a = BUILDERS["ltx"](seed=0).obj.transformer
    b = BUILDERS["ltx"](seed=1).obj.transformer
    c = BUILDERS["ltx"](seed=0).obj.transformer
    pa, pb, pc = (torch.cat([p.flatten() for p in m.parameters()]) for m in (a, b, c))
    assert not torch.equal(pa, pb)
    assert torch.equal(pa, pc)
