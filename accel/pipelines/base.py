"""The adapter interface: everything accel needs to know about one model family.

Accelerators never look at class names; they ask an adapter. An adapter wraps one model instance (the
denoiser of a diffusers pipeline, or a transformers VLM) and answers questions about its structure.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn


def resolve_classes(paths: tuple[str, ...]) -> tuple[type, ...]:
    """Import "package.module:ClassName" paths; names missing from the installed version are skipped."""
    found = []
    for path in paths:
        module_name, _, class_name = path.partition(":")
        try:
            found.append(getattr(importlib.import_module(module_name), class_name))
        except (ImportError, AttributeError):
            continue
    return tuple(found)


@dataclass(frozen=True, eq=False)
class AttentionSite:
    """One attention module of the model, as accelerators that replace attention see it.

    `role`: "self" (visual tokens only), "cross" (queries visual, keys text), "joint" (text and visual
    tokens in one sequence, see the adapter's text layout), "causal" (a language model's decoder
    self-attention) or "vision" (a VLM's vision encoder). `block` is the index of the block (DiT), the
    transformer block (UNet), or the layer (VLM language model / vision encoder) it belongs to.
    """

    name: str
    module: nn.Module
    block: int
    role: str


def find_attention_sites(model: nn.Module, roots: list[nn.Module], roles: dict[str, str]) -> list[AttentionSite]:
    """Submodules of `roots` whose own name is a key of `roles`, numbered by root, in call order."""
    names = {id(module): name for name, module in model.named_modules()}
    sites = []
    for index, root in enumerate(roots):
        for name, module in root.named_modules():
            role = roles.get(name.rsplit(".", 1)[-1])
            if role is not None:
                sites.append(AttentionSite(names[id(module)], module, index, role))
    return sites


class Adapter:
    family: ClassVar[str]  # short key, e.g. "flux"
    kind: ClassVar[str]  # "dit" | "unet" | "vlm"
    display_name: ClassVar[str]  # e.g. "FLUX (FluxTransformer2DModel)"
    model_classes: ClassVar[tuple[str, ...]]  # "module:Class" of the models this adapter serves
    # Glob patterns over module names of layers that W4 quantization keeps in 16-bit by default
    # (embedders, final projections, lm_head, vision tower): see accel/quant.
    quant_exclude: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: Any) -> bool:
        classes = resolve_classes(cls.model_classes)
        return bool(classes) and isinstance(model, classes)

    def describe(self) -> str:
        return f"{self.display_name}: {type(self.model).__name__}"

    def attention_sites(self) -> list[AttentionSite]:
        """The attention modules accelerators may reroute, in the order the forward calls them."""
        raise NotImplementedError


@dataclass(frozen=True)
class BlockIO:
    """Where a transformer block's outputs sit.

    `hidden_index` is None when the block returns the hidden-states tensor itself; `encoder_index` is None
    when the block returns no text stream (Wan, LTX: text enters through cross-attention).
    """

    hidden_index: int | None
    encoder_index: int | None = None
    num_outputs: int = 1


@dataclass(frozen=True)
class TextLayout:
    """Where text tokens sit in the self-attention sequence.

    `position` is "prefix" ([text, video]), "suffix" ([video, text]) or "none" (text only enters through
    cross-attention). `masked` says whether the model passes a key-padding mask for the text.
    """

    position: str
    masked: bool = False


@dataclass(frozen=True)
class LatentGrid:
    """Token grid of the visual stream after patch embedding: frames x height x width."""

    frames: int
    height: int
    width: int

    @property
    def tokens(self) -> int:
        return self.frames * self.height * self.width


class DiTAdapter(Adapter):
    """A diffusion transformer: a stack of blocks called in order on (hidden, encoder) streams."""

    kind = "dit"
    text_layout: ClassVar[TextLayout]
    attention_roles: ClassVar[dict[str, str]]  # attention submodule name in a block -> AttentionSite.role
    block_list_attrs: ClassVar[tuple[str, ...]]  # the model's attributes holding its block lists, in call order
    block_outputs: ClassVar[BlockIO]  # where the outputs of its blocks sit

    def attention_sites(self) -> list[AttentionSite]:
        return find_attention_sites(self.model, self.blocks(), self.attention_roles)

    def block_lists(self) -> list[nn.ModuleList]:
        """The block lists in the order the forward calls them."""
        return [getattr(self.model, name) for name in self.block_list_attrs]

    def blocks(self) -> list[nn.Module]:
        return [block for blocks in self.block_lists() for block in blocks]

    def block_io(self, block: nn.Module) -> BlockIO:
        """Where `block`'s outputs sit (in the families accel knows, the same for every block)."""
        return self.block_outputs

    def latent_grid(self, args: tuple, kwargs: dict) -> LatentGrid:
        """Grid of visual tokens for one call of the denoiser, from that call's arguments."""
        raise NotImplementedError


class UNetAdapter(Adapter):
    """A UNet: conv_in, down blocks, mid block, up blocks, conv_out."""

    kind = "unet"
    attention_roles: ClassVar[dict[str, str]] = {"attn1": "self", "attn2": "cross"}

    def attention_sites(self) -> list[AttentionSite]:
        blocks = [self.mid_block()] if self.mid_block() is not None else []
        roots = [*self.down_blocks(), *blocks, *self.up_blocks()]
        # Number by transformer block (the parent of attn1/attn2), not by UNet stage.
        sites, parents = [], {}
        for site in find_attention_sites(self.model, roots, self.attention_roles):
            parent = site.name.rsplit(".", 1)[0]
            sites.append(AttentionSite(site.name, site.module, parents.setdefault(parent, len(parents)), site.role))
        return sites

    def down_blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def mid_block(self) -> nn.Module | None:
        raise NotImplementedError

    def up_blocks(self) -> list[nn.Module]:
        raise NotImplementedError


class VLMAdapter(Adapter):
    """A transformers vision-language model."""

    kind = "vlm"
    vision_attention_name: ClassVar[str] = "self_attn"  # attention submodule of a vision encoder layer

    def attention_sites(self) -> list[AttentionSite]:
        language = find_attention_sites(self.model, list(self.language_layers()), {"self_attn": "causal"})
        vision = find_attention_sites(self.model, list(self.vision_layers()), {self.vision_attention_name: "vision"})
        return vision + language

    def vision_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def vision_tower(self) -> nn.Module:
        raise NotImplementedError

    def projector(self) -> nn.Module:
        raise NotImplementedError

    def language_model(self) -> nn.Module:
        raise NotImplementedError

    def language_layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def image_token_id(self) -> int:
        raise NotImplementedError

    def video_token_id(self) -> int | None:
        return None

    def visual_token_mask(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Bool mask [B, S]: positions in `input_ids` that hold image or video tokens."""
        mask = input_ids == self.image_token_id()
        video_id = self.video_token_id()
        if video_id is not None:
            mask |= input_ids == video_id
        return mask

    # ---- facts for visual token pruning (accel.pruning) ------------------------------------------------------

    def multimodal_model(self) -> nn.Module:
        """The module whose forward takes `input_ids` and the visual inputs and calls `language_model()`."""
        return getattr(self.model, "model", self.model)

    def image_segment_length(self) -> int | None:
        """Placeholders per image when every image has the same count (splits adjacent images); else None."""
        return None

    def video_frame_length(self, positions: torch.Tensor) -> int | None:
        """Placeholders per frame (temporal unit) of one video, given the language-model position ids of its
        placeholders (`[n]`, or `[axes, n]` for M-RoPE); None when unknown."""
        return None

    def structural_token_mask(self, features: torch.Tensor) -> torch.Tensor | None:
        """Bool [n]: visual placeholders that carry layout, not content (kept by pruning), or None."""
        return None

    def cls_attention_module(self) -> nn.Module | None:
        """The vision self-attention whose [CLS] query row scores the image features, or None (no CLS)."""
        return None

    def lm_query_key(self, layer_index: int, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Queries and keys [B, heads, S, head_dim] of decoder layer `layer_index` for its input hidden states
        (before rotary positions; key heads repeated to match query heads), and the attention scale."""
        layer = self.language_layers()[layer_index]
        attn = layer.self_attn
        normed = layer.input_layernorm(hidden_states)
        batch, length = normed.shape[:2]
        q = attn.q_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(normed).view(batch, length, -1, attn.head_dim).transpose(1, 2)
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        return q, k, float(attn.scaling)
