"""`accel.bench.vlm.profile_prefill`: where a VLM prefill's time goes (what `benchmarks/pruning.py --profile` adds
to each row), on the tiny LLaVA of the benchmark's scenarios."""

from __future__ import annotations

import torch

from accel.bench.vlm import compare_pruning, profile_prefill
from accel.bench.vlm_scenarios import build_vlm, make_vlm_inputs
from accel.pruning import PruneConfig


def test_profile_prefill_counts_the_forward_and_each_variant_gets_one():
    torch.manual_seed(0)
    model = build_vlm("llava", True, "sdpa", "cpu").eval()
    inputs = make_vlm_inputs("llava", model, True, "cpu")
    alone = profile_prefill(model, inputs, calls=2)
    assert alone["wall_ms"] > 0 and alone["gpu_kernel_ms"] is None and alone["top_gpu"] == []
    assert alone["aten_calls"] > 50  # a whole forward of the model, per call
    assert alone["top_host"] and all(row["ms"] > 0 and row["calls"] >= 1 for row in alone["top_host"])
    rows = compare_pruning(model, inputs, {"keep 2": PruneConfig(keep=2)}, new_tokens=2, repeats=1, profile=True)
    base, pruned = rows
    assert base.profile["aten_calls"] == alone["aten_calls"]  # the same forward, counted per call
    assert pruned.profile["aten_calls"] != base.profile["aten_calls"]  # the pruned forward is another one
