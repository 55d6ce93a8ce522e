"""Triton plumbing shared by accel's kernels: where they run, how they are loaded, grid arithmetic.

Layout (SageAttention style): each `*_kernel.py` module holds one `@triton.jit` kernel and its launcher
and imports triton at its top. The modules that expose the kernels (the PyTorch references beside them,
the `torch.library` custom ops, the public wrappers) never import triton themselves; they `load` a
kernel module when a kernel is first needed. So `import accel` works without triton, and tests can set
TRITON_INTERPRET before triton is imported. Device-side helpers shared by kernels live in
`accel._triton_tiles` (it imports triton, so only kernel modules import it).
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType

import torch

_WHERE = "CUDA tensors (or CPU tensors with TRITON_INTERPRET=1 set before importing triton), all on one device"


def interpreting() -> bool:
    """Kernels run in Triton's CPU interpreter (TRITON_INTERPRET=1: tests, small shapes)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids and block counts."""
    return -(-a // b)


@functools.cache
def available() -> bool:
    """Triton is installed (imports it once to find out)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def usable(device: torch.device) -> bool:
    """A Triton kernel can run on tensors of `device`: CUDA, or CPU under TRITON_INTERPRET=1."""
    return device.type == "cuda" or (device.type == "cpu" and interpreting())


def check_device(who: str, tensors, fix: str) -> None:
    """ValueError unless the (non-None) `tensors` share one device a Triton kernel can run on."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) != 1 or not usable(next(iter(devices))):
        raise ValueError(f"{who} runs on {_WHERE}; got tensors on {sorted(map(str, devices))}. {fix}")


def load(module: str) -> ModuleType:
    """The kernel module `module` (absolute name), imported on first use: the one way accel imports triton."""
    return importlib.import_module(module)
