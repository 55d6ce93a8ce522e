"""What the Accel Report node shows: what accel applied to a model, and per sampling run the steps computed and
reused. Plain text built from the sessions registered on the ModelPatcher (no ComfyUI import)."""

from __future__ import annotations

from .attention import KEY as ATTENTION_KEY
from .quant import KEY as W4_KEY
from .step_cache import KEY as STEP_CACHE_KEY


def _steps(indices: list[int]) -> str:
    return ", ".join(str(i) for i in indices) if indices else "none"


def run_lines(number: int, run: dict) -> list[str]:
    lines = [
        f"run {number}: {run['num_steps']} steps, denoiser calls computed {run['computed']}, reused {run['reused']} "
        f"({run['seconds']:.2f} s)"
    ]
    for name, branch in run["branches"].items():
        reasons = ", ".join(f"{why} {count}" for why, count in branch["compute_reasons"].items())
        lines.append(f"  {name}: reused steps {_steps(branch['reused'])}; computed because: {reasons or 'n/a'}")
    return lines


def _attention_lines(session) -> list[str]:
    stats = session.stats()
    lines = [f"Accel: {session.describe()}", f"  calls: {stats['calls'] or 'none yet'}"]
    back = {**stats["back_to_comfyui"]}
    if back:
        lines.append(f"  back to ComfyUI's attention: {back}")
    lines += [f"  note: {warning}" for warning in stats["warnings"]]
    return lines


def report_text(model_patcher) -> str:
    """The report of one ModelPatcher (the MODEL a sampler ran, or the Accel node's output it came from)."""
    cache = model_patcher.get_attachment(STEP_CACHE_KEY)
    attention = model_patcher.get_attachment(ATTENTION_KEY)
    w4 = model_patcher.get_attachment(W4_KEY)
    if cache is None and attention is None and w4 is None:
        return "Accel: no Accel node on this model (nothing applied)."
    lines = [f"Accel: {w4.describe()}"] if w4 is not None else []
    lines += _attention_lines(attention) if attention is not None else []
    if cache is not None:
        lines.append(f"Accel: {cache.describe()}")
        if not cache.runs:
            lines.append("no sampling run yet")
        for number, run in enumerate(cache.runs, start=1):
            lines += run_lines(number, run)
    return "\n".join(lines)


def report_data(model_patcher) -> dict:
    """The same as a JSON-ready dict."""
    data = {"applied": []}
    cache = model_patcher.get_attachment(STEP_CACHE_KEY)
    if cache is not None:
        data["applied"].append("step_cache")
        data.update(step_cache=cache.describe(), runs=list(cache.runs))
    attention = model_patcher.get_attachment(ATTENTION_KEY)
    if attention is not None:
        data["applied"].append("attention")
        data["attention"] = attention.stats()
    w4 = model_patcher.get_attachment(W4_KEY)
    if w4 is not None:
        data["applied"].append("w4")
        data["w4"] = w4.stats()
    return data
