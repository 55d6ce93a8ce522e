#!/usr/bin/env python
"""Visual token pruning benchmark at real model shapes, random weights, one CUDA GPU.

Scenarios (``--scenario``), each the real transformers class built from the released config's shapes with
random weights (nothing is downloaded), bf16, ``attn_implementation="sdpa"`` (``--attn flash_attention_2`` when
flash-attn is installed):

- ``llava``: LLaVA-1.5-7B: CLIP ViT-L/14 at 336 px (576 image tokens, [CLS] score), Llama-7B (32 layers, 4096
  hidden), one image, a 40-token prompt.
- ``qwen2_vl_image``: Qwen2-VL-7B: a 1280x720 image (resized to 1288x728 as the processor does: grid 1x52x92,
  1196 tokens after the 2x2 merger), 28-layer 3584-hidden text model.
- ``qwen2_vl_video``: Qwen2-VL-7B: a 32-frame video at 448x252 (grid 16x18x32, 2304 tokens).

Variants: the unpruned baseline, then ``PruneConfig(keep=k)`` for k in ``--keep`` (default 192, 128, 64), then
the FastV-style ``where="in_lm"`` at the smallest k. Each row: visual tokens in/kept, sequence length reaching
the language model, prefill time (one forward over the prompt), time to first token (``generate`` of 1 token,
vision encoder included), decode tokens/s, peak CUDA memory, first-token KL and greedy agreement against the
baseline. Random weights: timings are real, fidelity only says how close each variant stays to the random
baseline, not task accuracy.

Usage::

    python benchmarks/pruning.py                         # all scenarios on cuda:0
    python benchmarks/pruning.py --scenario llava --repeats 5
    python benchmarks/pruning.py --scenario llava --keep 64 --profile   # where each variant's prefill time goes
    python benchmarks/pruning.py --tiny --repeats 1      # tiny zoo models on CPU: checks the script itself
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

SCENARIOS = ("llava", "qwen2_vl_image", "qwen2_vl_video")  # those of accel.bench.vlm_scenarios


def run(args) -> dict:
    import torch

    from accel.bench.host import environment
    from accel.bench.vlm import compare_pruning
    from accel.bench.vlm_scenarios import build_vlm, make_vlm_inputs
    from accel.pruning import PruneConfig

    device = "cpu" if args.tiny else "cuda"
    attn = "sdpa" if args.tiny else args.attn
    keeps = [3, 2] if args.tiny else args.keep
    doc = {"tiny": args.tiny, "env": environment(device), "scenarios": {}}
    for scenario in args.scenario:
        model = build_vlm(scenario, args.tiny, attn, device).eval()
        model.generation_config.pad_token_id = 0
        inputs = make_vlm_inputs(scenario, model, args.tiny, device)
        variants = {f"keep {k}": PruneConfig(keep=k) for k in keeps}
        layer = 1 if args.tiny else 2
        variants[f"in_lm keep {min(keeps)} (layer {layer})"] = PruneConfig(keep=min(keeps), where="in_lm", layer=layer)
        rows = compare_pruning(
            model,
            inputs,
            variants,
            new_tokens=args.new_tokens,
            repeats=args.repeats,
            warmup=args.warmup,
            device=device,
            profile=args.profile,
        )
        doc["scenarios"][scenario] = {
            "prompt_tokens": inputs["input_ids"].shape[1],
            "rows": [r.to_dict() for r in rows],
        }
        _print(scenario, rows)
        if args.profile:
            _print_profile(rows)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return doc


def _print(scenario: str, rows) -> None:
    from accel.bench.measure import format_bytes

    print(f"\n{scenario}")
    head = (
        f"{'variant':<26}{'visual in->kept':>16}{'to LM':>7}{'prefill ms':>11}{'speedup':>8}{'TTFT ms':>9}"
        f"{'decode tok/s':>13}{'peak mem':>11}{'KL':>9}{'agree':>7}"
    )
    print(head + "\n" + "-" * len(head))
    for r in rows:
        vis = f"{r.visual_tokens_in}->{r.visual_tokens_kept}" if r.visual_tokens_in is not None else "all"
        dec = f"{r.decode_tokens_per_s:.1f}" if r.decode_tokens_per_s else "-"
        print(
            f"{r.variant:<26}{vis:>16}{r.sequence_to_lm:>7}{r.prefill_s * 1e3:>11.2f}{r.prefill_speedup:>7.2f}x"
            f"{r.ttft_s * 1e3:>9.2f}{dec:>13}{format_bytes(r.peak_memory_bytes):>11}{r.first_token_kl:>9.3g}"
            f"{r.token_agreement:>7.0%}"
        )


def _print_profile(rows) -> None:
    print(f"\n{'variant':<26}{'wall ms':>9}{'GPU kernels ms':>16}{'aten calls':>12}  syncs and copies")
    for r in rows:
        p = r.profile
        gpu = f"{p['gpu_kernel_ms']:.2f}" if p["gpu_kernel_ms"] is not None else "-"
        syncs = ", ".join(f"{k} {v}" for k, v in p["syncs_and_copies"].items()) or "-"
        print(f"{r.variant:<26}{p['wall_ms']:>9.2f}{gpu:>16}{p['aten_calls']:>12}  {syncs}")


def headline(doc: dict) -> str:
    """One line for the budgeted run's summary: the baseline's prefill and each variant's prefill speed-up."""
    parts = []
    for key, sc in doc["scenarios"].items():
        base, *rest = sc["rows"]
        cells = [f"{r['variant']} {r['prefill_speedup']:.2f}x" for r in rest]
        parts.append(f"{key}: prefill {base['prefill_s'] * 1e3:.1f} ms; " + ", ".join(cells))
    return "; ".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--keep", nargs="+", type=int, default=[192, 128, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2"])
    parser.add_argument(
        "--tiny", action="store_true", help="tiny zoo models on CPU (checks the script, measures nothing)"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile each variant's prefill: wall vs GPU kernel time, operator calls, syncs (rows' `profile`)",
    )
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    import torch

    from accel.bench.host import default_json_path, write_json

    if not args.tiny and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --tiny)")
    if args.tiny:
        args.new_tokens = min(args.new_tokens, 4)
        torch.set_num_threads(1)  # tiny matmuls on 2 shared cores thrash
    doc = run(args)
    doc["headline"] = headline(doc)
    path = write_json(
        args.json or default_json_path(Path(__file__).parent / "results", "pruning", doc["env"], args.tiny), doc
    )
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
