from __future__ import annotations

from .. import _hooks
from ._dit_common import grid_from_5d
from .base import BlockIO, DiTAdapter, LatentGrid, TextLayout


class HunyuanVideoAdapter(DiTAdapter):
    """HunyuanVideo: dual-stream then single-stream blocks; attention over [video, text] with a
    key-padding mask for the text; latent [B, C, F, H, W]."""

    family = "hunyuan_video"
    display_name = "HunyuanVideo"
    quant_exclude = ("context_embedder.*", "time_text_embed.*", "norm_out.*", "proj_out")
    model_classes = ("diffusers:HunyuanVideoTransformer3DModel",)
    text_layout = TextLayout("suffix", masked=True)
    attention_roles = {"attn": "joint"}
    block_list_attrs = ("transformer_blocks", "single_transformer_blocks")
    block_outputs = BlockIO(hidden_index=0, encoder_index=1, num_outputs=2)

    def latent_grid(self, args, kwargs) -> LatentGrid:
        latent = _hooks.get_arg(self.model, "hidden_states", args, kwargs)
        cfg = self.model.config
        return grid_from_5d(latent.shape, cfg.patch_size_t, cfg.patch_size, frames_dim=2)
