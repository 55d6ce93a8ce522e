"""Visual token pruning installed on one VLM instance, with torch module hooks (all removable).

Hooks, per instance:

1. `adapter.multimodal_model()` (e.g. `LlavaModel`): a forward pre-hook remembers the call's inputs
   (`input_ids`, grids, ...) and a forward hook forgets them; the language model receives only embeddings.
2. With a [CLS] score: a pre-hook on the vision self-attention whose output LLaVA uses computes the CLS
   query's attention row (one row, the tower keeps SDPA).
3. The language model (`adapter.language_model()`), a forward pre-hook that rewrites its keyword
   arguments:
   - prefill: drop visual tokens from `inputs_embeds`, `attention_mask` and `position_ids` (gathered, so
     kept tokens keep their original positions, M-RoPE included), left-pad rows to a common length;
   - decode: generate() keeps the full-length attention mask and original positions; the hook swaps the
     prefill part of the mask for the shortened one so the mask matches the shorter KV cache. Positions
     generate() computes from the full mask are the original ones, so Qwen's `rope_deltas` stays right.
   With `where="in_lm"` the language model runs unchanged up to `config.layer` and `accel.pruning.inlm`
   does the dropping there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .._transformers_compat import cache_length, get_cache
from .._unit import Unit
from ..report import Report
from .config import PruneConfig
from .segments import Segment, find_segments, left_pad
from .select import Selection, sampled_attention, select_segment


_MAX_PENDING_ROWS = 16  # vision-tower runs whose [CLS] rows wait for a prefill


class PruneError(RuntimeError):
    """The inputs of a call cannot be pruned consistently (the message says why and what to do)."""


@dataclass
class Compressed:
    """What decode steps need to know about the last pruned prefill."""

    cache: object  # the KV cache object the prefill filled
    full_length: int  # prompt length generate() sees
    mask: torch.Tensor  # [B, L] the shortened prompt's attention mask


@dataclass
class CallStats:
    visual_in: list[int] = field(default_factory=list)  # per row
    visual_kept: list[int] = field(default_factory=list)
    sequence_in: int = 0
    sequence_out: int = 0
    temporal_merged: int = 0
    kept_index: list[torch.Tensor] = field(default_factory=list)  # per row: kept positions of the full prompt


class PruneUnit(Unit):
    name = "prune"

    def __init__(self, adapter, config: PruneConfig, score: str):
        self.adapter = adapter
        self.config = config
        self.score = score  # "cls" | "sampled" (resolved from config.score)
        self._handles: list = []
        self._call: dict | None = None
        self._cls_rows: list[torch.Tensor] = []
        self._state: Compressed | None = None
        self._lm_inputs: tuple | None = None  # (attention_mask, position_ids) the language model got, for in_lm
        self.last: CallStats | None = None
        self.calls = 0
        self.visual_in_total = 0
        self.visual_kept_total = 0

    # ---- install / remove ----------------------------------------------------------------------------------

    def install(self) -> None:
        mm = self.adapter.multimodal_model()
        self._handles.append(mm.register_forward_pre_hook(self._remember_call, with_kwargs=True))
        self._handles.append(mm.register_forward_hook(self._forget_call, always_call=True))
        if self.score == "cls" and self.config.where == "before_lm":
            attn = self.adapter.cls_attention_module()
            self._handles.append(attn.register_forward_pre_hook(self._cls_row, with_kwargs=True))
        lm = self.adapter.language_model()
        self._handles.append(lm.register_forward_pre_hook(self._language_model_pre, with_kwargs=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._call = self._state = self._lm_inputs = None
        self._cls_rows.clear()

    def describe(self) -> str:
        return self.config.describe()

    def update_report(self, report: Report) -> None:
        stats = {
            "calls (prefills with visual tokens)": self.calls,
            "visual tokens in, total": self.visual_in_total,
            "visual tokens kept, total": self.visual_kept_total,
        }
        if self.last is not None:
            stats["last call: visual tokens in per row"] = list(self.last.visual_in)
            stats["last call: visual tokens kept per row"] = list(self.last.visual_kept)
            stats["last call: sequence length in -> out"] = f"{self.last.sequence_in} -> {self.last.sequence_out}"
            if self.last.temporal_merged:
                stats["last call: video tokens merged over time"] = self.last.temporal_merged
        report.stats["prune"] = stats

    # ---- hooks ---------------------------------------------------------------------------------------------

    def _remember_call(self, module, args, kwargs):
        call = dict(kwargs)
        if args:
            call.setdefault("input_ids", args[0])
        self._call = call

    def _forget_call(self, module, args, output):
        self._call = None

    @torch.no_grad()
    def _cls_row(self, module, args, kwargs):
        # generate() encodes images before the prefill call, so rows are kept until a prefill takes them.
        if len(self._cls_rows) >= _MAX_PENDING_ROWS:
            self._cls_rows.pop(0)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self._cls_rows.append(self.adapter.cls_attention_row(module, hidden))

    def _language_model_pre(self, module, args, kwargs):
        if self.config.where == "in_lm":
            self._lm_inputs = (kwargs.get("attention_mask"), kwargs.get("position_ids"))
            return None
        cache = get_cache(module, args, kwargs)
        past = cache_length(cache)
        if past > 0:
            return self._decode_step(args, kwargs, cache, past)
        self._state = None
        if self.config.where != "before_lm":
            return None
        call = self._call
        embeds = kwargs.get("inputs_embeds")
        ids = None if call is None else call.get("input_ids")
        if embeds is None or ids is None or ids.shape != embeds.shape[:2]:
            return None  # not a multimodal call we can map (e.g. inputs_embeds given by the user)
        if not bool(self.adapter.visual_token_mask(ids).any()):
            return None
        with torch.no_grad():
            return args, self._prefill(kwargs, ids, call, cache)

    # ---- prefill -------------------------------------------------------------------------------------------

    def _prefill(self, kwargs: dict, ids: torch.Tensor, call: dict, cache) -> dict:
        embeds = kwargs["inputs_embeds"]
        batch, length = ids.shape
        mask = attention_mask_2d(kwargs.get("attention_mask"), batch, length, embeds.device)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=embeds.device).expand(batch, length)
        segments = find_segments(self.adapter, ids, positions)
        scores = self._segment_scores(embeds, segments)

        stats = self._new_stats(batch, length)
        keep = torch.ones(batch, length, dtype=torch.bool, device=embeds.device)
        embeds = embeds.clone()
        for segment, score in zip(segments, scores):
            x = embeds[segment.row, segment.positions]
            selection = self._select(segment, x, score)
            keep[segment.row, segment.positions] = False
            index = selection.index + segment.start
            keep[segment.row, index] = True
            embeds[segment.row, index] = selection.features
            stats.visual_in[segment.row] += segment.length
            stats.visual_kept[segment.row] += selection.index.numel()
            stats.temporal_merged += selection.temporal_merged

        kept = [keep[b].nonzero().squeeze(1) for b in range(batch)]
        out_length = max(k.numel() for k in kept)
        new_embeds = embeds.new_zeros(batch, out_length, embeds.shape[-1])
        for b, k in enumerate(kept):
            new_embeds[b, out_length - k.numel() :] = embeds[b, k]
        new_mask = left_pad([mask[b, k] for b, k in enumerate(kept)], out_length)
        new_positions = left_pad([positions[..., b, k] for b, k in enumerate(kept)], out_length)

        self._finish_stats(stats, kept, out_length)
        if cache is not None:
            self._state = Compressed(cache=cache, full_length=length, mask=new_mask)
        kwargs = dict(kwargs)
        kwargs.update(inputs_embeds=new_embeds, attention_mask=new_mask, position_ids=new_positions)
        return kwargs

    def _new_stats(self, batch: int, length: int) -> CallStats:
        return CallStats(visual_in=[0] * batch, visual_kept=[0] * batch, sequence_in=length)

    def _finish_stats(self, stats: CallStats, kept: list[torch.Tensor], out_length: int) -> None:
        stats.sequence_out = out_length
        stats.kept_index = kept
        self.last = stats
        self.calls += 1
        self.visual_in_total += sum(stats.visual_in)
        self.visual_kept_total += sum(stats.visual_kept)

    def _segment_scores(self, embeds: torch.Tensor, segments: list[Segment]) -> list[torch.Tensor]:
        if self.score == "cls":
            images = [s for s in segments if not s.video]
            rows = self._take_cls_rows(len(images))
            if rows is None or rows.shape[0] != len(images) or any(s.length != rows.shape[1] for s in images):
                raise PruneError(
                    f"got [CLS] scores for {0 if rows is None else rows.shape[0]} images but the prompt has "
                    f"{len(images)} image segments; pass pixel_values with the prompt (precomputed "
                    "mm_encoder_outputs cannot be pruned with score='cls'), or use PruneConfig(score='sampled')"
                )
            return list(rows.to(embeds.device))
        scores = []
        for segment in segments:
            x = embeds[segment.row : segment.row + 1, segment.positions]
            q, k, scale = self.adapter.lm_query_key(0, x)
            scores.append(sampled_attention(q[0], k[0], self.config.sampled_queries, scale))
        return scores

    def _take_cls_rows(self, images: int) -> torch.Tensor | None:
        """[CLS] scores of the `images` most recently encoded images (then forget all pending rows)."""
        rows, count = [], 0
        while self._cls_rows and count < images:
            rows.insert(0, self._cls_rows.pop())
            count += rows[0].shape[0]
        self._cls_rows.clear()
        if count != images:
            return None
        return self.adapter.cls_feature_scores(torch.cat(rows))

    def _select(self, segment: Segment, x: torch.Tensor, score: torch.Tensor, config: PruneConfig | None = None) -> Selection:
        structural = self.adapter.structural_token_mask(x)
        frame_len = segment.frame_len if segment.video else None
        return select_segment(x, score, config or self.config, frame_len=frame_len, structural=structural)

    # ---- decode --------------------------------------------------------------------------------------------

    def _decode_step(self, args, kwargs, cache, past: int):
        state = self._state
        if state is None or state.cache is not cache:
            return None
        mask = kwargs.get("attention_mask")
        if isinstance(mask, dict) or (mask is not None and mask.ndim != 2):
            raise PruneError(
                "visual token pruning needs the 2-D attention mask during decoding; a prepared 4-D mask "
                "(static / compiled cache) cannot be shortened: use the default dynamic cache"
            )
        embeds = kwargs.get("inputs_embeds")
        new_tokens = embeds.shape[1] if embeds is not None else kwargs["input_ids"].shape[1]
        batch = state.mask.shape[0]
        if mask is None:
            tail = torch.ones(batch, past - state.mask.shape[1] + new_tokens, dtype=state.mask.dtype,
                              device=state.mask.device)
        else:
            tail = mask[:, state.full_length :].to(state.mask.dtype)
            if tail.shape[1] != past - state.mask.shape[1] + new_tokens:
                raise PruneError(
                    f"attention mask of length {mask.shape[1]} does not continue the pruned prompt of "
                    f"{state.full_length} tokens ({past} cached after pruning); pass the mask generate() builds"
                )
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = torch.cat([state.mask, tail], dim=1)
        return args, kwargs


def attention_mask_2d(mask, batch: int, length: int, device) -> torch.Tensor:
    if mask is None:
        return torch.ones(batch, length, dtype=torch.long, device=device)
    if isinstance(mask, dict) or mask.ndim != 2:
        raise PruneError(
            "visual token pruning needs the 2-D attention mask at prefill; a prepared 4-D mask (static / "
            "compiled cache) cannot be shortened: use the default dynamic cache"
        )
    return mask


def resolve_score(adapter, config: PruneConfig) -> str:
    has_cls = adapter.cls_attention_module() is not None
    if config.score == "cls" and not has_cls:
        raise ValueError(
            f"PruneConfig(score='cls'): {adapter.display_name}'s vision tower has no [CLS] token at the feature "
            "layer; use score='sampled' (or 'auto')"
        )
    if config.score == "auto":
        return "cls" if has_cls else "sampled"
    return config.score


__all__ = ["Compressed", "CallStats", "PruneError", "PruneUnit", "attention_mask_2d", "resolve_score"]
