"""Tests for accel.bench.metrics, accel.bench.measure and accel.bench.host."""

from __future__ import annotations

import math
import time

import pytest
import torch

from accel.bench.host import default_json_path, environment, to_json, write_json
from accel.bench.measure import PeakMemory, format_bytes, median, time_calls
from accel.bench.metrics import (
    first_token_kl,
    latent_fidelity,
    lpips_or_none,
    psnr,
    relative_l1,
    ssim,
    token_agreement,
)


def _img(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(*shape, generator=torch.Generator().manual_seed(seed))


def _noisy(x: torch.Tensor, std: float, seed: int = 1) -> torch.Tensor:
    n = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return x + std * n


def test_identical_inputs() -> None:
    x = _img(2, 3, 32, 32)
    assert psnr(x, x.clone()) == float("inf")
    assert ssim(x, x.clone()) == pytest.approx(1.0, abs=1e-12)
    assert relative_l1(x, x.clone()) == 0.0


def test_psnr_matches_mse_formula() -> None:
    x = _img(2, 3, 64, 64)
    y = _noisy(x, 0.05)
    mse = float(((x.double() - y.double()) ** 2).mean())
    assert psnr(y, x) == pytest.approx(10 * math.log10(1 / mse), rel=1e-9)
    assert psnr(y, x) == pytest.approx(10 * math.log10(1 / 0.05**2), abs=0.1)  # known variance
    assert psnr(y * 2, x * 2, data_range=2.0) == pytest.approx(psnr(y, x), rel=1e-9)


@pytest.mark.parametrize("hw", [(32, 32), (48, 40), (64, 64)])
def test_ssim_matches_skimage(hw: tuple[int, int]) -> None:
    skm = pytest.importorskip("skimage.metrics")
    x = _img(3, 3, *hw, seed=hw[0])
    y = (0.7 * x + 0.3 * _img(3, 3, *hw, seed=hw[1] + 7)).clamp(0, 1)
    ours = ssim(y, x)
    refs = [
        skm.structural_similarity(
            y[i].numpy().astype("float64"),
            x[i].numpy().astype("float64"),
            gaussian_weights=True,
            sigma=1.5,
            use_sample_covariance=False,
            data_range=1,
            channel_axis=0,
        )
        for i in range(3)
    ]
    assert ours == pytest.approx(sum(refs) / 3, abs=1e-3)
    assert ours == pytest.approx(sum(refs) / 3, abs=1e-9)  # in fact it is exact


def test_ssim_small_images_shrink_window() -> None:
    for h, w in [(8, 8), (5, 9), (1, 1)]:
        x = _img(1, 3, h, w)
        assert ssim(x, x) == pytest.approx(1.0)
        assert ssim(_noisy(x, 0.1), x) < 1.0


def test_video_shapes() -> None:
    v = _img(2, 4, 3, 32, 32)
    n = _noisy(v, 0.05)
    flat = (n.flatten(0, 1), v.flatten(0, 1))
    assert psnr(n, v) == pytest.approx(psnr(*flat))
    assert ssim(n, v) == pytest.approx(ssim(*flat))
    assert 0.0 < ssim(n, v) < 1.0
    with pytest.raises(ValueError):
        psnr(v, v[:, :2])
    with pytest.raises(ValueError):
        ssim(v[0, 0], v[0, 0])


def test_more_noise_is_worse() -> None:
    x = _img(2, 3, 48, 48)
    ps = [psnr(_noisy(x, s), x) for s in (0.01, 0.05, 0.2)]
    ss = [ssim(_noisy(x, s), x) for s in (0.01, 0.05, 0.2)]
    rl = [relative_l1(_noisy(x, s), x) for s in (0.01, 0.05, 0.2)]
    assert ps[0] > ps[1] > ps[2]
    assert ss[0] > ss[1] > ss[2]
    assert rl[0] < rl[1] < rl[2]


def test_lpips_optional() -> None:
    x = _img(1, 3, 32, 32)
    out = lpips_or_none(x, x)
    assert out is None or (isinstance(out, float) and out == pytest.approx(0.0, abs=1e-4))


def test_first_token_kl() -> None:
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4, 100, generator=g)
    b = torch.randn(4, 100, generator=g)
    assert first_token_kl(a, a.clone()) == pytest.approx(0.0, abs=1e-12)
    assert first_token_kl(a, a + 3.0) == pytest.approx(0.0, abs=1e-12)  # shift-invariant
    kl = first_token_kl(a, b)
    assert kl > 0
    p, q = torch.softmax(a.double(), -1), torch.softmax(b.double(), -1)
    assert kl == pytest.approx(float((p * (p / q).log()).sum(-1).mean()), rel=1e-9)
    assert first_token_kl(a.half(), b.half()) > 0
    assert first_token_kl(a[:, None], b[:, None]) == pytest.approx(kl)  # [B,T,V]: last pos


