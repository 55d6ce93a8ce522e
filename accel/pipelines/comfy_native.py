"""Adapters for ComfyUI's own model classes (`comfy.ldm.*`), beside the diffusers ones and of the same shape.

What differs from diffusers: ComfyUI's DiTs are reached through their `transformer_options`, not through module
hooks. Each block is replaced by a patch keyed `(name, index)` in `transformer_options["patches_replace"]["dit"]`
(the block gets and returns a dict, "img" for the visual stream and "txt" for the text stream where the block
has one), and the forward of most families runs ComfyUI's `DIFFUSION_MODEL` wrappers, which see the denoiser's
output. Nothing here imports ComfyUI: the classes are named as strings and resolved when a model is matched.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from ..errors import UnsupportedModelError
from .base import DiTAdapter, LatentGrid, TextLayout, UNetAdapter


class ComfyDiTAdapter(DiTAdapter):
    """A DiT of ComfyUI's, the `diffusion_model` of a `comfy.model_base.BaseModel`."""

    # Per block list (block_list_attrs, same order): the name its blocks have in the patches_replace["dit"] keys.
    block_patch_names: ClassVar[tuple[str, ...]]
    # The forward runs ComfyUI's DIFFUSION_MODEL wrappers (MMDiT's does not: the step cache patches its forward).
    output_wrapper: ClassVar[bool] = True
    patch_dims: ClassVar[int] = 2  # 2: latent [B, C, H, W]; 3: [B, C, F, H, W]
    # The forward names the running block in transformer_options ("block_type", "block_index"); attention outside
    # the blocks (HunyuanVideo's token refiner) is then recognised by their absence.
    names_blocks: ClassVar[bool] = True

    def block_keys(self) -> list[tuple[str, int]]:
        """The patches_replace["dit"] key of every block, in call order."""
        return [
            (name, index)
            for name, blocks in zip(self.block_patch_names, self.block_lists())
            for index in range(len(blocks))
        ]

    def latent_grid(self, args: tuple, kwargs: dict) -> LatentGrid:
        """Token grid of the latent `x`, the first argument of the diffusion model's forward (padded up to whole
        patches, as ComfyUI does)."""
        shape = (args[0] if args else kwargs["x"]).shape
        patch = getattr(self.model, "patch_size", 2)
        patch = tuple(patch) if isinstance(patch, (tuple, list)) else (1, patch, patch)
        frames = math.ceil(shape[2] / patch[0]) if self.patch_dims == 3 else 1
        return LatentGrid(frames, math.ceil(shape[-2] / patch[-2]), math.ceil(shape[-1] / patch[-1]))


class ComfyFluxAdapter(ComfyDiTAdapter):
    """FLUX.1 in ComfyUI: double-stream blocks ("img" and "txt"), then single-stream blocks on [txt, img]."""

    family = "flux"
    display_name = "FLUX (ComfyUI)"
    quant_exclude = (
        "img_in",
        "txt_in",
        "time_in.*",
        "vector_in.*",
        "guidance_in.*",
        "final_layer.*",
    )  # embedders and output layers stay 16-bit
    model_classes = ("comfy.ldm.flux.model:Flux",)
    text_layout = TextLayout("prefix")
    attention_roles = {"img_attn": "joint"}  # the double blocks' attention; single blocks compute theirs inline
    block_list_attrs = ("double_blocks", "single_blocks")
    block_patch_names = ("double_block", "single_block")


class ComfyChromaAdapter(ComfyFluxAdapter):
    """Chroma in ComfyUI: FLUX's block layout with a separate modulation network."""

    family = "chroma"
    display_name = "Chroma (ComfyUI)"
    quant_exclude = (
        "img_in",
        "txt_in",
        "distilled_guidance_layer.*",
        "final_layer.*",
    )  # embedders and output layers stay 16-bit
    model_classes = ("comfy.ldm.chroma.model:Chroma",)


class ComfyWanAdapter(ComfyDiTAdapter):
    """Wan 2.1/2.2 in ComfyUI: one block list, video-only self-attention, text through cross-attention."""

    family = "wan"
    display_name = "Wan (ComfyUI)"
    quant_exclude = (
        "patch_embedding",
        "text_embedding.*",
        "time_embedding.*",
        "time_projection.*",
        "head.*",
    )  # embedders and output layers stay 16-bit
    model_classes = ("comfy.ldm.wan.model:WanModel",)
    text_layout = TextLayout("none")
    attention_roles = {"self_attn": "self", "cross_attn": "cross"}
    block_list_attrs = ("blocks",)
    block_patch_names = ("double_block",)
    patch_dims = 3


