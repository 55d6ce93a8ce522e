"""Adapters for Qwen2-VL (`Qwen2VLForConditionalGeneration`) and Qwen2.5-VL (`Qwen2_5_VLForConditionalGeneration`).

Layout in transformers 5.x (identical attribute names for both)::

    model.model                      Qwen2VLModel / Qwen2_5_VLModel
    model.model.visual               Qwen2VisionTransformerPretrainedModel / Qwen2_5_VisionTransformerPretrainedModel
    model.model.visual.patch_embed   Conv3d over flattened (C, T=2, 14, 14) patches
    model.model.visual.blocks        vision blocks (ModuleList)
    model.model.visual.merger        PatchMerger: LN -> view(-1, C * merge**2) -> MLP  (the "projector")
    model.model.language_model       Qwen2VLTextModel / Qwen2_5_VLTextModel (.layers)
    model.model.rope_deltas          cached M-RoPE deltas [B, 1] (module state, set by every generate())

Transformers 4.x (< 4.52) had `model.visual` and `model.model` (the text model) on the top-level class; the
lookups below try both layouts.

Facts pruning will need (both versions):

* Inputs: `pixel_values` / `pixel_values_videos` are flattened patches `[sum(t*h*w), C*T*p*p]`, ordered so
  that each run of `spatial_merge_size**2` consecutive rows is one merged LM token; `image_grid_thw` /
  `video_grid_thw` `[N, 3]` give (t, h, w) in patches. One image yields `t*h*w // merge**2` LM tokens.
* The ViT attends block-diagonally per image and per frame: `cu_seqlens` from
  `transformers.vision_utils.get_vision_attention_seqlens(grid_thw, ...)`; its 2D RoPE positions come from
  `vision_utils.get_vision_position_ids`. Both can be precomputed and passed as kwargs (`cu_seqlens`,
  `position_ids`, `max_seqlen`), which the tower pops instead of recomputing.
* The LM uses M-RoPE: `position_ids` `[3, B, S]` (temporal, height, width), from
  `model.model.get_rope_index(input_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
  attention_mask)` -> `(position_ids, rope_deltas)`, `rope_deltas = max_position + 1 - valid_length` per
  row. Text tokens advance 1 per token; a visual block advances `max(h, w) // merge`, so visual tokens
  share positions. `generate()` calls it in `_prepare_position_ids_for_generation`, stores
  `model.model.rope_deltas` and feeds `[4, B, S]` positions whose row 0 is the plain text position (used
  only for the mask); decode steps use `cache_position + rope_deltas` on all 3 axes. Removing k visual
  tokens from the prefill therefore requires gathering the precomputed positions (not recomputing them on
  the shortened ids) and adding k to `rope_deltas`, since the cache is k shorter.
* In transformers 5.x `mm_token_type_ids` (0 text, 1 image, 2 video) is REQUIRED whenever `input_ids` and
  a `*_grid_thw` are given (ValueError otherwise); `get_rope_index` groups tokens by it, not by token id.
"""

from __future__ import annotations

import torch
from torch import nn

from accel.pipelines.base import VLMAdapter
from accel.pipelines.llava import _has_layers, _lookup, visual_inputs


