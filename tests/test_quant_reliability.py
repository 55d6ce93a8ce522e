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


# ---- save_pretrained of a 4-bit model ----------------------------------------------------------------------

import gc
import weakref

import pytest
import torch
from torch import nn

import accel
from accel.errors import AccelError, QuantSaveError
from accel.quant import QuantConfig, quantize
from accel.zoo import build

from conftest import tiny

TINY = QuantConfig(group_size=16, min_features=0)


def _same_state(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def _quantize(via, obj, patched):
    """Quantize `obj` through accel.patch or accel.quant.quantize; returns the undo."""
    if via == "patch":
        patched(obj, "lossless", quant=TINY)
        return lambda: accel.unpatch(obj)
    model = obj.transformer if hasattr(obj, "transformer") else obj
    return quantize(model, TINY).restore


@pytest.mark.parametrize("via", ["patch", "quantize"])
def test_flux_save_pretrained_refused_while_quantized_then_saves_bit_exact(via, patched, tmp_path):
    from diffusers import FluxTransformer2DModel

    pipe = tiny("flux").obj
    original = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    undo = _quantize(via, pipe, patched)
    with pytest.raises(QuantSaveError, match=r"accel\.quant\.save_quantized"):
        pipe.transformer.save_pretrained(tmp_path / "t")
    with pytest.raises(AccelError, match="from_pretrained would load them as uninitialised"):
        pipe.save_pretrained(tmp_path / "p")
    if via == "patch":  # the pipeline itself refuses: nothing half written
        assert not (tmp_path / "p").exists()
    assert not (tmp_path / "t").exists()

    undo()
    assert "save_pretrained" not in vars(pipe) and "save_pretrained" not in vars(pipe.transformer)
    pipe.save_pretrained(tmp_path / "p")
    reloaded = FluxTransformer2DModel.from_pretrained(tmp_path / "p" / "transformer")
    state = reloaded.state_dict()
    assert state.keys() == original.keys()
    assert all(state[k].dtype == v.dtype and torch.equal(state[k], v) for k, v in original.items())


@pytest.mark.parametrize("via", ["patch", "quantize"])
def test_llava_save_pretrained_refused_while_quantized_then_saves_bit_exact(via, patched, tmp_path):
    model = tiny("llava").obj
    undo = _quantize(via, model, patched)
    with pytest.raises(QuantSaveError, match=r"accel\.quant\.save_quantized"):
        model.save_pretrained(tmp_path / "q")
    assert not (tmp_path / "q").exists()
    undo()
    model.save_pretrained(tmp_path / "m")
    assert _same_state(type(model).from_pretrained(tmp_path / "m"), model)


class _Saveable(nn.Sequential):
    def save_pretrained(self, path):
        torch.save(self.state_dict(), path)


def test_quant_result_holds_no_strong_reference_to_the_model(tmp_path):
    # The quantized linear sits directly on the model: a strong (parent, attr) slot or save guard would hold it.
    model = _Saveable(nn.Linear(32, 32))
    ref = weakref.ref(model)
    result = quantize(model, TINY)
    with pytest.raises(QuantSaveError):
        model.save_pretrained(tmp_path / "m.pt")
    del model
    gc.collect()
    assert ref() is None and len(result.layers) == 1
    result.restore()  # nothing left to restore into: a no-op, not an error


# ---- dtype and device moves while quantized ----------------------------------------------------------------


@pytest.mark.parametrize("via, move, dtype", [("patch", "to", torch.bfloat16), ("quantize", "half", torch.float16)])
def test_restore_after_dtype_move_gives_the_cast_original(via, move, dtype):
    model = build("flux").obj.transformer  # its own instance: it gets cast
    expected = {k: v.to(dtype) for k, v in model.state_dict().items()}
    if via == "patch":
        accel.patch(model, "lossless", quant=TINY)
        undo = lambda: accel.unpatch(model)  # noqa: E731
    else:
        undo = quantize(model, TINY).restore
    model.to(dtype) if move == "to" else model.half()
    undo()
    assert {p.dtype for p in model.parameters()} == {dtype}
    state = model.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], v) for k, v in expected.items())


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_restore_after_device_move_puts_originals_on_the_new_device():
    model = build("flux").obj.transformer
    expected = {k: v.clone() for k, v in model.state_dict().items()}
    result = quantize(model, TINY)
    model.to("cuda")
    result.restore()
    assert {p.device.type for p in model.parameters()} == {"cuda"}
    state = model.state_dict()
    assert all(torch.equal(state[k].cpu(), v) for k, v in expected.items())
