"""The reference models of issue 12: small diffusion pipelines trained here on the shapes domain.

Random weights have none of what the accelerators exploit (a smooth denoising trajectory, local attention, a
picture to look at), and no trained weights can be downloaded on our machines. So `ref-flux` (a `FluxPipeline`,
64x64 images) and `ref-wan` (a `WanPipeline`, 9-frame 64x64 clips) are trained by `python -m accel.zoo.train`
on renders of `accel.zoo.shapes`, saved with `save_pretrained` under `accel/zoo/weights/`, and loaded with
`DiffusionPipeline.from_pretrained`. They are tiny models of a toy domain, nothing more.

Text encoders stay at a seeded random init and read the domain's word-level tokenizer; the transformer learns to
read them. The domain's roles have disjoint vocabularies (no colour is a background), so a bag of words carries
the prompt, and the Flux T5 is zero layers deep (embedding + final norm): FluxPipeline pads T5 input to
`max_sequence_length` (512 by default) without a mask, so deeper layers would make every real token's
feature depend on the pad count. With zero layers each pad is the same vector at the same (text) position, so
the trainer can stand one pad, weighted by its count, in for hundreds of them, exactly (see `accel.zoo.train`).
Wan's UMT5 is masked, so it keeps two real layers.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from accel.zoo._base import UnknownModelError
from accel.zoo.tokenizer import BOS_ID, EOS_ID, PAD_ID, domain_tokenizer, domain_vocabulary

WEIGHTS = Path(__file__).parent / "weights"
TEXT_DIM = 64  # hidden size of every frozen text encoder


@dataclass(frozen=True)
class Reference:
    """What a caller needs to run a reference pipeline the way it was trained."""

    name: str
    family: str  # adapter family key
    kind: str  # "image" | "video"
    size: int  # image side in pixels
    frames: int | None  # clip length (video only)
    steps: int  # default denoising steps
    guidance: float  # CFG scale the samples in the README and benchmarks use

    def call_kwargs(self, steps: int | None = None, guidance: float | None = None) -> dict:
        """Keyword arguments of one pipeline call at the trained resolution (prompt and generator aside).

        `max_sequence_length=16` pads prompts to 16 tokens instead of the pipelines' 512: the models were
        trained on every pad count in between (see `accel.zoo._train_data`), and the Flux transformer then runs
        on 80 tokens instead of 576."""
        kwargs = {"height": self.size, "width": self.size, "num_inference_steps": steps or self.steps}
        kwargs["max_sequence_length"] = 16
        scale = self.guidance if guidance is None else guidance
        if self.kind == "video":
            kwargs.update(num_frames=self.frames, guidance_scale=scale, negative_prompt="", output_type="pt")
        else:
            kwargs.update(true_cfg_scale=scale, negative_prompt="", output_type="pt")
        return kwargs


REFERENCES = {
    "ref-flux": Reference("ref-flux", "flux", "image", 64, None, 20, 4.0),
    "ref-wan": Reference("ref-wan", "wan", "video", 64, 9, 20, 4.0),
}
NAMES = tuple(REFERENCES)


def reference(name: str) -> Reference:
    try:
        return REFERENCES[name]
    except KeyError:
        raise UnknownModelError(f"unknown reference model {name!r}; choose one of: {', '.join(NAMES)}") from None


def _vocab_size() -> int:
    return len(domain_vocabulary())


def _flux_components() -> dict:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    clip = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=_vocab_size(),
            hidden_size=TEXT_DIM,
            intermediate_size=2 * TEXT_DIM,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=16,
            projection_dim=TEXT_DIM,
            pad_token_id=PAD_ID,
            bos_token_id=BOS_ID,
            eos_token_id=EOS_ID,  # pooled at the first eos (see accel.zoo.tokenizer)
        )
    )
    t5 = T5EncoderModel(
        T5Config(
            vocab_size=_vocab_size(),
            d_model=TEXT_DIM,
            d_kv=TEXT_DIM // 2,
            d_ff=2 * TEXT_DIM,
            num_layers=0,  # see the module docstring
            num_heads=2,
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            decoder_start_token_id=PAD_ID,
        )
    )
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 64),  # x4 down: 64x64 -> 16x16x4 latents -> 8x8 = 64 packed tokens
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
        use_quant_conv=False,
        use_post_quant_conv=False,
        scaling_factor=1.0,  # both set from the trained encoder's latent statistics
        shift_factor=0.0,
    )
    transformer = FluxTransformer2DModel(
        patch_size=1,
        in_channels=16,  # 4 latent channels packed 2x2
        num_layers=2,
        num_single_layers=4,
        attention_head_dim=32,
        num_attention_heads=4,
        joint_attention_dim=TEXT_DIM,
        pooled_projection_dim=TEXT_DIM,
        guidance_embeds=False,  # true CFG, as the benchmarks run it
        axes_dims_rope=(8, 12, 12),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False)
    return dict(
        scheduler=scheduler,
        vae=vae,
        text_encoder=clip,
        tokenizer=domain_tokenizer(16, bos=True),
        text_encoder_2=t5,
        tokenizer_2=domain_tokenizer(512),
        transformer=transformer,
    )


def _wan_components() -> dict:
    from diffusers import AutoencoderKLWan, UniPCMultistepScheduler, WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    z_dim = 8
    umt5 = UMT5EncoderModel(
        UMT5Config(
            vocab_size=_vocab_size(),
            d_model=TEXT_DIM,
            d_kv=TEXT_DIM // 2,
            d_ff=2 * TEXT_DIM,
            num_layers=2,
            num_heads=2,
            relative_attention_num_buckets=8,
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            decoder_start_token_id=PAD_ID,
        )
    )
    vae = AutoencoderKLWan(
        base_dim=8,  # narrow at full resolution, where a causal 3D conv costs most; flat shapes need little
        z_dim=z_dim,
        dim_mult=[1, 2, 4],
        num_res_blocks=1,
        attn_scales=[],
        # x4 spatial, x2 temporal: 9x64x64 -> 5x16x16x8 latents. Wan2.1's x8/x4 (48x fewer values) is more than
        # a VAE trained for minutes can learn; at x4/x2 (14x) it reconstructs the shapes cleanly.
        temperal_downsample=[False, True],
        scale_factor_temporal=2,
        scale_factor_spatial=4,
        latents_mean=[0.0] * z_dim,  # both set from the trained encoder's latent statistics
        latents_std=[1.0] * z_dim,
    )
    transformer = WanTransformer3DModel(
        patch_size=(1, 2, 2),  # 5x8x8 = 320 tokens: 20 key blocks of 16 for block-sparse attention
        num_attention_heads=4,
        attention_head_dim=32,
        in_channels=z_dim,
        out_channels=z_dim,
        text_dim=TEXT_DIM,
        freq_dim=64,
        ffn_dim=384,
        num_layers=4,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
        rope_max_seq_len=64,
    )
    scheduler = UniPCMultistepScheduler(
        num_train_timesteps=1000,
        solver_order=2,
        prediction_type="flow_prediction",
        solver_type="bh2",
        lower_order_final=True,
        use_flow_sigmas=True,
        flow_shift=2.0,
        timestep_spacing="linspace",
        final_sigmas_type="zero",
    )
    return dict(
        tokenizer=domain_tokenizer(512), text_encoder=umt5, vae=vae, transformer=transformer, scheduler=scheduler
    )


def untrained(name: str, seed: int = 0):
    """The reference pipeline of `name` with seeded random weights (what `accel.zoo.train` starts from)."""
    from diffusers import FluxPipeline, WanPipeline

    ref = reference(name)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if ref.kind == "image":
            pipe = FluxPipeline(**_flux_components())
        else:
            pipe = WanPipeline(**_wan_components())
    for module in (pipe.text_encoder, getattr(pipe, "text_encoder_2", None)):
        if module is not None:
            module.requires_grad_(False).eval()
    return configured(pipe, ref)


def configured(pipe, ref: Reference):
    if ref.kind == "image":
        pipe.default_sample_size = ref.size // pipe.vae_scale_factor  # FluxPipeline's default is 128 (1024 px)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def path(name: str) -> Path:
    """Where the shipped weights of `name` live (the `save_pretrained` layout)."""
    return WEIGHTS / reference(name).name


def load(name: str, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """The trained reference pipeline `name`, loaded offline with `DiffusionPipeline.from_pretrained`.

    Weights are stored in float16 and loaded as `dtype` (float32 by default: CPUs run it fastest). A Flux
    pipeline's default size is set to the trained 64x64; a Wan call needs `height`, `width` and `num_frames`
    (`reference(name).call_kwargs()` has them)."""
    from diffusers import DiffusionPipeline

    ref = reference(name)
    where = path(name)
    if not (where / "model_index.json").exists():
        raise UnknownModelError(
            f"no weights for {name!r} at {where}; train them with `python -m accel.zoo.train {name}`"
        )
    pipe = DiffusionPipeline.from_pretrained(str(where), dtype=dtype, local_files_only=True)
    return configured(pipe.to(device), ref)
