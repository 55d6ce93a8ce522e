"""One training step of each reference-model part: the VAE (reconstruction), and the transformer (flow matching
with the pipeline's conventions: x_t = (1 - s) x0 + s noise, target noise - x0; Flux reads the timestep as s,
Wan as 1000 s)."""

from __future__ import annotations

import random

import torch
import torch.nn.functional as F

from accel.zoo._train_data import PromptFeatures, compact_text
from accel.zoo.reference import Reference

KL_WEIGHT = 1e-6  # just enough to keep the latents a bounded, smooth space
CFG_DROP = 0.1  # fraction of samples trained on the empty prompt, so CFG has an unconditional branch


def foreground(x: torch.Tensor) -> torch.Tensor:
    """1 where a pixel belongs to the shape, else 0 ([B, 1, ...] like `x`, channels at dim 1, width last). A
    background is constant along each row (plain, or a vertical gradient) and the shape covers under half a
    row, so a row's median is its background."""
    median = x.median(dim=-1, keepdim=True).values
    return ((x - median).abs().sum(1, keepdim=True) > 0.15).to(x.dtype)


def reconstruction_loss(reconstruction: torch.Tensor, x: torch.Tensor, shape_weight: float = 0.0) -> torch.Tensor:
    """MSE + L1/2, with the shape's pixels weighing `1 + shape_weight`: a shape covers a few percent of a clip,
    and an unweighted loss learns the background long before the shape's colour."""
    error = (reconstruction - x).pow(2) + 0.5 * (reconstruction - x).abs()
    if not shape_weight:
        return error.mean()
    weight = 1 + shape_weight * foreground(x)
    return (error * weight).sum() / (weight.sum() * x.shape[1])


def vae_loss(vae, x: torch.Tensor, ref: Reference, shape_weight: float = 0.0) -> torch.Tensor:
    posterior = vae.encode(x).latent_dist
    kl = posterior.kl().mean() / x[0].numel()
    return reconstruction_loss(vae.decode(posterior.sample()).sample, x, shape_weight) + KL_WEIGHT * kl


@torch.no_grad()
def encode_latents(vae, x: torch.Tensor) -> torch.Tensor:
    """The posterior means of `x`, un-normalised."""
    return vae.encode(x).latent_dist.mode()


def normalisation(latents: torch.Tensor, ref: Reference) -> dict:
    """The VAE config values that map `latents` to zero mean, unit variance, in the pipeline's convention:
    Flux a global (shift_factor, scaling_factor); Wan per-channel latents_mean / latents_std."""
    if ref.kind == "image":
        return {"shift_factor": float(latents.mean()), "scaling_factor": float(1.0 / latents.std())}
    per_channel = latents.transpose(0, 1).flatten(1)
    return {"latents_mean": per_channel.mean(1).tolist(), "latents_std": per_channel.std(1).tolist()}


def normalise(latents: torch.Tensor, vae, ref: Reference) -> torch.Tensor:
    config = vae.config
    if ref.kind == "image":
        return (latents - config.shift_factor) * config.scaling_factor
    shape = (1, -1, 1, 1, 1)
    mean = torch.tensor(config.latents_mean).view(shape)
    std = torch.tensor(config.latents_std).view(shape)
    return (latents - mean) / std


def sample_sigmas(batch: int, gen: torch.Generator, mean: float = 0.0) -> torch.Tensor:
    """Logit-normal noise levels (SD3's default, mean 0), which weight the middle of the trajectory; a positive
    `mean` weights the noisier half, where a sample's colour and layout are decided."""
    return torch.sigmoid(torch.randn(batch, generator=gen) + mean)


def _prompt_ids(features: PromptFeatures, prompts: list[str], rng: random.Random) -> list[int]:
    empty = features.index[""]
    return [empty if rng.random() < CFG_DROP else features.index[p] for p in prompts]


class CountedPads:
    """A Wan cross-attention processor for training: passes the compact text's bias as the attention mask
    (the block calls cross attention without one). Installed on `attn2` only while training."""

    def __init__(self, inner):
        self.inner = inner
        self.bias: torch.Tensor | None = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        return self.inner(attn, hidden_states, encoder_hidden_states, self.bias, rotary_emb)


def flow_loss(
    transformer,
    x0: torch.Tensor,
    prompts: list[str],
    features: PromptFeatures,
    ref: Reference,
    gen: torch.Generator,
    rng: random.Random,
    short_share: float = 0.0,
    sigma_mean: float = 0.0,
) -> torch.Tensor:
    """Flow-matching loss of one batch of normalised latents `x0` (Flux [B, C, H, W], Wan [B, C, F, H, W]);
    `short_share` of the prompts are padded as `Reference.call_kwargs` pads them (see `compact_text`); noise levels
    are drawn by `sample_sigmas` around `sigma_mean`."""
    batch = x0.shape[0]
    ids = _prompt_ids(features, prompts, rng)
    text, bias = compact_text(features, ids, rng, short_share)
    sigma = sample_sigmas(batch, gen, sigma_mean).to(x0.device)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    view = (batch,) + (1,) * (x0.dim() - 1)
    x_t = (1 - sigma.view(view)) * x0 + sigma.view(view) * noise
    target = noise - x0
    text, bias = text.to(x0.device), bias.to(x0.device)
    if ref.kind == "image":
        prediction, target = _flux_forward(transformer, x_t, target, text, bias, features, ids, sigma)
    else:
        for block in transformer.blocks:
            block.attn2.processor.bias = bias[:, None, None, :]
        prediction = transformer(hidden_states=x_t, timestep=sigma * 1000, encoder_hidden_states=text).sample
    return F.mse_loss(prediction.float(), target.float())


def _flux_forward(transformer, x_t, target, text, bias, features, ids, sigma):
    from diffusers import FluxPipeline

    b, c, h, w = x_t.shape
    packed = FluxPipeline._pack_latents(x_t, b, c, h, w)
    image_ids = FluxPipeline._prepare_latent_image_ids(b, h // 2, w // 2, x_t.device, x_t.dtype)
    text_ids = torch.zeros(text.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
    joint_bias = torch.cat([bias, bias.new_zeros(b, packed.shape[1])], dim=1)[:, None, None, :]
    prediction = transformer(
        hidden_states=packed,
        encoder_hidden_states=text,
        pooled_projections=features.pooled[ids].to(x_t.device),
        timestep=sigma,
        img_ids=image_ids,
        txt_ids=text_ids,
        joint_attention_kwargs={"attention_mask": joint_bias},
    ).sample
    return prediction, FluxPipeline._pack_latents(target, b, c, h, w)
