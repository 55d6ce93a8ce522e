"""Peak-memory and timing helpers for the benchmark harness.

On CUDA the allocator's own peak counter is exact; on CPU there is no such counter,
so the process RSS is sampled in a background thread (psutil, imported lazily).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

import torch

__all__ = ["PeakMemory", "time_calls", "median", "format_bytes"]


def _is_cuda(device: str | torch.device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


class PeakMemory:
    """Context manager reporting the peak memory used while its block runs.

    After exit: ``peak_bytes`` (int or None), ``baseline_bytes`` (at entry),
    ``device_kind`` ("cuda" = ``torch.cuda.max_memory_allocated`` after a reset;
    "cpu-rss" = highest sampled process RSS, sampled every ``interval`` seconds).
    ``peak_bytes`` is None on CPU when psutil is not installed. CPU sampling can miss
    spikes shorter than ``interval``; RSS also counts non-torch memory.
    """

    def __init__(self, device: str | torch.device = "cpu", interval: float = 0.005) -> None:
        self.device = torch.device(device)
        self.interval = interval
        self.device_kind = "cuda" if _is_cuda(self.device) else "cpu-rss"
        self.peak_bytes: int | None = None
        self.baseline_bytes: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: Any = None

    @property
    def delta_bytes(self) -> int | None:
        """Peak minus baseline: the memory the block itself added."""
        if self.peak_bytes is None or self.baseline_bytes is None:
            return None
        return self.peak_bytes - self.baseline_bytes

    def _sample(self) -> None:
        rss = int(self._proc.memory_info().rss)
        if self.peak_bytes is None or rss > self.peak_bytes:
            self.peak_bytes = rss

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakMemory:
        self.peak_bytes = self.baseline_bytes = None
        if self.device_kind == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline_bytes = torch.cuda.memory_allocated(self.device)
            return self
        try:
            import psutil  # noqa: PLC0415  (optional, lazy)
        except ImportError:
            return self
        self._proc = psutil.Process()
        self._sample()
        self.baseline_bytes = self.peak_bytes
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name="PeakMemory", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self.device_kind == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        elif self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
            self._sample()  # catch memory still held at exit


def time_calls(fn: Callable[[], Any], repeats: int, warmup: int = 1, device: str | torch.device = "cpu") -> list[float]:
    """Run ``fn`` ``warmup`` times untimed, then return ``repeats`` times in seconds.

    On CUDA each call is timed with CUDA events recorded around it, after the queue is drained, so the
    kernels it launched count against it and host jitter does not; elsewhere, wall time.
    """
    cuda = _is_cuda(device)
    for _ in range(warmup):
        fn()
    times: list[float] = []
    for _ in range(repeats):
        if cuda:
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return times


def median(xs: Sequence[float]) -> float:
    """Median, robust to the odd slow call (GC, page faults); raises on empty input."""
    if not xs:
        raise ValueError("median of empty sequence")
    return float(statistics.median(xs))


def format_bytes(n: int | float | None) -> str:
    """Human-readable binary size, e.g. ``"12.3 MiB"``; ``None`` gives ``"n/a"``."""
    if n is None:
        return "n/a"
    sign = "-" if n < 0 else ""
    v = float(abs(n))
    if v < 1024:
        return f"{sign}{int(v)} B"
    for unit in ("KiB", "MiB", "GiB", "TiB"):
        v /= 1024
        if v < 1024 or unit == "TiB":
            break
    return f"{sign}{v:.1f} {unit}"
