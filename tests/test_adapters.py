"""Adapters describe the real models: block outputs, token grids, VLM parts."""

import pytest
import torch
from helpers import DIFFUSION_FAMILIES, tiny

from accel import _hooks
from accel.pipelines import find_adapter
from accel.pipelines.base import DiTAdapter

DIT_FAMILIES = [f for f in DIFFUSION_FAMILIES if f not in ("sd15", "sdxl")]


def _denoiser(model):
    return getattr(model.obj, "transformer", None) or model.obj.unet


@pytest.mark.parametrize("family", DIFFUSION_FAMILIES)
def test_adapter_found_for_each_denoiser(family):
    model = tiny(family)
    adapter = find_adapter(_denoiser(model))
    expected = "unet" if family in ("sd15", "sdxl") else family
    assert adapter.family == expected


@pytest.mark.compat
@pytest.mark.parametrize("family", DIT_FAMILIES)
def test_block_io_and_latent_grid_match_the_real_forward(family):
    model = tiny(family)
    denoiser = _denoiser(model)
    adapter = find_adapter(denoiser)
    assert isinstance(adapter, DiTAdapter)
    seen, grids = [], []

    def on_block(module, args, kwargs, output):
        seen.append(
            (
                module,
                _hooks.get_arg(module, "hidden_states", args, kwargs),
                _hooks.get_arg(module, "encoder_hidden_states", args, kwargs),
                output,
            )
        )

    def on_denoiser(module, args, kwargs):
        grids.append(adapter.latent_grid(args, kwargs))

    handles = [b.register_forward_hook(on_block, with_kwargs=True) for b in adapter.blocks()]
    handles.append(denoiser.register_forward_pre_hook(on_denoiser, with_kwargs=True))
    try:
        model.run(0, num_inference_steps=2)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) >= len(adapter.blocks())
    for module, hidden_in, encoder_in, output in seen[: len(adapter.blocks())]:
        io = adapter.block_io(module)
        hidden = output if io.hidden_index is None else output[io.hidden_index]
        assert hidden.shape == hidden_in.shape
        if io.encoder_index is not None and output[io.encoder_index] is not None:
            assert output[io.encoder_index].shape == encoder_in.shape
    first_hidden = seen[0][1]
    text_tokens = 0
    if family in ("flux", "hunyuan_video") and first_hidden.shape[1] != grids[0].tokens:
        text_tokens = seen[0][2].shape[1]  # single-stream blocks see [text, image]
    assert grids[0].tokens == first_hidden.shape[1] - text_tokens


def test_video_grids_have_frames():
    for family in ("wan", "hunyuan_video", "cogvideox", "ltx"):
        model = tiny(family)
        adapter = find_adapter(_denoiser(model))
        grids = []
        h = adapter.model.register_forward_pre_hook(
            lambda m, a, k, grids=grids, adapter=adapter: grids.append(adapter.latent_grid(a, k)), with_kwargs=True
        )
        try:
            model.run(0, num_inference_steps=2)
        finally:
            h.remove()
        assert grids[0].frames > 1, family


@pytest.mark.compat
@pytest.mark.parametrize("family", ["llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl"])
def test_vlm_adapters_expose_real_parts(family):
    model = tiny(family)
    adapter = find_adapter(model.obj)
    assert adapter.kind == "vlm" and adapter.family == family
    assert len(adapter.language_layers()) == model.obj.config.text_config.num_hidden_layers
    assert isinstance(adapter.vision_tower(), torch.nn.Module)
    assert isinstance(adapter.projector(), torch.nn.Module)
