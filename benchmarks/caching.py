#!/usr/bin/env python
"""Step-caching benchmark at real model shapes, random weights, one CUDA GPU.

What it measures: for each scenario, the denoising loop of the real diffusers pipeline is replayed on the
transformer alone (no text encoders, no VAE), with every caching variant side by side in one process:

- ``baseline``: no cache;
- ``diffusers FBC <t>``: diffusers' own First Block Cache, ``transformer.enable_cache(FirstBlockCacheConfig(threshold=t))``;
- ``accel balanced`` / ``accel fast``: the step-cache configs of accel's presets (``preset_configs(name)["cache"]``);
- ``accel thr <t>``: ``accel.CacheConfig(threshold=t)``;
- ``baseline (re-run)``: the baseline once more at the end: drift of the GPU clock over the session, and proof that
  ``disable_cache()`` / ``accel.unpatch`` left the model as it was (its latent must equal the baseline's).

For each: median wall time over ``--repeats`` runs after ``--warmup`` untimed runs (``torch.cuda.synchronize``
around each run), speedup against the baseline of the same process, peak ``torch.cuda.max_memory_allocated``
during the timed runs, denoiser passes computed/reused in one run, and the fidelity of the final latent against the
baseline's final latent from the same seed (PSNR with both latents mapped to [0, 1] by the baseline's min/max, and
relative L1 ``sum|x - ref| / sum|ref|``).

The weights are random (built from the released configs, nothing is downloaded), so the timings are real - same
shapes, same kernels - but fidelity is only closeness to the random baseline, and how many steps a threshold
reuses depends on the weights: a trained model's first-block signal differs, so read the skip counts and
speedups as "cost per reused step and overhead of the cache", not as what a trained model would get.

Scenarios (``--scenario``):

- ``wan``: Wan2.1-T2V-1.3B, 832x480, 81 frames -> latent [1, 16, 21, 60, 104] (32,760 video tokens), 50 steps,
  classifier-free guidance as two transformer calls per step (``cache_context("cond")`` / ``("uncond")``, with
  the ``step_index`` / ``sigma`` / ``num_inference_steps`` the real ``WanPipeline`` attaches), text embeddings
  [1, 512, 4096] (umT5-XXL), guidance 5.0. Scheduler: ``FlowMatchEulerDiscreteScheduler(shift=3.0)`` (the released
  pipeline ships UniPC with ``flow_shift=3.0``; Euler is used here for simplicity, see benchmarks/README.md).
- ``flux``: FLUX.1-dev, 1024x1024 -> 4096 packed image tokens [1, 4096, 64] + 512 text tokens (T5-XXL, 4096 wide),
  pooled CLIP-L [1, 768], 28 steps, guidance-distilled (one call per step under ``cache_context("cond")``, distilled
  guidance 3.5), ``timestep / 1000``, ``txt_ids`` / ``img_ids`` as ``FluxPipeline`` builds them, the released
  scheduler config (dynamic shift, mu from the image sequence length).

Call boundaries: like the real pipelines (``DiffusionPipeline.maybe_free_model_hooks``), every denoising loop ends
with ``transformer._reset_stateful_cache()``. That resets diffusers' FBC state and closes accel's call, so every run
is its own call in ``handle.report().calls`` (the script checks that there is one call per run, each with all the
passes of one run). accel is given the bare transformer here, so ``CacheConfig(num_steps=steps)`` is set for its
final-step protection.

Usage::

    python benchmarks/caching.py                        # both scenarios, 3 timed runs each, on cuda:0
    python benchmarks/caching.py --scenario flux --repeats 5
    python benchmarks/caching.py --tiny --repeats 1     # tiny configs, CPU, float32: checks the script itself

Results: a table on stdout and JSON at ``--json`` (default ``benchmarks/results/caching-<gpu>.json``).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as _dt
import json
import math
import platform
import re
import statistics
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without installing accel
    sys.path.insert(0, str(REPO))

# --tiny runs the zoo's tiny transformers (same classes, a few blocks, small widths).
from accel.zoo.image import FLUX_DEV_SCHEDULER, TINY_FLUX_TRANSFORMER  # noqa: E402  (after the path set-up above)
from accel.zoo.video import TINY_WAN_TRANSFORMER  # noqa: E402

# --------------------------------------------------------------------------------------------------------------------
# Released configs (values of the checkpoints' config.json; weights are random)

# black-forest-labs/FLUX.1-dev, transformer/config.json ("out_channels": null -> in_channels).
FLUX_DEV_TRANSFORMER = dict(
    patch_size=1,
    in_channels=64,  # 16 VAE latent channels packed 2x2
    out_channels=None,
    num_layers=19,  # double-stream blocks
    num_single_layers=38,
    attention_head_dim=128,
    num_attention_heads=24,  # inner dim 3072
    joint_attention_dim=4096,  # T5-XXL hidden size
    pooled_projection_dim=768,  # CLIP-L pooled
    guidance_embeds=True,  # guidance-distilled
    axes_dims_rope=(16, 56, 56),
)
# Wan-AI/Wan2.1-T2V-1.3B-Diffusers, transformer/config.json (hidden size 12 x 128 = 1536).
WAN21_T2V_1_3B_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=12,
    attention_head_dim=128,
    in_channels=16,
    out_channels=16,
    text_dim=4096,  # umT5-XXL hidden size
    freq_dim=256,
    ffn_dim=8960,
    num_layers=30,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=None,
    added_kv_proj_dim=None,
    rope_max_seq_len=1024,
)
# The released Wan2.1 pipeline uses UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
# flow_shift=3.0); this benchmark steps with flow-matching Euler at the same shift.
WAN_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
NO_GPU_MESSAGE = "benchmarks/caching.py needs a CUDA GPU; use --tiny to check the script on CPU"


# --------------------------------------------------------------------------------------------------------------------
# Models


def cast_like_from_pretrained(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast the way ``from_pretrained(torch_dtype=dtype)`` loads: floating parameters and persistent buffers go to
    ``dtype`` except those under the class's ``_keep_in_fp32_modules`` (Wan: rope, time_embedder,
    scale_shift_table, norm1-3), which stay float32. Non-persistent buffers (e.g. Wan's rope tables) stay as built."""
    if dtype == torch.float32:
        return
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    persistent = set(model.state_dict().keys())

    def target(name: str) -> torch.dtype:
        return torch.float32 if keep & set(name.split(".")) else dtype

    for mod_name, mod in model.named_modules():
        prefix = f"{mod_name}." if mod_name else ""
        for pname, p in list(mod.named_parameters(recurse=False)):
            if p.is_floating_point():
                p.data = p.data.to(target(prefix + pname))
        for bname, b in list(mod.named_buffers(recurse=False)):
            full = prefix + bname
            if b is not None and b.is_floating_point() and full in persistent:
                mod._buffers[bname] = b.to(target(full))


