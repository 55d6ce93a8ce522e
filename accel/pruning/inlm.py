"""FastV-style pruning inside the language model: drop visual tokens after decoder layer `config.layer`.

Layers before K see every token (their KV caches hold the full prompt); at layer K the attention of the
last `text_queries` prompt tokens over the visual tokens is recomputed for those query rows only (layer
K's own query/key projections and rotary positions, so the model keeps SDPA / FlashAttention), the
lowest-scoring visual tokens are dropped, and layers K.. run on the shorter sequence. Their KV caches are
shorter too, so every call gives them their own mask, built by transformers' `create_causal_mask` against
layer K's cache (`layer_idx=K`), and the gathered rotary embeddings at prefill.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from .._transformers_compat import create_causal_mask, get_cache, supports_mask_layer
from ..errors import UnsupportedModelError
from .segments import find_segments
from .unit import PruneError, PruneUnit, attention_mask_2d

_OVERRIDES = ("attention_mask", "position_embeddings", "position_ids")


def install_in_lm(unit: PruneUnit) -> None:
    layers = unit.adapter.language_layers()
    k = unit.config.layer
    if k >= len(layers):
        raise ValueError(
            f"PruneConfig(where='in_lm', layer={k}): the language model has only {len(layers)} layers; "
            f"use a layer below {len(layers)}"
        )
    lm_config = unit.adapter.language_model().config
    if any(t != "full_attention" for t in getattr(lm_config, "layer_types", None) or ()):
        raise ValueError("PruneConfig(where='in_lm') supports full-attention language models only (no sliding window)")
    if not supports_mask_layer():
        import transformers

        raise UnsupportedModelError(
            f"PruneConfig(where='in_lm') needs a transformers whose create_causal_mask takes layer_idx (transformers "
            f"{transformers.__version__} does not); upgrade transformers or use where='before_lm'"
        )
    state = _InLM(unit, k, lm_config)
    unit._handles.append(layers[k].register_forward_pre_hook(state.at_layer_k, with_kwargs=True))
    for layer in layers[k + 1 :]:
        unit._handles.append(layer.register_forward_pre_hook(state.after_layer_k, with_kwargs=True))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding as transformers' decoders apply it (cos/sin [B, S, d], halves rotated)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[:, None] + rotated * sin[:, None]


class _InLM:
    def __init__(self, unit: PruneUnit, k: int, lm_config):
        self.unit = unit
        self.k = k
        self.lm_config = lm_config
        self.select_config = replace(unit.config, contextual=0.0, temporal_threshold=None)
        self.overrides: dict | None = None  # kwargs for layers K+1.. in the current forward
        self.prompt_mask: torch.Tensor | None = None  # [B, L] mask of the shortened prompt
        self.full_length = 0
        self.cache = None

    def _mask(self, hidden, mask2d, cache, positions):
        return create_causal_mask(self.lm_config, hidden, mask2d, cache, positions, layer_idx=self.k)

    def at_layer_k(self, module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = get_cache(module, args, kwargs)
        lm_inputs = self.unit._lm_inputs
        self.overrides = None
        if cache is not None and cache.get_seq_length(self.k) > 0:
            if self.cache is not cache or lm_inputs is None:
                return None
            return self._decode(args, kwargs, hidden, cache, lm_inputs)
        self.cache = None
        call = self.unit._call
        if lm_inputs is None or call is None or call.get("input_ids") is None:
            return None
        ids = call["input_ids"]
        if ids.shape != hidden.shape[:2] or not bool(self.unit.adapter.visual_token_mask(ids).any()):
            return None
        with torch.no_grad():
            return self._prefill(args, kwargs, hidden, cache, ids, lm_inputs)

    def after_layer_k(self, module, args, kwargs):
        if self.overrides is None:
            return None
        kwargs = dict(kwargs)
        kwargs.update(self.overrides)
        return args, kwargs

    def _prefill(self, args, kwargs, hidden, cache, ids, lm_inputs):
        mask2d, positions = lm_inputs
        batch, length, _ = hidden.shape
        mask2d = attention_mask_2d(mask2d, batch, length, hidden.device)
        layer_positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=hidden.device).expand(batch, length)
        cos, sin = kwargs["position_embeddings"]
        q, key, scale = self.unit.adapter.lm_query_key(self.k, hidden)
        n_q = self.unit.config.text_queries
        q, key = _rotate(q[:, :, -n_q:], cos[:, -n_q:], sin[:, -n_q:]), _rotate(key, cos, sin)
        logits = torch.einsum("bhqd,bhkd->bhqk", q.float(), key.float()) * scale
        logits = logits.masked_fill(~mask2d.bool()[:, None, None, :], float("-inf"))
        scores = logits.softmax(-1).mean((1, 2))  # [B, S]: attention of the last prompt tokens

        segments = find_segments(self.unit.adapter, ids, positions)
        stats = self.unit._new_stats(batch, length)
        keep = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        for segment in segments:
            x = hidden[segment.row, segment.positions]
            selection = self.unit._select(segment, x, scores[segment.row, segment.positions], self.select_config)
            keep[segment.row, segment.positions] = False
            keep[segment.row, selection.index + segment.start] = True
            stats.visual_in[segment.row] += segment.length
            stats.visual_kept[segment.row] += selection.index.numel()
        kept = [keep[b].nonzero().squeeze(1) for b in range(batch)]
        out = max(k.numel() for k in kept)

        def gather(t: torch.Tensor, fill=0) -> torch.Tensor:  # [B, S, ...] -> [B, out, ...], left padded
            new = t.new_full((batch, out, *t.shape[2:]), fill)
            for b, k in enumerate(kept):
                new[b, out - k.numel() :] = t[b, k]
            return new

        new_hidden = gather(hidden)
        new_mask2d = gather(mask2d)
        new_cos = gather(cos.expand(batch, *cos.shape[1:]))
        new_sin = gather(sin.expand(batch, *sin.shape[1:]))
        new_layer_positions = None
        if layer_positions is not None:
            new_layer_positions = gather(layer_positions.expand(batch, length))
        self.overrides = {
            "attention_mask": self._mask(new_hidden, new_mask2d, cache, new_layer_positions),
            "position_embeddings": (new_cos, new_sin),
            "position_ids": new_layer_positions,
        }
        if cache is not None:
            self.cache, self.prompt_mask, self.full_length = cache, new_mask2d, length
        self.unit._finish_stats(stats, kept, out)
        kwargs = dict(kwargs)
        kwargs.update(self.overrides)
        if args:
            return (new_hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = new_hidden
        return args, kwargs

    def _decode(self, args, kwargs, hidden, cache, lm_inputs):
        mask2d, _ = lm_inputs
        batch, new_tokens = hidden.shape[:2]
        cached = cache.get_seq_length(self.k)
        if mask2d is None:
            tail = self.prompt_mask.new_ones(batch, cached - self.prompt_mask.shape[1] + new_tokens)
        else:
            if isinstance(mask2d, dict) or mask2d.ndim != 2:
                raise PruneError("PruneConfig(where='in_lm') needs the 2-D attention mask during decoding")
            tail = mask2d[:, self.full_length :].to(self.prompt_mask.dtype)
        full = torch.cat([self.prompt_mask, tail], dim=1)
        self.overrides = {"attention_mask": self._mask(hidden, full, cache, kwargs.get("position_ids"))}
        kwargs = dict(kwargs)
        kwargs.update(self.overrides)
        return args, kwargs
