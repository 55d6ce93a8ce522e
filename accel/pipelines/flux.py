from __future__ import annotations

from .. import _hooks
from .base import BlockIO, DiTAdapter, LatentGrid, TextLayout


class FluxAdapter(DiTAdapter):
    """FLUX.1: double-stream blocks, then single-stream blocks; attention sequence is [text, image]."""

    family = "flux"
    display_name = "FLUX"
    quant_exclude = ("time_text_embed.*", "context_embedder", "x_embedder", "norm_out.*", "proj_out")
    model_classes = ("diffusers:FluxTransformer2DModel",)
    text_layout = TextLayout("prefix")
    attention_roles = {"attn": "joint"}
    block_list_attrs = ("transformer_blocks", "single_transformer_blocks")
    block_outputs = BlockIO(hidden_index=1, encoder_index=0, num_outputs=2)

    def latent_grid(self, args, kwargs) -> LatentGrid:
        img_ids = _hooks.get_arg(self.model, "img_ids", args, kwargs)
        if img_ids.ndim == 3:
            img_ids = img_ids[0]
        return LatentGrid(1, int(img_ids[:, 1].max()) + 1, int(img_ids[:, 2].max()) + 1)
