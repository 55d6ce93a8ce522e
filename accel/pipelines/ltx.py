from __future__ import annotations

from .. import _hooks
from .base import BlockIO, DiTAdapter, LatentGrid, TextLayout


class LTXAdapter(DiTAdapter):
    """LTX-Video: video-only self-attention, text through cross-attention; the latent arrives packed as
    [B, tokens, C] with the grid given by the num_frames/height/width arguments."""

    family = "ltx"
    display_name = "LTX-Video"
    quant_exclude = ("proj_in", "time_embed.*", "caption_projection.*", "proj_out")
    model_classes = ("diffusers:LTXVideoTransformer3DModel",)
    text_layout = TextLayout("none")
    attention_roles = {"attn1": "self", "attn2": "cross"}
    block_list_attrs = ("transformer_blocks",)
    block_outputs = BlockIO(hidden_index=None)

    def latent_grid(self, args, kwargs) -> LatentGrid:
        def arg(name):
            return int(_hooks.get_arg(self.model, name, args, kwargs))

        return LatentGrid(arg("num_frames"), arg("height"), arg("width"))
