"""The two baselines every visual token pruning paper reports, for Qwen2-VL-style models (M-RoPE, one LM token per
merged patch), written independently of `accel.pruning` so that they measure the budget, not accel's plumbing:

* random keep: `round(n * keep_ratio)` visual tokens of each image or video chosen uniformly at random (seeded);
* uniform spatial pooling: each frame's token grid average-pooled in (ph, pw) blocks with ph * pw = 1 / ratio
  (50%: 1x2, 25%: 2x2, 12.5%: 2x4); a pooled token takes the M-RoPE position of its block's first token.

Both act on the prefill of the language model: a pre-hook on the multimodal model remembers the call's ids and
grids, a pre-hook on the language model drops (or pools) visual rows of `inputs_embeds`, `attention_mask` and
`position_ids` (gathered, so kept tokens keep their positions). Batches must hold one kind of media (every row the
same number of visual tokens), as `accel.bench.pruning_accuracy` runs them.

    with Baseline(model, "random", keep_ratio=0.25, seed=0) as b:
        logits = model(**inputs).logits
    b.visual_in, b.visual_kept, b.sequence_out
"""

from __future__ import annotations

import torch

from accel.errors import NotApplicableError

KINDS = ("random", "pooling")
POOL = {0.5: (1, 2), 0.25: (2, 2), 0.125: (2, 4)}  # keep ratio -> (rows, columns) pooled into one token


class Baseline:
    def __init__(self, model, kind: str, keep_ratio: float, seed: int = 0):
        if kind not in KINDS:
            raise ValueError(f"unknown baseline {kind!r}; choose one of {', '.join(KINDS)}")
        if kind == "pooling" and keep_ratio not in POOL:  # the benchmark's table shows it as unsupported
            raise NotApplicableError(f"uniform pooling takes keep ratios {sorted(POOL)}, not {keep_ratio}")
        self.model, self.kind, self.ratio = model, kind, keep_ratio
        self.gen = torch.Generator().manual_seed(seed)
        self.call: dict | None = None
        self.handles: list = []
        self.visual_in = self.visual_kept = self.sequence_out = 0

    def __enter__(self) -> Baseline:
        inner = self.model.model
        self.handles = [
            inner.register_forward_pre_hook(self._remember, with_kwargs=True),
            inner.language_model.register_forward_pre_hook(self._shorten, with_kwargs=True),
        ]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles, self.call = [], None

    def _remember(self, module, args, kwargs):
        self.call = dict(kwargs)

    def _shorten(self, module, args, kwargs):
        call, self.call = self.call, None
        embeds = kwargs.get("inputs_embeds")
        if call is None or embeds is None or call.get("input_ids") is None:
            return None
        ids = call["input_ids"]
        config = self.model.config
        video = bool((ids == config.video_token_id).any())
        grids = call.get("video_grid_thw" if video else "image_grid_thw")
        if grids is None:
            return None
        token = config.video_token_id if video else config.image_token_id
        merge = config.vision_config.spatial_merge_size
        rows = [self._row(ids[b] == token, grids[b], merge, b) for b in range(ids.shape[0])]
        length = max(r[0].numel() for r in rows)
        if any(r[0].numel() != length for r in rows):
            raise ValueError("baseline batches must give every row the same number of visual tokens")
        positions = kwargs["position_ids"]
        mask = kwargs.get("attention_mask")
        new = dict(kwargs)
        new["inputs_embeds"] = torch.stack([_apply(embeds[b], *rows[b]) for b in range(len(rows))])
        new["position_ids"] = torch.stack([positions[:, b, rows[b][0]] for b in range(len(rows))], dim=1)
        if mask is not None:
            new["attention_mask"] = torch.stack([mask[b, rows[b][0]] for b in range(len(rows))])
        self.sequence_out = length
        return args, new

    def _row(self, visual: torch.Tensor, grid: torch.Tensor, merge: int, b: int):
        """(kept positions of the row, {kept position: positions averaged into it} for pooling)."""
        where = visual.nonzero().squeeze(1)
        n = where.numel()
        text = (~visual).nonzero().squeeze(1)
        groups = {}
        if self.kind == "random":
            k = max(1, round(n * self.ratio))
            chosen = where[torch.randperm(n, generator=self.gen)[:k].sort().values.to(where.device)]
        else:
            t, h, w = (int(v) for v in grid)
            h, w = h // merge, w // merge
            ph, pw = POOL[self.ratio]
            grid_index = where.view(t, h, w)
            chosen = []
            for frame in grid_index:
                for i in range(0, h, ph):
                    for j in range(0, w, pw):
                        block = frame[i : i + ph, j : j + pw].reshape(-1)
                        groups[int(block[0])] = block
                        chosen.append(block[0])
            chosen = torch.stack(chosen)
        self.visual_in += n
        self.visual_kept += chosen.numel()
        return torch.cat([text, chosen]).sort().values, groups


def _apply(embeds: torch.Tensor, kept: torch.Tensor, groups: dict) -> torch.Tensor:
    out = embeds[kept].clone()
    if groups:
        slot = {int(p): i for i, p in enumerate(kept.tolist())}
        for first, block in groups.items():
            out[slot[first]] = embeds[block].mean(0)
    return out
