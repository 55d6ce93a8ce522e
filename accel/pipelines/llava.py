"""Adapter for LLaVA-1.5 style models (`LlavaForConditionalGeneration`).

Layout in transformers 5.x (`model` is the `LlavaForConditionalGeneration`)::

    model.model                        LlavaModel
    model.model.vision_tower           CLIPVisionModel (AutoModel of vision_config; SigLIP in some variants)
    model.model.multi_modal_projector  LlavaMultiModalProjector: linear_1 -> act -> linear_2
    model.model.language_model         LlamaModel (bare decoder; .layers, .embed_tokens, .norm)
    model.lm_head                      Linear

Transformers 4.x kept `vision_tower` / `multi_modal_projector` / `language_model` (a `*ForCausalLM`) on the
top-level model; the lookups below try both layouts.

Facts pruning will need:

* Image features are `projector(vision_tower(pixel_values, output_hidden_states=True).hidden_states[L])`
  with `L = config.vision_feature_layer` (-2 for LLaVA-1.5, i.e. the *input* of the last CLIP layer, so the
  last CLIP layer's output is never used), and with `vision_feature_select_strategy == "default"` the CLS
  token (index 0) is dropped first: one image gives `(image_size // patch_size) ** 2` features.
* The processor expands `<image>` to exactly that many `image_token_id` placeholders; `LlavaModel.forward`
  checks `n_placeholders * hidden == features.numel()` and `masked_scatter`s the features into the
  placeholder rows of `inputs_embeds`. Dropping visual tokens before the LM therefore means dropping the
  placeholder ids (and attention-mask columns) together with the features, or pruning after the merge.
* The language model uses ordinary 1D RoPE; positions come from the attention mask / cache position, so a
  shortened sequence needs no position bookkeeping beyond the mask.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from accel.pipelines.base import VLMAdapter


def _lookup(model: nn.Module, paths: tuple[str, ...], accept: Callable[[nn.Module], bool] | None = None) -> nn.Module:
    """First dotted attribute path of `model` that exists (and passes `accept`)."""
    for path in paths:
        obj = model
        for name in path.split("."):
            obj = getattr(obj, name, None)
            if obj is None:
                break
        if isinstance(obj, nn.Module) and (accept is None or accept(obj)):
            return obj
    raise AttributeError(f"{type(model).__name__}: none of {paths} found")


def _has_layers(module: nn.Module) -> bool:
    return isinstance(getattr(module, "layers", None), nn.ModuleList)


_PIXEL_INPUTS = {"image": "pixel_values", "video": "pixel_values_videos"}


def visual_inputs(call: dict) -> set[str]:
    """Modalities ("image", "video") one call of the multimodal model carries: pixels, or the features
    generate() encoded before the prefill (`mm_encoder_outputs`, transformers >= 5)."""
    encoded = call.get("mm_encoder_outputs") or {}
    return {kind for kind, key in _PIXEL_INPUTS.items() if call.get(key) is not None or encoded.get(kind) is not None}


class LlavaAdapter(VLMAdapter):
    """LLaVA / LLaVA-1.5: CLIP vision tower (CLS token), MLP projector, Llama decoder."""

    family = "llava"
    display_name = "LLaVA-1.5"
    quant_exclude = (
        "model.vision_tower.*",
        "vision_tower.*",
        "model.multi_modal_projector.*",
        "multi_modal_projector.*",
        "lm_head",
    )
    model_classes = (
        "transformers.models.llava.modeling_llava:LlavaForConditionalGeneration",
        "transformers:LlavaForConditionalGeneration",
    )

    # ---- structure ---------------------------------------------------------------------------------------

    def vision_tower(self) -> nn.Module:
        return _lookup(self.model, ("model.vision_tower", "vision_tower"))

    def projector(self) -> nn.Module:
        return _lookup(self.model, ("model.multi_modal_projector", "multi_modal_projector"))

    def language_model(self) -> nn.Module:
        """The bare decoder (`LlamaModel`, `Qwen2Model`, ...): has `.layers`, `.embed_tokens`, `.norm`."""
        return _lookup(
            self.model,
            ("model.language_model", "language_model.model", "language_model"),
            accept=_has_layers,
        )

    def language_layers(self) -> nn.ModuleList:
        return self.language_model().layers

    def vision_layers(self) -> nn.ModuleList:
        """Encoder layers of the vision tower (CLIP / SigLIP: `vision_model.encoder.layers`)."""
        tower = self.vision_tower()
        return _lookup(tower, ("vision_model.encoder.layers", "encoder.layers"))

    # ---- tokens ------------------------------------------------------------------------------------------

    def image_token_id(self) -> int:
        config = self.model.config
        token = getattr(config, "image_token_id", None)
        return int(token if token is not None else config.image_token_index)

    def video_token_id(self) -> int | None:
        return None

    def has_cls_token(self) -> bool:
        """Whether the vision tower prepends a CLS token (CLIP: yes; SigLIP: no)."""
        tower = self.vision_tower()
        embeddings = getattr(getattr(tower, "vision_model", tower), "embeddings", None)
        return getattr(embeddings, "class_embedding", None) is not None

    def vision_feature_layer(self) -> int | list[int]:
        return self.model.config.vision_feature_layer

    def vision_feature_select_strategy(self) -> str:
        """ "default" drops the CLS token before the projector; "full" keeps every position."""
        return self.model.config.vision_feature_select_strategy

    def tokens_per_image(self) -> int:
        """Placeholders per image: patches, plus CLS when the tower has one and the strategy is "full"."""
        vision = self.model.config.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        keep_cls = self.has_cls_token() and self.vision_feature_select_strategy() == "full"
        return patches + int(keep_cls)

    # ---- facts for visual token pruning (accel.pruning) ------------------------------------------------------

    def image_segment_length(self) -> int | None:
        return self.tokens_per_image()

    def visual_inputs(self, call: dict) -> set[str]:
        return visual_inputs(call)

    def mask_positions(self, position_ids: torch.Tensor | None) -> torch.Tensor | None:
        """The [B, S] positions the language model reads padding-free packed sequences from (no mask given)."""
        return position_ids if position_ids is not None and position_ids.ndim == 2 else None

    def cls_attention_module(self) -> nn.Module | None:
        """Self-attention of the vision layer whose output LLaVA feeds the projector (`vision_feature_layer`)."""
        layer = self.vision_feature_layer()
        if not self.has_cls_token() or not isinstance(layer, int):
            return None
        layers = self.vision_layers()
        index = layer % (len(layers) + 1) - 1  # hidden_states[0] is the embedding output
        return layers[index].self_attn if index >= 0 else None

    def cls_attention_row(self, attn: nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
        """Attention of the [CLS] query (position 0) over all positions, mean over heads: [N, T]. Only this one
        query row is computed, so the tower itself keeps running SDPA / FlashAttention."""
        batch, length, _ = hidden_states.shape
        q = attn.q_proj(hidden_states[:, :1]).view(batch, 1, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = attn.k_proj(hidden_states).view(batch, length, attn.num_heads, attn.head_dim).transpose(1, 2)
        logits = (q.float() @ k.float().transpose(-1, -2)) * attn.scale
        return logits.softmax(-1).mean(1)[:, 0]

    def cls_feature_scores(self, row: torch.Tensor) -> torch.Tensor:
        """Per-feature scores from `cls_attention_row`: the CLS column is dropped with the "default" strategy and
        ranked first with "full" (where the CLS token is itself a feature)."""
        if self.vision_feature_select_strategy() == "default":
            return row[:, 1:]
        row = row.clone()
        row[:, 0] = row.max(-1).values + 1.0
        return row
