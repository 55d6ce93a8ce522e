from __future__ import annotations

from .base import UNetAdapter


class UNet2DConditionAdapter(UNetAdapter):
    """SD1.5 / SDXL UNet: conv_in, down blocks (each returns its skip connections), mid, up blocks."""

    family = "unet"
    display_name = "SD1.5/SDXL UNet"
    quant_exclude = ("time_embedding.*", "add_embedding.*", "encoder_hid_proj*")
    model_classes = ("diffusers:UNet2DConditionModel",)

    def down_blocks(self):
        return list(self.model.down_blocks)

    def mid_block(self):
        return self.model.mid_block

    def up_blocks(self):
        return list(self.model.up_blocks)
