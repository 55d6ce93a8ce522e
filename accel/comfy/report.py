"""What the Accel Report node shows: what accel applied to a model, and per sampling run the steps computed and
reused. Plain text built from the sessions registered on the ModelPatcher (no ComfyUI import)."""

from __future__ import annotations

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


def report_text(model_patcher) -> str:
    """The report of one ModelPatcher (the MODEL a sampler ran, or the Accel node's output it came from)."""
    session = model_patcher.get_attachment(STEP_CACHE_KEY)
    if session is None:
        return "Accel: no Accel node on this model (nothing applied)."
    lines = [f"Accel: {session.describe()}"]
    if not session.runs:
        lines.append("no sampling run yet")
    for number, run in enumerate(session.runs, start=1):
        lines += run_lines(number, run)
    return "\n".join(lines)


def report_data(model_patcher) -> dict:
    """The same as a JSON-ready dict."""
    session = model_patcher.get_attachment(STEP_CACHE_KEY)
    if session is None:
        return {"applied": []}
    return {"applied": ["step_cache"], "step_cache": session.describe(), "runs": list(session.runs)}
