from __future__ import annotations

from .. import _hooks
from ._dit_common import grid_from_5d
from .base import BlockIO, DiTAdapter, LatentGrid, TextLayout


class WanAdapter(DiTAdapter):
    """Wan2.1: video-only self-attention, text through cross-attention; latent [B, C, F, H, W]."""

    family = "wan"
    display_name = "Wan2.1"
    quant_exclude = ("condition_embedder.*", "proj_out")
    model_classes = ("diffusers:WanTransformer3DModel",)
    text_layout = TextLayout("none")
    attention_roles = {"attn1": "self", "attn2": "cross"}
    block_list_attrs = ("blocks",)
    block_outputs = BlockIO(hidden_index=None)

    def latent_grid(self, args, kwargs) -> LatentGrid:
        latent = _hooks.get_arg(self.model, "hidden_states", args, kwargs)
        pt, ph, _ = self.model.config.patch_size
        return grid_from_5d(latent.shape, pt, ph, frames_dim=2)