def build_model(cls: type, config: dict, device: torch.device, dtype: torch.dtype, seed: int) -> nn.Module:
    """Random init directly on `device` (no 12B-parameter init on the CPU), then the from_pretrained-style cast."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = cls(**config)
    cast_like_from_pretrained(model, dtype)
    model.eval().requires_grad_(False)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return model


class Scenario:
    key: str
    title: str
    branches: tuple[str, ...]
    default_steps: int

    def __init__(self, tiny: bool, device: torch.device, dtype: torch.dtype, seed: int):
        self.tiny, self.device, self.dtype, self.seed = tiny, device, dtype, seed

    def build(self) -> nn.Module: ...

    def make_inputs(self) -> dict[str, Any]: ...

    def denoise(self, model: nn.Module, inputs: dict[str, Any], steps: int) -> torch.Tensor: ...

    def probe(self, model: nn.Module) -> nn.Module:
        """A module inside the LAST transformer block that runs only when that block really computes (a reused
        step hands the block's inputs through, or returns the cached residual, without calling it)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]: ...


def _flux_image_ids(h: int, w: int) -> torch.Tensor:
    """FluxPipeline._prepare_latent_image_ids: one (0, row, col) triple per packed image token."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


class FluxScenario(Scenario):
    key = "flux"
    title = "FLUX.1-dev (random weights)"
    branches = ("cond",)
    default_steps = 28
    guidance_scale = 3.5  # FluxPipeline default

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.tiny:
            self.config, self.height, self.width, self.text_len, self.pooled_dim = TINY_FLUX_TRANSFORMER, 256, 256, 16, 32
        else:
            self.config, self.height, self.width, self.text_len, self.pooled_dim = FLUX_DEV_TRANSFORMER, 1024, 1024, 512, 768
        self.text_dim = self.config["joint_attention_dim"]
        # FluxPipeline.prepare_latents: VAE latent (H/8, W/8), packed 2x2 -> (H/16) * (W/16) tokens of 64 channels.
        self.lat_h, self.lat_w = 2 * (self.height // 16), 2 * (self.width // 16)
        self.image_tokens = (self.lat_h // 2) * (self.lat_w // 2)

    def build(self) -> nn.Module:
        from diffusers import FluxTransformer2DModel

        return build_model(FluxTransformer2DModel, self.config, self.device, self.dtype, self.seed)

    def make_inputs(self) -> dict[str, Any]:
        gen = torch.Generator("cpu").manual_seed(self.seed + 1)
        noise = torch.randn(1, 16, self.lat_h, self.lat_w, generator=gen)
        noise = noise.view(1, 16, self.lat_h // 2, 2, self.lat_w // 2, 2).permute(0, 2, 4, 1, 3, 5)
        noise = noise.reshape(1, self.image_tokens, 64)  # FluxPipeline._pack_latents
        dev, dt = self.device, self.dtype
        return dict(
            noise=noise.to(dev, dt),
            prompt_embeds=torch.randn(1, self.text_len, self.text_dim, generator=gen).to(dev, dt),
            pooled_prompt_embeds=torch.randn(1, self.pooled_dim, generator=gen).to(dev, dt),
            text_ids=torch.zeros(self.text_len, 3).to(dev, dt),
            img_ids=_flux_image_ids(self.lat_h // 2, self.lat_w // 2).to(dev, dt),
            guidance=torch.full([1], self.guidance_scale, device=dev, dtype=torch.float32).expand(1),
        )

    def _scheduler(self, steps: int):
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
        # diffusers.pipelines.flux.pipeline_flux.calculate_shift (inlined: importing the pipeline module pulls in
        # transformers): mu grows linearly from base_shift at 256 image tokens to max_shift at 4096.
        cfg = sched.config
        slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
        mu = self.image_tokens * slope + cfg.base_shift - slope * cfg.base_image_seq_len
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=self.device, mu=mu)
        sched.set_begin_index(0)
        return sched

    @torch.no_grad()
    def denoise(self, model: nn.Module, inputs: dict[str, Any], steps: int) -> torch.Tensor:
        # The loop of FluxPipeline.__call__ (diffusers 0.42), true CFG off (FLUX.1-dev is guidance-distilled).
        sched = self._scheduler(steps)
        latents = inputs["noise"].clone()
        for t in sched.timesteps:
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            with model.cache_context("cond"):
                noise_pred = model(
                    hidden_states=latents,
                    timestep=timestep / 1000,
                    guidance=inputs["guidance"],
                    pooled_projections=inputs["pooled_prompt_embeds"],
                    encoder_hidden_states=inputs["prompt_embeds"],
                    txt_ids=inputs["text_ids"],
                    img_ids=inputs["img_ids"],
                    joint_attention_kwargs=None,
                    return_dict=False,
                )[0]
            latents = sched.step(noise_pred, t, latents, return_dict=False)[0]
        model._reset_stateful_cache()  # what DiffusionPipeline.maybe_free_model_hooks() does at the end of a call
        return latents

    def probe(self, model: nn.Module) -> nn.Module:
        return model.single_transformer_blocks[-1].proj_out

    def describe(self) -> dict[str, Any]:
        return dict(
            model="FluxTransformer2DModel",
            checkpoint_config="tiny (test only)" if self.tiny else "black-forest-labs/FLUX.1-dev",
            transformer_config=_jsonable(self.config),
            scheduler="FlowMatchEulerDiscreteScheduler",
            scheduler_config=dict(FLUX_DEV_SCHEDULER),
            pixels=f"{self.width}x{self.height}",
            latent_shape=[1, self.image_tokens, 64],
            image_tokens=self.image_tokens,
            text_tokens=self.text_len,
            prompt_embeds_shape=[1, self.text_len, self.text_dim],
            pooled_shape=[1, self.pooled_dim],
            guidance=self.guidance_scale,
            calls_per_step=len(self.branches),
        )


class WanScenario(Scenario):
    key = "wan"
    title = "Wan2.1-T2V-1.3B (random weights)"
    branches = ("cond", "uncond")
    default_steps = 50
    guidance_scale = 5.0  # WanPipeline default

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.tiny:
            self.config, self.height, self.width, self.frames, self.text_len = TINY_WAN_TRANSFORMER, 128, 128, 17, 16
        else:
            self.config, self.height, self.width, self.frames, self.text_len = (
                WAN21_T2V_1_3B_TRANSFORMER, 480, 832, 81, 512
            )
        self.text_dim = self.config["text_dim"]
        # AutoencoderKLWan: x8 spatial, x4 temporal (first frame kept) -> [1, 16, (F-1)/4+1, H/8, W/8]
        self.latent_shape = [1, 16, (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8]
        pt, ph, pw = self.config["patch_size"]
        self.video_tokens = (self.latent_shape[2] // pt) * (self.latent_shape[3] // ph) * (self.latent_shape[4] // pw)

    def build(self) -> nn.Module:
        from diffusers import WanTransformer3DModel

        return build_model(WanTransformer3DModel, self.config, self.device, self.dtype, self.seed)

    def make_inputs(self) -> dict[str, Any]:
        gen = torch.Generator("cpu").manual_seed(self.seed + 1)
        dev, dt = self.device, self.dtype
        return dict(
            noise=torch.randn(*self.latent_shape, generator=gen).to(dev),  # WanPipeline keeps latents in float32
            prompt_embeds=torch.randn(1, self.text_len, self.text_dim, generator=gen).to(dev, dt),
            negative_prompt_embeds=torch.randn(1, self.text_len, self.text_dim, generator=gen).to(dev, dt),
        )

    @torch.no_grad()
    def denoise(self, model: nn.Module, inputs: dict[str, Any], steps: int) -> torch.Tensor:
        # The loop of WanPipeline.__call__ (diffusers 0.42, Wan2.1: one transformer, no expand_timesteps).
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler(**WAN_SCHEDULER)
        sched.set_timesteps(steps, device=self.device)
        sched.set_begin_index(0)
        timesteps = sched.timesteps
        sigmas = sched.sigmas.cpu().tolist()  # once per run, so the loop itself has no host-device sync
        latents = inputs["noise"].clone()
        for i, t in enumerate(timesteps):
            latent_model_input = latents.to(self.dtype)
            timestep = t.expand(latents.shape[0])
            ctx = dict(step_index=i, sigma=sigmas[i], num_inference_steps=len(timesteps))
            with model.cache_context("cond", **ctx):
                noise_pred = model(
                    hidden_states=latent_model_input,
                    timestep=timestep,
                    encoder_hidden_states=inputs["prompt_embeds"],
                    attention_kwargs=None,
                    return_dict=False,
                )[0]
            with model.cache_context("uncond", **ctx):
                noise_uncond = model(
                    hidden_states=latent_model_input,
                    timestep=timestep,
                    encoder_hidden_states=inputs["negative_prompt_embeds"],
                    attention_kwargs=None,
                    return_dict=False,
                )[0]
            noise_pred = noise_uncond + self.guidance_scale * (noise_pred - noise_uncond)
            latents = sched.step(noise_pred, t, latents, return_dict=False)[0]
        model._reset_stateful_cache()  # what DiffusionPipeline.maybe_free_model_hooks() does at the end of a call
        return latents

    def probe(self, model: nn.Module) -> nn.Module:
        return model.blocks[-1].ffn

    def describe(self) -> dict[str, Any]:
        return dict(
            model="WanTransformer3DModel",
            checkpoint_config="tiny (test only)" if self.tiny else "Wan-AI/Wan2.1-T2V-1.3B-Diffusers",
            transformer_config=_jsonable(self.config),
            scheduler="FlowMatchEulerDiscreteScheduler (released pipeline: UniPCMultistepScheduler, flow_shift 3.0)",
            scheduler_config=dict(WAN_SCHEDULER),
            pixels=f"{self.width}x{self.height}",
            frames=self.frames,
            latent_shape=self.latent_shape,
            video_tokens=self.video_tokens,
            prompt_embeds_shape=[1, self.text_len, self.text_dim],
            guidance=self.guidance_scale,
            calls_per_step=len(self.branches),
        )


SCENARIOS = {"wan": WanScenario, "flux": FluxScenario}


# --------------------------------------------------------------------------------------------------------------------
# Variants


@dataclass
class Variant:
    name: str
    kind: str  # "baseline" | "diffusers-fbc" | "accel" | "baseline-rerun"
    config: Any = None

    def config_dict(self) -> dict[str, Any] | None:
        return _jsonable(dataclasses.asdict(self.config)) if dataclasses.is_dataclass(self.config) else None


def make_variants(args: argparse.Namespace, steps: int) -> list[Variant]:
    from diffusers.hooks import FirstBlockCacheConfig

    from accel import CacheConfig
    from accel.presets import preset_configs

    variants = [Variant("baseline", "baseline")]
    for th in args.fbc_thresholds:
        variants.append(Variant(f"diffusers FBC {th:g}", "diffusers-fbc", FirstBlockCacheConfig(threshold=th)))
    for preset in args.accel_presets:
        cfg = preset_configs(preset)["cache"]
        if cfg is None:  # "lossless": no step cache
            continue
        variants.append(Variant(f"accel {preset}", "accel", dataclasses.replace(cfg, num_steps=steps)))
    for th in args.accel_thresholds:
        variants.append(Variant(f"accel thr {th:g}", "accel", CacheConfig(threshold=th, num_steps=steps)))
    # Threshold 0 never reuses: against the baseline these show the hooks' own overhead, and against each
    # other the cost of the one host-device sync per step that decision="current" adds.
    for decision in ("lagged", "current"):
        variants.append(
            Variant(f"accel overhead {decision}", "accel", CacheConfig(threshold=0.0, decision=decision, num_steps=steps))
        )
    return variants


@contextlib.contextmanager
def applied(model: nn.Module, variant: Variant) -> Iterator[Any]:
    """Install the variant's cache for the duration of the block; yields accel's handle (or None)."""
    if variant.kind == "diffusers-fbc":
        model.enable_cache(variant.config)
        try:
            yield None
        finally:
            model.disable_cache()
    elif variant.kind == "accel":
        import accel

        handle = accel.patch(model, cache=variant.config)
        try:
            yield handle
        finally:
            accel.unpatch(model)
    else:
        yield None


class PassCounter:
    """Counts calls of the probe module: denoiser passes in which the last block really computed."""

    def __init__(self, module: nn.Module):
        self.n = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.n += 1

    def remove(self) -> None:
        self._handle.remove()


# --------------------------------------------------------------------------------------------------------------------
# Measuring


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fidelity(x: torch.Tensor, ref: torch.Tensor) -> dict[str, Any]:
    """PSNR (dB) with both mapped to [0, 1] by ref's min/max, relative L1, max |x - ref|; float64 on CPU."""
    x, ref = x.detach().double().cpu(), ref.detach().double().cpu()
    finite = bool(torch.isfinite(x).all())
    lo, hi = ref.min(), ref.max()
    span = (hi - lo).clamp_min(1e-12)
    mse = float((((x - lo) / span - (ref - lo) / span) ** 2).mean())
    identical = bool(torch.equal(x, ref))
    return dict(
        psnr_db=None if identical or not finite else (10 * math.log10(1 / mse) if mse > 0 else None),
        rel_l1=float((x - ref).abs().sum() / ref.abs().sum().clamp_min(1e-12)) if finite else None,
        max_abs_diff=float((x - ref).abs().max()) if finite else None,
        identical=identical,
        finite=finite,
    )


def measure(
    scn: Scenario,
    model: nn.Module,
    inputs: dict[str, Any],
    variant: Variant,
    steps: int,
    repeats: int,
    warmup: int,
    counter: PassCounter,
) -> dict[str, Any]:
    dev = scn.device
    passes = steps * len(scn.branches)
    times: list[float] = []
    computed_per_run: list[int] = []
    first = last = None
    accel_report = None
    with applied(model, variant) as handle:
        for i in range(warmup + repeats):
            timed = i >= warmup
            if dev.type == "cuda" and i == warmup:
                _sync(dev)
                torch.cuda.reset_peak_memory_stats(dev)
            counter.n = 0
            _sync(dev)
            t0 = time.perf_counter()
            out = scn.denoise(model, inputs, steps)
            _sync(dev)
            elapsed = time.perf_counter() - t0
            computed_per_run.append(counter.n)
            if timed:
                times.append(elapsed)
            out = out.detach().float().cpu()
            if first is None:
                first = out
            last = out
        peak = torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None
        if handle is not None:
            accel_report = handle.report()

    row: dict[str, Any] = dict(
        name=variant.name,
        kind=variant.kind,
        config=variant.config_dict(),
        runs_timed=repeats,
        runs_warmup=warmup,
        times_s=times,
        median_s=statistics.median(times),
        peak_mem_bytes=peak,
        passes=passes,
        computed=computed_per_run[-1],
        reused=passes - computed_per_run[-1],
        computed_source="probe on the last block",
        computed_per_run=computed_per_run,
        # the same seed every run: a cache that keeps no state across calls gives the same latent every run
        run_to_run_max_abs_diff=float((first - last).abs().max()),
        notes=[],
    )
    if len(set(computed_per_run)) > 1:
        row["notes"].append(f"computed passes differ between runs: {computed_per_run}")
    if accel_report is not None:
        calls = accel_report.calls
        call = calls[-1]
        row["accel_report"] = dict(
            calls_recorded=len(calls),
            last_call=accel_report.to_dict()["calls"][-1],
            warnings=list(accel_report.warnings),
            applied=[vars(a) for a in accel_report.applied],
        )
        row["computed"], row["reused"] = call.computed, call.reused
        row["computed_source"] = "accel report"
        if len(calls) != warmup + repeats:
            row["notes"].append(f"accel recorded {len(calls)} calls for {warmup + repeats} runs")
        bad = [c.computed + c.reused for c in calls if c.computed + c.reused != passes]
        if bad:
            row["notes"].append(f"accel calls with a pass count other than {passes}: {bad}")
        if call.computed != computed_per_run[-1]:
            row["notes"].append(
                f"accel report says {call.computed} computed, the last-block probe counted {computed_per_run[-1]}"
            )
    row["_latent"] = last
    return row


def run_scenario(key: str, args: argparse.Namespace, device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    scn = SCENARIOS[key](args.tiny, device, dtype, args.seed)
    steps = args.steps or scn.default_steps
    info = scn.describe()
    info.update(steps=steps, dtype=str(dtype).replace("torch.", ""), passes_per_run=steps * len(scn.branches))
    print(f"\n[{key}] building {scn.title} ({'tiny' if args.tiny else 'released config'}) on {device} ...", flush=True)
    t0 = time.perf_counter()
    model = scn.build()
    n_params = sum(p.numel() for p in model.parameters())
    info.update(parameters=n_params, build_s=round(time.perf_counter() - t0, 1))
    inputs = scn.make_inputs()
    counter = PassCounter(scn.probe(model))
    if device.type == "cuda":
        info["weights_bytes"] = torch.cuda.memory_allocated(device)

    variants = make_variants(args, steps)
    if args.variants:
        wanted = set(args.variants)
        variants = [v for v in variants if v.kind == "baseline" or v.name in wanted]
    rows: list[dict[str, Any]] = []
    ref = None
    for variant in variants + ([] if args.no_rerun else [Variant("baseline (re-run)", "baseline-rerun")]):
        rerun = variant.kind == "baseline-rerun"
        try:
            row = measure(
                scn, model, inputs, variant, steps,
                repeats=1 if rerun else args.repeats,
                warmup=0 if rerun else args.warmup,
                counter=counter,
            )
        except Exception as err:  # one failing variant must not lose the others' (long) measurements
            if variant.kind == "baseline":
                raise
            traceback.print_exc()
            row = dict(name=variant.name, kind=variant.kind, config=variant.config_dict(), error=repr(err), notes=[])
            rows.append(row)
            print(f"[{key}] {_format_row(row)}", flush=True)
            continue
        latent = row.pop("_latent")
        if ref is None:
            ref = latent
            if not bool(torch.isfinite(ref).all()):
                print(f"[{key}] WARNING: the baseline's final latent is not finite; fidelity is meaningless", flush=True)
        row.update(fidelity(latent, ref))
        row["speedup"] = rows[0]["median_s"] / row["median_s"] if rows else 1.0
        rows.append(row)
        print(f"[{key}] {_format_row(row)}", flush=True)
    counter.remove()
    info["rows"] = rows
    del model, inputs
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return info


# --------------------------------------------------------------------------------------------------------------------
# Output

_COLUMNS = (
    ("variant", 22), ("median s", 9), ("speedup", 8), ("peak mem", 10), ("computed", 9), ("reused", 7),
    ("PSNR dB", 8), ("rel L1", 9),
)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e8 else f"{n / 1e6:.2f}M"


def _gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / 2**30:.2f} GiB"


def _format_row(row: dict[str, Any]) -> str:
    if "error" in row:
        return f"{row['name'].ljust(_COLUMNS[0][1])}  FAILED: {row['error']}"
    if row["identical"]:
        psnr = "inf"
    elif row["psnr_db"] is None:
        psnr = "n/a" if not row["finite"] else "inf"
    else:
        psnr = f"{row['psnr_db']:.2f}"
    rel = "n/a" if row["rel_l1"] is None else f"{row['rel_l1']:.2e}"
    cells = (
        row["name"],
        f"{row['median_s']:.3f}",
        f"{row['speedup']:.2f}x",
        _gib(row["peak_mem_bytes"]),
        f"{row['computed']}/{row['passes']}",
        str(row["reused"]),
        psnr,
        rel,
    )
    text = "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, (_, w)) in enumerate(zip(cells, _COLUMNS)))
    return text + ("  ! " + "; ".join(row["notes"]) if row["notes"] else "")


def print_table(key: str, info: dict[str, Any], env: dict[str, Any]) -> None:
    shape = info.get("latent_shape")
    branches = "cond + uncond (CFG)" if info["calls_per_step"] == 2 else "cond (guidance-distilled)"
    print()
    print(
        f"== {key}: {info['checkpoint_config']} shapes, random weights, {_count(info['parameters'])} params | "
        f"latent {shape} | {info['steps']} steps x {branches} | {info['dtype']} | {env['device_name']} =="
    )
    print("  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(_COLUMNS)))
    for row in info["rows"]:
        print(_format_row(row))
    print(
        "computed/reused: denoiser passes in one run (all CFG branches); PSNR/rel L1: final latent vs the baseline's "
        "(latents mapped to [0,1] by the baseline's min/max); random weights: fidelity = closeness to the baseline only."
    )


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def environment(device: torch.device) -> dict[str, Any]:
    import diffusers

    import accel

    cuda = device.type == "cuda"
    return dict(
        device=str(device),
        device_name=torch.cuda.get_device_name(device) if cuda else f"CPU ({platform.processor() or platform.machine()})",
        gpu=torch.cuda.get_device_name(device) if cuda else None,
        cuda=torch.version.cuda if cuda else None,
        torch=torch.__version__,
        diffusers=diffusers.__version__,
        accel=getattr(accel, "__version__", None),
        python=platform.python_version(),
        platform=platform.platform(),
        cpu_threads=torch.get_num_threads(),
    )


# --------------------------------------------------------------------------------------------------------------------
# CLI


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scenario", choices=["wan", "flux", "all"], default="all")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per variant (median reported; default 3)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs per variant before timing (default 1)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (default: wan 50, flux 28)")
    p.add_argument("--tiny", action="store_true", help="tiny configs and latents, CPU, float32: checks the script")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=None, help="default: bf16 (fp32 with --tiny)")
    p.add_argument("--device", default=None, help="default: cuda (cpu with --tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--fbc-thresholds", type=_floats, default=[0.05, 0.1], help="diffusers FBC thresholds (default 0.05,0.1)")
    p.add_argument("--accel-presets", type=_names, default=["balanced", "fast"], help="accel presets (default balanced,fast)")
    p.add_argument("--accel-thresholds", type=_floats, default=[0.05, 0.1], help="accel raw thresholds (default 0.05,0.1)")
    p.add_argument("--variants", type=_names, default=None, help="only these variant names (comma-separated; baseline always runs)")
    p.add_argument("--no-rerun", action="store_true", help="skip the final baseline re-run")
    p.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/caching-<gpu>.json")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if args.steps is not None and args.steps < 2:
        p.error("--steps must be >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device or ("cpu" if args.tiny else "cuda"))
    if device.type == "cuda" and not torch.cuda.is_available():
        sys.exit(NO_GPU_MESSAGE)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type != "cuda" and not args.tiny:
        sys.exit(NO_GPU_MESSAGE)
    dtype = DTYPES[args.dtype or ("fp32" if args.tiny else "bf16")]
    if device.type == "cuda":
        torch.cuda.set_device(device)
    elif args.tiny:
        torch.set_num_threads(1)  # tiny models: one thread is as fast and far steadier on a shared CPU

    env = environment(device)
    print(
        f"accel step-caching benchmark | {env['device_name']} | torch {env['torch']} | diffusers {env['diffusers']} "
        f"| {str(dtype).replace('torch.', '')}{' | TINY configs (script check, not a benchmark)' if args.tiny else ''}",
        flush=True,
    )
    out = args.json
    if out is None:
        name = _slug(env["gpu"]) if env["gpu"] else "cpu"
        out = REPO / "benchmarks" / "results" / f"caching-{name}{'-tiny' if args.tiny else ''}.json"
    keys = ["wan", "flux"] if args.scenario == "all" else [args.scenario]
    results: dict[str, Any] = {}
    doc = dict(
        benchmark="accel step caching",
        created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        tiny=args.tiny,
        weights="random (released configs, nothing downloaded): timings are real, fidelity is closeness to the baseline",
        settings=dict(
            repeats=args.repeats, warmup=args.warmup, seed=args.seed, dtype=str(dtype).replace("torch.", ""),
            steps=args.steps, fbc_thresholds=args.fbc_thresholds, accel_presets=args.accel_presets,
            accel_thresholds=args.accel_thresholds,
        ),
        env=env,
        scenarios=results,
    )
    for key in keys:
        results[key] = run_scenario(key, args, device, dtype)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(_jsonable(doc), indent=2) + "\n")  # after each scenario: a crash keeps the rest
    for key in keys:
        print_table(key, results[key], env)
    print(f"\nwrote {out}")
    failed = [f"{key}: {row['name']}" for key in keys for row in results[key]["rows"] if "error" in row]
    if failed:
        print("FAILED variants: " + ", ".join(failed), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
