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

from .errors import KernelInputError

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
        raise KernelInputError(f"{who} runs on {_WHERE}; got tensors on {sorted(map(str, devices))}. {fix}")


def load(module: str) -> ModuleType:
    """The kernel module `module` (absolute name), imported on first use: the one way accel imports triton."""
    return importlib.import_module(module)


class KernelOp:
    """A kernel's launcher registered as a `torch.library` custom op, so torch.compile traces it as one node
    (no graph break). Outside compilation it calls the launcher directly: the op dispatcher costs tens of
    microseconds a call, which decoding with one W4 GEMM per linear layer would feel."""

    registered: list[KernelOp] = []

    def __init__(self, name: str, launcher):
        self.launcher = launcher
        self.op = torch.library.custom_op(name, launcher, mutates_args=())
        KernelOp.registered.append(self)

    def register_fake(self, fake):
        self.op.register_fake(fake)
        return fake

    def __call__(self, *args):
        return self.op(*args) if torch.compiler.is_compiling() else self.launcher(*args)


def custom_op(name: str):
    """Decorator: `@custom_op("accel::name")` on a launcher (typed arguments, no mutation) -> a `KernelOp`."""
    return lambda launcher: KernelOp(name, launcher)