class Qwen2VLAdapter(VLMAdapter):
    """Qwen2-VL: native-resolution ViT (full attention per image/frame), 2x2 PatchMerger, M-RoPE decoder."""

    family = "qwen2_vl"
    display_name = "Qwen2-VL"
    quant_exclude = ("model.visual.*", "visual.*", "lm_head")
    model_classes = (
        "transformers.models.qwen2_vl.modeling_qwen2_vl:Qwen2VLForConditionalGeneration",
        "transformers:Qwen2VLForConditionalGeneration",
    )
    vision_attention_name = "attn"

    def vision_tower(self) -> nn.Module:
        return _lookup(self.model, ("model.visual", "visual"))

    def projector(self) -> nn.Module:
        """The PatchMerger at the end of the vision tower (merges 2x2 patches, maps to the text width)."""
        return self.vision_tower().merger

    def language_model(self) -> nn.Module:
        return _lookup(self.model, ("model.language_model", "language_model", "model"), accept=_has_layers)

    def language_layers(self) -> nn.ModuleList:
        return self.language_model().layers

    def vision_layers(self) -> nn.ModuleList:
        return self.vision_tower().blocks

    def image_token_id(self) -> int:
        return int(self.model.config.image_token_id)

    def video_token_id(self) -> int | None:
        return int(self.model.config.video_token_id)

    def vision_start_token_id(self) -> int:
        return int(self.model.config.vision_start_token_id)

    def vision_end_token_id(self) -> int:
        return int(self.model.config.vision_end_token_id)

    def has_cls_token(self) -> bool:
        return False

    def spatial_merge_size(self) -> int:
        return int(self.model.config.vision_config.spatial_merge_size)

    def video_frame_length(self, positions: torch.Tensor) -> int | None:
        """Tokens of one temporal patch: those sharing the first token's M-RoPE temporal position
        (`positions` is `[3, n]` or generate()'s `[4, n]`, whose row 0 is the plain text position)."""
        if positions.ndim != 2 or positions.shape[0] not in (3, 4):
            return None
        temporal = positions[-3]
        return int((temporal == temporal[0]).sum())

    def visual_inputs(self, call: dict) -> set[str]:
        return visual_inputs(call)

    def mask_positions(self, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        """Text positions, row 0 of `[4, B, S]` position ids: the text model reads packed sequences from them
        (3-row M-RoPE positions alone never mark packing)."""
        if position_ids is not None and position_ids.ndim == 3 and position_ids.shape[0] == 4:
            return position_ids[0]
        return None

    def rope_model(self) -> nn.Module:
        """The module owning `get_rope_index` and the cached `rope_deltas` (`model.model` in 5.x)."""
        inner = getattr(self.model, "model", None)
        return inner if hasattr(inner, "get_rope_index") else self.model


class Qwen2_5_VLAdapter(Qwen2VLAdapter):
    """Qwen2.5-VL: as Qwen2-VL, but the ViT uses window attention except in `fullatt_block_indexes`.

    Window facts (transformers 5.x): `Qwen2_5_VisionTransformerPretrainedModel.forward` computes
    `window_index, cu_window_seqlens = transformers.vision_utils.get_vision_window_index(grid_thw,
    spatial_merge_size, window_size, patch_size)` (window side in merged tokens =
    `window_size // spatial_merge_size // patch_size`), then `permute_input_for_window_attn` reorders the
    patch sequence in units of `spatial_merge_size**2` rows (one merged token) by `window_index` BEFORE the
    first block (the rotary cos/sin are permuted the same way). Every block therefore sees tokens in
    window order; blocks in `fullatt_block_indexes` attend over `cu_seqlens` (whole image/frame), the others
    over `cu_window_seqlens`. After the merger the output is put back in raster order with
    `merged[argsort(window_index)]`. Hidden states hooked inside the blocks are in window order. Passing both
    `window_index` and `cu_window_seqlens` as kwargs skips the recomputation.
    Videos: M-RoPE temporal positions are spaced by `tokens_per_second * second_per_grid_ts` (a generate kwarg).
    """

    family = "qwen2_5_vl"
    display_name = "Qwen2.5-VL"
    model_classes = (
        "transformers.models.qwen2_5_vl.modeling_qwen2_5_vl:Qwen2_5_VLForConditionalGeneration",
        "transformers:Qwen2_5_VLForConditionalGeneration",
    )

    def window_size(self) -> int:
        """Window side in pixels (the ViT window is `window_size // spatial_merge_size // patch_size` merged tokens)."""
        return int(self.model.config.vision_config.window_size)

    def fullatt_block_indexes(self) -> list[int]:
        return list(self.model.config.vision_config.fullatt_block_indexes)
