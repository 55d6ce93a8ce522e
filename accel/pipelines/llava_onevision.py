"""Adapter for LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`).

Layout in transformers 5.x (same attribute names as LLaVA)::

    model.model                        LlavaOnevisionModel
    model.model.vision_tower           SiglipVisionModel (no CLS token, no pooling head)
    model.model.multi_modal_projector  LlavaOnevisionMultiModalProjector: linear_1 -> act -> linear_2
    model.model.image_newline          nn.Parameter [text_hidden]: the learned "newline" embedding
    model.model.language_model         Qwen2Model (bare decoder; .layers)

Facts pruning will need:

* Checkpoints use `vision_feature_layer = -1` and `vision_feature_select_strategy = "full"` (SigLIP has no
  CLS to drop).
* Images are AnyRes: `pixel_values` is `[B, max_tiles, C, S, S]` (zero-padded), tile 0 is the whole image
  resized to S, the others the crops of the best `image_grid_pinpoints` resolution chosen from
  `image_sizes` (original H, W). After the projector, `pack_image_features` keeps the base tile's
  `(S/p)**2` features, then the crop grid *unpadded* back to the original aspect ratio (bilinearly shrunk
  if larger than `anyres_max_9`), with one `image_newline` appended per grid row. All of these, the newline
  vectors included, sit on `image_token_id` placeholders, so `visual_token_mask` covers the newlines too.
  The per-image count varies with `image_sizes` (the processor's `_get_number_of_features`).
* Videos (`pixel_values_videos` `[B, F, C, S, S]`, same F for the batch): each frame's features are
  bilinearly pooled to `ceil(S/p/2)**2`, frames are concatenated and ONE `image_newline` ends the video:
  `F * ceil(S/p/2)**2 + 1` `video_token_id` placeholders.
* `batch_num_images` (from the processor) marks multi-image rows, whose images skip AnyRes (base tile + 1
  newline only).
* The text model uses ordinary 1D RoPE.
"""

from __future__ import annotations

import torch
from torch import nn

from accel.pipelines.llava import LlavaAdapter


class LlavaOnevisionAdapter(LlavaAdapter):
    """LLaVA-OneVision: SigLIP tower, MLP projector with AnyRes packing + newline, Qwen2 decoder."""

    family = "llava_onevision"
    display_name = "LLaVA-OneVision"
    model_classes = (
        "transformers.models.llava_onevision.modeling_llava_onevision:LlavaOnevisionForConditionalGeneration",
        "transformers:LlavaOnevisionForConditionalGeneration",
    )

    def video_token_id(self) -> int | None:
        config = self.model.config
        token = getattr(config, "video_token_id", None)
        return int(token if token is not None else config.video_token_index)

    def image_newline(self) -> nn.Parameter:
        inner = getattr(self.model, "model", self.model)
        newline = getattr(inner, "image_newline", None)
        return newline if newline is not None else self.model.image_newline

    def tokens_per_image(self) -> int:
        """Features of the base tile only; AnyRes images add crops + newlines (depends on the image size)."""
        vision = self.model.config.vision_config
        return (vision.image_size // vision.patch_size) ** 2

    def tokens_per_video(self, num_frames: int) -> int:
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return num_frames * ((side + 1) // 2) ** 2 + 1

    # ---- facts for visual token pruning (accel.pruning) ------------------------------------------------------

    def image_segment_length(self) -> int | None:
        return None  # AnyRes: the count depends on each image's size

    def video_frame_length(self, positions: torch.Tensor) -> int | None:
        """Every frame is pooled to `ceil(side / 2) ** 2` tokens (one newline ends the whole video)."""
        vision = self.model.config.vision_config
        side = vision.image_size // vision.patch_size
        return ((side + 1) // 2) ** 2

    def structural_token_mask(self, features: torch.Tensor) -> torch.Tensor | None:
        """The `image_newline` vectors (end of each AnyRes row, end of a video), found by value."""
        newline = self.image_newline().to(features.device, features.dtype)
        return (features == newline).all(-1)
