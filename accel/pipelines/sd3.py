from __future__ import annotations

from .. import _hooks
from .base import BlockIO, DiTAdapter, LatentGrid, TextLayout


class SD3Adapter(DiTAdapter):
    """Stable Diffusion 3 / 3.5 MMDiT: joint attention over [image, text]; the last block drops the text."""

    family = "sd3"
    display_name = "Stable Diffusion 3"
    quant_exclude = ("time_text_embed.*", "context_embedder", "norm_out.*", "proj_out")
    model_classes = ("diffusers:SD3Transformer2DModel",)
    text_layout = TextLayout("suffix")
    attention_roles = {"attn": "joint", "attn2": "self"}
    block_list_attrs = ("transformer_blocks",)
    block_outputs = BlockIO(hidden_index=1, encoder_index=0, num_outputs=2)

    def latent_grid(self, args, kwargs) -> LatentGrid:
        latent = _hooks.get_arg(self.model, "hidden_states", args, kwargs)
        p = self.model.config.patch_size
        return LatentGrid(1, latent.shape[-2] // p, latent.shape[-1] // p)
