"""Diffusion transformers at the released models' shapes with random weights, and their inputs, for benchmarks.

    scn = WanScenario(tiny=False, device=torch.device("cuda"), dtype=torch.bfloat16, seed=0)
    model, inputs = scn.build(), scn.make_inputs()
    out = scn.forward(model, inputs)                 # one denoiser call at a mid-schedule timestep
    latent = scn.denoise(model, inputs, steps=50)   # the real pipeline's denoising loop, transformer only

The configs are the checkpoints' own config.json values; nothing is downloaded, so timings are real (same
shapes, same kernels) while outputs only say how close a variant stays to the random baseline. `tiny=True`
swaps in the zoo's tiny transformers and small latents (CPU, float32: checks a script, measures nothing);
keyword overrides (config, height, width, frames, text_len) change a scenario's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from accel.zoo._diffusers import cast_like_from_pretrained
from accel.zoo.image import FLUX_DEV_SCHEDULER, FLUX_DEV_TRANSFORMER, TINY_FLUX_TRANSFORMER
from accel.zoo.video import TINY_WAN_TRANSFORMER, WAN21_T2V_1_3B_TRANSFORMER

# The released Wan2.1 pipeline uses UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
# flow_shift=3.0); the benchmarks step with flow-matching Euler at the same shift.
WAN_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0)


@dataclass(frozen=True)
class AttentionShape:
    """One attention call: `heads` x `tokens` x `head_dim`, batch 1; tokens = the latent grid's plus `text`."""

    title: str
    heads: int
    grid: tuple[int, int, int] | None  # latent tokens (frames, height, width) after patching; None: no grid
    text: int = 0  # tokens besides the grid: text, or a VLM's whole prompt
    causal: bool = False
    head_dim: int = 128

    @property
    def tokens(self) -> int:
        return (math.prod(self.grid) if self.grid else 0) + self.text


ATTENTION_SHAPES = {
    "wan": AttentionShape("Wan2.1-1.3B 480p self-attention, 81 frames", 12, (21, 30, 52)),
    "hunyuan": AttentionShape("HunyuanVideo 720p joint attention, 129 frames", 24, (33, 45, 80), text=256),
    "flux": AttentionShape("FLUX.1-dev 1024px joint attention", 24, (1, 64, 64), text=512),
    "vlm": AttentionShape("7B-class VLM prefill", 32, None, text=4096, causal=True),
}
# INT8 attention launch configurations (block_q, block_k, num_warps, num_stages) that benchmarks/attention.py
# sweeps and benchmarks/compile_report.py compiles; the first is int8_attention's default.
INT8_TILE_SWEEP = [
    (128, 64, 8, None),
    (128, 64, 4, 3),
    (128, 128, 8, 2),
    (128, 32, 4, 4),
    (64, 64, 4, 3),
    (64, 128, 4, 2),
]


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


def _end_of_call(model: nn.Module) -> None:
    """What `DiffusionPipeline.maybe_free_model_hooks()` does to the denoiser at the end of a pipeline call: reset
    the state of its stateful hooks (a step cache's, for one), through the public hook registry."""
    from diffusers.hooks import HookRegistry

    HookRegistry.check_if_exists_or_initialize(model).reset_stateful_hooks(recurse=True)


class Scenario:
    """One released model's transformer at its real shapes; subclasses fill in the model and its pipeline loop."""

    key: str
    title: str
    branches: tuple[str, ...]  # cache contexts per denoising step (CFG: "cond", "uncond")
    default_steps: int
    guidance_scale: float
    released: dict  # the transformer's released config
    tiny_config: dict
    checkpoint: str
    transformer_class: str  # the diffusers class of `released`
    scheduler_name: str  # the scheduler `denoise` steps with (and how it differs from the released pipeline's)
    scheduler_config: dict

    def __init__(self, tiny: bool, device: torch.device, dtype: torch.dtype, seed: int, **size: Any):
        self.tiny, self.device, self.dtype, self.seed = tiny, torch.device(device), dtype, seed
        self.config = size.pop("config", None) or (self.tiny_config if tiny else self.released)
        self._size(**size)

    def _size(self, **size: Any) -> None:
        raise NotImplementedError

    def build(self) -> nn.Module:
        import diffusers

        cls = getattr(diffusers, self.transformer_class)
        return build_model(cls, self.config, self.device, self.dtype, self.seed)

    def make_inputs(self) -> dict[str, Any]:
        raise NotImplementedError

    def forward(self, model: nn.Module, inputs: dict[str, Any], timestep: float | None = None) -> torch.Tensor:
        """One conditional denoiser call on the initial noise (default: the schedule's middle timestep)."""
        raise NotImplementedError

    @torch.no_grad()
    def denoise(self, model: nn.Module, inputs: dict[str, Any], steps: int) -> torch.Tensor:
        """The released pipeline's denoising loop on the transformer alone; returns the final latent."""
        latents = self._loop(model, inputs, steps)
        _end_of_call(model)
        return latents

    def _loop(self, model: nn.Module, inputs: dict[str, Any], steps: int) -> torch.Tensor:
        """The loop of the released pipeline's `__call__` (without the end-of-call reset)."""
        raise NotImplementedError

    def probe(self, model: nn.Module) -> nn.Module:
        """A module inside the LAST transformer block that runs only when that block really computes (a reused
        step hands the block's inputs through, or returns the cached residual, without calling it)."""
        raise NotImplementedError

    def describe(self) -> dict[str, Any]:
        """The scenario's shapes and configs, for a result's JSON."""
        return dict(
            model=self.transformer_class,
            checkpoint_config=self._checkpoint(),
            transformer_config=dict(self.config),
            scheduler=self.scheduler_name,
            scheduler_config=dict(self.scheduler_config),
            pixels=f"{self.width}x{self.height}",
            **self._shapes(),
            guidance=self.guidance_scale,
            calls_per_step=len(self.branches),
        )

    def _shapes(self) -> dict[str, Any]:
        """The latent and embedding shapes of `describe`."""
        raise NotImplementedError

    def _checkpoint(self) -> str:
        if self.config is self.released:
            return self.checkpoint
        return "tiny (test only)" if self.tiny else "custom"


