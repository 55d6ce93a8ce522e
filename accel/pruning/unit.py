"""Visual token pruning installed on one VLM instance, with torch module hooks (all removable).

Hooks, per instance:

1. The top-level model: a forward pre-hook takes `labels` out of the call and a forward hook computes the
   loss on the labels of the tokens the language model kept (the logits are as short as its sequence).
2. `adapter.multimodal_model()` (e.g. `LlavaModel`): a forward pre-hook remembers the call's inputs
   (`input_ids`, pixel values, grids, ...) and a forward hook forgets them; the language model receives
   only embeddings.
3. With a [CLS] score: a pre-hook on the vision self-attention whose output LLaVA uses computes the CLS
   query's attention row (one row, the tower keeps SDPA), and a hook on the projector pairs those rows
   with the image features they score. A prompt's images are matched to them by value, so generate()
   may repeat images (beams, several sequences per prompt) or re-run the prompt (`use_cache=False`).
4. The language model (`adapter.language_model()`), a forward pre-hook that rewrites its keyword
   arguments:
   - prefill: drop visual tokens from `inputs_embeds`, `attention_mask` and `position_ids` (gathered, so
     kept tokens keep their original positions, M-RoPE included), left-pad rows to a common length;
   - decode: generate() keeps the full-length attention mask and original positions; the hook swaps the
     prefill part of the mask for the shortened one so the mask matches the shorter KV cache (one record
     per live cache, so interleaved generations, e.g. assisted decoding, each keep theirs). Positions
     generate() computes from the full mask are the original ones, so Qwen's `rope_deltas` stays right.
   With `where="in_lm"` the language model runs unchanged up to `config.layer` and `accel.pruning.inlm`
   does the dropping there.

A call that changes nothing (text only, or every visual token kept) is passed through untouched, so
`keep_ratio=1.0` is the identity, `attention_mask=None` (padding-free packed sequences) included.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch

from .._transformers_compat import cache_length, crop_cache, get_cache, output_cache
from .._unit import Unit
from ..errors import ConfigError
from ..report import Report
from .config import PruneConfig
from .errors import PruneError, compile_refusal
from .segments import Segment, find_segments, left_pad
from .select import Selection, distinct_scores, keeps_all, sampled_attention, select_segment

_MAX_PENDING_ROWS = 16  # vision-tower runs whose [CLS] rows wait for the projector
_IGNORE_INDEX = -100  # transformers' label of positions without a loss


@dataclass
class Compressed:
    """What decode steps need to know about a pruned prefill (one per KV cache)."""

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
    def __init__(self, adapter, config: PruneConfig, score: str):
        self.adapter = adapter
        self.config = config
        self.score = score  # "cls" | "distinct" | "sampled" (resolved from config.score)
        self._handles: list = []
        self._call: dict | None = None
        self._cls_pending: list[torch.Tensor] = []  # [CLS] rows of tower runs not yet paired with features
        self._cls_images: tuple[torch.Tensor, torch.Tensor] | None = None  # features [N, T, D], scores [N, T]
        self._states: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # KV cache -> Compressed
        self._new_cache_state: Compressed | None = None  # for the cache a pruned prefill's model creates
        self._lm_inputs: tuple | None = None  # (attention_mask, position_ids) the language model got, for in_lm
        self._labels: dict | None = None  # labels taken out of the current top-level call
        self._changed: tuple[list[torch.Tensor], int] | None = None  # (kept per row, length) of a pruned call
        self.answer_tokens = 0  # tokens of the current call after its prompt (assisted generation's drafts)
        self._refuse_compile = compile_refusal()
        self.last: CallStats | None = None
        self.calls = 0
        self.visual_in_total = 0
        self.visual_kept_total = 0

    # ---- install / remove ----------------------------------------------------------------------------------

    def install(self) -> None:
        top = self.adapter.model
        self._handles.append(top.register_forward_pre_hook(self._top_pre, with_kwargs=True))
        self._handles.append(top.register_forward_hook(self._top_post, with_kwargs=True, always_call=True))
        mm = self.adapter.multimodal_model()
        self._handles.append(mm.register_forward_pre_hook(self._remember_call, with_kwargs=True))
        self._handles.append(mm.register_forward_hook(self._forget_call, always_call=True))
        if self.score == "cls" and self.config.where == "before_lm":
            attn = self.adapter.cls_attention_module()
            self._handles.append(attn.register_forward_pre_hook(self._cls_row, with_kwargs=True))
            self._handles.append(self.adapter.projector().register_forward_hook(self._cls_features))
        lm = self.adapter.language_model()
        self._handles.append(lm.register_forward_pre_hook(self._language_model_pre, with_kwargs=True))
        self._handles.append(lm.register_forward_hook(self._language_model_post, always_call=True))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._call = self._lm_inputs = self._cls_images = self._labels = self._changed = self._new_cache_state = None
        self._states = weakref.WeakKeyDictionary()
        self._cls_pending.clear()

    def describe(self) -> str:
        return self.config.describe()

    def update_report(self, report: Report) -> None:
        last = self.last
        report.stats["prune"] = {  # layout documented in accel.report
            "calls": self.calls,
            "visual_tokens_in_total": self.visual_in_total,
            "visual_tokens_kept_total": self.visual_kept_total,
            "last_call": None
            if last is None
            else {
                "visual_tokens_in": list(last.visual_in),
                "visual_tokens_kept": list(last.visual_kept),
                "sequence_in": last.sequence_in,
                "sequence_out": last.sequence_out,
                "video_tokens_merged": last.temporal_merged,
            },
        }

    # ---- hooks ---------------------------------------------------------------------------------------------

    def check_not_compiling(self) -> None:
        if torch.compiler.is_compiling():
            self._refuse_compile()

    def _top_pre(self, module, args, kwargs):
        self.check_not_compiling()
        self._changed = self._labels = None
        # Assisted generation prefills the prompt with the draft tokens after it and asks for the logits of
        # the last `logits_to_keep` positions: the prompt ends where those start (in_lm scores with its end).
        keep_logits = kwargs.get("logits_to_keep")
        self.answer_tokens = keep_logits - 1 if isinstance(keep_logits, int) and keep_logits > 0 else 0
        labels = {k: kwargs[k] for k in ("labels", "shift_labels") if kwargs.get(k) is not None}
        if not labels:
            return None
        # The model's own loss would compare full-length labels with shortened logits: it is computed after.
        self._labels = labels
        return args, {k: v for k, v in kwargs.items() if k not in labels}

    def _top_post(self, module, args, kwargs, output):
        labels, self._labels = self._labels, None
        changed, self._changed = self._changed, None
        self.answer_tokens = 0
        if labels is None or output is None:
            return None
        if changed is not None:
            labels = {k: _gather_rows(v, *changed, fill=_IGNORE_INDEX) for k, v in labels.items()}
        logits = output["logits"] if isinstance(output, dict) else output[0]
        extra = {k: kwargs[k] for k in ("num_items_in_batch", "ignore_index") if k in kwargs}
        if "shift_labels" in labels:
            extra["shift_labels"] = labels["shift_labels"]
        loss = module.loss_function(logits=logits, labels=labels.get("labels"), vocab_size=logits.shape[-1], **extra)
        if isinstance(output, dict):  # a ModelOutput: rebuilt so that loss comes first, as the model returns it
            return type(output)(loss=loss, **{k: v for k, v in output.items() if k != "loss"})
        return (loss, *output)

    def _remember_call(self, module, args, kwargs):
        self.check_not_compiling()
        call = dict(kwargs)
        if args:
            call.setdefault("input_ids", args[0])
        self._call = call

    def _forget_call(self, module, args, output):
        self._call = None

    @torch.no_grad()
    def _cls_row(self, module, args, kwargs):
        self.check_not_compiling()
        if len(self._cls_pending) >= _MAX_PENDING_ROWS:
            self._cls_pending.pop(0)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        self._cls_pending.append(self.adapter.cls_attention_row(module, hidden))

    def _cls_features(self, module, args, output):
        """The projector's output: the image features the pending [CLS] rows score, in the same order."""
        if not self._cls_pending:
            return
        scores = self.adapter.cls_feature_scores(torch.cat(self._cls_pending))
        self._cls_pending.clear()
        n, t = scores.shape
        if not isinstance(output, torch.Tensor) or output.numel() != n * t * output.shape[-1]:
            self._cls_images = None
            return
        # Kept until the next image batch: generate() reuses these features for every step and copy of a prompt.
        self._cls_images = (output.detach().reshape(n, t, -1), scores)

    def _language_model_pre(self, module, args, kwargs):
        self.check_not_compiling()
        self._new_cache_state = None
        if self.config.where == "in_lm":
            self._lm_inputs = (kwargs.get("attention_mask"), kwargs.get("position_ids"))
            return None
        cache = get_cache(module, args, kwargs)
        past = cache_length(cache)
        if past > 0:
            return self._decode_step(args, kwargs, cache, past)
        call = self._call
        embeds = kwargs.get("inputs_embeds")
        ids = None if call is None else call.get("input_ids")
        if embeds is None or ids is None or ids.shape != embeds.shape[:2]:
            return None  # not a multimodal call we can map (e.g. inputs_embeds given by the user)
        segments = self.segments(ids, kwargs.get("position_ids"), call)
        if not segments:
            return None
        with torch.no_grad():
            new = self._prefill(kwargs, ids, segments)
        if new is None:
            return None
        self.check_rebuild(module, kwargs.get("attention_mask"), kwargs.get("position_ids"))
        state = Compressed(full_length=ids.shape[1], mask=new["attention_mask"])
        if cache is not None:
            self._states[cache] = state
        else:  # the language model may create its cache itself (older transformers): taken from its output
            self._new_cache_state = state
        kwargs = dict(kwargs)
        kwargs.update(new)
        _renumber_cache_position(kwargs, 0, new["inputs_embeds"].shape[1])
        return args, kwargs

    def _language_model_post(self, module, args, output):
        state, self._new_cache_state = self._new_cache_state, None
        cache = output_cache(output) if state is not None else None
        if cache is not None:
            self._states[cache] = state

    # ---- prefill -------------------------------------------------------------------------------------------

    def segments(self, ids: torch.Tensor, positions, call: dict) -> list[Segment]:
        """The image and video segments of a prefill whose call carries images / videos (a text-only call whose
        ids happen to hold a placeholder id has none)."""
        kinds = self.adapter.visual_inputs(call)
        if not kinds:
            return []
        if positions is None:
            positions = torch.arange(ids.shape[1], device=ids.device).expand(ids.shape)
        return find_segments(self.adapter, ids, positions, images="image" in kinds, videos="video" in kinds)

    def check_rebuild(self, module, mask, positions) -> None:
        """Refuse what a shortened sequence cannot serve; called once a prefill does drop tokens."""
        if module.training and torch.is_grad_enabled():
            raise PruneError(
                "visual token pruning rebuilds the language model's inputs without gradients, so training would "
                "silently lose them; call model.eval() or run under torch.no_grad(), or patch with prune=False "
                "for training"
            )
        text_positions = self.adapter.mask_positions(positions) if mask is None else None
        if text_positions is not None and bool((text_positions.diff(dim=-1) != 1).any()):
            raise PruneError(
                "padding-free packed sequences (position_ids restarting, no attention mask) cannot be pruned: a "
                "shortened sequence has gaps in its positions that would read as new sequences. Pass an attention "
                "mask per sequence (one row each), or use PruneConfig(keep_ratio=1.0)"
            )

    def _prefill(self, kwargs: dict, ids: torch.Tensor, segments: list[Segment]) -> dict | None:
        """The shortened inputs, or None when every visual token is kept unchanged."""
        embeds = kwargs["inputs_embeds"]
        batch, length = ids.shape
        stats = self._new_stats(batch, length)
        keep = torch.ones(batch, length, dtype=torch.bool, device=embeds.device)
        if keeps_all(self.config):  # nothing to score
            for segment in segments:
                stats.visual_in[segment.row] += segment.length
                stats.visual_kept[segment.row] += segment.length
            self._finish_stats(stats, [row.nonzero().squeeze(1) for row in keep], length)
            return None
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=embeds.device).expand(batch, length)
        scores = self._segment_scores(embeds, segments)
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
        self._finish_stats(stats, kept, out_length)
        if bool(keep.all()):
            return None  # all kept: the features are the originals too (merging only happens when tokens go)
        mask = attention_mask_2d(kwargs.get("attention_mask"), batch, length, embeds.device)
        self._changed = (kept, out_length)
        return {
            "inputs_embeds": _gather_rows(embeds, kept, out_length),
            "attention_mask": _gather_rows(mask, kept, out_length),
            "position_ids": left_pad([positions[..., b, k] for b, k in enumerate(kept)], out_length),
        }

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
            return self._cls_scores(embeds, segments)
        if self.score == "distinct":
            return [distinct_scores(embeds[segment.row, segment.positions]) for segment in segments]
        scores = []
        for segment in segments:
            x = embeds[segment.row : segment.row + 1, segment.positions]
            q, k, scale = self.adapter.lm_query_key(0, x)
            scores.append(sampled_attention(q[0], k[0], self.config.sampled_queries, scale))
        return scores

    def _cls_scores(self, embeds: torch.Tensor, segments: list[Segment]) -> list[torch.Tensor]:
        """[CLS] scores of each image segment: those of the encoded image whose features it holds."""
        features, rows = self._cls_images if self._cls_images is not None else (embeds.new_empty(0, 0, 0), None)
        features = features.to(embeds.device, embeds.dtype)  # as the model casts them before scattering
        scores = []
        for k, segment in enumerate(s for s in segments if not s.video):
            x = embeds[segment.row, segment.positions]
            n = features.shape[0]
            order = [k, *range(n)] if k < n else range(n)  # without repeats, image k is encoded image k
            match = next((i for i in order if features.shape[1:] == x.shape and torch.equal(features[i], x)), None)
            if match is None:
                raise PruneError(
                    f"image {k} of the batch (row {segment.row}) is none of the {n} images the vision tower encoded "
                    "last, so it has no [CLS] score: pass pixel_values with the prompt (image features computed "
                    "before accel.patch, or with another model, cannot be scored), or use PruneConfig(score='distinct')"
                )
            scores.append(rows[match].to(embeds.device))
        return scores

    def _select(
        self, segment: Segment, x: torch.Tensor, score: torch.Tensor, config: PruneConfig | None = None
    ) -> Selection:
        structural = self.adapter.structural_token_mask(x)
        frame_len = segment.frame_len if segment.video else None
        return select_segment(x, score, config or self.config, frame_len=frame_len, structural=structural)

    # ---- decode --------------------------------------------------------------------------------------------

    def _decode_step(self, args, kwargs, cache, past: int):
        state = self._states.get(cache)
        if state is None:
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
            tail = torch.ones(
                batch, past - state.mask.shape[1] + new_tokens, dtype=state.mask.dtype, device=state.mask.device
            )
        else:
            tail = mask[:, state.full_length :].to(state.mask.dtype)
            expected = state.mask.shape[1] + tail.shape[1] - new_tokens
            if past > expected:  # drafts assisted decoding rejected, cropped by an unpruned length (older transformers)
                crop_cache(cache, expected)
                past = cache_length(cache)
            if tail.shape[1] != past - state.mask.shape[1] + new_tokens:
                raise PruneError(
                    f"attention mask of length {mask.shape[1]} does not continue the pruned prompt of "
                    f"{state.full_length} tokens ({past} cached after pruning); pass the mask generate() builds"
                )
        kwargs = dict(kwargs)
        kwargs["attention_mask"] = torch.cat([state.mask, tail], dim=1)
        _renumber_cache_position(kwargs, past, new_tokens)
        return args, kwargs


