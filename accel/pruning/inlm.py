"""FastV-style pruning inside the language model: drop visual tokens after decoder layer `config.layer`.

Layers before K see every token (their KV caches hold the full prompt); at layer K the attention of the
last `text_queries` prompt tokens over the visual tokens is recomputed for those query rows only (layer
K's own query/key projections and rotary positions, so the model keeps SDPA / FlashAttention), the
lowest-scoring visual tokens are dropped, and layers K.. run on the shorter sequence. Their KV caches are
shorter too, so every call gives them their own mask, built by transformers' `create_causal_mask` against
layer K's cache (`layer_idx=K`), and the gathered rotary embeddings at prefill.

Without a KV cache (`generate(use_cache=False)`) every step runs the whole sequence again; its last tokens
are then generated ones, not the prompt's. A call without a cache whose ids extend the previous such call
row by row therefore keeps that call's selection of the shared part (and every newer token), so each step
prunes the prompt as the cached generation does.
"""

from __future__ import annotations

import weakref
from dataclasses import replace

import torch

from .._transformers_compat import create_causal_mask, get_cache, supports_mask_layer
from ..errors import ConfigError, UnsupportedModelError
from .errors import PruneError
from .select import keeps_all
from .unit import PruneUnit, _gather_rows, attention_mask_2d


