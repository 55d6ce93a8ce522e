"""Tiny, offline, random-weight instances of real diffusers image pipelines.

Every builder returns a `TinyModel` whose `obj` is a genuine diffusers pipeline (`FluxPipeline`,
`StableDiffusion3Pipeline`, `StableDiffusionPipeline`, `StableDiffusionXLPipeline`) made of genuine diffusers
models with tiny configs and seeded random weights. There are no text encoders or tokenizers: the pipelines
are called with pre-made random prompt embeddings (drawn from the build seed), the way a user who encodes
prompts themselves would call them.

How classifier-free guidance reaches the denoiser in each default run:

* flux: true CFG (`true_cfg_scale > 1` plus negative embeddings). `FluxPipeline` calls the transformer twice per
  step, once inside `transformer.cache_context("cond")` and once inside `transformer.cache_context("uncond")`.
  The transformer also has `guidance_embeds=True` (FLUX.1-dev style), so `guidance_scale` feeds the distilled
  guidance embedding.
* sd3, sd15, sdxl: batched CFG (`guidance_scale > 1`): one denoiser call per step on `cat([uncond, cond])`.
  (`SD3Transformer2DModel` and `UNet2DConditionModel` have no `cache_context` at all in diffusers 0.42.)

`TinyModel.run(seed, **overrides)` calls the pipeline with `generator=torch.Generator("cpu").manual_seed(seed)`,
`output_type="pt"`, 64x64 pixels and 12 steps; every override (`num_inference_steps`, `height`, `width`,
`guidance_scale`, `true_cfg_scale`, `num_images_per_prompt`, `prompt_embeds`, `latents`, ...) goes to the
pipeline call. Flux and SD3 ignore `num_images_per_prompt` for user-supplied embeddings, so for those two the
embeddings are repeated instead (same result: B images per prompt). Pixels come back as float32 [B, 3, H, W].
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from accel.zoo._base import TinyModel, seeded
from accel.zoo._diffusers import prompt_embeds

DEFAULT_STEPS = 12

# Prompt-embedding shapes shared by the builders (stand-ins for the text encoders' outputs).
_TXT_LEN = 16  # tokens of the (fake) encoded prompt
_FLUX_TXT_DIM = 32  # T5 hidden size stand-in
_FLUX_POOLED_DIM = 32  # CLIP pooled size stand-in
_SD3_TXT_DIM = 32  # joint_attention_dim
_SD3_POOLED_DIM = 32  # CLIP-L + CLIP-G pooled stand-in
_SD15_TXT_DIM = 32  # cross_attention_dim
_SDXL_TXT_DIM = 64  # CLIP-L + CLIP-G hidden concat stand-in
_SDXL_POOLED_DIM = 32  # CLIP-G pooled (text_embeds) stand-in
_SDXL_TIME_DIM = 8  # addition_time_embed_dim

# black-forest-labs/FLUX.1-dev, scheduler/scheduler_config.json (also used by accel/bench/scenarios.py).
FLUX_DEV_SCHEDULER = dict(
    num_train_timesteps=1000,
    shift=3.0,
    use_dynamic_shifting=True,
    base_shift=0.5,
    max_shift=1.15,
    base_image_seq_len=256,
    max_image_seq_len=4096,
)

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

# The tiny FLUX transformer: the released one, narrow and shallow (also the --tiny stand-in of
# accel/bench/scenarios.py).
TINY_FLUX_TRANSFORMER = dict(
    FLUX_DEV_TRANSFORMER,
    num_layers=2,
    num_single_layers=3,
    attention_head_dim=16,
    num_attention_heads=2,
    joint_attention_dim=_FLUX_TXT_DIM,
    pooled_projection_dim=_FLUX_POOLED_DIM,
    axes_dims_rope=(4, 6, 6),  # sums to attention_head_dim
)

_POOLED_KEYS = ("prompt_embeds", "pooled_prompt_embeds", "negative_prompt_embeds", "negative_pooled_prompt_embeds")


def _vae(latent_channels: int, *, quant_conv: bool, scaling_factor: float, shift_factor: float | None):
    """A 4-level AutoencoderKL (vae_scale_factor 8, like the real ones) with tiny channel counts."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(8, 16, 16, 16),
        layers_per_block=1,
        latent_channels=latent_channels,
        norm_num_groups=4,
        sample_size=64,
        scaling_factor=scaling_factor,
        shift_factor=shift_factor,
        use_quant_conv=quant_conv,  # SD1.5/SDXL VAEs have them, the Flux/SD3 16-channel VAEs do not
        use_post_quant_conv=quant_conv,
        # No fp32 upcast round-trip in fp16 runs (the SDXL pipeline would otherwise move the VAE to fp32 and
        # back mid-call); these tiny random VAEs do not overflow in half precision.
        force_upcast=False,
    )


