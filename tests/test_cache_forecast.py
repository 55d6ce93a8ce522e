"""What a reused DiT step gets: the forecast denoiser output (default) or head output + forecast tail residual."""

import pytest
import torch
from helpers import tiny

import accel
from accel import CacheConfig


@pytest.mark.parametrize("dit", ["flux", "wan"])
def test_output_forecast_of_order_zero_repeats_the_last_computed_output(dit):
    """forecast="output" swaps a reused step's denoiser output for the forecast; at order 0 that is the output of
    the branch's last computed step, exactly. forecast="residual" returns something else on the same steps."""
    model = tiny(dit)
    transformer = model.obj.transformer
    outputs = []
    handle = transformer.register_forward_hook(lambda module, args, output: outputs.append(output[0].clone()))
    try:
        results = {}
        for forecast in ("output", "residual"):
            outputs.clear()
            cache = CacheConfig(threshold=1e9, max_consecutive=2, taylor_order=0, forecast=forecast)
            patch = accel.patch(model.obj, cache=cache)
            model.run(0)
            calls = patch.report().stats["cache"]["calls"][-1]
            accel.unpatch(model.obj)
            results[forecast] = list(outputs)
        branches = calls["branches"]
        order = sorted((step, name) for name, b in branches.items() for step in b["computed"] + b["reused"])
        by_call = {key: i for i, key in enumerate(order)}  # the pipeline alternates branches within a step
        for name, branch in branches.items():
            for step in branch["reused"]:
                last = max(s for s in branch["computed"] if s < step)
                reused, computed = by_call[(step, name)], by_call[(last, name)]
                assert torch.equal(results["output"][reused], results["output"][computed])
                assert not torch.equal(results["residual"][reused], results["residual"][computed])
    finally:
        handle.remove()
