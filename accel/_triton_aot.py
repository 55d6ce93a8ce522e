"""Compile a Triton kernel for an NVIDIA GPU on a machine without one, and read what came out.

Why: accel's kernels are tested under TRITON_INTERPRET, which checks their math but not that they
compile for the GPUs we target, which tensor-core instructions Triton picks for them, or whether they
fit in shared memory and registers. Triton compiles ahead of time (Triton IR -> PTX -> cubin with the
`ptxas` it bundles) once the active driver names a target; no GPU is touched. This is the only
GPU-free check of those properties. It says nothing about speed.

Use in a process where TRITON_INTERPRET is unset (an interpreted `@triton.jit` function cannot be
compiled). Pointer arguments may be torch dtypes (Triton's MockTensor); integer arguments should be
the real values (Triton specialises on ==1 and on divisibility by 16).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass

# Largest dynamic shared memory one block may opt into (CUDA programming guide, compute capabilities).
SHARED_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

_MMA = re.compile(r"\b(wgmma\.mma_async|mma\.sync)\.[\w.]+")
_TYPES = ("s8", "u8", "s4", "u4", "e4m3", "e5m2", "f16", "bf16", "tf32", "f32", "f64", "s32")


@dataclass
class CompileInfo:
    target: str  # the ptxas --gpu-name, e.g. "sm_90a"
    shared: int  # bytes of shared memory per block the launch asks for
    registers: int  # per thread
    spill_stores: int  # bytes, from ptxas -v
    spill_loads: int
    stack: int  # bytes of stack frame per thread
    mma: list[str]  # tensor-core instruction kinds in the PTX, e.g. ["wgmma s8"]; [] = no tensor cores
    cubin_bytes: int
    num_warps: int
    num_stages: int


class _FakeDriver:
    """Just enough of a driver for `JITFunction.warmup` to compile for `arch`; launches nothing."""

    def __init__(self, arch: int):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.arch = arch

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return ("aot", self.arch)  # a device-cache key of its own per target, never a real device's

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        import torch

        return torch.device("cpu")

    def is_active(self):
        return True


@contextmanager
def fake_target(arch: int):
    """Make Triton compile for compute capability `arch` (80, 89, 90, ...), then restore the driver."""
    from triton.runtime import driver

    saved = driver._active  # may be None (no driver created yet); DriverConfig.active would create one
    driver.set_active(_FakeDriver(arch))
    try:
        yield
    finally:
        driver._active = saved


def ptxas(arch: int) -> str | None:
    """Path of the ptxas Triton uses for `arch`, or None if it is missing."""
    try:
        from triton.backends.nvidia.compiler import get_ptxas

        path = get_ptxas(arch).path
    except Exception:  # not bundled and not on PATH: knobs raise
        return None
    return path if path and os.path.exists(path) else None


def mma_kinds(ptx: str) -> list[str]:
    """Tensor-core instruction kinds in `ptx`: "wgmma s8", "mma bf16", "mma e4m3", ... (by A operand type)."""
    kinds = set()
    for m in _MMA.finditer(ptx):
        types = [t for t in m.group(0).split(".") if t in _TYPES]  # mma: D A B C; wgmma: D A B
        if len(types) >= 3:
            a, b = types[1], types[2]
            kinds.add(f"{m.group(1).split('.')[0]} {a if a == b else a + 'x' + b}")
    return sorted(kinds)


def _ptxas_report(ptx: str, arch_name: str, arch: int, fp_fusion: bool) -> dict[str, int]:
    """Re-assemble the PTX with Triton's ptxas flags plus -v (0.1 s) and parse registers and spills;
    the compile itself only logs them when TRITON_DUMP_PTXAS_LOG is set and the cache misses."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        cmd = [ptxas(arch), "-v", "--regAllocOptLevel=2", f"--gpu-name={arch_name}", src, "-o", src + ".o"]
        if not fp_fusion:
            cmd.insert(2, "--fmad=false")
        log = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    num = lambda pattern: int(re.search(pattern, log).group(1))  # noqa: E731
    return dict(
        registers=num(r"Used (\d+) registers"),
        stack=num(r"(\d+) bytes stack frame"),
        spill_stores=num(r"(\d+) bytes spill stores"),
        spill_loads=num(r"(\d+) bytes spill loads"),
    )


def compile_kernel(jit_fn, args, grid, target: int = 90, **kwargs) -> CompileInfo:
    """Compile `jit_fn` for compute capability `target` as `jit_fn[grid](*args, **kwargs)` would.

    kwargs: the constexprs, launch options (num_warps, num_stages) and keyword pointer arguments (a torch dtype
    stands for a tensor, as in `args`). Raises what Triton or ptxas raise when the kernel does not compile.
    """
    from triton.backends.nvidia.compiler import sm_arch_from_capability
    from triton.runtime.jit import JITFunction, MockTensor

    if not isinstance(jit_fn, JITFunction):
        raise TypeError(f"{jit_fn!r} is not a compilable JITFunction; unset TRITON_INTERPRET before importing triton")
    if ptxas(target) is None:
        raise RuntimeError(f"Triton's ptxas for sm_{target} is missing; reinstall triton or set TRITON_PTXAS_PATH")
    with fake_target(target):
        # warmup wraps positional dtypes in MockTensor itself, keyword ones not
        k = jit_fn.warmup(*args, grid=grid, **{name: MockTensor.wrap_dtype(v) for name, v in kwargs.items()})
    md = k.metadata
    arch_name = sm_arch_from_capability(target)  # "sm_90a": what Triton hands ptxas
    regs = _ptxas_report(k.asm["ptx"], arch_name, target, md.enable_fp_fusion)
    return CompileInfo(
        target=arch_name,
        shared=md.shared,
        mma=mma_kinds(k.asm["ptx"]),
        cubin_bytes=len(k.asm["cubin"]),
        num_warps=md.num_warps,
        num_stages=md.num_stages,
        **regs,
    )
