"""Baseline vs each preset on a reference model (`accel.zoo.reference`), same prompt and seed: what `accel demo`
runs by default.

    pipe, trained = build("ref-flux")           # the trained weights when shipped, else random ones
    result = run_reference("ref-flux", pipe, "a red circle on a navy background", ["balanced", "fast"], steps=8)
    for row in result["rows"]: print(row.variant, row.passes_computed, row.flops_saved, row.psnr)
    result["outputs"]["fast"]                   # the pixels, for accel.bench.gallery

A row (`DemoRow`; `to_dict()` is its JSON) leads with what does not depend on the machine:

    variant                "baseline" or the preset
    passes_computed        transformer passes computed in the last call (CFG branches summed); the baseline's
                           are counted by a hook, a variant's come from the report's stats["cache"]
    passes_reused          passes whose tail the cache forecast instead (0 without caching)
    attention_blocks_kept  share of attention key blocks computed in the sparse calls, 1 - stats["sparse"]
                           ["mean_sparsity"]; null when sparse attention did not run
    flops_saved            estimated share of the baseline's transformer FLOPs skipped (below)
    psnr, ssim             of the output against the baseline's (accel.bench.metrics); psnr "inf" when identical
    prompt_score           share of the prompt's attributes (colour, shape, background, motion) that
                           accel.bench.prompt_score reads right in the output
    prompt_attributes      {attribute: 1.0 or 0.0}: which of them
    cpu_s                  median wall-clock seconds of the timed calls on this CPU; cpu_times_s, each of them
    cpu_speedup            the baseline's cpu_s over this one
    applied, skipped       "accelerator: detail" / "accelerator: reason" from the report
    report                 the variant's `Report.to_dict()` (null for the baseline)
    error                  "Type: message" if the variant failed (the other variants still run), else null

FLOPs saved is an estimate, not a measurement. FLOPs of one transformer pass are counted on the baseline's first
pass: linear layers (2 per multiply-add) and attention products (QKᵀ and PV), nothing else (norms, rotary
embeddings, the patch-embedding convolution and elementwise work are small next to them, and left out). Every
pass is assumed to cost the same. A reused pass still runs what lies outside the blocks and the cache's
`head_blocks` first blocks (the preset's CacheConfig); the rest of it is saved. In a computed pass, sparse
attention saves its skipped share of the attention products of self/joint attention (cross-attention stays
dense), averaged over all such calls, the dense ones included. What the cache's and the sparse kernel's own
bookkeeping costs is not counted. So

    flops_saved = r (1 - reuse_cost / pass) + (1 - r) (attention / pass) s

with r = reused / (computed + reused), s = mean_sparsity * sparse_calls / (sparse + dense self/joint calls).
"""

from __future__ import annotations

import traceback
from collections import Counter
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from accel.bench import measure, metrics, prompt_score
from accel.bench.harness import Variant, applied
from accel.bench.host import to_json
from accel.zoo import reference as zoo_reference

PROMPTS = {  # one domain prompt per reference model: an image for Flux, a moving shape for Wan
    "ref-flux": "a red circle on a navy background",
    "ref-wan": "a yellow square on a black background moving right",
}


def build(name: str, seed: int = 0) -> tuple[Any, bool]:
    """(pipeline, trained): `load(name)` when its weights are in the package, else `untrained(name, seed)`."""
    if (zoo_reference.path(name) / "model_index.json").exists():
        return zoo_reference.load(name), True
    return zoo_reference.untrained(name, seed), False


@dataclass
class FlopProfile:
    """FLOPs of one transformer pass: in all, per block (the adapter's order), and in self/joint attention
    products; `passes`: transformer passes of one pipeline call."""

    pass_flops: int
    block_flops: list[int]
    attention_flops: int
    passes: int


def _arg(args: tuple, kwargs: dict, index: int, name: str):
    return args[index] if len(args) > index else kwargs[name]


