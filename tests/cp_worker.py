"""One rank of the two-process context-parallel checks (tests/test_context_parallel.py starts two of these).

The test forks two ranks into `run_rank`; by hand, run `python tests/cp_worker.py OUT_DIR` under torchrun's environment
(RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT), e.g. `torchrun --nproc-per-node 2 tests/cp_worker.py OUT_DIR`. Joins a gloo group, runs every scenario and saves what it saw to OUT_DIR/rank{RANK}.pt; each rank also runs half of
the scenarios on an unparallelised copy of the model (same weights), the references. The test compares.
"""

from __future__ import annotations

import os
import sys
import time

import torch
import torch.distributed as dist
from diffusers.models import attention_dispatch

# Scenarios: (name, family, accel.patch keywords by name (see _keywords), steps). The threshold ones reuse some steps on
# the tiny models; the others put each accelerator, then all of them, under Ulysses.
SCENARIOS = [
    ("wan-threshold", "wan", "threshold", 12),
    ("wan-balanced", "wan", "balanced", 12),
    ("wan-fast", "wan", "fast", 12),
    ("wan-residual", "wan", "residual", 12),
    ("flux-threshold", "flux", "threshold", 12),
    ("wan-int8", "wan", "int8", 3),
    ("wan-sparse", "wan", "sparse", 3),
    ("wan-w4", "wan", "w4", 3),
    ("wan-all", "wan", "all", 6),
    ("flux-int8", "flux", "int8", 3),
    ("wan-ring", "wan", "threshold", 12),  # ring degree 2 instead of Ulysses
]


def _keywords(name: str) -> dict:
    from accel import CacheConfig, QuantConfig, SparseConfig

    sparse = SparseConfig(target=0.7, block_q=16, block_k=16, stride=4, dense_fraction=0.0)
    w4 = QuantConfig(group_size=16, min_features=0)
    return {
        "threshold": {"cache": CacheConfig(threshold=0.3)},
        "balanced": {},
        "fast": {"preset": "fast"},
        "residual": {"cache": CacheConfig(threshold=0.3, forecast="residual")},
        "int8": {"cache": False, "attention": "int8"},
        "sparse": {"cache": False, "sparse": sparse},
        "w4": {"cache": False, "quant": w4},
        "all": {"quant": w4, "attention": "int8", "sparse": sparse},
    }[name]


def _decisions(handle) -> dict:
    call = handle.report().stats["cache"]["calls"][-1]
    return {name: (branch["computed"], branch["reused"]) for name, branch in call["branches"].items()}


NATIVE_FORWARD_OP = attention_dispatch._native_attention_forward_op


def _native_with_lse(
    ctx,
    query,
    key,
    value,
    attn_mask=None,
    dropout_p=0.0,
    is_causal=False,
    scale=None,
    enable_gqa=False,
    return_lse=False,
    _save_ctx=True,
    _parallel_config=None,
):
    """diffusers' native attention op with the log-sum-exp ring attention needs, written out (no diffusers backend
    that returns it runs on CPU). [B, S, H, D] in and out, log-sum-exp [B, S, H]; no mask, dropout or GQA (Wan's
    self-attention, the only call ring attention takes here)."""
    q, k, v = (x.permute(0, 2, 1, 3) for x in (query, key, value))
    scores = (q @ k.transpose(-1, -2)) * (scale if scale is not None else q.shape[-1] ** -0.5)
    lse = scores.logsumexp(-1, keepdim=True)
    out = ((scores - lse).exp() @ v).permute(0, 2, 1, 3)
    return (out, lse.squeeze(-1).permute(0, 2, 1)) if return_lse else out


def _run(family: str, keywords: dict, steps: int, parallel: bool, ring: bool = False) -> dict:
    from diffusers import ContextParallelConfig

    import accel
    from accel.zoo import build

    tiny = build(family)
    if parallel:
        degrees = {"ring_degree": 2} if ring else {"ulysses_degree": 2}
        # Ulysses keeps diffusers' own op: it calls F.scaled_dot_product_attention, which accel's router takes.
        attention_dispatch._native_attention_forward_op = _native_with_lse if ring else NATIVE_FORWARD_OP
        tiny.obj.transformer.enable_parallelism(config=ContextParallelConfig(**degrees))
    handle = accel.patch(tiny.obj, **keywords)
    output = tiny.run(0, num_inference_steps=steps)
    report = handle.report()
    stats = {name: value for name, value in report.stats.items() if name != "cache"}
    result = {"output": output, "applied": [str(a) for a in report.applied], "stats": stats}
    result["decisions"] = _decisions(handle) if "cache" in report.stats else None
    accel.unpatch(tiny.obj)
    if keywords.get("cache"):  # a few scenarios: accel's hooks left diffusers' intact
        result["unpatched_output"] = tiny.run(0, num_inference_steps=2)
    return result


def _divergent(rank: int) -> dict:
    """The decision unit on its own: each rank sees a different head (rank 0 barely changes, rank 1 jumps every step).
    Decided per rank they differ; with the all-reduce both take the same decision."""
    from accel.caching import CacheConfig, CacheController
    from accel.caching import distributed as cache_dist

    def decide_all(group) -> list[bool]:
        gen = torch.Generator().manual_seed(rank)
        base = torch.randn(64, generator=gen)
        controller = CacheController(CacheConfig(threshold=0.2, num_steps=10))
        controller.begin_call()
        decisions = []
        for step in range(10):
            scale = 0.001 if rank == 0 else 1.0
            head = base + scale * step * torch.randn(64, generator=gen)
            controller.enter("cond", num_steps=10, managed=True)
            with cache_dist.scope(group):
                reuse = controller.decide((head,))
                if not reuse:
                    controller.store((head * 2,), reference=(head * 2,))
            controller.exit()
            decisions.append(reuse)
        controller.end_call()
        return decisions

    return {"alone": decide_all(None), "all-reduced": decide_all(dist.group.WORLD)}


def main(out_dir: str) -> None:
    torch.set_num_threads(1)
    rank = int(os.environ["RANK"])
    dist.init_process_group("gloo", rank=rank, world_size=int(os.environ["WORLD_SIZE"]))
    # diffusers picks the device as rank % torch.accelerator.device_count(), which is 0 on a CPU-only machine.
    torch.accelerator.device_count = lambda: 1
    start = time.monotonic()
    results = {"divergent": _divergent(rank)}
    # The unparallelised references, shared out between the ranks so that they run side by side.
    for index, (name, family, keywords, steps) in enumerate(SCENARIOS):
        if index % 2 == rank:
            results[f"{name}/reference"] = _run(family, _keywords(keywords), steps, parallel=False)
            print(f"{time.monotonic() - start:6.1f} s  {name}/reference", flush=True)
    for name, family, keywords, steps in SCENARIOS:
        results[name] = _run(family, _keywords(keywords), steps, parallel=True, ring=name.endswith("-ring"))
        print(f"{time.monotonic() - start:6.1f} s  {name}", flush=True)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run_rank(rank: int, port: int, out_dir: str) -> None:
    """Entry point of a forked rank (the test's way: the parent has already imported torch, diffusers and accel)."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank))
    main(out_dir)


if __name__ == "__main__":
    main(sys.argv[1])
