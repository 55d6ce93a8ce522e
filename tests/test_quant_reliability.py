"""Reliability of W4 quantization: saving refuses what cannot be reloaded, loading is all or nothing and
checked, dtype/device moves survive unpatch, and accel imports under a meta default device."""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from helpers import tiny
from safetensors import safe_open
from safetensors.torch import save_file, save_model
from torch import nn

import accel
from accel.errors import AccelError, QuantFileError, QuantSaveError
from accel.quant import QuantConfig, load_quantized, quantize, save_quantized
from accel.quant.io import _digest
from accel.zoo import build

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
        assert handle.report().stats["quant"]["layers_quantized"] > 0
        out = tiny.run(seed=0, num_inference_steps=2)
        assert out.shape == base.shape and torch.isfinite(out).all()
        accel.unpatch(tiny.obj)
        assert torch.equal(tiny.run(seed=0, num_inference_steps=2), base)
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
        env={**os.environ, "TRITON_INTERPRET": "1"},
    )
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]


# ---- save_pretrained of a 4-bit model ----------------------------------------------------------------------

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


# ---- load_quantized: checked, all or nothing ---------------------------------------------------------------


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A quantized tiny FLUX transformer (low-rank part on) and its file."""
    source = build("flux").obj.transformer
    quantize(source, QuantConfig(group_size=16, min_features=0, rank=2))
    path = tmp_path_factory.mktemp("w4") / "good.safetensors"
    save_quantized(source, path)
    return source, path


def _contents(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, json.loads(f.metadata()["accel.quant"])


def _write(path, tensors, info, rehash=True):
    if rehash and "sha256" in info:
        info["sha256"] = {k: _digest(t) for k, t in tensors.items()}
    save_file(tensors, str(path), metadata={"accel.quant": info if isinstance(info, str) else json.dumps(info)})


def _flip_byte(path, name):
    data = bytearray(path.read_bytes())
    n = int.from_bytes(data[:8], "little")
    start, end = json.loads(data[8 : 8 + n])[name]["data_offsets"]
    data[8 + n + (start + end) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def _layer(info):
    return next(iter(info["layers"]))


def _plain(tensors, info):
    return next(k for k in tensors if not any(k.startswith(f"{layer}.") for layer in info["layers"]))


def _edit_tensors(fn):
    def make(good, bad):
        tensors, info = _contents(good)
        fn(tensors, info)
        _write(bad, tensors, info)

    return make


def _edit_info(fn):
    def make(good, bad):
        tensors, info = _contents(good)
        _write(bad, tensors, fn(info), rehash=False)

    return make


def _set(info, *keys_value):
    *keys, value = keys_value
    target = info
    for key in keys[:-1]:
        target = target[key]
    target[keys[-1]] = value
    return info


def _nan(tensors, info):
    tensors[f"{_layer(info)}.scales"][0, 0] = float("nan")


def _inf(tensors, info):
    tensors[f"{_layer(info)}.offsets"][-1, -1] = float("inf")


def _corrupt(good, bad):
    bad.write_bytes(good.read_bytes())
    _flip_byte(bad, f"{_layer(_contents(good)[1])}.qweight")


BAD_FILES = {
    "missing tensor": (_edit_tensors(lambda t, i: t.pop(_plain(t, i))), "is missing from the file"),
    "missing 4-bit tensor": (_edit_tensors(lambda t, i: t.pop(f"{_layer(i)}.scales")), r"\.scales' of 4-bit layer"),
    "extra tensor": (_edit_tensors(lambda t, i: t.update({"bogus.weight": torch.ones(3)})), "'bogus.weight'"),
    "wrong shape": (_edit_tensors(lambda t, i: t.update({_plain(t, i): torch.zeros(7, 3)})), "has shape"),
    "wrong codes dtype": (
        _edit_tensors(lambda t, i: t.update({f"{_layer(i)}.qweight": t[f"{_layer(i)}.qweight"].to(torch.int16)})),
        "uint8 codes",
    ),
    "NaN scale": (_edit_tensors(_nan), r"\.scales' holds non-finite"),
    "inf offset": (_edit_tensors(_inf), r"\.offsets' holds non-finite"),
    "corrupted bytes": (_corrupt, r"\.qweight' is corrupted"),
    "invalid JSON": (_edit_info(lambda i: json.dumps(i)[:-5]), "not valid JSON"),
    "JSON array": (_edit_info(lambda i: "[1, 2]"), "JSON list, not an object"),
    "unknown format": (_edit_info(lambda i: _set(i, "format", 99)), "format 99; this accel reads formats 1, 2"),
    "format as text": (_edit_info(lambda i: _set(i, "format", "2")), "format '2'"),
    "layers not a mapping": (_edit_info(lambda i: _set(i, "layers", [])), "field 'layers'"),
    "field of wrong type": (
        _edit_info(lambda i: _set(i, "layers", _layer(i), "group_size", "16")),
        "'group_size' must be int",
    ),
    "bool as int": (_edit_info(lambda i: _set(i, "layers", _layer(i), "rank", True)), "'rank' must be int"),
    "missing field": (_edit_info(lambda i: (i["layers"][_layer(i)].pop("rank"), i)[1]), "exactly the fields"),
    "bad group size": (_edit_info(lambda i: _set(i, "layers", _layer(i), "group_size", 24)), "group_size=24"),
    "shape not the model's": (
        _edit_info(lambda i: _set(i, "layers", _layer(i), "in_features", 2 * i["layers"][_layer(i)]["in_features"])),
        "same architecture",
    ),
    "layer not in the model": (
        _edit_info(lambda i: _set(i, "layers", {"nope.proj": next(iter(i["layers"].values()))})),
        "'nope.proj', which FluxTransformer2DModel does not have",
    ),
    "checksums missing": (_edit_info(lambda i: (i.pop("sha256"), i)[1]), "field 'sha256'"),
    "checksum not hex": (_edit_info(lambda i: _set(i, "sha256", next(iter(i["sha256"])), "xyz")), "field 'sha256'"),
    "checksum of no tensor": (_edit_info(lambda i: _set(i, "sha256", "ghost", "0" * 64)), "'ghost'"),
    "not safetensors": (lambda good, bad: bad.write_bytes(b"\x10" + b"\x00" * 7 + b"{not json}" * 3), "not a readable"),
    "no accel metadata": (lambda good, bad: save_file({"x": torch.ones(2)}, str(bad)), "not written by accel"),
}


@pytest.fixture(scope="module")
def target():
    """A fresh model of the same architecture, and its state before any load attempt."""
    model = build("flux", seed=1).obj.transformer
    return model, dict(model.named_modules()), {k: v.clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("case", BAD_FILES)
def test_bad_file_raises_naming_the_problem_and_changes_nothing(case, saved, target, tmp_path):
    _, good = saved
    model, modules, state = target
    bad = tmp_path / "bad.safetensors"
    make, match = BAD_FILES[case]
    make(good, bad)
    with pytest.raises(QuantFileError, match=match) as caught:
        load_quantized(model, bad)
    assert isinstance(caught.value, AccelError) and isinstance(caught.value, ValueError)
    now = dict(model.named_modules())
    assert now.keys() == modules.keys() and all(now[k] is m for k, m in modules.items())
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], v) for k, v in state.items())
    assert "save_pretrained" not in vars(model)


def test_retry_with_the_good_file_after_failures_is_bit_exact(saved, tmp_path):
    source, good = saved
    model = build("flux", seed=1).obj.transformer
    for case in ("missing tensor", "wrong shape", "NaN scale"):  # the first two fail after the layers were swapped
        bad = tmp_path / f"{case}.safetensors"
        BAD_FILES[case][0](good, bad)
        with pytest.raises(QuantFileError):
            load_quantized(model, bad)
    load_quantized(model, good)
    assert _same_state(model, source)
    with pytest.raises(QuantSaveError):  # loaded 4-bit: the plain format cannot hold it either
        model.save_pretrained(tmp_path / "plain")


def test_format_1_files_still_load_with_the_checks_they_allow(saved, tmp_path):
    source, good = saved
    tensors, info = _contents(good)
    old = tmp_path / "format1.safetensors"
    v1 = json.dumps({"format": 1, "layers": info["layers"]})
    save_model(source, str(old), metadata={"accel.quant": v1})  # what accel wrote before checksums
    model = build("flux", seed=1).obj.transformer
    with pytest.warns(UserWarning, match="format 1, which stores no checksums"):
        load_quantized(model, old)
    assert _same_state(model, source)

    _nan(tensors, info)
    _write(old, tensors, json.loads(v1))
    fresh = build("flux", seed=1).obj.transformer
    with pytest.warns(UserWarning, match="format 1"), pytest.raises(QuantFileError, match="non-finite"):
        load_quantized(fresh, old)


class _Tied(nn.Module):
    def __init__(self):
        super().__init__()
        self.first = nn.Linear(32, 64)
        self.second = self.first  # one layer under two names
        self.norm = nn.LayerNorm(64)
        self.tail = nn.Linear(64, 64, bias=False)
        self.tail_again = nn.Linear(64, 64, bias=False)
        self.tail_again.weight = self.tail.weight  # one parameter under two names, kept 16-bit


def test_tied_layers_and_weights_are_stored_once_and_load_tied(tmp_path):
    torch.manual_seed(0)
    source = _Tied()
    quantize(source, QuantConfig(group_size=16, min_features=0, exclude=("tail*",)))
    path = tmp_path / "tied.safetensors"
    save_quantized(source, path)
    stored, info = _contents(path)
    assert list(info["layers"]) == ["first"] and "second.qweight" not in stored and "tail_again.weight" not in stored
    model = _Tied()
    load_quantized(model, path)
    assert model.second is model.first and model.tail_again.weight is model.tail.weight
    assert _same_state(model, source)
