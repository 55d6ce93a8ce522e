"""Tiny random-weight vision-language models built from the real transformers classes.

Four families, each a real `*ForConditionalGeneration` class with a tiny config:

* ``llava``: `LlavaForConditionalGeneration`, CLIP vision tower (CLS token), Llama text model;
* ``llava_onevision``: `LlavaOnevisionForConditionalGeneration`, SigLIP (no CLS), Qwen2 text model;
* ``qwen2_vl``: `Qwen2VLForConditionalGeneration`, Qwen2-VL ViT + PatchMerger, M-RoPE text model;
* ``qwen2_5_vl``: `Qwen2_5_VLForConditionalGeneration`, window-attention ViT + PatchMerger, M-RoPE text model.

No tokenizer or processor is involved: `make_inputs` writes `input_ids` directly, with the image/video
placeholder token repeated exactly as many times as the real processor would expand it, plus every tensor
the model's `forward` needs (`pixel_values`, `image_sizes`, `image_grid_thw`, `mm_token_type_ids`, ...).

Shared tiny vocabulary (256 ids) for all four families:

* 0 = pad, 1 = bos, 2 = eos; ordinary text tokens are drawn from ``[3, 240)``;
* 250 = image placeholder, 251 = video placeholder, 252 = ``<|vision_start|>``, 253 = ``<|vision_end|>``
  (the last two are only used by the Qwen families, as their processors do).

Placeholder counts of the default inputs (one image per row, or one video per row with ``video=True``):

* ``llava``: 56 px image, patch 14 -> 4x4 = 16 tokens (CLS dropped by the "default" select strategy).
* ``llava_onevision``: AnyRes with 56 px tiles (pinpoints 56/112 px); default image of original size 60x90
  -> best resolution 112x112 = 1 base + 4 crop tiles -> base 4x4 = 16 + crop grid 8x8 unpadded to 6x8 = 48
  + 6 newlines = 70 tokens (ragged row 1: 100x70 -> 72); video 4 frames of 56 px -> 4 * 2x2 (pooled)
  + 1 newline = 17 tokens.
* ``qwen2_vl``: image 56x84 -> grid (1, 4, 6) -> 6 tokens after the 2x2 merger (ragged row 1: 84x84 -> 9);
  video 4 frames of 56x56 -> grid (2, 4, 4) -> 8 tokens (ragged row 1: 56x84 -> 12).
* ``qwen2_5_vl``: image 84x112 -> grid (1, 6, 8) -> 12 tokens (merged grid 3x4 split into 2x2-token windows,
  window_index = [0,1,4,5, 2,3,6,7, 8,9, 10,11]; ragged row 1: 112x112 -> 16); video 4 frames of 84x84 ->
  grid (2, 6, 6) -> 18 tokens (ragged row 1: 112x84 -> 24).
* Qwen prompts wrap the placeholders in ``<|vision_start|> ... <|vision_end|>`` and carry
  ``mm_token_type_ids``; Qwen2.5-VL videos also carry ``second_per_grid_ts`` (1.0).

With ``ragged=True`` row ``i`` gets a longer prompt (left-padded) and, for the dynamic-resolution families
(``llava_onevision`` images, Qwen images and videos), a different image size, hence a different placeholder
count per row. `make_inputs` also accepts the `TinyModel` itself.

`TinyModel.run(seed, batch_size=1, video=False, ragged=False, max_new_tokens=8)` runs greedy `generate()` with
``min_new_tokens == max_new_tokens`` so every run yields exactly ``max_new_tokens`` new tokens (the random
weights would otherwise stop at the eos id now and then); ``first_logits`` are the raw (unprocessed) logits.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch

from accel.zoo._base import TinyModel, VLMOutput, seeded

# ----------------------------------------------------------------------------------------------------------
# Shared token ids
# ----------------------------------------------------------------------------------------------------------

VOCAB_SIZE = 256
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
TEXT_ID_RANGE = (3, 240)
IMAGE_TOKEN_ID = 250
VIDEO_TOKEN_ID = 251
VISION_START_ID = 252
VISION_END_ID = 253

# Prompt text around the visual block; ragged row i adds 3*i tokens before and i tokens after it.
_PREFIX_LEN, _SUFFIX_LEN = 4, 3

# Video length in frames for every family (Qwen: 2 temporal patches of 2 frames).
_VIDEO_FRAMES = 4

# LLaVA-OneVision tiny tile size and AnyRes grid (multiples of the tile, like the real 384 px config).
_OV_TILE = 56
_OV_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]
# Original (height, width) of the image in row i (ragged) / every row (not ragged).
_OV_IMAGE_SIZES = [(60, 90), (100, 70), (50, 50), (112, 112)]

# Qwen (height, width) in pixels: multiples of patch 14 * merge 2 = 28.
_QWEN2_IMAGE_SIZES = [(56, 84), (84, 84), (56, 56), (84, 112)]
_QWEN2_VIDEO_SIZES = [(56, 56), (56, 84), (84, 84), (28, 56)]
_QWEN25_IMAGE_SIZES = [(84, 112), (112, 112), (56, 84), (112, 140)]
_QWEN25_VIDEO_SIZES = [(84, 84), (112, 84), (56, 112), (84, 140)]


# ----------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------


def _instantiate(config, seed: int, dtype) -> torch.nn.Module:
    """Build the model class of `config` with weights drawn from `seed`, leaving the global RNG untouched."""
    from transformers import AutoModelForImageTextToText

    model = seeded(seed, lambda: AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa", dtype=torch.float32))
    model = model.to(dtype).eval()
    gen = model.generation_config
    gen.bos_token_id = BOS_ID
    gen.eos_token_id = EOS_ID
    gen.pad_token_id = PAD_ID
    gen.do_sample = False
    gen.max_new_tokens = 8
    for key in ("temperature", "top_p", "top_k"):
        if hasattr(gen, key):
            setattr(gen, key, None)
    return model


def _text_kwargs(**extra) -> dict:
    kwargs = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=False,
    )
    kwargs.update(extra)
    return kwargs


def _make_tiny(family: str, model: torch.nn.Module) -> TinyModel:
    def run(seed: int = 0, **overrides) -> VLMOutput:
        unknown = set(overrides) - {"batch_size", "video", "ragged", "max_new_tokens"}
        if unknown:
            raise TypeError(f"unknown overrides for {family}: {sorted(unknown)}")
        inputs = make_inputs(
            model,
            seed=seed,
            batch_size=overrides.get("batch_size", 1),
            video=overrides.get("video", False),
            ragged=overrides.get("ragged", False),
        )
        return generate(model, inputs, max_new_tokens=overrides.get("max_new_tokens", 8))

    return TinyModel(name=f"tiny-random-{family}", family=family, kind="vlm", obj=model, _run=run)


def generate(model: torch.nn.Module, inputs: dict, max_new_tokens: int = 8) -> VLMOutput:
    """Greedy `generate()` exactly as `TinyModel.run` does it (exactly `max_new_tokens` new tokens)."""
    out = model.generate(
        **inputs,
        max_new_tokens=max_new_tokens,
        min_new_tokens=max_new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return VLMOutput(sequences=out.sequences, first_logits=out.logits[0].float())


def tiny_llava(seed: int = 0, dtype=torch.float32) -> TinyModel:
    """LLaVA-1.5 layout: CLIP ViT (CLS) -> hidden_states[-2] minus CLS -> 2-layer GELU MLP -> Llama."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=2,
        image_size=56,
        patch_size=14,
        projection_dim=32,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(**_text_kwargs())
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        image_seq_length=(56 // 14) ** 2,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        pad_token_id=PAD_ID,
    )
    return _make_tiny("llava", _instantiate(config, seed, dtype))


