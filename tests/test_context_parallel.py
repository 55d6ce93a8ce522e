"""accel under diffusers' context parallelism (Ulysses degree 2; ring degree 2 for the cache), on CPU: two processes
over gloo, started here.

The two ranks (tests/cp_worker.py) run every scenario once, together, in about a minute; each test below checks
one property of what they saved. Two concessions to running without GPUs: the CPU's device count is patched to 1
(diffusers divides by it to pick each rank's device), and for ring attention diffusers' native op is given the
log-sum-exp it lacks (no diffusers backend that returns it runs on CPU).
"""

from __future__ import annotations

import multiprocessing
import socket
import threading
import time

import pytest
import torch

import accel
from accel import AttentionConfig, CacheConfig, NotApplicableError, ParallelismError
from accel.zoo import build

TIMEOUT_S = 240
# Largest |difference| to one process, in [0, 1] pixels (None: bit for bit). Wan's Ulysses all-to-all hands each rank
# whole heads in the original token order, so the math is the same; sparse attention sums kept blocks in another order.
# FLUX joins text and image tokens per rank before the all-to-all, so its attention sums keys in another order (seen
# 1e-6), and INT8 attention groups other tokens under one quantization scale (seen 1.4e-5).
TOLERANCE = {
    "wan-threshold": None,
    "wan-balanced": None,
    "wan-fast": None,
    "wan-residual": None,
    "flux-threshold": 1e-5,
    "wan-int8": None,
    "wan-sparse": 1e-6,
    "wan-w4": None,
    "wan-all": 1e-6,
    "flux-int8": 1e-4,
    "wan-ring": 1e-6,  # ring degree 2, cache only: partial attention merged through the log-sum-exp (seen 2.4e-7)
}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    """What each of the two ranks saved. They are forked from this process, which has imported torch, diffusers and
    accel already (spawned, each would spend most of its time importing them), and killed if they outlive TIMEOUT_S."""
    import cp_worker

    out = tmp_path_factory.mktemp("cp")
    port = _free_port()
    # Forking a process that runs other threads (a server an earlier test left running, say) can copy a held lock
    # into the child; then a fork server, started fresh and importing the worker once, forks the ranks instead.
    method = "fork" if threading.active_count() == 1 else "forkserver"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload(["cp_worker"])
    procs = [context.Process(target=cp_worker.run_rank, args=(rank, port, str(out)), daemon=True) for rank in range(2)]
    try:
        for proc in procs:
            proc.start()
        deadline = time.monotonic() + TIMEOUT_S
        for proc in procs:
            proc.join(max(deadline - time.monotonic(), 0))
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
                proc.join()
    codes = [proc.exitcode for proc in procs]
    assert codes == [0, 0], f"ranks exited with {codes} (killed after {TIMEOUT_S} s if negative)"
    saved = [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(2)]
    references = {key: value for rank in saved for key, value in rank.items() if key.endswith("/reference")}
    return [{**rank, **references} for rank in saved]


def _close(scenario: str, actual: torch.Tensor, expected: torch.Tensor) -> None:
    tolerance = TOLERANCE[scenario]
    if tolerance is None:
        assert torch.equal(actual, expected)
    else:
        torch.testing.assert_close(actual, expected, atol=tolerance, rtol=0)


@pytest.mark.parametrize("scenario", list(TOLERANCE))
def test_ranks_agree_and_match_one_process(ranks, scenario):
    zero, one = ranks[0][scenario], ranks[1][scenario]
    reference = ranks[0][f"{scenario}/reference"]
    # every rank made the same cache decisions, the ones one unparallelised process makes
    assert zero["decisions"] == one["decisions"] == reference["decisions"]
    # the gather at the output hands every rank the same tensor
    assert torch.equal(zero["output"], one["output"])
    _close(scenario, zero["output"], reference["output"])
    if "unpatched_output" in reference:  # unpatched, the parallel model computes what it did before accel
        _close(scenario, zero["unpatched_output"], reference["unpatched_output"])


@pytest.mark.parametrize("scenario", ["wan-int8", "flux-int8", "wan-all"])
def test_int8_route_takes_every_call_after_the_all_to_all(ranks, scenario):
    # each rank's router sees as many calls as one process (one per module and step, for its share of the heads),
    # none fell back to SDPA
    for rank in ranks:
        assert rank[scenario]["stats"]["attention"] == ranks[0][f"{scenario}/reference"]["stats"]["attention"]


def test_sparse_patterns_per_head_match_one_process(ranks):
    """Each rank holds whole heads after the all-to-all (rank r: head r of 2) and searches their patterns there."""
    reference = ranks[0]["wan-sparse/reference"]["stats"]["sparse"]["sparsity_per_head"]
    for index, rank in enumerate(ranks):
        mine = rank["wan-sparse"]["stats"]["sparse"]["sparsity_per_head"]
        assert mine == {layer: [heads[index]] for layer, heads in reference.items()}


@pytest.mark.parametrize("scenario", ["wan-threshold", "wan-residual", "flux-threshold", "wan-ring"])
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


def test_sparse_declines_text_joined_with_image_tokens():
    tiny = build("flux")
    _pretend_parallel(tiny.obj.transformer, ulysses_degree=2)
    with pytest.raises(NotApplicableError, match="in pieces between the image tokens"):
        accel.patch(tiny.obj, cache=False, sparse=True)


def test_tensor_parallelism_is_refused():
    from diffusers import ParallelConfig, TensorParallelConfig

    tiny = build("wan")
    tiny.obj.transformer._parallel_config = ParallelConfig(tensor_parallel_config=TensorParallelConfig(tp_degree=2))
    with pytest.raises(ParallelismError, match="tensor parallelism"):
        accel.patch(tiny.obj, cache=CacheConfig())


def test_accel_hooks_sit_inside_context_parallel_hooks():
    """Block hooks installed after enable_parallelism are moved inside diffusers' split hook (so they see the rank's
    slice), and removing them leaves the split hook running (diffusers' removal of an inner hook would bypass an
    outer hook that replaces forward, which is why accel re-registers outermost first)."""
    from diffusers.hooks import HookRegistry, ModelHook
    from torch import nn

    from accel import _hooks
    from accel._private import hook_order

    calls = []

    class Split(ModelHook):  # stands in for diffusers' ContextParallelSplitHook: pre_forward only
        def pre_forward(self, module, *args, **kwargs):
            calls.append("split")
            return args, kwargs

    class Accel(ModelHook):
        def new_forward(self, module, *args, **kwargs):
            calls.append("accel")
            return self.fn_ref.original_forward(*args, **kwargs)

    root = nn.Sequential(nn.Linear(2, 2))
    block = root[0]
    registry = HookRegistry.check_if_exists_or_initialize(block)
    registry.register_hook(Split(), "cp_input---0")
    hooks = _hooks.HookSet(root, "accel_test", [(block, Accel())])
    hooks.install()
    assert hook_order(registry) == ["accel_test", "cp_input---0"]
    x = torch.randn(1, 2)
    expected = block.__class__.forward(block, x)
    assert torch.equal(root(x), expected) and calls == ["split", "accel"]
    hooks.remove()
    calls.clear()
    assert torch.equal(root(x), expected) and calls == ["split"]
    assert hook_order(registry) == ["cp_input---0"]