def install_in_lm(unit: PruneUnit) -> None:
    layers = unit.adapter.language_layers()
    k = unit.config.layer
    if k >= len(layers):
        raise ConfigError(
            f"PruneConfig(where='in_lm', layer={k}): the language model has only {len(layers)} layers; "
            f"use a layer below {len(layers)}"
        )
    lm_config = unit.adapter.language_model().config
    if any(t != "full_attention" for t in getattr(lm_config, "layer_types", None) or ()):
        raise ConfigError("PruneConfig(where='in_lm') supports full-attention language models only (no sliding window)")
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
        self.select_config = replace(unit.config, contextual=0.0, temporal_threshold=None, duplicate_similarity=None)
        self.overrides: dict | None = None  # kwargs for layers K+1.. in the current forward
        # KV cache -> (mask [B, L] of the shortened prompt, prompt length generate() sees)
        self.prompts: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.uncached: tuple[torch.Tensor, torch.Tensor] | None = None  # (ids, keep) of the last call without cache

    def _mask(self, hidden, mask2d, cache, positions):
        return create_causal_mask(self.lm_config, hidden, mask2d, cache, positions, layer_idx=self.k)

    def at_layer_k(self, module, args, kwargs):
        self.unit.check_not_compiling()
        hidden = args[0] if args else kwargs["hidden_states"]
        cache = get_cache(module, args, kwargs)
        lm_inputs = self.unit._lm_inputs
        self.overrides = None
        if cache is not None and cache.get_seq_length(self.k) > 0:
            prompt = self.prompts.get(cache)
            if prompt is None or lm_inputs is None:
                return None
            return self._decode(args, kwargs, hidden, cache, lm_inputs, *prompt)
        call = self.unit._call
        if lm_inputs is None or call is None or call.get("input_ids") is None:
            return None
        ids = call["input_ids"]
        if ids.shape != hidden.shape[:2]:
            return None
        segments = self.unit.segments(ids, lm_inputs[1], call)
        if not segments:
            return None
        with torch.no_grad():
            keep = self._keep(kwargs, hidden, cache, ids, segments, lm_inputs[0])
        if keep is None:
            return None
        self.unit.check_rebuild(module, *lm_inputs)
        return self._shorten(args, kwargs, hidden, cache, keep, lm_inputs[0])

    def after_layer_k(self, module, args, kwargs):
        if self.overrides is None:
            return None
        kwargs = dict(kwargs)
        kwargs.update(self.overrides)
        return args, kwargs

    def _keep(self, kwargs, hidden, cache, ids, segments, mask2d) -> torch.Tensor | None:
        """Bool [B, S]: the tokens layers K.. see, or None when that is all of them."""
        batch, length = ids.shape
        stats = self.unit._new_stats(batch, length)
        keep = None if cache is not None else self._extended_selection(ids)
        if keep is None and not keeps_all(self.unit.config):
            keep = self._select(kwargs, hidden, ids, segments, mask2d)
        if cache is None:
            self.uncached = (ids, keep if keep is not None else torch.ones_like(ids, dtype=torch.bool))
        full = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        for segment in segments:
            stats.visual_in[segment.row] += segment.length
            row = full[segment.row] if keep is None else keep[segment.row]
            stats.visual_kept[segment.row] += int(row[segment.positions].sum())
        kept = [(full if keep is None else keep)[b].nonzero().squeeze(1) for b in range(batch)]
        self.unit._finish_stats(stats, kept, max(k.numel() for k in kept))
        return None if keep is None or bool(keep.all()) else keep

    def _extended_selection(self, ids: torch.Tensor) -> torch.Tensor | None:
        """The previous uncached call's selection, when every row of `ids` extends one of its rows."""
        if self.uncached is None:
            return None
        old_ids, old_keep = self.uncached
        n = old_ids.shape[1]
        if ids.shape[1] <= n or old_ids.device != ids.device:
            return None
        same = (ids[:, None, :n] == old_ids[None]).all(-1)  # [B, B_old]
        if not bool(same.any(-1).all()):
            return None
        tail = torch.ones(ids.shape[0], ids.shape[1] - n, dtype=torch.bool, device=ids.device)
        return torch.cat([old_keep[same.int().argmax(-1)], tail], dim=1)

    def _select(self, kwargs, hidden, ids, segments, mask2d) -> torch.Tensor:
        batch, length, _ = hidden.shape
        mask2d = attention_mask_2d(mask2d, batch, length, hidden.device)
        cos, sin = kwargs["position_embeddings"]
        q, key, scale = self.unit.adapter.lm_query_key(self.k, hidden)
        end = max(length - self.unit.answer_tokens, 1)
        queries = slice(max(end - self.unit.config.text_queries, 0), end)
        q, key = _rotate(q[:, :, queries], cos[:, queries], sin[:, queries]), _rotate(key, cos, sin)
        logits = torch.einsum("bhqd,bhkd->bhqk", q.float(), key.float()) * scale
        logits = logits.masked_fill(~mask2d.bool()[:, None, None, :], float("-inf"))
        scores = logits.softmax(-1).mean((1, 2))  # [B, S]: attention of the prompt's last tokens
        keep = torch.ones(batch, length, dtype=torch.bool, device=hidden.device)
        for segment in segments:
            x = hidden[segment.row, segment.positions]
            selection = self.unit._select(segment, x, scores[segment.row, segment.positions], self.select_config)
            keep[segment.row, segment.positions] = False
            keep[segment.row, selection.index + segment.start] = True
        return keep

    def _shorten(self, args, kwargs, hidden, cache, keep, mask2d):
        batch, length, _ = hidden.shape
        mask2d = attention_mask_2d(mask2d, batch, length, hidden.device)
        kept = [keep[b].nonzero().squeeze(1) for b in range(batch)]
        out = max(k.numel() for k in kept)
        layer_positions = kwargs.get("position_ids")
        cos, sin = kwargs["position_embeddings"]
        new_hidden = _gather_rows(hidden, kept, out)
        new_mask2d = _gather_rows(mask2d, kept, out)
        new_layer_positions = None
        if layer_positions is not None:
            new_layer_positions = _gather_rows(layer_positions.expand(batch, length), kept, out)
        self.overrides = {
            "attention_mask": self._mask(new_hidden, new_mask2d, cache, new_layer_positions),
            "position_embeddings": (
                _gather_rows(cos.expand(batch, *cos.shape[1:]), kept, out),
                _gather_rows(sin.expand(batch, *sin.shape[1:]), kept, out),
            ),
            "position_ids": new_layer_positions,
        }
        if cache is not None:
            self.prompts[cache] = (new_mask2d, length)
        self.unit._changed = (kept, out)
        kwargs = dict(kwargs)
        kwargs.update(self.overrides)
        if args:
            return (new_hidden, *args[1:]), kwargs
        kwargs["hidden_states"] = new_hidden
        return args, kwargs

    def _decode(self, args, kwargs, hidden, cache, lm_inputs, prompt_mask, full_length):
        mask2d, _ = lm_inputs
        batch, new_tokens = hidden.shape[:2]
        cached = cache.get_seq_length(self.k)
        if mask2d is None:
            tail = prompt_mask.new_ones(batch, cached - prompt_mask.shape[1] + new_tokens)
        else:
            if isinstance(mask2d, dict) or mask2d.ndim != 2:
                raise PruneError("PruneConfig(where='in_lm') needs the 2-D attention mask during decoding")
            tail = mask2d[:, full_length:].to(prompt_mask.dtype)
        full = torch.cat([prompt_mask, tail], dim=1)
        self.overrides = {"attention_mask": self._mask(hidden, full, cache, kwargs.get("position_ids"))}
        kwargs = dict(kwargs)
        kwargs.update(self.overrides)
        return args, kwargs
