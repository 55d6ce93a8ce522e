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


class Adapter:
    family: ClassVar[str]  # short key, e.g. "flux"
    kind: ClassVar[str]  # "dit" | "unet" | "vlm"
    display_name: ClassVar[str]  # e.g. "FLUX (FluxTransformer2DModel)"
    model_classes: ClassVar[tuple[str, ...]]  # "module:Class" of the models this adapter serves

    def __init__(self, model: nn.Module):
        self.model = model

    @classmethod
    def matches(cls, model: Any) -> bool:
        classes = resolve_classes(cls.model_classes)
        return bool(classes) and isinstance(model, classes)

    def describe(self) -> str:
        return f"{self.display_name}: {type(self.model).__name__}"


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

    def block_lists(self) -> list[nn.ModuleList]:
        """The block lists in the order the forward calls them."""
        raise NotImplementedError

    def blocks(self) -> list[nn.Module]:
        return [block for blocks in self.block_lists() for block in blocks]

    def block_io(self, block: nn.Module) -> BlockIO:
        raise NotImplementedError

    def latent_grid(self, args: tuple, kwargs: dict) -> LatentGrid:
        """Grid of visual tokens for one call of the denoiser, from that call's arguments."""
        raise NotImplementedError


class UNetAdapter(Adapter):
    """A UNet: conv_in, down blocks, mid block, up blocks, conv_out."""

    kind = "unet"

    def down_blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def mid_block(self) -> nn.Module | None:
        raise NotImplementedError

    def up_blocks(self) -> list[nn.Module]:
        raise NotImplementedError


class VLMAdapter(Adapter):
    """A transformers vision-language model."""

    kind = "vlm"

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
