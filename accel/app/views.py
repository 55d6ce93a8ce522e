"""What the page shows of a comparison, as plain data (no gradio here): the metrics table, the one-line summary,
the session's runs for the plot, and which controls a model leaves usable."""

from __future__ import annotations

import math

from accel.app.models import LoadedModel

PSNR_CAP = 100.0  # identical outputs (PSNR inf) are drawn at this height in the plot
TABLE_HEADERS = ["", "baseline", "accelerated"]


def _num(value, digits: int = 2, unit: str = "") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):  # "inf" from to_json
        return "identical (inf)" if value == "inf" else value
    return f"{value:.{digits}f}{unit}"


def _passes(side: dict) -> str:
    if side.get("passes_computed") is None:
        return "-"
    return f"{side['passes_computed']} / {side['passes_reused']}"


def table(metrics: dict) -> list[list[str]]:
    """Rows of the metrics table (README.md, "The app" says what each means)."""
    base, acc = metrics["baseline"], metrics["accelerated"]
    rows = [
        [
            "wall time (s)",
            _num(base["seconds"], 3) + (" (cached)" if base.get("cached") else ""),
            _num(acc["seconds"], 3),
        ],
        ["speedup", "1.00x", _num(metrics["speedup"], 2, "x")],
        ["peak memory (MB)", _num(base["peak_memory_mb"], 0), _num(acc["peak_memory_mb"], 0)],
    ]
    if metrics["kind"] == "vlm":
        rows.append(["token agreement", "-", _num(metrics["token_agreement"], 3)])
        rows.append(["visual tokens kept", "all", acc.get("visual_tokens_kept") or "all"])
    else:
        rows.append(["denoiser passes computed / reused", _passes(base), _passes(acc)])
        rows.append(["PSNR vs baseline (dB)", "-", _num(metrics["psnr"], 2)])
        rows.append(["SSIM vs baseline", "-", _num(metrics["ssim"], 4)])
        if metrics.get("lpips") is not None:
            rows.append(["LPIPS vs baseline", "-", _num(metrics["lpips"], 4)])
    if base["prompt_accuracy"] is not None or acc["prompt_accuracy"] is not None:
        rows.append(["prompt accuracy", _num(base["prompt_accuracy"], 2), _num(acc["prompt_accuracy"], 2)])
    return rows


def summary(metrics: dict) -> str:
    """One line of Markdown: the speedup and what it cost."""
    parts = [f"**{_num(metrics['speedup'], 2, 'x')}** ({metrics['settings']})"]
    if metrics["kind"] == "vlm":
        parts.append(f"token agreement **{_num(metrics['token_agreement'], 3)}**")
    else:
        parts.append(f"PSNR **{_num(metrics['psnr'], 2)}** dB, SSIM **{_num(metrics['ssim'], 4)}**")
        acc = metrics["accelerated"]
        if acc["passes_computed"] is not None:
            total = acc["passes_computed"] + acc["passes_reused"]
            parts.append(f"{acc['passes_computed']} of {total} denoiser passes computed")
    if metrics["baseline"].get("cached"):
        parts.append("baseline from cache (same model, prompt, seed, steps, size, frames)")
    return "; ".join(parts)


def run_point(metrics: dict) -> dict:
    """One run of the session, for the plot."""
    quality = metrics["token_agreement"] if metrics["kind"] == "vlm" else metrics["psnr"]
    if quality == "inf":
        quality = PSNR_CAP
    return {
        "kind": metrics["kind"],
        "model": metrics["model"],
        "settings": metrics["settings"],
        "speedup": metrics["speedup"],
        "quality": None if quality is None or not math.isfinite(quality) else min(quality, PSNR_CAP),
    }


def plot_rows(history: list[dict], kind: str) -> list[dict]:
    return [run for run in history if run["kind"] == kind and run["quality"] is not None and run["speedup"]]


def model_note(model: LoadedModel) -> str:
    defaults = []
    if model.default_steps:
        defaults.append(f"{model.default_steps} steps")
    if model.default_size:
        defaults.append(f"{model.default_size} px")
    if model.default_frames:
        defaults.append(f"{model.default_frames} frames")
    text = model.note
    if defaults:
        text += f" Defaults (0 in a control): {', '.join(defaults)}."
    return text
