"""Tiny random-weight instances of real diffusers video pipelines.

Every builder returns a `TinyModel` whose `obj` is a real diffusers pipeline (`WanPipeline`,
`HunyuanVideoPipeline`, `CogVideoXPipeline`, `LTXPipeline`) built from tiny configs of the real denoiser and VAE
classes, with the scheduler (class and config) the released checkpoint ships with. There are no text encoders or
tokenizers: the components are `None` and every run passes seeded random prompt embeddings (and the masks, pooled
embeddings and negatives each pipeline needs), so classifier-free guidance is on in the default run.

Weights are drawn from `seed` inside `torch.random.fork_rng()`, so building never disturbs the caller's global RNG.
The "prompt" embeddings are fixed per built model (drawn from the build seed); the run seed drives the pipeline's
`generator`, i.e. the initial noise, exactly as a user would call it.

`TinyModel.run(seed, **overrides)` returns float32 pixels in [0, 1] shaped `[B, F, C, H, W]`. Overrides
`num_inference_steps`, `height`, `width`, `num_frames`, `guidance_scale` (and anything else) go to the pipeline.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from accel.zoo._base import TinyModel, seeded

DEFAULT_STEPS = 10


# --------------------------------------------------------------------------------------------------------------------
# helpers



def _prepare(modules, dtype: torch.dtype) -> None:
    """eval() (parameters keep requires_grad=True, as from `from_pretrained`), and cast to `dtype` the way
    `from_pretrained(torch_dtype=dtype)` would: floating parameters and persistent buffers go to `dtype`,
    except those under the class's `_keep_in_fp32_modules`
    (e.g. Wan's rope / time_embedder / norms / scale_shift_table), which stay float32. Non-persistent buffers
    stay as built. (`ModelMixin.to(dtype)` would cast everything and warn.)"""
    for m in modules:
        m.eval()
        if dtype == torch.float32:
            continue
        keep = getattr(m, "_keep_in_fp32_modules", None) or []
        state_names = set(m.state_dict().keys())
        for mod_name, mod in m.named_modules():
            prefix = f"{mod_name}." if mod_name else ""
            for pname, p in list(mod.named_parameters(recurse=False)):
                if torch.is_floating_point(p):
                    full = prefix + pname
                    target = torch.float32 if any(k in full.split(".") for k in keep) else dtype
                    p.data = p.data.to(target)
            for bname, b in list(mod.named_buffers(recurse=False)):
                full = prefix + bname
                if b is not None and torch.is_floating_point(b) and full in state_names:
                    target = torch.float32 if any(k in full.split(".") for k in keep) else dtype
                    setattr(mod, bname, b.to(target))


def _embeds(gen: torch.Generator, batch: int, seq: int, dim: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(batch, seq, dim, generator=gen, dtype=torch.float32).to(dtype)


def _mask(batch: int, seq: int, valid: int, dtype: torch.dtype = torch.long) -> torch.Tensor:
    """Attention mask with `valid` leading ones, like a padded tokenizer output."""
    m = torch.zeros(batch, seq, dtype=dtype)
    m[:, :valid] = 1
    return m


def _to_pixels(frames: Any) -> Any:
    """Pipeline output -> float32 [B, F, C, H, W] in [0, 1] (for output_type "pt" / "np")."""
    if isinstance(frames, torch.Tensor):
        return frames.float().cpu()
    try:
        import numpy as np

        if isinstance(frames, np.ndarray):  # np: [B, F, H, W, C]
            return torch.from_numpy(frames).float().permute(0, 1, 4, 2, 3).contiguous()
    except ImportError:  # pragma: no cover
        pass
    return frames  # "pil" / "latent": return as the pipeline gave it


def _make_run(pipe, defaults: dict[str, Any]) -> Callable[..., Any]:
    """`run(seed, **overrides)`: call the pipeline as a user would; overrides win over defaults."""

    def _run(seed: int = 0, **overrides: Any) -> Any:
        # The stored embeddings live on CPU; follow the pipeline if it was moved (`pipe.to("cuda")`), since these
        # pipelines do not move user-given embeddings themselves. The generator stays on CPU (as in diffusers docs),
        # so the initial noise is the same on every device.
        device = pipe.device
        kwargs = {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in defaults.items()}
        kwargs["output_type"] = "pt"
        kwargs.update(overrides)
        if "generator" not in overrides:
            kwargs["generator"] = torch.Generator("cpu").manual_seed(seed)
        # Not every pipeline repeats user-given embeddings by num_videos_per_prompt (CogVideoX does not):
        # repeat them here so a batch of n videos works the same for all families.
        copies = int(kwargs.pop("num_videos_per_prompt", None) or 1)
        if copies > 1:
            for key, value in list(kwargs.items()):
                if key != "latents" and isinstance(value, torch.Tensor) and ("embeds" in key or "mask" in key):
                    kwargs[key] = value.repeat_interleave(copies, dim=0)
        out = pipe(**kwargs)  # the pipelines' __call__ already runs under torch.no_grad()
        frames = out[0] if isinstance(out, tuple) else out.frames
        return _to_pixels(frames)

    return _run


# --------------------------------------------------------------------------------------------------------------------
# Wan 2.1 (T2V)

WAN_TEXT_DIM = 32
WAN_TEXT_LEN = 16

# The tiny Wan transformer (also the --tiny stand-in of accel/bench/scenarios.py).
TINY_WAN_TRANSFORMER = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=16,
    out_channels=16,
    text_dim=WAN_TEXT_DIM,
    freq_dim=32,
    ffn_dim=64,
    num_layers=3,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    rope_max_seq_len=64,
)


def tiny_wan(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyModel:
    """`WanPipeline`: 3-block `WanTransformer3DModel` (2 heads x 16, patch (1,2,2)), tiny `AutoencoderKLWan`
    (x8 spatial, x4 temporal, z_dim 16), UniPC flow-prediction scheduler as shipped with Wan2.1-T2V-1.3B.

    Default run: 9 frames at 64x64 -> latents 3 x 8 x 8 -> 3 x 4 x 4 = 48 tokens; CFG 5.0 as two calls per step
    (`cache_context("cond")`, then `cache_context("uncond")`)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    def build():
        transformer = WanTransformer3DModel(**TINY_WAN_TRANSFORMER)
        vae = AutoencoderKLWan(
            base_dim=4,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True, True],
        )
        gen = torch.Generator("cpu").manual_seed(seed)
        emb = _embeds(gen, 1, WAN_TEXT_LEN, WAN_TEXT_DIM, dtype)
        neg = _embeds(gen, 1, WAN_TEXT_LEN, WAN_TEXT_DIM, dtype)
        return transformer, vae, emb, neg

    transformer, vae, emb, neg = seeded(seed, build)
    _prepare([transformer, vae], dtype)
    # Wan-AI/Wan2.1-T2V-1.3B-Diffusers scheduler/scheduler_config.json
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        beta_start=0.0001,
        beta_end=0.02,
        beta_schedule="linear",
        solver_order=2,
        prediction_type="flow_prediction",
        solver_type="bh2",
        lower_order_final=True,
        use_flow_sigmas=True,
        flow_shift=3.0,
        timestep_spacing="linspace",
        final_sigmas_type="zero",
    )
    pipe = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    defaults = dict(
        prompt_embeds=emb,
        negative_prompt_embeds=neg,
        height=64,
        width=64,
        num_frames=9,
        num_inference_steps=DEFAULT_STEPS,
        guidance_scale=5.0,
    )
    return TinyModel(
        name="tiny-random-wan",
        family="wan",
        kind="video",
        obj=pipe,
        _run=_make_run(pipe, defaults),
        default_steps=DEFAULT_STEPS,
    )


