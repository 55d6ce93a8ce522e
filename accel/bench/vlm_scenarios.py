"""Vision-language models at the released models' shapes with random weights, and prompts as their processors
build them, for the pruning benchmarks (`accel.bench.vlm.compare_pruning`).

    model = build_vlm("llava", tiny=False, attn="sdpa", device="cuda").eval()
    inputs = make_vlm_inputs("llava", model, tiny=False, device="cuda")

Scenarios: ``llava`` (LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px, 576 image tokens, Llama-7B, one image, a 40-token
prompt), ``qwen2_vl_image`` (Qwen2-VL-7B, a 1280x720 image resized to 1288x728: grid 1x52x92, 1196 tokens after
the 2x2 merger) and ``qwen2_vl_video`` (Qwen2-VL-7B, 32 frames at 448x252: grid 16x18x32, 2304 tokens); bf16.
`tiny=True` builds the zoo's tiny model of the same class instead (CPU: checks a script, measures nothing).
"""

from __future__ import annotations

import torch

from accel.zoo import UnknownModelError

VLM_SCENARIOS = ("llava", "qwen2_vl_image", "qwen2_vl_video")
IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID = 32000, 32001, 32002, 32003  # inside both vocabularies below


def _llava_config():
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(
        hidden_size=1024,
        intermediate_size=4096,
        num_hidden_layers=24,
        num_attention_heads=16,
        image_size=336,
        patch_size=14,
        projection_dim=768,
        hidden_act="quick_gelu",
    )
    text = LlamaConfig(
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        vocab_size=32064,
        max_position_embeddings=4096,
    )
    return LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=IMAGE_ID,
        image_seq_length=576,
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
    )


def _qwen2_vl_config():
    from transformers import Qwen2VLConfig

    vision = dict(
        depth=32,
        embed_dim=1280,
        hidden_size=3584,
        mlp_ratio=4,
        num_heads=16,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
    )
    text = dict(
        hidden_size=3584,
        intermediate_size=18944,
        num_hidden_layers=28,
        num_attention_heads=28,
        num_key_value_heads=4,
        vocab_size=152064,
        max_position_embeddings=32768,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]},
    )
    return Qwen2VLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=IMAGE_ID,
        video_token_id=VIDEO_ID,
        vision_start_token_id=VSTART_ID,
        vision_end_token_id=VEND_ID,
    )


def build_vlm(scenario: str, tiny: bool, attn: str = "sdpa", device: str | torch.device = "cpu"):
    """The scenario's model (random weights) on `device`, built there (a 7B model's random init takes minutes on a
    CPU, about 3 s a Llama-7B layer on 2 cores, and seconds on a GPU); `tiny`: the zoo's tiny model."""
    if scenario not in VLM_SCENARIOS:
        raise UnknownModelError(f"unknown VLM scenario {scenario!r}; choose from {', '.join(VLM_SCENARIOS)}")
    llava = scenario == "llava"
    if tiny:
        from accel.zoo import vlm

        return (vlm.tiny_llava() if llava else vlm.tiny_qwen2_vl()).obj.to(device)
    from transformers import AutoModelForImageTextToText

    config = _llava_config() if llava else _qwen2_vl_config()
    with torch.device(device):
        return AutoModelForImageTextToText.from_config(config, attn_implementation=attn, dtype=torch.bfloat16)


def _qwen2_vl_inputs(scenario: str, model, text, gen: torch.Generator, device) -> dict:
    vc = model.config.vision_config
    dtype = next(model.parameters()).dtype
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    grid = (1, 52, 92) if scenario == "qwen2_vl_image" else (16, 18, 32)
    n = grid[0] * grid[1] * grid[2] // vc.spatial_merge_size**2
    token, kind = (IMAGE_ID, 1) if scenario == "qwen2_vl_image" else (VIDEO_ID, 2)
    ids = text(20) + [VSTART_ID] + [token] * n + [VEND_ID] + text(20)
    types = [0] * 21 + [kind] * n + [0] * 21
    pixels = torch.randn(grid[0] * grid[1] * grid[2], patch_dim, generator=gen).to(device, dtype)
    key = "image" if kind == 1 else "video"
    return {
        "input_ids": torch.tensor([ids], device=device),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device),
        "mm_token_type_ids": torch.tensor([types], device=device),
        "pixel_values" if kind == 1 else "pixel_values_videos": pixels,
        f"{key}_grid_thw": torch.tensor([grid], device=device),
    }


def make_vlm_inputs(scenario: str, model, tiny: bool, device) -> dict:
    """Prompt ids with the placeholders expanded as the processor does, plus random pixels, on `device`."""
    if tiny:
        from accel.zoo import vlm

        return {k: v.to(device) for k, v in vlm.make_inputs(model, video=scenario.endswith("video")).items()}
    gen = torch.Generator().manual_seed(0)

    def text(n: int) -> list[int]:
        return torch.randint(100, 30000, (n,), generator=gen).tolist()

    if scenario != "llava":
        return _qwen2_vl_inputs(scenario, model, text, gen, device)
    ids = [1] + text(20) + [IMAGE_ID] * 576 + text(20)
    pixels = torch.randn(1, 3, 336, 336, generator=gen)
    return {
        "input_ids": torch.tensor([ids], device=device),
        "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device),
        "pixel_values": pixels.to(device, next(model.parameters()).dtype),
    }


__all__ = ["VLM_SCENARIOS", "build_vlm", "make_vlm_inputs"]
