"""benchmarks/pruning.py runs end to end in its --tiny (CPU) mode and reports every VLM measurement."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_pruning_benchmark_tiny(tmp_path: Path) -> None:
    out = tmp_path / "pruning.json"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "pruning.py"), "--tiny", "--repeats", "1", "--json", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    doc = json.loads(out.read_text())
    assert doc["tiny"] is True
    assert set(doc["scenarios"]) == {"llava", "qwen2_vl_image", "qwen2_vl_video"}
    for name, scenario in doc["scenarios"].items():
        rows = scenario["rows"]
        assert [r["variant"] for r in rows] == ["baseline", "keep 3", "keep 2", "in_lm keep 2 (layer 1)"]
        base = rows[0]
        assert base["sequence_to_lm"] == scenario["prompt_tokens"] and base["token_agreement"] == 1.0
        for row in rows:
            for key in ("prefill_s", "ttft_s", "first_token_kl", "token_agreement", "peak_memory_bytes"):
                assert row[key] is not None, (name, row["variant"], key)
            assert "decode_tokens_per_s" in row  # None when CPU noise makes generate(4) no slower than generate(1)
        for row in rows[1:]:
            kept = int(row["variant"].split()[-1] if "in_lm" not in row["variant"] else row["variant"].split()[2])
            assert row["visual_tokens_kept"] == kept < row["visual_tokens_in"], (name, row)
            assert row["sequence_to_lm"] < base["sequence_to_lm"]
            assert row["report"]["calls (prefills with visual tokens)"] >= 3  # prefill, TTFT and full runs
    assert "prefill ms" in proc.stdout
