"""Fidelity metrics comparing an accelerated run against its reference run.

All image metrics take float tensors in ``[0, 1]`` shaped ``[B, C, H, W]`` (images)
or ``[B, F, C, H, W]`` (videos, treated as ``B*F`` images). The math runs in
float64 on CPU so results do not depend on the dtype/device of the pipeline output.
Only torch is needed at runtime; ``lpips`` is optional (see :func:`lpips_or_none`).
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "psnr",
    "ssim",
    "relative_l1",
    "latent_fidelity",
    "lpips_or_none",
    "first_token_kl",
    "token_agreement",
]


def _as_images(pred: torch.Tensor, ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Check shapes and flatten videos to ``[N, C, H, W]`` float64 on CPU."""
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {tuple(pred.shape)} vs {tuple(ref.shape)}")
    if pred.dim() == 5:
        pred, ref = pred.flatten(0, 1), ref.flatten(0, 1)
    if pred.dim() != 4:
        raise ValueError(f"expected [B,C,H,W] or [B,F,C,H,W], got shape {tuple(pred.shape)}")
    return pred.detach().double().cpu(), ref.detach().double().cpu()


def psnr(pred: torch.Tensor, ref: torch.Tensor, data_range: float = 1.0) -> float:
    """PSNR in dB from the MSE over all elements; identical inputs give ``inf``."""
    p, r = _as_images(pred, ref)
    mse = float(torch.mean((p - r) ** 2))
    if mse == 0.0:
        return float("inf")
    return 10.0 * math.log10(data_range**2 / mse)


