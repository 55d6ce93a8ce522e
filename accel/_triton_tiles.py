"""Device-side helpers shared by accel's Triton GEMM kernels. Imports triton: only kernel modules import it
(the host-side plumbing, which must import without triton, is `accel._triton`)."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def grouped_tile(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """Row and column offsets ([BLOCK_M], [BLOCK_N]) of program `pid`'s output tile in grouped order: GROUP_M
    rows of tiles walk the N tiles together, so neighbouring programs share weight tiles while they are in L2."""
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % rows
    pid_n = (pid % per_group) // rows
    return pid_m * BLOCK_M + tl.arange(0, BLOCK_M), pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
