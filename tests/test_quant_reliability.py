"""Reliability of W4 quantization: saving refuses what cannot be reloaded, loading is all or nothing and
checked, dtype/device moves survive unpatch, and accel imports under a meta default device."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_under_meta_device_then_normal_use():
    # A fresh interpreter: accel must be imported for the first time inside the meta context.
    script = textwrap.dedent(
        """
        import pkgutil, importlib, torch
        with torch.device("meta"):
            import accel, accel.quant, accel.attention, accel.pruning, accel.caching, accel.zoo, accel.bench
            for info in pkgutil.walk_packages(accel.__path__, "accel."):
                if not info.name.endswith("__main__"):
                    importlib.import_module(info.name)
        from accel.quant import QuantConfig
        from accel.zoo import build

        tiny = build("flux")
        base = tiny.run(seed=0, num_inference_steps=2)
        handle = accel.patch(tiny.obj, "lossless", quant=QuantConfig(group_size=16, min_features=0))
        assert handle.report().stats["quant"]["layers quantized"] > 0
        out = tiny.run(seed=0, num_inference_steps=2)
        assert out.shape == base.shape and torch.isfinite(out).all()
        accel.unpatch(tiny.obj)
        assert torch.equal(tiny.run(seed=0, num_inference_steps=2), base)
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
