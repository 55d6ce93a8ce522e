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
    python benchmarks/pruning.py --tiny --repeats 1      # tiny zoo models on CPU: checks the script itself
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing accel
    sys.path.insert(0, str(REPO))

from accel.bench.measure import format_bytes  # noqa: E402
from accel.bench.vlm import compare_pruning  # noqa: E402
from accel.pruning import PruneConfig  # noqa: E402

SCENARIOS = ("llava", "qwen2_vl_image", "qwen2_vl_video")
IMAGE_ID, VIDEO_ID, VSTART_ID, VEND_ID = 32000, 32001, 32002, 32003  # inside both vocabularies below


def _llava(tiny: bool, attn: str):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    if tiny:
        from accel.zoo import vlm

        return vlm.tiny_llava().obj
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID, image_seq_length=576,
                         vision_feature_select_strategy="default", vision_feature_layer=-2)
    return LlavaForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=torch.bfloat16)


def _qwen2_vl(tiny: bool, attn: str):
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    if tiny:
        from accel.zoo import vlm

        return vlm.tiny_qwen2_vl().obj
    vision = dict(depth=32, embed_dim=1280, hidden_size=3584, mlp_ratio=4, num_heads=16, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    text = dict(hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                num_key_value_heads=4, vocab_size=152064, max_position_embeddings=32768,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    config = Qwen2VLConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_ID, video_token_id=VIDEO_ID,
                           vision_start_token_id=VSTART_ID, vision_end_token_id=VEND_ID)
    return Qwen2VLForConditionalGeneration._from_config(config, attn_implementation=attn, dtype=torch.bfloat16)


def _inputs(scenario: str, model, tiny: bool, device) -> dict:
    """Prompt ids with expanded placeholders, as the processors build them, plus random pixels."""
    if tiny:
        from accel.zoo import vlm

        return {k: v.to(device) for k, v in vlm.make_inputs(model, video=scenario.endswith("video")).items()}
    gen = torch.Generator().manual_seed(0)
    text = lambda n: torch.randint(100, 30000, (n,), generator=gen).tolist()  # noqa: E731
    dtype = next(model.parameters()).dtype
    if scenario == "llava":
        ids = [1] + text(20) + [IMAGE_ID] * 576 + text(20)
        pixels = torch.randn(1, 3, 336, 336, generator=gen)
        return {"input_ids": torch.tensor([ids], device=device), "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device),
                "pixel_values": pixels.to(device, dtype)}
    vc = model.config.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    grid = (1, 52, 92) if scenario == "qwen2_vl_image" else (16, 18, 32)
    n = grid[0] * grid[1] * grid[2] // vc.spatial_merge_size**2
    token, kind = (IMAGE_ID, 1) if scenario == "qwen2_vl_image" else (VIDEO_ID, 2)
    ids = text(20) + [VSTART_ID] + [token] * n + [VEND_ID] + text(20)
    types = [0] * 21 + [kind] * n + [0] * 21
    pixels = torch.randn(grid[0] * grid[1] * grid[2], patch_dim, generator=gen).to(device, dtype)
    inputs = {"input_ids": torch.tensor([ids], device=device), "attention_mask": torch.ones(1, len(ids), dtype=torch.long, device=device),
              "mm_token_type_ids": torch.tensor([types], device=device)}
    key = "image" if kind == 1 else "video"
    inputs["pixel_values" if kind == 1 else "pixel_values_videos"] = pixels
    inputs[f"{key}_grid_thw"] = torch.tensor([grid], device=device)
    return inputs


def run(args) -> dict:
    device = "cpu" if args.tiny else "cuda"
    attn = "sdpa" if args.tiny else args.attn
    keeps = [3, 2] if args.tiny else args.keep
    doc = {"tiny": args.tiny, "env": _env(device), "scenarios": {}}
    for scenario in args.scenario:
        model = (_llava if scenario == "llava" else _qwen2_vl)(args.tiny, attn).to(device).eval()
        model.generation_config.pad_token_id = 0
        inputs = _inputs(scenario, model, args.tiny, device)
        variants = {f"keep {k}": PruneConfig(keep=k) for k in keeps}
        layer = 1 if args.tiny else 2
        variants[f"in_lm keep {min(keeps)} (layer {layer})"] = PruneConfig(keep=min(keeps), where="in_lm", layer=layer)
        rows = compare_pruning(model, inputs, variants, new_tokens=args.new_tokens, repeats=args.repeats,
                               warmup=args.warmup, device=device)
        doc["scenarios"][scenario] = {"prompt_tokens": inputs["input_ids"].shape[1], "rows": [r.to_dict() for r in rows]}
        _print(scenario, rows)
        del model
        if device == "cuda":
            torch.cuda.empty_cache()
    return doc


def _print(scenario: str, rows) -> None:
    print(f"\n{scenario}")
    head = f"{'variant':<26}{'visual in->kept':>16}{'to LM':>7}{'prefill ms':>11}{'speedup':>8}{'TTFT ms':>9}{'decode tok/s':>13}{'peak mem':>11}{'KL':>9}{'agree':>7}"
    print(head + "\n" + "-" * len(head))
    for r in rows:
        vis = f"{r.visual_tokens_in}->{r.visual_tokens_kept}" if r.visual_tokens_in is not None else "all"
        dec = f"{r.decode_tokens_per_s:.1f}" if r.decode_tokens_per_s else "-"
        print(f"{r.variant:<26}{vis:>16}{r.sequence_to_lm:>7}{r.prefill_s * 1e3:>11.2f}{r.prefill_speedup:>7.2f}x"
              f"{r.ttft_s * 1e3:>9.2f}{dec:>13}{format_bytes(r.peak_memory_bytes):>11}{r.first_token_kl:>9.3g}{r.token_agreement:>7.0%}")


def _env(device: str) -> dict:
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "python": platform.python_version(),
            "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scenario", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    parser.add_argument("--keep", nargs="+", type=int, default=[192, 128, 64])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--attn", default="sdpa", choices=["sdpa", "flash_attention_2"])
    parser.add_argument("--tiny", action="store_true", help="tiny zoo models on CPU (checks the script, measures nothing)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    if not args.tiny and not torch.cuda.is_available():
        parser.error("needs a CUDA GPU (or --tiny)")
    if args.tiny:
        args.new_tokens = min(args.new_tokens, 4)
        torch.set_num_threads(1)  # tiny matmuls on 2 shared cores thrash
    doc = run(args)
    path = args.json or REPO / "benchmarks" / "results" / f"pruning-{'tiny' if args.tiny else 'gpu'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2, default=str))
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