def _repeat_for_images(kwargs: dict, keys: tuple[str, ...]) -> None:
    """Flux/SD3 do not repeat user-supplied embeddings by `num_images_per_prompt` (only the ones they encode
    themselves), so we expand the embeddings' batch instead and ask the pipeline for 1 image per prompt."""
    n = int(kwargs.get("num_images_per_prompt") or 1)
    if n == 1:
        return
    for k in keys:
        if kwargs.get(k) is not None:
            kwargs[k] = kwargs[k].repeat_interleave(n, dim=0)
    kwargs["num_images_per_prompt"] = 1


def _make_run(pipe, defaults: dict, repeat_keys: tuple[str, ...] = ()) -> Callable[..., torch.Tensor]:
    def _run(seed: int = 0, **overrides) -> torch.Tensor:
        kwargs = dict(defaults)
        kwargs.update(overrides)
        if repeat_keys:
            _repeat_for_images(kwargs, repeat_keys)
        kwargs.setdefault("generator", torch.Generator("cpu").manual_seed(seed))
        kwargs.setdefault("output_type", "pt")
        images = pipe(**kwargs).images  # the pipelines run under their own torch.no_grad()
        return images.float() if isinstance(images, torch.Tensor) else images

    return _run


def _tiny_image(
    family: str,
    seed: int,
    dtype: torch.dtype,
    build: Callable[[], object],
    text_dim: int,
    pooled_dim: int | None = None,
    repeat_keys: tuple[str, ...] = (),
    **call,
) -> TinyModel:
    """The family's TinyModel: `build()` makes the pipeline with weights drawn from `seed`, cast to `dtype`; the
    default call passes prompt embeddings drawn from `seed + 1` (pooled ones with `pooled_dim`), 64x64 pixels,
    DEFAULT_STEPS steps and `call`."""
    pipe = seeded(seed, build)
    for comp in pipe.components.values():
        if isinstance(comp, torch.nn.Module):
            # Plain nn.Module.to: diffusers' ModelMixin.to(dtype) logs a "should be kept in float32: []" warning
            # on every dtype cast even when nothing must stay in fp32 (these tiny models have no such modules).
            torch.nn.Module.to(comp, dtype=dtype)
            comp.eval()
    pipe.set_progress_bar_config(disable=True)
    gen = torch.Generator("cpu").manual_seed(seed + 1)
    defaults = prompt_embeds(gen, _TXT_LEN, text_dim, dtype, pooled_dim)
    defaults.update(num_inference_steps=DEFAULT_STEPS, height=64, width=64, num_images_per_prompt=1, **call)
    return TinyModel.of(family, "image", pipe, _make_run(pipe, defaults, repeat_keys), DEFAULT_STEPS)


# --------------------------------------------------------------------------------------------------- flux


