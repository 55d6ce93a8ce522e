"""One comparison: the baseline and the accelerated side of one request, on one model, with the same seed.

Under the model's lock (one job per model at a time), the baseline is taken from the model's cache when the same
(prompt, seed, steps, size, frames, new tokens, upload) ran before, else run unpatched and cached; then the model
is patched with the settings' keywords, run, and unpatched again (`accel.bench.harness.applied`, which unpatches
on errors too), so nothing of one request's accelerators is left for the next. The metrics are the JSON the page's
table and the `compare` API endpoint show (their meaning is in README.md, "The app"):

    model, kind, settings (its label), patch (the accel.patch keywords, as text)
    baseline, accelerated   seconds (wall time of the pipeline call or generate), peak_memory_mb (CUDA: peak
                            allocated; CPU: peak process RSS, sampled), passes_computed / passes_reused
                            (denoiser passes, CFG branches summed; null for VLMs), cached (baseline only),
                            prompt_accuracy (reference models with a prompt of their domain, else null),
                            answer and tokens (VLMs), visual_tokens_kept (VLMs with pruning)
    speedup                 baseline seconds / accelerated seconds
    psnr, ssim              of the accelerated pixels against the baseline's; psnr "inf" when identical
    lpips                   LPIPS (AlexNet) distance when the lpips package and its weights are on this machine
    token_agreement         VLMs: share of generated positions where both sides chose the same token
    applied, skipped, warnings, report   from the accelerated side's `handle.report()` (report: to_dict())
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch

from accel.app.models import LoadedModel, Output, Request
from accel.app.settings import Settings


@dataclass
class Side:
    output: Output
    seconds: float
    peak_bytes: int | None
    computed: int | None
    reused: int | None
    report: Any = None  # accel.report.Report of the accelerated side


@dataclass
class Comparison:
    baseline: Side
    accelerated: Side
    metrics: dict


class _PassCounter:
    """Counts forward calls of the model's denoiser (diffusion pipelines only)."""

    def __init__(self, model: LoadedModel):
        self.count, self._handle, self._module = 0, None, None
        if model.kind != "vlm":
            from accel.api import resolve_target

            self._module = resolve_target(model.target)

    def __enter__(self):
        if self._module is not None:
            self._handle = self._module.register_forward_pre_hook(self._tick)
        return self

    def _tick(self, *_):
        self.count += 1

    def __exit__(self, *exc):
        if self._handle is not None:
            self._handle.remove()


def _timed_run(model: LoadedModel, request: Request, label: str) -> tuple[Output, float, int | None, int]:
    from accel.bench.measure import PeakMemory

    cuda = model.device.type == "cuda"
    with _PassCounter(model) as passes, PeakMemory(model.device) as memory:
        if cuda:
            torch.cuda.synchronize(model.device)
        start = time.perf_counter()
        output = model.run(request, label)
        if cuda:
            torch.cuda.synchronize(model.device)
        seconds = time.perf_counter() - start
    return output, seconds, memory.peak_bytes, passes.count


def run_baseline(model: LoadedModel, request: Request) -> Side:
    output, seconds, peak, passes = _timed_run(model, request, "baseline")
    counted = model.kind != "vlm"
    return Side(output, seconds, peak, passes if counted else None, 0 if counted else None)


def run_accelerated(model: LoadedModel, request: Request, patch_kwargs: dict) -> Side:
    from accel.bench.harness import Variant, applied

    with applied(model.target, Variant("accelerated", patch_kwargs)) as handle:
        output, seconds, peak, passes = _timed_run(model, request, "accelerated")
        report = handle.report()
    calls = report.stats.get("cache", {}).get("calls")
    if model.kind == "vlm":
        computed = reused = None
    elif calls:
        computed, reused = calls[-1]["computed"], calls[-1]["reused"]
    else:
        computed, reused = passes, 0
    return Side(output, seconds, peak, computed, reused, report)


def compare(model: LoadedModel, settings: Settings, request: Request) -> Comparison:
    """Baseline (cached per request) and accelerated side of `request` on `model`, with their metrics."""
    patch_kwargs = settings.patch_kwargs()
    with model.lock:
        key = request.baseline_key()
        baseline = model.baselines.get(key)
        cached = baseline is not None
        if not cached:
            baseline = run_baseline(model, request)
            model.remember_baseline(key, baseline)
        accelerated = run_accelerated(model, request, patch_kwargs)
    metrics = _metrics(model, settings, request, baseline, accelerated, patch_kwargs)
    metrics["baseline"]["cached"] = cached
    return Comparison(baseline, accelerated, metrics)


def _side_json(model: LoadedModel, side: Side, request: Request) -> dict:
    row: dict[str, Any] = {
        "seconds": side.seconds,
        "peak_memory_mb": None if side.peak_bytes is None else side.peak_bytes / 2**20,
        "passes_computed": side.computed,
        "passes_reused": side.reused,
        "prompt_accuracy": _prompt_accuracy(model, side.output, request.prompt),
    }
    if model.kind == "vlm":
        row.update(answer=side.output.text, tokens=side.output.tokens)
        last = (side.report.stats.get("prune") or {}).get("last_call") if side.report is not None else None
        row["visual_tokens_kept"] = (
            None if not last else f"{sum(last['visual_tokens_kept'])}/{sum(last['visual_tokens_in'])}"
        )
    return row


def _metrics(model, settings, request, baseline: Side, accelerated: Side, patch_kwargs: dict) -> dict:
    from accel.bench import metrics
    from accel.bench.host import to_json

    report = accelerated.report
    doc: dict[str, Any] = {
        "model": model.name,
        "kind": model.kind,
        "settings": settings.label(),
        "patch": {key: repr(value) if not isinstance(value, str) else value for key, value in patch_kwargs.items()},
        "baseline": _side_json(model, baseline, request),
        "accelerated": _side_json(model, accelerated, request),
        "speedup": baseline.seconds / accelerated.seconds if accelerated.seconds > 0 else None,
        "psnr": None,
        "ssim": None,
        "lpips": None,
        "token_agreement": None,
    }
    if model.kind == "vlm":
        doc["token_agreement"] = metrics.token_agreement(baseline.output.tokens, accelerated.output.tokens)
    else:
        pair = (accelerated.output.pixels, baseline.output.pixels)
        doc["psnr"], doc["ssim"], doc["lpips"] = metrics.psnr(*pair), metrics.ssim(*pair), metrics.lpips_or_none(*pair)
    doc["applied"] = [f"{a.accelerator}: {a.detail}" for a in report.applied]
    doc["skipped"] = [f"{s.accelerator}: {s.reason}" for s in report.skipped]
    doc["warnings"] = list(report.warnings)
    doc["report"] = report.to_dict()
    return to_json(doc)


def _prompt_accuracy(model: LoadedModel, output: Output, prompt: str) -> float | None:
    """Share of the prompt's attributes (colour, shape, background, motion) read right in the output: reference
    models only, and only for a prompt of their domain (None otherwise)."""
    if model.source != "reference" or output.pixels is None:
        return None
    from accel.bench.prompt_score import score
    from accel.errors import AccelError
    from accel.zoo.shapes import parse_prompt

    try:
        wanted = parse_prompt(prompt)
    except AccelError:
        return None
    if (wanted["motion"] is not None) != (model.kind == "video"):
        return None
    found = score(output.pixels, [prompt])
    marks = [found[key] for key in ("colour", "shape", "background", "motion") if found[key] is not None]
    return sum(marks) / len(marks)