def test_token_agreement() -> None:
    t = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    assert token_agreement(t, t.clone()) == 1.0
    u = t.clone()
    u[0, 3] = 0
    u[1, 0] = 0
    assert token_agreement(t, u) == pytest.approx(6 / 8)
    assert token_agreement([1, 2, 3, 4], [1, 2]) == pytest.approx(2 / 4)
    assert token_agreement([[1, 2], [3]], [[1, 2, 9], [3]]) == pytest.approx(3 / 4)
    assert token_agreement([], []) == 1.0
    assert token_agreement([9, 9], [1, 2]) == 0.0


def test_peak_memory_cpu() -> None:
    pytest.importorskip("psutil")
    with PeakMemory("cpu") as pm:
        big = torch.ones(50_000_000, dtype=torch.float32)  # 200 MB, pages touched
        time.sleep(0.05)
        del big
    assert pm.device_kind == "cpu-rss"
    assert pm.peak_bytes is not None and pm.baseline_bytes is not None
    assert pm.peak_bytes - pm.baseline_bytes >= 150 * 2**20
    assert pm.delta_bytes == pm.peak_bytes - pm.baseline_bytes


def test_time_calls_and_helpers() -> None:
    calls: list[int] = []
    ts = time_calls(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(ts) == 5 and len(calls) == 7
    assert all(t >= 0 for t in ts)
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([1.0, 2.0, 3.0, 4.0]) == 2.5
    with pytest.raises(ValueError):
        median([])
    assert format_bytes(512) == "512 B"
    assert format_bytes(int(12.3 * 2**20)) == "12.3 MiB"
    assert format_bytes(3 * 2**30) == "3.0 GiB"
    assert format_bytes(None) == "n/a"


def test_latent_fidelity() -> None:
    ref = torch.linspace(-2.0, 2.0, 3 * 8 * 5).reshape(3, 8, 5)  # any shape: a packed FLUX latent is 3-D
    same = latent_fidelity(ref.clone(), ref)
    assert same == dict(psnr_db=None, rel_l1=0.0, max_abs_diff=0.0, identical=True, finite=True)
    shifted = latent_fidelity(ref + 0.04, ref)  # span 4: mapped to [0, 1] the error is 0.01 everywhere
    assert shifted["psnr_db"] == pytest.approx(40.0) and not shifted["identical"]
    assert shifted["max_abs_diff"] == pytest.approx(0.04)
    assert shifted["rel_l1"] == pytest.approx(relative_l1(ref + 0.04, ref))
    bad = ref.clone()
    bad[0, 0, 0] = float("nan")
    assert latent_fidelity(bad, ref) == dict(
        psnr_db=None, rel_l1=None, max_abs_diff=None, identical=False, finite=False
    )
    with pytest.raises(ValueError, match="shapes differ"):
        latent_fidelity(ref[:1], ref)


def test_results_json_and_environment(tmp_path) -> None:
    import dataclasses
    import json

    @dataclasses.dataclass
    class Config:
        threshold: float
        shape: tuple

    doc = {"config": Config(0.1, (1, 2)), "psnr": float("inf"), "nan": float("nan"), "dtype": torch.bfloat16, 3: None}
    assert to_json(doc) == {
        "config": {"threshold": 0.1, "shape": [1, 2]},
        "psnr": "inf",
        "nan": "nan",
        "dtype": "torch.bfloat16",
        "3": None,
    }
    path = write_json(tmp_path / "new" / "result.json", doc)  # folders are created
    assert json.loads(path.read_text()) == to_json(doc) and [p.name for p in path.parent.iterdir()] == ["result.json"]

    env = environment("cpu")
    assert env["device"] == "cpu" and env["gpu"] is None and env["torch"] == torch.__version__
    assert {"accel", "diffusers", "transformers", "triton", "python", "cpu_count", "torch_threads"} <= set(env)
    assert default_json_path(tmp_path, "caching", env, tiny=True) == tmp_path / "caching-cpu-tiny.json"
    assert (
        default_json_path(tmp_path, "quant", dict(gpu="NVIDIA H100 80GB HBM3"), tiny=False).name
        == "quant-nvidia-h100-80gb-hbm3.json"
    )