def tiny_flux(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyModel:
    """FLUX.1-dev-shaped pipeline: 2 double-stream + 3 single-stream blocks, 2 heads x 16 dims, true CFG."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    def build():
        transformer = FluxTransformer2DModel(**TINY_FLUX_TRANSFORMER)
        vae = _vae(16, quant_conv=False, scaling_factor=0.3611, shift_factor=0.1159)
        scheduler = FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER)
        return FluxPipeline(
            scheduler=scheduler,
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            transformer=transformer,
        )

    call = dict(true_cfg_scale=4.0, guidance_scale=3.5)
    return _tiny_image("flux", seed, dtype, build, _FLUX_TXT_DIM, _FLUX_POOLED_DIM, _POOLED_KEYS, **call)


# ---------------------------------------------------------------------------------------------------- sd3


def tiny_sd3(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyModel:
    """SD3-shaped pipeline: 4 joint blocks, 2 heads x 16 dims, patch 2, batched CFG."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    def build():
        transformer = SD3Transformer2DModel(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            num_layers=4,
            attention_head_dim=16,
            num_attention_heads=2,
            joint_attention_dim=_SD3_TXT_DIM,
            caption_projection_dim=32,  # = inner dim, as in the real model
            pooled_projection_dim=_SD3_POOLED_DIM,
            out_channels=16,
            pos_embed_max_size=32,  # resolutions up to 32 * 2 * 8 = 512 px
        )
        vae = _vae(16, quant_conv=False, scaling_factor=1.5305, shift_factor=0.0609)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
        return StableDiffusion3Pipeline(
            transformer=transformer,
            scheduler=scheduler,
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            text_encoder_2=None,
            tokenizer_2=None,
            text_encoder_3=None,
            tokenizer_3=None,
        )

    return _tiny_image("sd3", seed, dtype, build, _SD3_TXT_DIM, _SD3_POOLED_DIM, _POOLED_KEYS, guidance_scale=5.0)


# --------------------------------------------------------------------------------------------------- sd15


def tiny_sd15(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyModel:
    """SD1.5-shaped pipeline: UNet with 3 CrossAttn down blocks + 1 plain down block (mirrored up), DDIM."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    def build():
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(16, 32, 32, 32),
            layers_per_block=1,
            norm_num_groups=8,
            cross_attention_dim=_SD15_TXT_DIM,
            attention_head_dim=2,  # legacy naming: number of heads, as in SD1.5's config
        )
        vae = _vae(4, quant_conv=True, scaling_factor=0.18215, shift_factor=None)
        scheduler = DDIMScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        )
        return StableDiffusionPipeline(
            vae=vae,
            text_encoder=None,
            tokenizer=None,
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )

    return _tiny_image("sd15", seed, dtype, build, _SD15_TXT_DIM, guidance_scale=7.5)


# --------------------------------------------------------------------------------------------------- sdxl


def tiny_sdxl(seed: int = 0, dtype: torch.dtype = torch.float32) -> TinyModel:
    """SDXL-shaped pipeline: UNet Down + 2 CrossAttn blocks (1, 2 transformer layers), text_time embeds, Euler."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel

    def build():
        unet = UNet2DConditionModel(
            sample_size=8,
            in_channels=4,
            out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(16, 32, 64),
            layers_per_block=2,
            transformer_layers_per_block=(1, 1, 2),
            norm_num_groups=8,
            cross_attention_dim=_SDXL_TXT_DIM,
            attention_head_dim=(2, 2, 4),  # legacy naming: heads per block, as in SDXL's config
            use_linear_projection=True,
            addition_embed_type="text_time",
            addition_time_embed_dim=_SDXL_TIME_DIM,
            projection_class_embeddings_input_dim=_SDXL_TIME_DIM * 6 + _SDXL_POOLED_DIM,
        )
        vae = _vae(4, quant_conv=True, scaling_factor=0.13025, shift_factor=None)
        scheduler = EulerDiscreteScheduler(
            num_train_timesteps=1000,
            beta_start=0.00085,
            beta_end=0.012,
            beta_schedule="scaled_linear",
            timestep_spacing="leading",
            steps_offset=1,
            interpolation_type="linear",
        )
        return StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=None,
            text_encoder_2=None,
            tokenizer=None,
            tokenizer_2=None,
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )

    return _tiny_image("sdxl", seed, dtype, build, _SDXL_TXT_DIM, _SDXL_POOLED_DIM, guidance_scale=5.0)


BUILDERS: dict[str, Callable[..., TinyModel]] = {
    "flux": tiny_flux,
    "sd3": tiny_sd3,
    "sd15": tiny_sd15,
    "sdxl": tiny_sdxl,
}