def _flux_image_ids(h: int, w: int) -> torch.Tensor:
    """FluxPipeline._prepare_latent_image_ids: one (0, row, col) triple per packed image token."""
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


class FluxScenario(Scenario):
    """FLUX.1-dev: 1024x1024 -> 4096 packed image tokens [1, 4096, 64] + 512 T5-XXL text tokens, pooled CLIP-L
    [1, 768], guidance-distilled (one call per step, distilled guidance 3.5), 28 steps."""

    key = "flux"
    title = "FLUX.1-dev (random weights)"
    branches = ("cond",)
    default_steps = 28
    guidance_scale = 3.5  # FluxPipeline default
    released, tiny_config = FLUX_DEV_TRANSFORMER, TINY_FLUX_TRANSFORMER
    checkpoint = "black-forest-labs/FLUX.1-dev"
    transformer_class = "FluxTransformer2DModel"
    scheduler_name, scheduler_config = "FlowMatchEulerDiscreteScheduler", FLUX_DEV_SCHEDULER

    def _size(self, height: int | None = None, width: int | None = None, text_len: int | None = None) -> None:
        self.height = height or (256 if self.tiny else 1024)
        self.width = width or (256 if self.tiny else 1024)
        self.text_len = text_len or (16 if self.tiny else 512)
        self.pooled_dim = self.config["pooled_projection_dim"]
        self.text_dim = self.config["joint_attention_dim"]
        # FluxPipeline.prepare_latents: VAE latent (H/8, W/8), packed 2x2 -> (H/16) * (W/16) tokens of 64 channels.
        self.lat_h, self.lat_w = 2 * (self.height // 16), 2 * (self.width // 16)
        self.image_tokens = (self.lat_h // 2) * (self.lat_w // 2)

    def _shapes(self) -> dict[str, Any]:
        return dict(
            latent_shape=[1, self.image_tokens, 64],
            image_tokens=self.image_tokens,
            text_tokens=self.text_len,
            prompt_embeds_shape=[1, self.text_len, self.text_dim],
            pooled_shape=[1, self.pooled_dim],
        )

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

    def _call(self, model: nn.Module, inputs: dict[str, Any], latents: torch.Tensor, timestep: torch.Tensor):
        return model(
            hidden_states=latents,
            timestep=timestep,
            guidance=inputs["guidance"],
            pooled_projections=inputs["pooled_prompt_embeds"],
            encoder_hidden_states=inputs["prompt_embeds"],
            txt_ids=inputs["text_ids"],
            img_ids=inputs["img_ids"],
            joint_attention_kwargs=None,
            return_dict=False,
        )[0]

    @torch.no_grad()
    def forward(self, model: nn.Module, inputs: dict[str, Any], timestep: float | None = None) -> torch.Tensor:
        t = torch.full([1], 0.5 if timestep is None else timestep, device=self.device, dtype=self.dtype)
        return self._call(model, inputs, inputs["noise"], t)

    def _scheduler(self, steps: int):
        import numpy as np
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler(**self.scheduler_config)
        # diffusers.pipelines.flux.pipeline_flux.calculate_shift (inlined: importing the pipeline module pulls in
        # transformers): mu grows linearly from base_shift at 256 image tokens to max_shift at 4096.
        cfg = sched.config
        slope = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
        mu = self.image_tokens * slope + cfg.base_shift - slope * cfg.base_image_seq_len
        sched.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=self.device, mu=mu)
        sched.set_begin_index(0)
        return sched

    def _loop(self, model: nn.Module, inputs: dict[str, Any], steps: int) -> torch.Tensor:
        # The loop of FluxPipeline.__call__ (diffusers 0.42), true CFG off (FLUX.1-dev is guidance-distilled).
        sched = self._scheduler(steps)
        latents = inputs["noise"].clone()
        for t in sched.timesteps:
            timestep = t.expand(latents.shape[0]).to(latents.dtype)
            with model.cache_context("cond"):
                noise_pred = self._call(model, inputs, latents, timestep / 1000)
            latents = sched.step(noise_pred, t, latents, return_dict=False)[0]
        return latents

    def probe(self, model: nn.Module) -> nn.Module:
        return model.single_transformer_blocks[-1].proj_out


class WanScenario(Scenario):
    """Wan2.1-T2V-1.3B: 832x480, 81 frames -> latent [1, 16, 21, 60, 104] (32,760 video tokens), umT5-XXL text
    embeddings [1, 512, 4096], classifier-free guidance as two calls per step (guidance 5.0), 50 steps."""

    key = "wan"
    title = "Wan2.1-T2V-1.3B (random weights)"
    branches = ("cond", "uncond")
    default_steps = 50
    guidance_scale = 5.0  # WanPipeline default
    released, tiny_config = WAN21_T2V_1_3B_TRANSFORMER, TINY_WAN_TRANSFORMER
    checkpoint = "Wan-AI/Wan2.1-T2V-1.3B-Diffusers"
    transformer_class = "WanTransformer3DModel"
    scheduler_name = "FlowMatchEulerDiscreteScheduler (released pipeline: UniPCMultistepScheduler, flow_shift 3.0)"
    scheduler_config = WAN_SCHEDULER

    def _size(
        self,
        height: int | None = None,
        width: int | None = None,
        frames: int | None = None,
        text_len: int | None = None,
    ) -> None:
        self.height = height or (128 if self.tiny else 480)
        self.width = width or (128 if self.tiny else 832)
        self.frames = frames or (17 if self.tiny else 81)
        self.text_len = text_len or (16 if self.tiny else 512)
        self.text_dim = self.config["text_dim"]
        # AutoencoderKLWan: x8 spatial, x4 temporal (first frame kept) -> [1, 16, (F-1)/4+1, H/8, W/8]
        self.latent_shape = [1, 16, (self.frames - 1) // 4 + 1, self.height // 8, self.width // 8]
        pt, ph, pw = self.config["patch_size"]
        self.video_tokens = (self.latent_shape[2] // pt) * (self.latent_shape[3] // ph) * (self.latent_shape[4] // pw)

    def _shapes(self) -> dict[str, Any]:
        return dict(
            frames=self.frames,
            latent_shape=self.latent_shape,
            video_tokens=self.video_tokens,
            prompt_embeds_shape=[1, self.text_len, self.text_dim],
        )

    def make_inputs(self) -> dict[str, Any]:
        gen = torch.Generator("cpu").manual_seed(self.seed + 1)
        dev, dt = self.device, self.dtype
        return dict(
            noise=torch.randn(*self.latent_shape, generator=gen).to(dev),  # WanPipeline keeps latents in float32
            prompt_embeds=torch.randn(1, self.text_len, self.text_dim, generator=gen).to(dev, dt),
            negative_prompt_embeds=torch.randn(1, self.text_len, self.text_dim, generator=gen).to(dev, dt),
        )

    def _call(self, model: nn.Module, latents: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor):
        return model(
            hidden_states=latents,
            timestep=timestep,
            encoder_hidden_states=text,
            attention_kwargs=None,
            return_dict=False,
        )[0]

    @torch.no_grad()
    def forward(self, model: nn.Module, inputs: dict[str, Any], timestep: float | None = None) -> torch.Tensor:
        t = torch.full([1], 500.0 if timestep is None else timestep, device=self.device)
        return self._call(model, inputs["noise"].to(self.dtype), t, inputs["prompt_embeds"])

    def _loop(self, model: nn.Module, inputs: dict[str, Any], steps: int) -> torch.Tensor:
        # The loop of WanPipeline.__call__ (diffusers 0.42, Wan2.1: one transformer, no expand_timesteps).
        from diffusers import FlowMatchEulerDiscreteScheduler

        sched = FlowMatchEulerDiscreteScheduler(**self.scheduler_config)
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
                noise_pred = self._call(model, latent_model_input, timestep, inputs["prompt_embeds"])
            with model.cache_context("uncond", **ctx):
                noise_uncond = self._call(model, latent_model_input, timestep, inputs["negative_prompt_embeds"])
            noise_pred = noise_uncond + self.guidance_scale * (noise_pred - noise_uncond)
            latents = sched.step(noise_pred, t, latents, return_dict=False)[0]
        return latents

    def probe(self, model: nn.Module) -> nn.Module:
        return model.blocks[-1].ffn


SCENARIOS: dict[str, type[Scenario]] = {"wan": WanScenario, "flux": FluxScenario}


class PassCounter:
    """Counts calls of a probe module (`Scenario.probe`): denoiser passes in which the last block really computed."""

    def __init__(self, module: nn.Module):
        self.n = 0
        self._handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module, args) -> None:
        self.n += 1

    def remove(self) -> None:
        self._handle.remove()


__all__ = [
    "ATTENTION_SHAPES",
    "AttentionShape",
    "FLUX_DEV_TRANSFORMER",
    "FluxScenario",
    "INT8_TILE_SWEEP",
    "PassCounter",
    "SCENARIOS",
    "Scenario",
    "WAN21_T2V_1_3B_TRANSFORMER",
    "WAN_SCHEDULER",
    "WanScenario",
    "build_model",
    "cast_like_from_pretrained",
]