class _FlopCounter(TorchFunctionMode):
    """Counts FLOPs of F.linear and SDPA calls while `on`, by block and inside self/joint attention."""

    def __init__(self):
        super().__init__()
        self.on, self.block, self.in_site = False, None, False
        self.total = self.attention = 0
        self.by_block: Counter[int] = Counter()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.on and func is F.linear:
            x, w = _arg(args, kwargs, 0, "input"), _arg(args, kwargs, 1, "weight")
            self._add(2 * x.numel() * w.shape[0], False)
        elif self.on and func is F.scaled_dot_product_attention:
            q, k, v = (_arg(args, kwargs, i, n) for i, n in enumerate(("query", "key", "value")))
            rows = q.numel() // q.shape[-1]  # batch x query heads x query tokens
            self._add(2 * rows * k.shape[-2] * (q.shape[-1] + v.shape[-1]), self.in_site)
        return func(*args, **kwargs)

    def _add(self, flops: int, attention: bool) -> None:
        self.total += flops
        self.attention += flops if attention else 0
        if self.block is not None:
            self.by_block[self.block] += flops


def _setter(obj, name: str, value) -> Callable:
    def hook(*_):
        setattr(obj, name, value)

    return hook


@contextmanager
def profiling(pipe) -> Any:
    """Within the block, the first transformer pass of `pipe` is counted; yields a function giving the
    `FlopProfile` afterwards."""
    from accel.pipelines import find_adapter

    transformer = pipe.transformer
    adapter = find_adapter(transformer)
    counter, passes = _FlopCounter(), [0]

    def start(*_):
        counter.on = passes[0] == 0
        passes[0] += 1

    handles = [
        transformer.register_forward_pre_hook(start),
        transformer.register_forward_hook(_setter(counter, "on", False)),
    ]
    for index, block in enumerate(adapter.blocks()):
        handles += [block.register_forward_pre_hook(_setter(counter, "block", index))]
        handles += [block.register_forward_hook(_setter(counter, "block", None))]
    for site in adapter.attention_sites():
        if site.role in ("self", "joint"):  # what sparse attention may thin out; cross-attention it leaves dense
            handles += [site.module.register_forward_pre_hook(_setter(counter, "in_site", True))]
            handles += [site.module.register_forward_hook(_setter(counter, "in_site", False))]
    blocks = len(adapter.blocks())
    try:
        with counter:
            yield lambda: FlopProfile(
                counter.total, [counter.by_block[i] for i in range(blocks)], counter.attention, passes[0]
            )
    finally:
        for handle in handles:
            handle.remove()


def flops_saved(profile: FlopProfile, report: dict | None, head_blocks: int) -> float:
    """The estimate of the module docstring, from a variant's `Report.to_dict()` (None: the baseline, 0)."""
    if report is None or not profile.pass_flops:
        return 0.0
    calls = report["stats"].get("cache", {}).get("calls") or [{"computed": 1, "reused": 0}]
    computed, reused = calls[-1]["computed"], calls[-1]["reused"]
    r = reused / max(computed + reused, 1)
    reuse_cost = profile.pass_flops - sum(profile.block_flops[head_blocks:])
    sparse = report["stats"].get("sparse") or {}
    s = 0.0
    if sparse.get("mean_sparsity") is not None:
        dense = sparse.get("dense_warmup_calls", 0) + sum(sparse.get("calls_left_dense", {}).values())
        s = sparse["mean_sparsity"] * sparse["sparse_calls"] / max(sparse["sparse_calls"] + dense, 1)
    pass_flops = profile.pass_flops
    return r * (1 - reuse_cost / pass_flops) + (1 - r) * profile.attention_flops / pass_flops * s


def _head_blocks(preset: str) -> int:
    from accel.presets import preset_configs

    return getattr(preset_configs(preset).get("cache"), "head_blocks", 0)


@dataclass
class DemoRow:
    """One variant of a reference model's comparison; the fields are documented in the module docstring."""

    variant: str
    passes_computed: int | None = None
    passes_reused: int | None = None
    attention_blocks_kept: float | None = None
    flops_saved: float | None = None
    psnr: float | None = None
    ssim: float | None = None
    prompt_score: float | None = None
    prompt_attributes: dict[str, float] = field(default_factory=dict)
    cpu_s: float | None = None
    cpu_times_s: list[float] = field(default_factory=list)
    cpu_speedup: float | None = None
    applied: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    report: dict | None = None
    error: str | None = None

    def to_dict(self) -> dict:
        return to_json(self)


def _score(row: DemoRow, output: torch.Tensor, prompt: str) -> None:
    found = prompt_score.score(output, [prompt] * output.shape[0])
    row.prompt_attributes = {k: found[k] for k in ("colour", "shape", "background", "motion") if found[k] is not None}
    row.prompt_score = sum(row.prompt_attributes.values()) / len(row.prompt_attributes)