def tiny_llava_onevision(seed: int = 0, dtype=torch.float32) -> TinyModel:
    """LLaVA-OneVision layout: SigLIP (no CLS, no head) -> last layer, "full" -> MLP -> Qwen2; AnyRes + newline."""
    from transformers import (
        LlavaOnevisionConfig,
        Qwen2Config,
        SiglipVisionConfig,
    )

    vision = SiglipVisionConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=_OV_TILE,
        patch_size=14,
        vision_use_head=False,
    )
    text = Qwen2Config(**_text_kwargs())
    config = LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_TOKEN_ID,
        video_token_index=VIDEO_TOKEN_ID,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=[list(p) for p in _OV_PINPOINTS],
        vision_aspect_ratio="anyres_max_9",
        pad_token_id=PAD_ID,
    )
    return _make_tiny(
        "llava_onevision", _instantiate(config, seed, dtype)
    )


def tiny_qwen2_vl(seed: int = 0, dtype=torch.float32) -> TinyModel:
    """Qwen2-VL: ViT on flattened 2x14x14 patches (2D RoPE) -> 2x2 PatchMerger -> M-RoPE text model."""
    from transformers import Qwen2VLConfig

    vision = dict(
        depth=2,
        embed_dim=32,
        hidden_size=64,  # merger output = text hidden size
        mlp_ratio=2,
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    text = _text_kwargs(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    config = Qwen2VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )
    return _make_tiny("qwen2_vl", _instantiate(config, seed, dtype))


def tiny_qwen2_5_vl(seed: int = 0, dtype=torch.float32) -> TinyModel:
    """Qwen2.5-VL: window-attention ViT (window 56 px = 2x2 merged tokens, block 1 full) -> merger -> M-RoPE."""
    from transformers import Qwen2_5_VLConfig

    vision = dict(
        depth=2,
        hidden_size=32,
        intermediate_size=64,
        out_hidden_size=64,  # merger output = text hidden size
        num_heads=2,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        window_size=56,
        fullatt_block_indexes=[1],
        tokens_per_second=2,
    )
    text = _text_kwargs(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    config = Qwen2_5_VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )
    return _make_tiny("qwen2_5_vl", _instantiate(config, seed, dtype))


BUILDERS: dict[str, Callable[..., TinyModel]] = {
    "llava": tiny_llava,
    "llava_onevision": tiny_llava_onevision,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
}


# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def family_of(model: Any) -> str:
    """Family key of a tiny (or any) model of the four supported classes, from its config's model_type."""
    model = model.obj if isinstance(model, TinyModel) else model
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in BUILDERS:
        raise ValueError(f"not a supported VLM: {type(model).__name__} (model_type={model_type!r})")
    return model_type


def _row_sizes(table: list, batch_size: int, ragged: bool) -> list:
    return [table[i % len(table)] if ragged else table[0] for i in range(batch_size)]


def _rand_text(n: int, gen: torch.Generator) -> list[int]:
    return torch.randint(*TEXT_ID_RANGE, (n,), generator=gen).tolist()


def onevision_image_tokens(orig_hw: tuple[int, int], config) -> int:
    """Placeholder count of one single-image AnyRes input (mirrors `LlavaOnevisionProcessor`)."""
    from transformers.image_processing_utils import select_best_resolution

    tile = config.vision_config.image_size
    side = tile // config.vision_config.patch_size
    best_h, best_w = select_best_resolution(orig_hw, config.image_grid_pinpoints)
    cur_h, cur_w = side * (best_h // tile), side * (best_w // tile)
    orig_h, orig_w = orig_hw
    if orig_w / orig_h > cur_w / cur_h:
        new_h = int(round(orig_h * (cur_w / orig_w), 7))
        cur_h -= 2 * ((cur_h - new_h) // 2)
    else:
        new_w = int(round(orig_w * (cur_h / orig_h), 7))
        cur_w -= 2 * ((cur_w - new_w) // 2)
    unpadded, newlines = cur_h * cur_w, cur_h
    max_patches = int(config.vision_aspect_ratio.strip("anyres_max_"))
    ratio = math.sqrt(cur_h * cur_w / (max_patches * side**2))
    if ratio > 1.1:
        unpadded = int(cur_h // ratio) * int(cur_w // ratio)
        newlines = int(cur_h // ratio)
    count = side * side + unpadded + newlines
    if config.vision_feature_select_strategy == "default":
        count -= 1
    return count


def _qwen_grid(hw: tuple[int, int], frames: int, vision_config) -> tuple[int, int, int]:
    p, t = vision_config.patch_size, vision_config.temporal_patch_size
    return (max(frames // t, 1), hw[0] // p, hw[1] // p)


def make_inputs(
    tiny_or_model: Any, seed: int = 0, batch_size: int = 1, video: bool = False, ragged: bool = False
) -> dict:
    """`generate()` kwargs for a tiny VLM: token ids with expanded placeholders plus the visual tensors.

    One image per row (or one video per row with ``video=True``; LLaVA has no video input and raises).
    Rows get different random text and pixels. ``ragged=True`` (meaningful with ``batch_size > 1``) makes
    row ``i``'s prompt ``4*i`` tokens longer, left-pads all rows to the same length, and for the dynamic
    resolution families also gives each row a different image/video size. Deterministic in ``seed``; the
    global RNG is not touched.
    """
    model = tiny_or_model.obj if isinstance(tiny_or_model, TinyModel) else tiny_or_model
    family = family_of(model)
    config = model.config
    dtype = next(model.parameters()).dtype
    gen = torch.Generator().manual_seed(seed)
    rows: list[list[int]] = []
    kinds: list[list[int]] = []  # 0 text, 1 image, 2 video (mm_token_type_ids)
    extra: dict[str, Any] = {}

    def add_row(i: int, visual: list[int], kind: int, bos: bool = False):
        prefix = _rand_text(_PREFIX_LEN + (3 * i if ragged else 0), gen)
        suffix = _rand_text(_SUFFIX_LEN + (i if ragged else 0), gen)
        head = [BOS_ID] if bos else []
        ids = head + prefix + visual + suffix
        rows.append(ids)
        visual_kinds = [kind if t in (IMAGE_TOKEN_ID, VIDEO_TOKEN_ID) else 0 for t in visual]
        kinds.append([0] * (len(head) + len(prefix)) + visual_kinds + [0] * len(suffix))

    if family == "llava":
        if video:
            raise ValueError("llava has no video input")
        vc = config.vision_config
        # patches, plus the CLS token unless the "default" strategy drops it
        n = (vc.image_size // vc.patch_size) ** 2 + (config.vision_feature_select_strategy == "full")
        extra["pixel_values"] = torch.randn(batch_size, 3, vc.image_size, vc.image_size, generator=gen)
        for i in range(batch_size):
            add_row(i, [IMAGE_TOKEN_ID] * n, 1, bos=True)

    elif family == "llava_onevision":
        vc = config.vision_config
        tile = vc.image_size
        if video:
            side = tile // vc.patch_size
            n = _VIDEO_FRAMES * math.ceil(side / 2) ** 2 + 1
            extra["pixel_values_videos"] = torch.randn(batch_size, _VIDEO_FRAMES, 3, tile, tile, generator=gen)
            for i in range(batch_size):
                add_row(i, [VIDEO_TOKEN_ID] * n, 2)
        else:
            from transformers.image_processing_utils import select_best_resolution

            sizes = _row_sizes(_OV_IMAGE_SIZES, batch_size, ragged)
            tiles = []
            for hw in sizes:
                bh, bw = select_best_resolution(hw, config.image_grid_pinpoints)
                tiles.append(1 + (bh // tile) * (bw // tile))
            pixel_values = torch.zeros(batch_size, max(tiles), 3, tile, tile)
            for i, (hw, count) in enumerate(zip(sizes, tiles)):
                pixel_values[i, :count] = torch.randn(count, 3, tile, tile, generator=gen)
                add_row(i, [IMAGE_TOKEN_ID] * onevision_image_tokens(hw, config), 1)
            extra["pixel_values"] = pixel_values
            extra["image_sizes"] = torch.tensor(sizes, dtype=torch.long)
            extra["batch_num_images"] = torch.ones(batch_size, dtype=torch.long)

    else:  # qwen2_vl, qwen2_5_vl
        vc = config.vision_config
        merge = vc.spatial_merge_size
        patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
        if family == "qwen2_vl":
            table = _QWEN2_VIDEO_SIZES if video else _QWEN2_IMAGE_SIZES
        else:
            table = _QWEN25_VIDEO_SIZES if video else _QWEN25_IMAGE_SIZES
        grids = [_qwen_grid(hw, _VIDEO_FRAMES if video else 1, vc) for hw in _row_sizes(table, batch_size, ragged)]
        token_id, kind = (VIDEO_TOKEN_ID, 2) if video else (IMAGE_TOKEN_ID, 1)
        patches = []
        for i, (t, h, w) in enumerate(grids):
            patches.append(torch.randn(t * h * w, patch_dim, generator=gen))
            n = t * h * w // merge**2
            add_row(i, [VISION_START_ID] + [token_id] * n + [VISION_END_ID], kind)
        grid_thw = torch.tensor(grids, dtype=torch.long)
        if video:
            extra["pixel_values_videos"] = torch.cat(patches)
            extra["video_grid_thw"] = grid_thw
            if family == "qwen2_5_vl":
                # temporal_patch_size / fps with fps = 2, as the processor computes it
                extra["second_per_grid_ts"] = torch.full((batch_size,), 1.0)
        else:
            extra["pixel_values"] = torch.cat(patches)
            extra["image_grid_thw"] = grid_thw

    length = max(len(r) for r in rows)
    input_ids = torch.full((batch_size, length), PAD_ID, dtype=torch.long)
    attention_mask = torch.zeros(batch_size, length, dtype=torch.long)
    mm_types = torch.zeros(batch_size, length, dtype=torch.long)
    for i, (ids, kind) in enumerate(zip(rows, kinds)):
        input_ids[i, length - len(ids) :] = torch.tensor(ids)
        attention_mask[i, length - len(ids) :] = 1
        mm_types[i, length - len(ids) :] = torch.tensor(kind)

    inputs = {"input_ids": input_ids, "attention_mask": attention_mask}
    if family in ("qwen2_vl", "qwen2_5_vl"):
        inputs["mm_token_type_ids"] = mm_types
    for key, value in extra.items():
        inputs[key] = value.to(dtype) if value.is_floating_point() and key != "second_per_grid_ts" else value
    return inputs
