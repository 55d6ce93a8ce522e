"""One rank of the two-process context-parallel checks (tests/test_context_parallel.py starts two of these).

Run as `python tests/cp_worker.py OUT_DIR` with torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT).
Joins a gloo group, runs every scenario and saves what it saw to OUT_DIR/rank{RANK}.pt; rank 0 also runs each
scenario on an unparallelised copy of the model (same weights) as the reference. The test compares.
"""

from __future__ import annotations

import os
import sys

import torch
import torch.distributed as dist

# Scenarios: (name, family, accel.patch keywords, steps). The threshold ones reuse some steps on the tiny models.
SCENARIOS = [
    ("wan-threshold", "wan", {"cache": ("threshold", 0.3)}, 12),
    ("wan-balanced", "wan", {}, 12),
    ("flux-threshold", "flux", {"cache": ("threshold", 0.3)}, 12),
    ("flux-balanced", "flux", {}, 12),
]


def _keywords(spec: dict) -> dict:
    from accel import CacheConfig

    out = {}
    for name, value in spec.items():
        out[name] = CacheConfig(**{value[0]: value[1]}) if name == "cache" else value
    return out


def _decisions(handle) -> dict:
    call = handle.report().stats["cache"]["calls"][-1]
    return {name: (branch["computed"], branch["reused"]) for name, branch in call["branches"].items()}


def _run(family: str, keywords: dict, steps: int, parallel: bool) -> dict:
    from diffusers import ContextParallelConfig

    import accel
    from accel.zoo import build

    tiny = build(family)
    if parallel:
        tiny.obj.transformer.enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))
    handle = accel.patch(tiny.obj, **keywords)
    output = tiny.run(0, num_inference_steps=steps)
    result = {"output": output, "decisions": _decisions(handle), "applied": [str(a) for a in handle.report().applied]}
    accel.unpatch(tiny.obj)
    result["unpatched_output"] = tiny.run(0, num_inference_steps=2)  # accel's hooks left diffusers' intact
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
    results = {"divergent": _divergent(rank)}
    for name, family, spec, steps in SCENARIOS:
        keywords = _keywords(spec)
        if rank == 0:
            results[f"{name}/reference"] = _run(family, keywords, steps, parallel=False)
        results[name] = _run(family, keywords, steps, parallel=True)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