# --------------------------------------------------------------------------------------------------------------------
# HunyuanVideo (T2V)

HY_TEXT_DIM = 32
HY_TEXT_LEN = 16
HY_TEXT_VALID = 12
HY_POOLED_DIM = 16


def tiny_hunyuan_video(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyModel:
    """`HunyuanVideoPipeline`: `HunyuanVideoTransformer3DModel` with 2 double + 2 single blocks + 1 refiner block
    (2 heads x 16, rope axes (4, 6, 6), patch 2 x 2, guidance embeds), tiny `AutoencoderKLHunyuanVideo`
    (x8 spatial, x4 temporal, 4 latent channels), FlowMatchEuler with shift 7 as shipped.

    Default run: 9 frames at 64x64 -> latents 3 x 8 x 8 -> 3 x 4 x 4 = 48 tokens (+16 text tokens, 12 unmasked).
    CFG: `true_cfg_scale=4.0` with negative embeds -> two calls per step (`cache_context("cond")` then
    `("uncond")`). `guidance_scale` is HunyuanVideo's distilled *embedded* guidance (default 6.0), not CFG;
    pass `true_cfg_scale=1.0` to turn CFG off."""
    from diffusers import (
        AutoencoderKLHunyuanVideo,
        FlowMatchEulerDiscreteScheduler,
        HunyuanVideoPipeline,
        HunyuanVideoTransformer3DModel,
    )

    def build():
        transformer = HunyuanVideoTransformer3DModel(
            in_channels=4,
            out_channels=4,
            num_attention_heads=2,
            attention_head_dim=16,
            num_layers=2,
            num_single_layers=2,
            num_refiner_layers=1,
            mlp_ratio=2.0,
            patch_size=2,
            patch_size_t=1,
            qk_norm="rms_norm",
            guidance_embeds=True,
            text_embed_dim=HY_TEXT_DIM,
            pooled_projection_dim=HY_POOLED_DIM,
            rope_theta=256.0,
            rope_axes_dim=(4, 6, 6),
        )
        vae = AutoencoderKLHunyuanVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=4,
            down_block_types=("HunyuanVideoDownBlock3D",) * 4,
            up_block_types=("HunyuanVideoUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            layers_per_block=1,
            act_fn="silu",
            norm_num_groups=4,
            scaling_factor=0.476986,
            spatial_compression_ratio=8,
            temporal_compression_ratio=4,
            mid_block_add_attention=True,
        )
        gen = torch.Generator("cpu").manual_seed(seed)
        emb = _embeds(gen, 1, HY_TEXT_LEN, HY_TEXT_DIM, dtype)
        pooled = torch.randn(1, HY_POOLED_DIM, generator=gen).to(dtype)
        neg = _embeds(gen, 1, HY_TEXT_LEN, HY_TEXT_DIM, dtype)
        neg_pooled = torch.randn(1, HY_POOLED_DIM, generator=gen).to(dtype)
        return transformer, vae, emb, pooled, neg, neg_pooled

    transformer, vae, emb, pooled, neg, neg_pooled = seeded(seed, build)
    _prepare([transformer, vae], dtype)
    # hunyuanvideo-community/HunyuanVideo scheduler/scheduler_config.json
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=7.0)
    pipe = HunyuanVideoPipeline(
        text_encoder=None,
        tokenizer=None,
        transformer=transformer,
        vae=vae,
        scheduler=scheduler,
        text_encoder_2=None,
        tokenizer_2=None,
    )
    pipe.set_progress_bar_config(disable=True)
    defaults = dict(
        prompt_embeds=emb,
        pooled_prompt_embeds=pooled,
        prompt_attention_mask=_mask(1, HY_TEXT_LEN, HY_TEXT_VALID),
        negative_prompt_embeds=neg,
        negative_pooled_prompt_embeds=neg_pooled,
        negative_prompt_attention_mask=_mask(1, HY_TEXT_LEN, HY_TEXT_VALID // 2),
        height=64,
        width=64,
        num_frames=9,
        num_inference_steps=DEFAULT_STEPS,
        guidance_scale=6.0,
        true_cfg_scale=4.0,
    )
    return TinyModel(
        name="tiny-random-hunyuan_video",
        family="hunyuan_video",
        kind="video",
        obj=pipe,
        _run=_make_run(pipe, defaults),
        default_steps=DEFAULT_STEPS,
    )


# --------------------------------------------------------------------------------------------------------------------
# CogVideoX (1.0, 5b-style: rotary positions)

COG_TEXT_DIM = 32
COG_TEXT_LEN = 16


def tiny_cogvideox(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyModel:
    """`CogVideoXPipeline`: 3-block `CogVideoXTransformer3DModel` (CogVideoX-5b style: 3D rotary positions,
    2 heads x 16, patch 2), tiny `AutoencoderKLCogVideoX` (x8 spatial, x4 temporal, 4 latent channels),
    `CogVideoXDDIMScheduler` (v-prediction, zero-SNR, trailing) as shipped with CogVideoX-5b.

    Default run: 9 frames at 64x64 -> latents 3 x 8 x 8 -> 3 x 4 x 4 = 48 tokens (+16 text tokens).
    CFG 6.0 batched: one call per step on [uncond, cond] under `cache_context("cond_uncond")`."""
    from diffusers import (
        AutoencoderKLCogVideoX,
        CogVideoXDDIMScheduler,
        CogVideoXPipeline,
        CogVideoXTransformer3DModel,
    )

    def build():
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            time_embed_dim=16,
            text_embed_dim=COG_TEXT_DIM,
            num_layers=3,
            sample_width=8,  # latent grid of the default 64x64 run
            sample_height=8,
            sample_frames=9,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=COG_TEXT_LEN,
            use_rotary_positional_embeddings=True,
            use_learned_positional_embeddings=False,
        )
        vae = AutoencoderKLCogVideoX(
            in_channels=3,
            out_channels=3,
            down_block_types=("CogVideoXDownBlock3D",) * 4,
            up_block_types=("CogVideoXUpBlock3D",) * 4,
            block_out_channels=(8, 8, 8, 8),
            latent_channels=4,
            layers_per_block=1,
            norm_num_groups=2,
            temporal_compression_ratio=4,
            sample_height=64,
            sample_width=64,
            scaling_factor=0.7,
        )
        gen = torch.Generator("cpu").manual_seed(seed)
        emb = _embeds(gen, 1, COG_TEXT_LEN, COG_TEXT_DIM, dtype)
        neg = _embeds(gen, 1, COG_TEXT_LEN, COG_TEXT_DIM, dtype)
        return transformer, vae, emb, neg

    transformer, vae, emb, neg = seeded(seed, build)
    _prepare([transformer, vae], dtype)
    # THUDM/CogVideoX-5b scheduler/scheduler_config.json
    scheduler = CogVideoXDDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        clip_sample=False,
        set_alpha_to_one=True,
        steps_offset=0,
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        rescale_betas_zero_snr=True,
        snr_shift_scale=1.0,
    )
    pipe = CogVideoXPipeline(tokenizer=None, text_encoder=None, vae=vae, transformer=transformer, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    defaults = dict(
        prompt_embeds=emb,
        negative_prompt_embeds=neg,
        height=64,
        width=64,
        num_frames=9,
        num_inference_steps=DEFAULT_STEPS,
        guidance_scale=6.0,
    )
    return TinyModel(
        name="tiny-random-cogvideox",
        family="cogvideox",
        kind="video",
        obj=pipe,
        _run=_make_run(pipe, defaults),
        default_steps=DEFAULT_STEPS,
    )


# --------------------------------------------------------------------------------------------------------------------
# LTX-Video (0.9.0)

LTX_TEXT_DIM = 32
LTX_TEXT_LEN = 16
LTX_TEXT_VALID = 12


def tiny_ltx(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyModel:
    """`LTXPipeline`: 3-block `LTXVideoTransformer3DModel` (2 heads x 16, patch 1), tiny `AutoencoderKLLTXVideo`
    (x32 spatial, x8 temporal, 8 latent channels), FlowMatchEuler with dynamic shifting as shipped with
    Lightricks/LTX-Video.

    Default run: 9 frames at 128x128 -> latents 2 x 4 x 4 = 32 tokens (+16 text tokens, 12 unmasked).
    CFG 3.0 batched: one call per step on [uncond, cond] under `cache_context("cond_uncond")`.
    Needs `num_inference_steps >= 2`: with the shipped `shift_terminal=0.1`, diffusers' terminal stretch divides
    by zero for a single sigma (NaN timestep -> IndexError), exactly as the real checkpoint would."""
    from diffusers import (
        AutoencoderKLLTXVideo,
        FlowMatchEulerDiscreteScheduler,
        LTXPipeline,
        LTXVideoTransformer3DModel,
    )

    def build():
        transformer = LTXVideoTransformer3DModel(
            in_channels=8,
            out_channels=8,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=16,
            cross_attention_dim=32,
            num_layers=3,
            caption_channels=LTX_TEXT_DIM,
        )
        vae = AutoencoderKLLTXVideo(
            in_channels=3,
            out_channels=3,
            latent_channels=8,
            block_out_channels=(8, 8, 8, 8),
            decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1),
            decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, True, False),
            decoder_spatio_temporal_scaling=(True, True, True, False),
            decoder_inject_noise=(False, False, False, False, False),
            upsample_residual=(False, False, False, False),
            upsample_factor=(1, 1, 1, 1),
            timestep_conditioning=False,
            patch_size=4,
            patch_size_t=1,
            encoder_causal=True,
            decoder_causal=False,
        )
        gen = torch.Generator("cpu").manual_seed(seed)
        emb = _embeds(gen, 1, LTX_TEXT_LEN, LTX_TEXT_DIM, dtype)
        neg = _embeds(gen, 1, LTX_TEXT_LEN, LTX_TEXT_DIM, dtype)
        return transformer, vae, emb, neg

    transformer, vae, emb, neg = seeded(seed, build)
    _prepare([transformer, vae], dtype)
    # Lightricks/LTX-Video scheduler/scheduler_config.json
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000,
        shift=1.0,
        use_dynamic_shifting=True,
        base_shift=0.95,
        max_shift=2.05,
        base_image_seq_len=1024,
        max_image_seq_len=4096,
        shift_terminal=0.1,
    )
    pipe = LTXPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    defaults = dict(
        prompt_embeds=emb,
        prompt_attention_mask=_mask(1, LTX_TEXT_LEN, LTX_TEXT_VALID),
        negative_prompt_embeds=neg,
        negative_prompt_attention_mask=_mask(1, LTX_TEXT_LEN, LTX_TEXT_VALID // 2),
        height=128,
        width=128,
        num_frames=9,
        num_inference_steps=DEFAULT_STEPS,
        guidance_scale=3.0,
    )
    return TinyModel(
        name="tiny-random-ltx",
        family="ltx",
        kind="video",
        obj=pipe,
        _run=_make_run(pipe, defaults),
        default_steps=DEFAULT_STEPS,
    )


BUILDERS: dict[str, Callable[..., TinyModel]] = {
    "wan": tiny_wan,
    "hunyuan_video": tiny_hunyuan_video,
    "cogvideox": tiny_cogvideox,
    "ltx": tiny_ltx,
}

__all__ = ["BUILDERS", "DEFAULT_STEPS", "tiny_cogvideox", "tiny_hunyuan_video", "tiny_ltx", "tiny_wan"]