def latent_fidelity(x: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """Closeness of a final latent (any shape) to the baseline's: PSNR in dB with both mapped to [0, 1] by
    `ref`'s min/max (None when identical or not finite), `relative_l1`, max |x - ref|, whether they are
    identical and whether `x` is finite; float64 on CPU."""
    if x.shape != ref.shape:
        raise ValueError(f"x and ref shapes differ: {tuple(x.shape)} vs {tuple(ref.shape)}")
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    finite = bool(torch.isfinite(x).all())
    identical = bool(torch.equal(x, ref))
    lo, span = ref.min(), (ref.max() - ref.min()).clamp_min(1e-12)
    mse = float((((x - lo) / span - (ref - lo) / span) ** 2).mean())
    return dict(
        psnr_db=None if identical or not finite or mse == 0 else 10 * math.log10(1 / mse),
        rel_l1=relative_l1(x, ref) if finite else None,
        max_abs_diff=float((x - ref).abs().max()) if finite else None,
        identical=identical,
        finite=finite,
    )


def _gaussian_1d(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(
    pred: torch.Tensor,
    ref: torch.Tensor,
    data_range: float = 1.0,
    win_size: int = 11,
    sigma: float = 1.5,
) -> float:
    """Mean SSIM (Wang et al. 2004), per channel, averaged over channels and images.

    Uses an 11x11 Gaussian window (sigma 1.5), K1=0.01, K2=0.03 and population
    (not sample) covariances, evaluated only where the window fits inside the image.
    This equals ``skimage.metrics.structural_similarity(gaussian_weights=True,
    sigma=1.5, use_sample_covariance=False, ...)``, which filters with reflect
    padding and then crops the border.

    Images smaller than the window: the window shrinks to the largest odd size that
    fits (``min(H, W)`` or ``min(H, W) - 1``), keeping sigma and renormalising the
    truncated Gaussian, so tiny images still get a score instead of an error.
    """
    p, r = _as_images(pred, ref)
    n, c, h, w = p.shape
    win = min(win_size, h, w)
    win -= 1 - win % 2  # make odd
    g = _gaussian_1d(win, sigma)
    kernel = (g[:, None] * g[None, :]).expand(c, 1, win, win).contiguous()

    def filt(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=c)  # 'valid' region only

    mu_x, mu_y = filt(p), filt(r)
    var_x = filt(p * p) - mu_x**2
    var_y = filt(r * r) - mu_y**2
    cov = filt(p * r) - mu_x * mu_y
    c1 = (0.01 * data_range) ** 2
    c2 = (0.03 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(s.mean())


def relative_l1(pred: torch.Tensor, ref: torch.Tensor) -> float:
    """``sum|pred - ref| / sum|ref|``: scale-free drift, usable on latents too (any shape)."""
    if pred.shape != ref.shape:
        raise ValueError(f"pred and ref shapes differ: {tuple(pred.shape)} vs {tuple(ref.shape)}")
    p, r = pred.detach().double().cpu(), ref.detach().double().cpu()
    return float((p - r).abs().sum() / r.abs().sum().clamp_min(1e-12))


_LPIPS_MODEL: Any = None
_LPIPS_FAILED = False


def _load_lpips() -> Any:
    """Build LPIPS(alex) only from local files; never downloads, never prints."""
    import lpips  # noqa: PLC0415  (optional dependency)
    from torchvision.models import AlexNet_Weights  # noqa: PLC0415

    lin = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
    backbone = os.path.basename(AlexNet_Weights.IMAGENET1K_V1.url)
    cached = os.path.join(torch.hub.get_dir(), "checkpoints", backbone)
    if not (os.path.isfile(lin) and os.path.isfile(cached)):
        raise FileNotFoundError("LPIPS weights not available locally")
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return lpips.LPIPS(net="alex", verbose=False).eval()


def lpips_or_none(pred: torch.Tensor, ref: torch.Tensor) -> float | None:
    """Mean LPIPS (AlexNet) distance, or ``None`` when it cannot be computed offline.

    Optional: needs the ``lpips`` package plus its linear weights and torchvision's
    AlexNet checkpoint already in the torch hub cache. Any failure (missing package,
    missing weights, bad input) yields ``None`` silently so benchmarks still run.
    """
    global _LPIPS_MODEL, _LPIPS_FAILED
    if _LPIPS_FAILED:
        return None
    try:
        if _LPIPS_MODEL is None:
            _LPIPS_MODEL = _load_lpips()
    except Exception:  # noqa: BLE001  (optional metric: any failure means "unavailable")
        _LPIPS_FAILED = True
        return None
    try:
        p, r = _as_images(pred, ref)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            d = _LPIPS_MODEL(p.float() * 2 - 1, r.float() * 2 - 1)  # lpips expects [-1, 1]
        return float(d.mean())
    except Exception:  # noqa: BLE001
        return None


def first_token_kl(logits_ref: torch.Tensor, logits_test: torch.Tensor) -> float:
    """KL(ref || test) of the next-token softmax, mean over the batch, in float64.

    Accepts ``[V]``, ``[B, V]`` or ``[B, T, V]``; for 3-D input the last position is
    used, i.e. the distribution of the first token generated after the prompt.
    """
    if logits_ref.shape != logits_test.shape:
        raise ValueError(f"logit shapes differ: {tuple(logits_ref.shape)} vs {tuple(logits_test.shape)}")
    a, b = logits_ref.detach().double().cpu(), logits_test.detach().double().cpu()
    if a.dim() == 1:
        a, b = a[None], b[None]
    elif a.dim() == 3:
        a, b = a[:, -1], b[:, -1]
    lp, lq = F.log_softmax(a, dim=-1), F.log_softmax(b, dim=-1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return max(float(kl.mean()), 0.0)  # clamp tiny negative rounding noise


def _rows(seq: torch.Tensor | Sequence[Any]) -> list[list[int]]:
    if isinstance(seq, torch.Tensor):
        seq = seq.detach().cpu().tolist()
    rows = list(seq)
    if not rows or not isinstance(rows[0], (list, tuple)):
        return [[int(x) for x in rows]]
    return [[int(x) for x in row] for row in rows]


def token_agreement(seq_ref: torch.Tensor | Sequence[Any], seq_test: torch.Tensor | Sequence[Any]) -> float:
    """Fraction of generated token positions that match, pooled over the batch.

    Takes ``[T]`` or ``[B, T]`` (tensors or nested lists) of generated tokens only.
    Rows of different length are compared up to the shorter one; the extra positions
    of the longer one count as mismatches (denominator is the longer length).
    Two empty sequences agree fully (1.0).
    """
    ref, test = _rows(seq_ref), _rows(seq_test)
    if len(ref) != len(test):
        raise ValueError(f"batch sizes differ: {len(ref)} vs {len(test)}")
    same = total = 0
    for r, t in zip(ref, test):
        same += sum(x == y for x, y in zip(r, t))
        total += max(len(r), len(t))
    return 1.0 if total == 0 else same / total