class ComfyHunyuanVideoAdapter(ComfyDiTAdapter):
    """HunyuanVideo in ComfyUI: double-stream then single-stream blocks, attention on [video, text] with the text
    padding masked."""

    family = "hunyuan_video"
    display_name = "HunyuanVideo (ComfyUI)"
    quant_exclude = (
        "img_in.*",
        "txt_in.*",
        "time_in.*",
        "vector_in.*",
        "guidance_in.*",
        "final_layer.*",
    )  # embedders and output layers stay 16-bit
    model_classes = ("comfy.ldm.hunyuan_video.model:HunyuanVideo",)
    text_layout = TextLayout("suffix", masked=True)
    attention_roles = {"img_attn": "joint"}
    block_list_attrs = ("double_blocks", "single_blocks")
    block_patch_names = ("double_block", "single_block")
    patch_dims = 3


class ComfyLTXVAdapter(ComfyDiTAdapter):
    """LTX-Video in ComfyUI: one block list, video-only self-attention, text through cross-attention."""

    family = "ltx"
    display_name = "LTX-Video (ComfyUI)"
    quant_exclude = (
        "patchify_proj",
        "adaln_single.*",
        "caption_projection.*",
        "proj_out",
    )  # embedders and output layers stay 16-bit
    model_classes = ("comfy.ldm.lightricks.model:LTXVModel",)
    text_layout = TextLayout("none")
    attention_roles = {"attn1": "self", "attn2": "cross"}
    block_list_attrs = ("transformer_blocks",)
    block_patch_names = ("double_block",)
    patch_dims = 3
    names_blocks = False


class ComfySD3Adapter(ComfyDiTAdapter):
    """SD3 / SD3.5 (MMDiT) in ComfyUI: joint blocks on [text, image] (the reverse of diffusers' order)."""

    family = "sd3"
    display_name = "SD3 (ComfyUI)"
    quant_exclude = ("x_embedder.*", "t_embedder.*", "y_embedder.*", "context_embedder", "final_layer.*")
    model_classes = ("comfy.ldm.modules.diffusionmodules.mmdit:OpenAISignatureMMDITWrapper",)
    text_layout = TextLayout("prefix")
    attention_roles = {"attn": "joint"}
    block_list_attrs = ("joint_blocks",)
    block_patch_names = ("double_block",)
    output_wrapper = False
    names_blocks = False


class ComfyUNetAdapter(UNetAdapter):
    """SD1.5 / SDXL in ComfyUI (`UNetModel`): input blocks (input block 0 is the stem convolution), middle block,
    output blocks. Its forward runs DIFFUSION_MODEL wrappers and "input_block_patch" patches after every input
    block, but takes no block replacement: the step cache stops a reused step after its head input block instead."""

    family = "unet"
    display_name = "SD1.5/SDXL UNet (ComfyUI)"
    quant_exclude = ("time_embed.*", "label_emb.*")
    model_classes = ("comfy.ldm.modules.diffusionmodules.openaimodel:UNetModel",)
    text_layout = TextLayout("none")  # text only through cross-attention
    head_block = 1  # the first input block after the stem: its residual is the cache's signal
    output_wrapper = True
    names_blocks = False
    block_patch_names: ClassVar[tuple[str, ...]] = ()

    def down_blocks(self):
        return list(self.model.input_blocks)

    def mid_block(self):
        return self.model.middle_block

    def up_blocks(self):
        return list(self.model.output_blocks)

    def block_lists(self) -> list:
        return []  # no blocks ComfyUI lets a patch replace

    def latent_grid(self, args: tuple, kwargs: dict) -> LatentGrid:
        shape = (args[0] if args else kwargs["x"]).shape
        return LatentGrid(1, shape[-2], shape[-1])


COMFY_ADAPTERS: list[type[ComfyDiTAdapter | ComfyUNetAdapter]] = [
    ComfyFluxAdapter,
    ComfyChromaAdapter,
    ComfyWanAdapter,
    ComfyHunyuanVideoAdapter,
    ComfyLTXVAdapter,
    ComfySD3Adapter,
    ComfyUNetAdapter,
]


def find_comfy_adapter(diffusion_model: Any) -> ComfyDiTAdapter | ComfyUNetAdapter:
    """The adapter of a ComfyUI diffusion model (`model_patcher.model.diffusion_model`)."""
    for adapter_cls in COMFY_ADAPTERS:
        if adapter_cls.matches(diffusion_model):
            return adapter_cls(diffusion_model)
    names = ", ".join(a.display_name for a in COMFY_ADAPTERS)
    raise UnsupportedModelError(
        f"accel's ComfyUI nodes do not support {type(diffusion_model).__module__}.{type(diffusion_model).__qualname__}"
        f" yet. Supported: {names}. Leave this model without Accel nodes."
    )