def _renumber_cache_position(kwargs: dict, past: int, new_tokens: int) -> None:
    """Older transformers (5.0 among them) pass `cache_position`, where the new tokens go in the KV cache (the
    mask is built from it too): in the pruned cache they go right after what it holds."""
    position = kwargs.get("cache_position")
    if position is not None:
        kwargs["cache_position"] = torch.arange(past, past + new_tokens, device=position.device)


def _gather_rows(t: torch.Tensor, kept: list[torch.Tensor], length: int, fill=0) -> torch.Tensor:
    """[B, S, ...] -> [B, length, ...]: row b's `kept[b]` positions, left padded with `fill` (as generation pads)."""
    out = t.new_full((t.shape[0], length, *t.shape[2:]), fill)
    for b, k in enumerate(kept):
        out[b, length - k.numel() :] = t[b, k]
    return out


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
        raise ConfigError(
            f"PruneConfig(score='cls'): {adapter.display_name}'s vision tower has no [CLS] token at the feature "
            "layer; use score='distinct' or 'sampled' (or 'auto')"
        )
    if config.score == "auto":
        return "cls" if has_cls else "distinct"
    return config.score


__all__ = ["Compressed", "CallStats", "PruneError", "PruneUnit", "attention_mask_2d", "resolve_score"]
