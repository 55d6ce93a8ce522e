"""Tiny random VLMs of the real transformers classes, and their adapters."""

from __future__ import annotations

import pytest
import torch
import transformers
from torch import nn

from accel import zoo
from accel.errors import AccelError
from accel.pipelines.llava import LlavaAdapter
from accel.pipelines.llava_onevision import LlavaOnevisionAdapter
from accel.pipelines.qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from accel.zoo import vlm
from accel.zoo._base import TinyModel, VLMOutput

FAMILIES = ["llava", "llava_onevision", "qwen2_vl", "qwen2_5_vl"]
VIDEO_FAMILIES = ["llava_onevision", "qwen2_vl", "qwen2_5_vl"]

CLASSES = {
    "llava": transformers.LlavaForConditionalGeneration,
    "llava_onevision": transformers.LlavaOnevisionForConditionalGeneration,
    "qwen2_vl": transformers.Qwen2VLForConditionalGeneration,
    "qwen2_5_vl": transformers.Qwen2_5_VLForConditionalGeneration,
}
ADAPTERS = {
    "llava": LlavaAdapter,
    "llava_onevision": LlavaOnevisionAdapter,
    "qwen2_vl": Qwen2VLAdapter,
    "qwen2_5_vl": Qwen2_5_VLAdapter,
}

_CACHE: dict[str, TinyModel] = {}


def tiny(family: str) -> TinyModel:
    if family not in _CACHE:
        _CACHE[family] = vlm.BUILDERS[family](seed=0)
    return _CACHE[family]


def feature_counts(model, inputs: dict) -> tuple[int, int]:
    """(image features, video features) the model's own encoders produce for `inputs`."""
    inner = model.model
    n_image = n_video = 0
    with torch.no_grad():
        if "pixel_values" in inputs:
            if isinstance(model, transformers.LlavaForConditionalGeneration):
                out = inner.get_image_features(pixel_values=inputs["pixel_values"])
            elif isinstance(model, transformers.LlavaOnevisionForConditionalGeneration):
                out = inner.get_image_features(
                    inputs["pixel_values"], inputs["image_sizes"], batch_num_images=inputs["batch_num_images"]
                )
            else:
                out = inner.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"])
            n_image = sum(f.shape[0] for f in out.pooler_output)
        if "pixel_values_videos" in inputs:
            if isinstance(model, transformers.LlavaOnevisionForConditionalGeneration):
                feats = inner.get_video_features(inputs["pixel_values_videos"]).pooler_output
                # transformers < 5.18 appends the video's newline token in forward, not in get_video_features
                newline = torch.equal(feats[:, -1], inner.image_newline.expand_as(feats[:, -1]))
                n_video = feats.shape[0] * (feats.shape[1] + (0 if newline else 1))
            else:
                out = inner.get_video_features(inputs["pixel_values_videos"], inputs["video_grid_thw"])
                n_video = sum(f.shape[0] for f in out.pooler_output)
    return n_image, n_video


def single_row(family: str, inputs: dict, i: int) -> dict:
    """Row `i` of a batch of `make_inputs`, without its left padding."""
    keep = inputs["attention_mask"][i].bool()
    row = {k: inputs[k][i : i + 1, keep] for k in ("input_ids", "attention_mask", "mm_token_type_ids") if k in inputs}
    if family in ("llava", "llava_onevision"):
        for key in ("pixel_values", "image_sizes", "batch_num_images", "pixel_values_videos"):
            if key in inputs:
                row[key] = inputs[key][i : i + 1]
    else:
        for pix, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
            if grid in inputs:
                sizes = inputs[grid].prod(-1).tolist()
                row[pix] = torch.split(inputs[pix], sizes)[i]
                row[grid] = inputs[grid][i : i + 1]
        if "second_per_grid_ts" in inputs:
            row["second_per_grid_ts"] = inputs["second_per_grid_ts"][i : i + 1]
    return row


@pytest.mark.parametrize("family", FAMILIES)
def test_build(family):
    t = tiny(family)
    assert isinstance(t, TinyModel)
    assert isinstance(t.obj, CLASSES[family])
    assert (t.name, t.family, t.kind) == (f"tiny-random-{family}", family, "vlm")
    assert not t.obj.training
    assert t.obj.config._attn_implementation == "sdpa"


