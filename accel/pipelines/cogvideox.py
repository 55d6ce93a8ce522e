from __future__ import annotations

from .. import _hooks
from ._dit_common import grid_from_5d
from .base import BlockIO, DiTAdapter, LatentGrid, TextLayout


class CogVideoXAdapter(DiTAdapter):
    """CogVideoX: expert blocks over [text (226 tokens), video]; latent [B, F, C, H, W]."""

    family = "cogvideox"
    display_name = "CogVideoX"
    quant_exclude = ("patch_embed.*", "time_embedding.*", "ofs_embedding.*", "norm_out.*", "proj_out")
    model_classes = ("diffusers:CogVideoXTransformer3DModel",)
    text_layout = TextLayout("prefix")
    attention_roles = {"attn1": "joint"}
    block_list_attrs = ("transformer_blocks",)
    block_outputs = BlockIO(hidden_index=0, encoder_index=1, num_outputs=2)

    def latent_grid(self, args, kwargs) -> LatentGrid:
        latent = _hooks.get_arg(self.model, "hidden_states", args, kwargs)
        cfg = self.model.config
        return grid_from_5d(latent.shape, cfg.patch_size_t or 1, cfg.patch_size, frames_dim=1)
