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

from collections.abc import Callable

import torch

from accel.zoo._base import TinyModel
from accel.zoo._video import DEFAULT_STEPS, TEXT_DIM, TEXT_LEN, tiny_video

# --------------------------------------------------------------------------------------------------------------------
# Wan 2.1 (T2V)

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

# The tiny Wan transformer: the released one, narrow and 3 blocks deep (also the --tiny stand-in of
# accel/bench/scenarios.py).
TINY_WAN_TRANSFORMER = dict(
    WAN21_T2V_1_3B_TRANSFORMER,
    num_attention_heads=2,
    attention_head_dim=16,
    text_dim=TEXT_DIM,
    freq_dim=32,
    ffn_dim=64,
    num_layers=3,
    rope_max_seq_len=64,
)


def tiny_wan(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyModel:
    """`WanPipeline`: 3-block `WanTransformer3DModel` (2 heads x 16, patch (1,2,2)), tiny `AutoencoderKLWan`
    (x8 spatial, x4 temporal, z_dim 16), UniPC flow-prediction scheduler as shipped with Wan2.1-T2V-1.3B.

    Default run: 9 frames at 64x64 -> latents 3 x 8 x 8 -> 3 x 4 x 4 = 48 tokens; CFG 5.0 as two calls per step
    (`cache_context("cond")`, then `cache_context("uncond")`)."""
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanPipeline, WanTransformer3DModel

    def modules():
        transformer = WanTransformer3DModel(**TINY_WAN_TRANSFORMER)
        vae = AutoencoderKLWan(
            base_dim=4,
            z_dim=16,
            dim_mult=[1, 1, 1, 1],
            num_res_blocks=1,
            attn_scales=[],
            temperal_downsample=[False, True, True],
        )
        return transformer, vae

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

    def pipeline(transformer, vae):
        return WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae, scheduler=scheduler)

    return tiny_video("wan", seed, dtype, modules, pipeline, height=64, width=64, guidance_scale=5.0)


# --------------------------------------------------------------------------------------------------------------------
# HunyuanVideo (T2V)

_HY_POOLED_DIM = 16


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

    def modules():
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
            text_embed_dim=TEXT_DIM,
            pooled_projection_dim=_HY_POOLED_DIM,
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
        return transformer, vae

    def pipeline(transformer, vae):
        # hunyuanvideo-community/HunyuanVideo scheduler/scheduler_config.json
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=7.0)
        no_text = dict.fromkeys(("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
        return HunyuanVideoPipeline(transformer=transformer, vae=vae, scheduler=scheduler, **no_text)

    call = dict(height=64, width=64, guidance_scale=6.0, true_cfg_scale=4.0)
    return tiny_video("hunyuan_video", seed, dtype, modules, pipeline, _HY_POOLED_DIM, masks=True, **call)


# --------------------------------------------------------------------------------------------------------------------
# CogVideoX (1.0, 5b-style: rotary positions)


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

    def modules():
        transformer = CogVideoXTransformer3DModel(
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=4,
            out_channels=4,
            time_embed_dim=16,
            text_embed_dim=TEXT_DIM,
            num_layers=3,
            sample_width=8,  # latent grid of the default 64x64 run
            sample_height=8,
            sample_frames=9,
            patch_size=2,
            temporal_compression_ratio=4,
            max_text_seq_length=TEXT_LEN,
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
        return transformer, vae

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

    def pipeline(transformer, vae):
        return CogVideoXPipeline(
            transformer=transformer, vae=vae, scheduler=scheduler, text_encoder=None, tokenizer=None
        )

    return tiny_video("cogvideox", seed, dtype, modules, pipeline, height=64, width=64, guidance_scale=6.0)


# --------------------------------------------------------------------------------------------------------------------
# LTX-Video (0.9.0)


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

    def modules():
        transformer = LTXVideoTransformer3DModel(
            in_channels=8,
            out_channels=8,
            patch_size=1,
            patch_size_t=1,
            num_attention_heads=2,
            attention_head_dim=16,
            cross_attention_dim=32,
            num_layers=3,
            caption_channels=TEXT_DIM,
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
        return transformer, vae

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

    def pipeline(transformer, vae):
        return LTXPipeline(scheduler=scheduler, vae=vae, text_encoder=None, tokenizer=None, transformer=transformer)

    return tiny_video("ltx", seed, dtype, modules, pipeline, masks=True, height=128, width=128, guidance_scale=3.0)


BUILDERS: dict[str, Callable[..., TinyModel]] = {
    "wan": tiny_wan,
    "hunyuan_video": tiny_hunyuan_video,
    "cogvideox": tiny_cogvideox,
    "ltx": tiny_ltx,
}

__all__ = [
    "BUILDERS",
    "DEFAULT_STEPS",
    "TINY_WAN_TRANSFORMER",
    "WAN21_T2V_1_3B_TRANSFORMER",
    "tiny_cogvideox",
    "tiny_hunyuan_video",
    "tiny_ltx",
    "tiny_wan",
]
