"""Tiny random-weight vision-language models built from the real transformers classes.

Four families, each a real `*ForConditionalGeneration` class with a tiny config:

* ``llava``: `LlavaForConditionalGeneration`, CLIP vision tower (CLS token), Llama text model;
* ``llava_onevision``: `LlavaOnevisionForConditionalGeneration`, SigLIP (no CLS), Qwen2 text model;
* ``qwen2_vl``: `Qwen2VLForConditionalGeneration`, Qwen2-VL ViT + PatchMerger, M-RoPE text model;
* ``qwen2_5_vl``: `Qwen2_5_VLForConditionalGeneration`, window-attention ViT + PatchMerger, M-RoPE text model.

Inputs (`make_inputs`, the shared tiny vocabulary and the placeholder counts) are described in
`accel.zoo._vlm_inputs`; the names are importable from here.

`TinyModel.run(seed, batch_size=1, video=False, ragged=False, max_new_tokens=8)` runs greedy `generate()` with
``min_new_tokens == max_new_tokens`` so every run yields exactly ``max_new_tokens`` new tokens (the random
weights would otherwise stop at the eos id now and then); ``first_logits`` are the raw (unprocessed) logits.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from accel.zoo._base import TinyModel, UnknownOverrideError, VLMOutput, seeded
from accel.zoo._vlm_inputs import (
    BOS_ID,
    EOS_ID,
    IMAGE_TOKEN_ID,
    PAD_ID,
    TEXT_ID_RANGE,
    VIDEO_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    VOCAB_SIZE,
    family_of,
    make_inputs,
    onevision_image_tokens,
)

# LLaVA-OneVision tiny tile size and AnyRes grid (multiples of the tile, like the real 384 px config).
_OV_TILE = 56
_OV_PINPOINTS = [[56, 56], [56, 112], [112, 56], [112, 112]]


# ----------------------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------------------


def _instantiate(config, seed: int, dtype) -> torch.nn.Module:
    """Build the model class of `config` with weights drawn from `seed`, leaving the global RNG untouched."""
    from transformers import AutoModelForImageTextToText

    model = seeded(
        seed, lambda: AutoModelForImageTextToText.from_config(config, attn_implementation="sdpa", dtype=torch.float32)
    )
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


def _qwen_config(config_class: type, vision: dict):
    """A Qwen-VL config: `vision` with the shared tiny text model (M-RoPE sections 2+3+3 = head_dim 16 / 2)."""
    text = _text_kwargs(rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]})
    return config_class(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_TOKEN_ID,
        video_token_id=VIDEO_TOKEN_ID,
        vision_start_token_id=VISION_START_ID,
        vision_end_token_id=VISION_END_ID,
    )


def _make_tiny(family: str, model: torch.nn.Module) -> TinyModel:
    def run(seed: int = 0, **overrides) -> VLMOutput:
        unknown = set(overrides) - {"batch_size", "video", "ragged", "max_new_tokens"}
        if unknown:
            raise UnknownOverrideError(
                f"unknown overrides for {family}: {sorted(unknown)}; it takes batch_size, video, ragged, max_new_tokens"
            )
        inputs = make_inputs(
            model,
            seed=seed,
            batch_size=overrides.get("batch_size", 1),
            video=overrides.get("video", False),
            ragged=overrides.get("ragged", False),
        )
        return generate(model, inputs, max_new_tokens=overrides.get("max_new_tokens", 8))

    return TinyModel.of(family, "vlm", model, run)


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
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

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
    return _make_tiny("llava_onevision", _instantiate(config, seed, dtype))


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
    return _make_tiny("qwen2_vl", _instantiate(_qwen_config(Qwen2VLConfig, vision), seed, dtype))


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
    return _make_tiny("qwen2_5_vl", _instantiate(_qwen_config(Qwen2_5_VLConfig, vision), seed, dtype))


BUILDERS: dict[str, Callable[..., TinyModel]] = {
    "llava": tiny_llava,
    "llava_onevision": tiny_llava_onevision,
    "qwen2_vl": tiny_qwen2_vl,
    "qwen2_5_vl": tiny_qwen2_5_vl,
}


__all__ = [
    "BOS_ID",
    "BUILDERS",
    "EOS_ID",
    "IMAGE_TOKEN_ID",
    "PAD_ID",
    "TEXT_ID_RANGE",
    "VIDEO_TOKEN_ID",
    "VISION_END_ID",
    "VISION_START_ID",
    "VOCAB_SIZE",
    "family_of",
    "generate",
    "make_inputs",
    "onevision_image_tokens",
    "tiny_llava",
    "tiny_llava_onevision",
    "tiny_qwen2_5_vl",
    "tiny_qwen2_vl",
]
