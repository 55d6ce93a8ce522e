"""`PruneConfig`: how many visual tokens reach the language model, and how they are chosen."""

from __future__ import annotations

from dataclasses import dataclass

from .._validate import check_choice, check_float, check_int
from ..errors import ConfigError

_WHERE = ("before_lm", "in_lm")
_SCORES = ("auto", "cls", "distinct", "sampled")


@dataclass
class PruneConfig:
    """Visual token pruning for VLMs (LLaVA-1.5, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL).

    The budget is per image or video (one "segment" of visual placeholder tokens); give one of:

    - `keep`: tokens kept per segment (VisionZip's 64 of 576 is `keep=64`);
    - `keep_ratio`: fraction kept per segment (`0.11`);
    - `mass`: dynamic budget, the fewest top-scoring tokens whose normalised score mass reaches `mass`
      (ZipVL-style), so images whose attention is concentrated keep fewer tokens. `min_keep` is a floor.

    With none of the three, `keep_ratio=0.25` is used. `keep_ratio=1.0` keeps every token and
    reproduces the unpatched model bit for bit (useful to check the plumbing).

    `where`: `"before_lm"` (default) selects among the projected visual features before the language
    model; `"in_lm"` runs the first `layer` decoder layers on every token, then keeps the visual tokens
    the last `text_queries` prompt tokens attend to most (FastV-style), recomputing only those attention
    rows, so SDPA / FlashAttention stay on.

    `score`: `"auto"` uses the vision tower's [CLS] attention row where there is a [CLS] token
    (LLaVA-1.5's CLIP) and `"distinct"` otherwise: how far each visual token's feature is from its image's
    typical (per-channel median) token, so the repetitive background scores low. `"sampled"`: the mean
    attention each visual token receives from `sampled_queries` evenly spaced tokens of its own image,
    computed with the first decoder layer's query/key projections (no positions); on `ref-vlm` it kept less
    accuracy than `"distinct"` (and on earlier weights less than random tokens; benchmarks/RESULTS.md). Ignored
    for `where="in_lm"`.

    `duplicate_similarity`: how the dominant tokens are chosen (before the LM). Going down the scores, a token whose
    cosine similarity to a higher-scoring token already chosen is above it is a near-duplicate: every token that is
    not one is kept (by score) before any that is, so each distinct thing in the image keeps a token before the most
    salient one keeps a second (on `ref-vlm` the top scores alone sometimes dropped a whole shape;
    benchmarks/RESULTS.md). None: the top-scoring tokens, whatever they repeat.

    `contextual`: fraction of the budget spent on merged "contextual" tokens (VisionZip): the tokens not
    kept as dominant are averaged into that many evenly spaced targets by cosine similarity. 0 keeps the
    dominant tokens only.

    `temporal_threshold`: videos only. A token whose cosine similarity to the token at the same place in
    the previous frame is above it is merged into that earlier token before spatial selection. 1.0 or
    None turns temporal merging off; it is not applied at `keep_ratio=1.0` (keep-all changes nothing).
    """

    keep: int | None = None
    keep_ratio: float | None = None
    mass: float | None = None
    min_keep: int = 1
    where: str = "before_lm"
    layer: int = 2
    text_queries: int = 1
    score: str = "auto"
    sampled_queries: int = 16
    duplicate_similarity: float | None = 0.8
    contextual: float = 0.15
    temporal_threshold: float | None = 0.9

    def __post_init__(self) -> None:
        check_int(self, "keep", low=1, optional=True)
        check_float(self, "keep_ratio", low=0, high=1, open_low=True, optional=True)
        check_float(self, "mass", low=0, high=1, open_low=True, optional=True)
        given = [name for name in ("keep", "keep_ratio", "mass") if getattr(self, name) is not None]
        if len(given) > 1:
            raise ConfigError(f"PruneConfig: give only one of keep, keep_ratio, mass (got {', '.join(given)})")
        if not given:
            self.keep_ratio = 0.25
        check_int(self, "min_keep", low=1)
        check_choice(self, "where", _WHERE)
        check_int(self, "layer", low=1, hint="layers before it see every token")
        check_int(self, "text_queries", low=1)
        check_choice(self, "score", _SCORES)
        check_int(self, "sampled_queries", low=1)
        check_float(self, "duplicate_similarity", low=-1, high=1, optional=True, hint="None keeps the top scores")
        check_float(self, "contextual", low=0, high=1, open_high=True)
        check_float(self, "temporal_threshold", low=-1, high=1, optional=True, hint="None turns temporal merging off")

    def budget(self, n: int, scores=None) -> int:
        """Tokens to keep of a segment of `n` scored tokens (`scores`: a distribution, for `mass`)."""
        if self.keep is not None:
            k = self.keep
        elif self.keep_ratio is not None:
            k = n if self.keep_ratio >= 1.0 else round(n * self.keep_ratio)
        else:
            ordered = scores.double().sort(descending=True).values
            cumulative = (ordered / ordered.sum().clamp_min(1e-30)).cumsum(0)
            k = int((cumulative < self.mass - 1e-9).sum()) + 1
        return max(min(k, n), min(self.min_keep, n))

    def describe(self) -> str:
        if self.keep is not None:
            budget = f"keep {self.keep} per image/video"
        elif self.mass is not None:
            budget = f"dynamic: score mass {self.mass:g}"
        else:
            budget = f"keep {self.keep_ratio:.0%} per image/video"
        if self.where == "in_lm":
            return f"{budget}, inside the language model after layer {self.layer} (text-guided, FastV-style)"
        return f"{budget}, before the language model ({self.score} score)"
