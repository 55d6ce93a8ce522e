"""accel under diffusers' context parallelism (Ulysses degree 2), on CPU: two processes over gloo, started here.

The two ranks (tests/cp_worker.py) run every scenario once, together, in about a minute; each test below checks
one property of what they saved. Patching the CPU's device count to 1 is the only concession to running without
GPUs (diffusers divides by it to pick each rank's device).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import accel
from accel import AttentionConfig, CacheConfig, NotApplicableError, ParallelismError
from accel.zoo import build

WORKER = Path(__file__).with_name("cp_worker.py")
TIMEOUT_S = 240
SCENARIOS = ("wan-threshold", "wan-balanced", "flux-threshold", "flux-balanced")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the two ranks saved; the processes are killed if they outlive TIMEOUT_S."""
    out = tmp_path_factory.mktemp("cp")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE="2")
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(filter(None, [os.getcwd(), env.get("PYTHONPATH")])))
    procs = []
    try:
        for rank in range(2):
            log = open(out / f"rank{rank}.log", "w")  # noqa: SIM115 - closed with the process below
            procs.append(
                (
                    subprocess.Popen(
                        [sys.executable, str(WORKER), str(out)],
                        env=dict(env, RANK=str(rank)),
                        stdout=log,
                        stderr=subprocess.STDOUT,
                    ),
                    log,
                )
            )
        for proc, _ in procs:
            proc.wait(timeout=TIMEOUT_S)
    finally:
        for proc, log in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            log.close()
    for rank, (proc, _) in enumerate(procs):
        assert proc.returncode == 0, (out / f"rank{rank}.log").read_text()[-4000:]
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]


def _same(family: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    """Wan under Ulysses computes what one process computes, bit for bit. FLUX joins text and image tokens per rank
    before the all-to-all, so its attention sums keys in another order: within 1e-5 of the [0, 1] pixels (seen: 1e-6).
    """
    if family == "wan":
        assert torch.equal(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_ranks_agree_and_match_one_process(ranks, scenario):
    zero, one = ranks[0][scenario], ranks[1][scenario]
    reference = ranks[0][f"{scenario}/reference"]
    family = scenario.split("-")[0]
    # every rank made the same decisions, the ones one unparallelised process makes
    assert zero["decisions"] == one["decisions"] == reference["decisions"]
    # the gather at the output hands every rank the same tensor
    assert torch.equal(zero["output"], one["output"])
    _same(family, zero["output"], reference["output"])
    _same(family, zero["unpatched_output"], reference["unpatched_output"])


@pytest.mark.parametrize("scenario", ["wan-threshold", "flux-threshold"])
def test_threshold_reuses_the_same_steps_on_both_ranks(ranks, scenario):
    decisions = ranks[0][scenario]["decisions"]
    assert all(reused for _, reused in decisions.values()), decisions
    assert "context-parallel ranks" in " ".join(ranks[0][scenario]["applied"])


def test_all_reduce_forces_one_decision_on_divergent_inputs(ranks):
    zero, one = ranks[0]["divergent"], ranks[1]["divergent"]
    assert zero["alone"] != one["alone"]  # the inputs do make the ranks disagree on their own
    assert zero["all-reduced"] == one["all-reduced"]


# -- refusals, in this process ---------------------------------------------------------------------------------------


def test_enable_parallelism_after_patch_is_refused():
    tiny = build("wan")
    accel.patch(tiny.obj)
    with pytest.raises(ParallelismError, match="before patching"):
        tiny.obj.transformer.enable_parallelism(config=None)
    accel.unpatch(tiny.obj)
    assert "enable_parallelism" not in vars(tiny.obj.transformer)


def _pretend_parallel(model, **degrees):
    from diffusers import ContextParallelConfig, ParallelConfig

    model._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(**degrees))


@pytest.mark.parametrize("keyword", [{"attention": AttentionConfig(kernel="sdpa")}, {"sparse": True}])
def test_attention_routes_decline_ring(keyword):
    tiny = build("wan")
    _pretend_parallel(tiny.obj.transformer, ring_degree=2)
    with pytest.raises(NotApplicableError, match="log-sum-exp"):
        accel.patch(tiny.obj, cache=False, **keyword)
    assert accel.get_handle(tiny.obj) is None


def test_tensor_parallelism_is_refused():
    from diffusers import ParallelConfig, TensorParallelConfig

    tiny = build("wan")
    tiny.obj.transformer._parallel_config = ParallelConfig(tensor_parallel_config=TensorParallelConfig(tp_degree=2))
    with pytest.raises(ParallelismError, match="tensor parallelism"):
        accel.patch(tiny.obj, cache=CacheConfig())
