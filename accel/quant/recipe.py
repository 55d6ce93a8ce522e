"""How one weight matrix becomes int4: activation-aware scaling, low-rank split, group fit.

With everything on, for a weight W [N, K] and calibration inputs X [T, K]:

1. Activation-aware scaling (AWQ): input channel k is multiplied by s_k = mean|x_k|^alpha before
   quantization, so channels that see large activations get finer levels; the stored per-channel factor
   1/s_k is applied to the dequantized weight, so the layer still computes X W^T. alpha in 0..1 is chosen
   per layer by the output error on X (alpha = 0 is plain quantization, so scaling never loses on X).
2. Low-rank split (SVDQuant): the top `rank` singular directions of the scaled weight are kept in 16-bit
   as two thin matrices (up [N, r], down [r, K]); only the rest, with its outliers mostly gone, is
   quantized.
3. Group fit (`int4.fit_int4`) of the remainder, its error weighted by E[x_k^2] when calibrated.

With int8 activations (W4A8), step 1 measures the output error with the inputs rounded to int8 per token,
as the W4A8 GEMM rounds them: dividing outlier channels by s_k then also shrinks each token's int8 step
(SmoothQuant's idea), and alpha balances that against the weight error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .int4 import dequantize, fit_int4, pack_int4
from .kernels import quantize_activations_reference, w4a8_matmul_reference

_ALPHAS = [i / 10 for i in range(11)]


@dataclass
class ActivationStats:
    """What calibration recorded for one layer's input."""

    absmean: torch.Tensor  # [K] float32, mean |x_k|
    sqmean: torch.Tensor  # [K] float32, mean x_k^2
    sample: torch.Tensor  # [T, K] input rows (CPU)


@dataclass
class QuantizedWeight:
    """The tensors a `W4Linear` stores, and how well they reproduce the original weight."""

    qweight: torch.Tensor  # uint8 [N, K/2]
    scales: torch.Tensor  # [N, K/G] compute dtype
    offsets: torch.Tensor  # [N, K/G] compute dtype
    in_scale: torch.Tensor | None  # [K] compute dtype: 1/s of activation-aware scaling
    lora_down: torch.Tensor | None  # [r, K] compute dtype (applies to the raw input)
    lora_up: torch.Tensor | None  # [N, r] compute dtype
    weight_error: float  # ||W - W_q|| / ||W|| (Frobenius)
    output_error: float | None  # ||X (W - W_q)^T|| / ||X W^T|| on the calibration rows
    alpha: float | None  # chosen activation-scaling strength (None: not calibrated)
    int8_output_error: float | None = None  # as output_error, with the W4A8 GEMM's int8 activations

    def effective_weight(self) -> torch.Tensor:
        """The weight the quantized layer computes with, in float32 (for tests and error reports)."""
        w = dequantize(self.qweight, self.scales, self.offsets, self.in_scale, torch.float32)
        if self.lora_up is not None:
            w = w + self.lora_up.float() @ self.lora_down.float()
        return w


def _rel(num: torch.Tensor, den: torch.Tensor) -> float:
    return float(num.norm() / den.norm().clamp_min(1e-30))


def _channel_factor(absmean: torch.Tensor, alpha: float, dtype: torch.dtype) -> torch.Tensor:
    """1/s for s = absmean^alpha normalised to geometric mean range 1, rounded to `dtype`."""
    s = absmean.clamp_min(1e-5) ** alpha
    s = s / (s.max() * s.min()).sqrt()
    return (1.0 / s).to(dtype).float()


def _int8_rows(x: torch.Tensor, inv: torch.Tensor, group_size: int) -> torch.Tensor:
    """x * inv rounded to int8 per token as the W4A8 GEMM does, back in float32."""
    x8, step, _ = quantize_activations_reference(x, inv, group_size)
    return x8.float() * step[:, None]


def _choose_alpha(w, x, y, absmean, group_size, dtype, int8_activations):
    """The activation-scaling strength with the smallest output error on the calibration rows, using
    plain round-to-nearest for speed (as AWQ does)."""
    best_alpha, best_err = 0.0, None
    for alpha in _ALPHAS:
        inv = _channel_factor(absmean, alpha, dtype)
        q, sc, off = fit_int4(w / inv, group_size, dtype, search=False)
        if int8_activations:
            y_q = _int8_rows(x, inv, group_size) @ dequantize(pack_int4(q), sc, off, None, torch.float32).T
        else:
            y_q = x @ dequantize(pack_int4(q), sc, off, inv, torch.float32).T
        err = float(((y_q - y) ** 2).sum())
        if best_err is None or err < best_err:
            best_alpha, best_err = alpha, err
    return best_alpha


def quantize_weight(
    weight: torch.Tensor,
    *,
    group_size: int,
    dtype: torch.dtype,
    search: bool = True,
    rank: int = 0,
    stats: ActivationStats | None = None,
    int8_activations: bool = False,
) -> QuantizedWeight:
    """Quantize one weight [N, K] (see the module docstring). Runs on the weight's device, in float32.
    `int8_activations`: the layer may run W4A8; choose alpha for it and report its error too."""
    w = weight.detach().float()
    n, k = w.shape
    x = y = None
    importance = inv = None
    alpha = None
    if stats is not None:
        x = stats.sample.to(w.device, torch.float32)
        y = x @ w.T
        alpha = _choose_alpha(w, x, y, stats.absmean.to(w.device), group_size, dtype, int8_activations)
        importance = stats.sqmean.to(w.device).clamp_min(1e-12)
        if alpha > 0:
            inv = _channel_factor(stats.absmean.to(w.device), alpha, dtype)
            importance = importance * inv * inv  # error in the scaled space, seen through x_k / s_k

    lora_down = lora_up = None
    residual = w
    if rank > 0:
        r = min(rank, n, k)
        scaled = w if inv is None else w / inv
        devices = [w.device] if w.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):  # randomized SVD: deterministic, and the caller's RNG untouched
            torch.manual_seed(0)
            u, sv, v = torch.svd_lowrank(scaled, q=min(r + 8, n, k), niter=4)
        lora_up = (u[:, :r] * sv[:r]).to(dtype).contiguous()
        lora_down = (v[:, :r].T * (1.0 if inv is None else inv)).to(dtype).contiguous()
        residual = w - lora_up.float() @ lora_down.float()

    target = residual if inv is None else residual / inv
    q, scales, offsets = fit_int4(target, group_size, dtype, search=search, importance=importance)
    result = QuantizedWeight(
        qweight=pack_int4(q),
        scales=scales,
        offsets=offsets,
        in_scale=None if inv is None else inv.to(dtype),
        lora_down=lora_down,
        lora_up=lora_up,
        weight_error=0.0,
        output_error=None,
        alpha=alpha,
    )
    diff = w - result.effective_weight()
    result.weight_error = _rel(diff, w)
    if x is not None:
        result.output_error = _rel(x @ diff.T, y)
        if int8_activations:
            y8 = w4a8_matmul_reference(x, result.qweight, scales, offsets, result.in_scale)
            if lora_up is not None:
                y8 = y8 + (x @ lora_down.float().T) @ lora_up.float().T
            result.int8_output_error = _rel(y8 - y, y)
    return result