def _baseline(pipe, run: Callable[[], torch.Tensor], prompt: str, repeats: int, warmup: int):
    """The baseline's row, output and FLOP profile; the profile's call is untimed (a warm-up call, or one
    extra call with warmup=0)."""
    last: list[Any] = [None, None]  # output, profile

    def call() -> None:
        if last[1] is None:
            with profiling(pipe) as profile:
                last[0] = run()
            last[1] = profile()
        else:
            last[0] = run()

    if warmup == 0:
        call()
    times = measure.time_calls(call, repeats=repeats, warmup=warmup, device="cpu")
    output, profile = last
    row = DemoRow("baseline", profile.passes, 0, None, 0.0, float("inf"), 1.0)
    row.cpu_times_s, row.cpu_s, row.cpu_speedup = times, measure.median(times), 1.0
    _score(row, output, prompt)
    return row, output, profile


def _variant(
    pipe, run, preset: str, baseline: torch.Tensor, profile: FlopProfile, prompt: str, repeats: int, warmup: int
):
    """One preset's row and output (None when it failed; the row says why)."""
    row, output = DemoRow(preset), None
    try:
        with applied(pipe, Variant(preset, {"preset": preset, "strict": False})) as handle:
            last: list[Any] = [None]
            times = measure.time_calls(lambda: last.__setitem__(0, run()), repeats=repeats, warmup=warmup, device="cpu")
            report = handle.report()
        output, row.report = last[0], report.to_dict()
        row.applied = [f"{a.accelerator}: {a.detail}" for a in report.applied]
        row.skipped = [f"{s.accelerator}: {s.reason}" for s in report.skipped]
        row.cpu_times_s, row.cpu_s = times, measure.median(times)
        calls = report.stats.get("cache", {}).get("calls")
        row.passes_computed, row.passes_reused = (
            (calls[-1]["computed"], calls[-1]["reused"]) if calls else (profile.passes, 0)
        )
        sparsity = report.stats.get("sparse", {}).get("mean_sparsity")
        row.attention_blocks_kept = None if sparsity is None else 1.0 - sparsity
        row.flops_saved = flops_saved(profile, row.report, _head_blocks(preset))
        row.psnr, row.ssim = metrics.psnr(output, baseline), metrics.ssim(output, baseline)
        _score(row, output, prompt)
    except Exception as err:  # noqa: BLE001  (recorded in the row, the other presets still run)
        row.error = f"{type(err).__name__}: {err}"
        row.report = {"traceback": traceback.format_exc()}
    return row, output


def run_reference(
    name: str,
    pipe,
    prompt: str,
    presets: Sequence[str],
    *,
    steps: int | None = None,
    seed: int = 0,
    repeats: int = 1,
    warmup: int = 1,
    trained: bool = False,
    on_run: Callable[[str], None] | None = None,
) -> dict:
    """Baseline, then each preset, on reference model `name`'s `pipe` with `prompt` and `seed` (the same for
    all): {"model", "family", "kind", "trained", "weights", "prompt", "steps", "seed", "profile", "rows",
    "outputs"}, `rows` the `DemoRow`s (baseline first), `outputs` {variant: pixels} of those that ran;
    `trained` as `build` said. `on_run(variant)` is called after each variant, for a progress bar."""
    ref = zoo_reference.reference(name)
    kwargs = ref.call_kwargs(steps=steps)

    def run() -> torch.Tensor:
        out = pipe(prompt, generator=torch.Generator().manual_seed(seed), **kwargs)
        return out.frames if ref.kind == "video" else out.images

    base, baseline, profile = _baseline(pipe, run, prompt, repeats, warmup)
    rows, outputs = [base], {"baseline": baseline}
    if on_run:
        on_run(base.variant)
    for preset in presets:
        row, output = _variant(pipe, run, preset, baseline, profile, prompt, repeats, warmup)
        if row.cpu_s:
            row.cpu_speedup = base.cpu_s / row.cpu_s
        rows.append(row)
        if output is not None:
            outputs[preset] = output
        if on_run:
            on_run(preset)
    return {
        "model": name,
        "family": ref.family,
        "kind": ref.kind,
        "trained": trained,
        "weights": str(zoo_reference.path(name)),
        "prompt": prompt,
        "steps": kwargs["num_inference_steps"],
        "seed": seed,
        "profile": profile,
        "rows": rows,
        "outputs": outputs,
    }


__all__ = ["PROMPTS", "DemoRow", "FlopProfile", "build", "flops_saved", "profiling", "run_reference"]