@pytest.mark.parametrize("family", FAMILIES)
def test_run_default(family):
    t = tiny(family)
    inputs = vlm.make_inputs(t)
    out = t.run(0)
    assert isinstance(out, VLMOutput)
    prompt = inputs["input_ids"].shape[1]
    assert out.sequences.shape == (1, prompt + 8)
    assert torch.equal(out.sequences[:, :prompt], inputs["input_ids"])
    assert out.first_logits.shape == (1, vlm.VOCAB_SIZE)
    assert out.first_logits.dtype == torch.float32
    assert torch.isfinite(out.first_logits).all()
    assert t.run(0, max_new_tokens=3).sequences.shape == (1, prompt + 3)


@pytest.mark.parametrize("family", VIDEO_FAMILIES)
def test_run_video(family):
    t = tiny(family)
    inputs = vlm.make_inputs(t, video=True)
    assert "pixel_values_videos" in inputs and "pixel_values" not in inputs
    assert (inputs["input_ids"] == vlm.VIDEO_TOKEN_ID).any()
    out = t.run(0, video=True, max_new_tokens=4)
    assert out.sequences.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_llava_has_no_video():
    with pytest.raises(ValueError, match="video=False") as info:
        vlm.make_inputs(tiny("llava"), video=True)
    assert isinstance(info.value, AccelError)
    with pytest.raises(TypeError, match="steps") as info:
        tiny("llava").run(0, steps=3)
    assert isinstance(info.value, AccelError)


def test_unknown_family_or_model_is_an_accel_error():
    with pytest.raises(zoo.UnknownModelError, match="unknown family 'bogus'; choose one of: flux"):
        zoo.build("bogus")
    with pytest.raises(ValueError, match=r"not a supported VLM: Linear \(model_type=None\)") as info:
        vlm.make_inputs(nn.Linear(2, 2))
    assert isinstance(info.value, AccelError)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("video", [False, True])
