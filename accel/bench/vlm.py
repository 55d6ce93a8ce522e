"""VLM measurements for visual token pruning: tokens kept, prefill time, time to first token, decode speed,
peak memory, and fidelity to the unpruned model (first-token KL, greedy agreement).

    rows = compare_pruning(model, inputs, {"keep 64": PruneConfig(keep=64)}, new_tokens=32, repeats=3)

The model must not be patched; each variant is patched, measured and unpatched again.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch

import accel
from accel.bench import measure, metrics


@dataclass
class VLMRow:
    variant: str
    visual_tokens_in: int | None = None  # summed over the batch, last prefill
    visual_tokens_kept: int | None = None
    sequence_to_lm: int | None = None  # prompt length reaching the language model
    prefill_s: float | None = None  # median of one forward pass over the prompt
    ttft_s: float | None = None  # median of generate(max_new_tokens=1)
    decode_tokens_per_s: float | None = None  # new tokens after the first, per second, per row
    peak_memory_bytes: int | None = None
    memory_kind: str = ""
    prefill_speedup: float | None = None
    first_token_kl: float | None = None
    token_agreement: float | None = None
    report: dict = field(default_factory=dict)  # the variant's report.stats["prune"]
    profile: dict | None = None  # `profile_prefill`, with compare_pruning(profile=True)

    def to_dict(self) -> dict:
        return asdict(self)


def _generate(model, inputs: dict, new_tokens: int):
    return model.generate(
        **inputs,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )


def measure_vlm(model, inputs: dict, *, new_tokens: int, repeats: int, warmup: int, device) -> tuple[dict, object]:
    """Times of one model: (measurements, the last greedy generate output)."""
    result = {}
    with torch.no_grad():
        result["prefill_s"] = measure.median(
            measure.time_calls(lambda: model(**inputs, use_cache=True), repeats, warmup, device)
        )
    result["ttft_s"] = measure.median(measure.time_calls(lambda: _generate(model, inputs, 1), repeats, warmup, device))
    out: list = [None]

    def full():
        out[0] = _generate(model, inputs, new_tokens)

    with measure.PeakMemory(device) as mem:
        total = measure.median(measure.time_calls(full, repeats, warmup, device))
    if new_tokens > 1 and total > result["ttft_s"]:
        result["decode_tokens_per_s"] = (new_tokens - 1) / (total - result["ttft_s"])
    result["peak_memory_bytes"], result["memory_kind"] = mem.peak_bytes, mem.device_kind
    return result, out[0]


# What a forward's own host-device syncs show up as (`.item()`, `nonzero`, `.tolist()`); the profile's one
# cudaDeviceSynchronize, which ends its timing, is not among them.
_SYNCS = ("cudaStreamSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync")


def profile_prefill(model, inputs: dict, *, calls: int = 3, device="cpu", top: int = 8) -> dict:
    """Where one prefill forward's time goes, under torch's profiler (one untimed call first): the wall time per
    call, the GPU kernels' time per call (none on CPU), the aten operator calls and the host-device syncs and
    copies per call, and the `top` operators by host and by GPU time. Kernel time far below the wall time means
    the forward is bound by the host launching work, where fewer tokens save little."""
    from torch.profiler import ProfilerActivity, profile

    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def drain():
        if cuda:
            torch.cuda.synchronize(device)

    with torch.no_grad():
        model(**inputs, use_cache=True)
        drain()
        with profile(activities=activities) as prof:
            start = time.perf_counter()
            for _ in range(calls):
                model(**inputs, use_cache=True)
            drain()  # once: a sync per call would stall the host between calls, which the model does not do
            wall = (time.perf_counter() - start) / calls
    events = prof.key_averages()
    ops = [e for e in events if e.key.startswith("aten::")]

    def ranked(key) -> list[dict]:
        rows = sorted(events, key=key, reverse=True)[:top]
        return [{"op": e.key, "calls": e.count // calls, "ms": key(e) / 1e3 / calls} for e in rows if key(e) > 0]

    kernels_us = sum(e.self_device_time_total for e in events if e.device_type == torch.autograd.DeviceType.CUDA)
    return {
        "wall_ms": wall * 1e3,
        "gpu_kernel_ms": kernels_us / 1e3 / calls if cuda else None,
        "aten_calls": sum(e.count for e in ops) // calls,
        "syncs_and_copies": {e.key: e.count // calls for e in events if e.key in _SYNCS},
        "top_host": ranked(lambda e: e.self_cpu_time_total),
        "top_gpu": ranked(lambda e: e.self_device_time_total) if cuda else [],
    }


def compare_pruning(
    model,
    inputs: dict,
    variants: dict,
    *,
    new_tokens: int = 16,
    repeats: int = 3,
    warmup: int = 1,
    device="cpu",
    profile: bool = False,
) -> list[VLMRow]:
    """The unpruned baseline, then each `name -> PruneConfig` variant; one `VLMRow` each (baseline first).
    `profile`: each row also gets `profile_prefill` of its prefill."""
    if accel.get_handle(model) is not None:
        raise accel.AlreadyPatchedError("compare_pruning needs the unpatched model as its baseline; call accel.unpatch")
    prompt = inputs["input_ids"].shape[1]
    base_values, reference = measure_vlm(
        model, inputs, new_tokens=new_tokens, repeats=repeats, warmup=warmup, device=device
    )
    rows = [
        VLMRow(
            "baseline",
            sequence_to_lm=prompt,
            **base_values,
            prefill_speedup=1.0,
            first_token_kl=0.0,
            token_agreement=1.0,
            profile=profile_prefill(model, inputs, device=device) if profile else None,
        )
    ]
    for name, config in variants.items():
        handle = accel.patch(model, prune=config)
        try:
            values, out = measure_vlm(
                model, inputs, new_tokens=new_tokens, repeats=repeats, warmup=warmup, device=device
            )
            stats = handle.report().stats["prune"]
            profiled = profile_prefill(model, inputs, device=device) if profile else None
        finally:
            accel.unpatch(model)
        row = VLMRow(name, **values, report=stats, profile=profiled)
        last = stats["last_call"]
        if last is not None:
            row.visual_tokens_in, row.visual_tokens_kept = (
                sum(last["visual_tokens_in"]),
                sum(last["visual_tokens_kept"]),
            )
            row.sequence_to_lm = last["sequence_out"]
        row.prefill_speedup = rows[0].prefill_s / row.prefill_s
        row.first_token_kl = metrics.first_token_kl(reference.logits[0].float(), out.logits[0].float())
        row.token_agreement = metrics.token_agreement(reference.sequences[:, prompt:], out.sequences[:, prompt:])
        rows.append(row)
    return rows


__all__ = ["VLMRow", "compare_pruning", "measure_vlm", "profile_prefill"]
