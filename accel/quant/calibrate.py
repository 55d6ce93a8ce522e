"""Record what the layers to be quantized see during a short run of the user's own model."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .recipe import ActivationStats


class _InputRecorder:
    """Forward pre-hook: running per-channel mean |x| and mean x^2, plus a random subset of input rows
    (kept on the CPU, in the input's dtype, so calibration costs no accelerator memory)."""

    def __init__(self, tokens: int, generator: torch.Generator):
        self.tokens = tokens
        self.generator = generator
        self.abs_sum = self.sq_sum = None
        self.count = 0
        self.rows: list[torch.Tensor] = []
        self.kept = 0

    def __call__(self, module: nn.Module, args: tuple) -> None:
        if not args or not torch.is_tensor(args[0]):
            return
        x = args[0].detach()
        x2 = x.reshape(-1, x.shape[-1]).float()
        if self.abs_sum is None:
            self.abs_sum = torch.zeros(x2.shape[1], device=x2.device)
            self.sq_sum = torch.zeros(x2.shape[1], device=x2.device)
        self.abs_sum += x2.abs().sum(0)
        self.sq_sum += (x2 * x2).sum(0)
        self.count += x2.shape[0]
        pick = torch.randperm(x2.shape[0], generator=self.generator)[: self.tokens]
        self.rows.append(x.reshape(-1, x.shape[-1])[pick.to(x.device)].to("cpu"))
        self.kept += len(pick)
        if self.kept > 4 * self.tokens:  # bound host memory over long runs
            self.rows = [self._subset(2 * self.tokens)]
            self.kept = len(self.rows[0])

    def _subset(self, n: int) -> torch.Tensor:
        rows = torch.cat(self.rows)
        return rows[torch.randperm(len(rows), generator=self.generator)[:n]]

    def stats(self) -> ActivationStats | None:
        if not self.count:
            return None
        return ActivationStats(
            absmean=self.abs_sum / self.count, sqmean=self.sq_sum / self.count, sample=self._subset(self.tokens)
        )


def calibrate(layers: dict[str, nn.Module], run: Callable[[], Any], tokens: int) -> dict[str, ActivationStats]:
    """Call `run()` once with recorders on `layers`; stats per layer name (layers that saw no input are
    missing from the result)."""
    generator = torch.Generator().manual_seed(0)
    recorders = {name: _InputRecorder(tokens, generator) for name in layers}
    handles = [layers[name].register_forward_pre_hook(rec) for name, rec in recorders.items()]
    try:
        with torch.no_grad():
            run()
    finally:
        for handle in handles:
            handle.remove()
    stats = {name: rec.stats() for name, rec in recorders.items()}
    return {name: s for name, s in stats.items() if s is not None}