def test_ragged_batch(family, video):
    if video and family not in VIDEO_FAMILIES:
        pytest.skip("no video input")
    t = tiny(family)
    inputs = vlm.make_inputs(t, batch_size=2, video=video, ragged=True)
    mask = inputs["attention_mask"]
    lengths = mask.sum(1)
    assert lengths[0] < lengths[1]
    assert mask[0, 0] == 0 and mask[:, -1].all()  # left padded
    assert (inputs["input_ids"][mask == 0] == vlm.PAD_ID).all()
    out = t.run(0, batch_size=2, video=video, ragged=True, max_new_tokens=4)
    assert out.sequences.shape == (2, mask.shape[1] + 4)
    assert out.first_logits.shape == (2, vlm.VOCAB_SIZE)
    # The padded row in the batch behaves like the same row alone (masking and positions are right).
    for i in range(2):
        solo = vlm.generate(t.obj, single_row(family, inputs, i), max_new_tokens=1)
        torch.testing.assert_close(out.first_logits[i : i + 1], solo.first_logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("family", FAMILIES)
def test_determinism(family):
    state = torch.random.get_rng_state()
    again = vlm.BUILDERS[family](seed=0)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    for (name, a), b in zip(tiny(family).obj.state_dict().items(), again.obj.state_dict().values()):
        assert torch.equal(a, b), name
    first, second = tiny(family).run(0, max_new_tokens=4), again.run(0, max_new_tokens=4)
    assert torch.equal(first.sequences, second.sequences)
    assert torch.equal(first.first_logits, second.first_logits)
    assert not torch.equal(first.first_logits, again.run(1, max_new_tokens=1).first_logits)
    other = vlm.BUILDERS[family](seed=1)
    assert not torch.equal(next(iter(other.obj.state_dict().values())), next(iter(again.obj.state_dict().values())))


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_matches(family):
    model = tiny(family).obj
    for other, adapter in ADAPTERS.items():
        assert adapter.matches(model) == (other == family), (adapter.__name__, family)
    assert ADAPTERS[family].family == family
    assert ADAPTERS[family].kind == "vlm"


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("video", [False, True])
def test_visual_token_mask_counts_features(family, video):
    if video and family not in VIDEO_FAMILIES:
        pytest.skip("no video input")
    t = tiny(family)
    adapter = ADAPTERS[family](t.obj)
    inputs = vlm.make_inputs(t, batch_size=2, video=video, ragged=True)
    n_image, n_video = feature_counts(t.obj, inputs)
    assert int(adapter.visual_token_mask(inputs["input_ids"]).sum()) == n_image + n_video > 0
    ids = inputs["input_ids"]
    assert int((ids == adapter.image_token_id()).sum()) == n_image
    if adapter.video_token_id() is not None:
        assert int((ids == adapter.video_token_id()).sum()) == n_video


def test_placeholder_counts():
    counts = {}
    for family in FAMILIES:
        for video in [False, True] if family in VIDEO_FAMILIES else [False]:
            ids = vlm.make_inputs(tiny(family), video=video)["input_ids"]
            counts[family, video] = int(((ids == vlm.IMAGE_TOKEN_ID) | (ids == vlm.VIDEO_TOKEN_ID)).sum())
    assert counts == {
        ("llava", False): 16,
        ("llava_onevision", False): 70,
        ("llava_onevision", True): 17,
        ("qwen2_vl", False): 6,
        ("qwen2_vl", True): 8,
        ("qwen2_5_vl", False): 12,
        ("qwen2_5_vl", True): 18,
    }


def test_llava_adapter_structure():
    model = tiny("llava").obj
    a = LlavaAdapter(model)
    assert a.vision_tower() is model.model.vision_tower
    assert isinstance(a.vision_tower(), transformers.CLIPVisionModel)
    assert a.projector() is model.model.multi_modal_projector
    assert a.language_model() is model.model.language_model
    assert isinstance(a.language_model(), transformers.LlamaModel)
    layers = a.language_layers()
    assert isinstance(layers, nn.ModuleList) and len(layers) == model.config.text_config.num_hidden_layers
    assert all(type(layer).__name__ == "LlamaDecoderLayer" for layer in layers)
    assert a.vision_layers() is model.model.vision_tower.encoder.layers
    assert a.has_cls_token()
    assert a.image_token_id() == vlm.IMAGE_TOKEN_ID and a.video_token_id() is None
    assert (a.vision_feature_layer(), a.vision_feature_select_strategy()) == (-2, "default")
    assert a.tokens_per_image() == 16


def test_llava_onevision_adapter_structure():
    model = tiny("llava_onevision").obj
    a = LlavaOnevisionAdapter(model)
    assert a.vision_tower() is model.model.vision_tower
    assert isinstance(a.vision_tower(), transformers.SiglipVisionModel)
    assert a.projector() is model.model.multi_modal_projector
    assert a.language_model() is model.model.language_model
    assert isinstance(a.language_model(), transformers.Qwen2Model)
    assert a.language_layers() is model.model.language_model.layers
    assert all(type(layer).__name__ == "Qwen2DecoderLayer" for layer in a.language_layers())
    assert not a.has_cls_token()
    assert a.image_newline() is model.model.image_newline
    assert (a.image_token_id(), a.video_token_id()) == (vlm.IMAGE_TOKEN_ID, vlm.VIDEO_TOKEN_ID)
    assert a.tokens_per_video(4) == 17


@pytest.mark.parametrize("family", ["qwen2_vl", "qwen2_5_vl"])
def test_qwen_adapter_structure(family):
    model = tiny(family).obj
    a = ADAPTERS[family](model)
    assert a.vision_tower() is model.model.visual
    assert type(a.vision_tower()).__name__ in (
        "Qwen2VisionTransformerPretrainedModel",
        "Qwen2_5_VisionTransformerPretrainedModel",
    )
    assert a.projector() is model.model.visual.merger
    assert a.language_model() is model.model.language_model
    assert a.language_layers() is model.model.language_model.layers
    assert len(a.language_layers()) == model.config.text_config.num_hidden_layers
    assert a.vision_layers() is model.model.visual.blocks
    assert not a.has_cls_token()
    assert a.spatial_merge_size() == 2
    assert (a.image_token_id(), a.video_token_id()) == (vlm.IMAGE_TOKEN_ID, vlm.VIDEO_TOKEN_ID)
    assert a.rope_model() is model.model and hasattr(a.rope_model(), "get_rope_index")


def test_qwen2_5_window_permutation_is_nontrivial():
    from transformers.vision_utils import get_vision_window_index

    t = tiny("qwen2_5_vl")
    a = Qwen2_5_VLAdapter(t.obj)
    assert a.fullatt_block_indexes() == [1] and len(a.vision_layers()) == 2
    for video in (False, True):
        inputs = vlm.make_inputs(t, video=video)
        grid = inputs["video_grid_thw" if video else "image_grid_thw"]
        window_index, cu_window = get_vision_window_index(grid, a.spatial_merge_size(), a.window_size(), 14)
        assert not torch.equal(window_index, torch.arange(len(window_index)))
        assert len(cu_window) > 2  # several windows per image


def test_bfloat16_build():
    t = vlm.tiny_qwen2_5_vl(dtype=torch.bfloat16)
    assert next(t.obj.parameters()).dtype == torch.bfloat16
    out = t.run(0, max_new_tokens=2)
    assert out.first_logits.dtype == torch.float32
