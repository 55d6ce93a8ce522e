"""What accel did to a model, and what happened in the calls since."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .caching import CallStats


@dataclass
class Applied:
    accelerator: str
    module: str
    detail: str


@dataclass
class Skipped:
    accelerator: str
    reason: str


@dataclass
class Report:
    model: str
    family: str | None
    preset: str
    applied: list[Applied] = field(default_factory=list)
    skipped: list[Skipped] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    calls: list[CallStats] = field(default_factory=list)  # the most recent calls (at most 100)
    # Per-accelerator statistics gathered during calls, e.g. {"attention": {"int8 calls": 120, ...}}.
    stats: dict[str, dict] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {
            "model": self.model,
            "family": self.family,
            "preset": self.preset,
            "applied": [vars(a) for a in self.applied],
            "skipped": [vars(s) for s in self.skipped],
            "warnings": list(self.warnings),
            "stats": {name: dict(values) for name, values in self.stats.items()},
            "calls": [
                {
                    "num_steps": call.num_steps,
                    "branches": {
                        name: {
                            "computed": list(b.computed),
                            "reused": list(b.reused),
                            "compute_reasons": dict(b.reasons),
                            "estimated_error": b.estimated_error,
                        }
                        for name, b in call.branches.items()
                    },
                }
                for call in self.calls
            ],
        }

    def __str__(self) -> str:
        lines = [f"accel on {self.model} ({self.family or 'unsupported'}), preset {self.preset!r}"]
        for a in self.applied:
            lines.append(f"  applied  {a.accelerator:<9} {a.module}: {a.detail}")
        for s in self.skipped:
            lines.append(f"  skipped  {s.accelerator:<9} {s.reason}")
        if not self.applied:
            lines.append("  nothing applied: the model runs exactly as before")
        for w in self.warnings:
            lines.append(f"  warning  {w}")
        for name, values in self.stats.items():
            lines.append(f"  stats    {name}")
            for key, value in values.items():
                lines.append(f"    {key}: {value}")
        for n, call in enumerate(self.calls, 1):
            steps = f"{call.num_steps} steps" if call.num_steps is not None else "steps unknown"
            lines.append(f"  call {n} ({steps}): {call.computed} denoiser passes computed, {call.reused} reused")
            for name, b in call.branches.items():
                reasons = ", ".join(f"{k} {v}" for k, v in b.reasons.items())
                lines.append(
                    f"    {name:<10} computed {len(b.computed):>3}  reused {len(b.reused):>3}  "
                    f"est. error {b.estimated_error:.3g}  reused steps {b.reused}  (computed: {reasons})"
                )
        return "\n".join(lines)
