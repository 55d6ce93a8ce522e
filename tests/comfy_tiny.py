"""Shared by the ComfyUI tests: where the ComfyUI fixture is, whether its requirements are installed, and tiny
native ComfyUI models (built from comfy.model_base / comfy.ldm classes with small configs, random weights).

ComfyUI lives in ../shared/comfyui next to the repository (read-only, GPL: a test fixture, never imported by accel
itself). Outside CI (CI=true) the tests skip when it or its requirements are missing; in CI they fail."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared" / "comfyui"
COMFYUI = SHARED / "ComfyUI"
SHIM = SHARED / "shim"  # a torchvision stand-in ComfyUI imports at start-up (see its README)
IN_CI = os.environ.get("CI") == "true"
# What ComfyUI's CPU requirements bring that accel's own do not (requirements-cpu.txt).
REQUIRED = ("aiohttp", "einops", "torchsde", "comfy_kitchen", "sqlalchemy", "alembic", "comfyui_frontend_package")
INSTALL_HINT = "echo torch==2.13.0 > /tmp/c.txt && pip install -r ../shared/comfyui/requirements-cpu.txt -c /tmp/c.txt"


def missing_reason() -> str | None:
    if not (COMFYUI / "main.py").is_file():
        return f"ComfyUI is not at {COMFYUI} (the shared test fixture)"
    absent = [name for name in REQUIRED if importlib.util.find_spec(name) is None]
    if absent:
        return f"ComfyUI's requirements are not installed ({', '.join(absent)}): {INSTALL_HINT}"
    return None


def require_comfyui() -> None:
    """Skip (fail in CI) when ComfyUI or its requirements are missing."""
    reason = missing_reason()
    if reason is not None:
        if IN_CI:
            pytest.fail(f"{reason}; .ci/run installs them")
        pytest.skip(reason)


def comfy_env() -> dict:
    """Environment of a process that runs ComfyUI: the torchvision stand-in on PYTHONPATH, one thread."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(SHIM), str(REPO), env.get("PYTHONPATH")) if p)
    return env


def import_comfy():
    """Import ComfyUI in this process on the CPU (only in a process of its own: the stand-in torchvision it needs
    would be visible to everything else)."""
    for path in (str(SHIM), str(COMFYUI)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sample

    return comfy


def _randomize(model, seed: int) -> None:
    """ComfyUI's layers start uninitialised (weights come from checkpoints): small random weights instead, small
    enough that the sampling trajectory is smooth and the default cache budget reuses steps."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.05)
        for name, b in model.named_buffers():
            if name.endswith("pos_embed"):  # MMDiT's, a buffer filled from checkpoints
                b.copy_(torch.randn(b.shape, generator=generator) * 0.05)


FLUX = dict(
    image_model="flux",
    guidance_embed=False,
    in_channels=16,
    out_channels=16,
    vec_in_dim=8,
    context_in_dim=16,
    hidden_size=32,
    mlp_ratio=2.0,
    num_heads=2,
    depth=2,
    depth_single_blocks=2,
    axes_dim=[4, 6, 6],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    txt_ids_dims=[],
)
CHROMA = dict(
    FLUX,
    image_model="chroma",
    in_channels=64,  # Chroma counts channels after patching
    out_channels=64,
    vec_in_dim=None,
    depth=1,
    in_dim=64,  # its modulation network: 16 + 16 timestep/guidance features + 32 index features
    out_dim=32,
    hidden_dim=32,
    n_layers=2,
)
del CHROMA["guidance_embed"]
HUNYUAN_VIDEO = dict(
    FLUX,
    image_model="hunyuan_video",
    depth=1,
    patch_size=[1, 2, 2],
    guidance_embed=True,
    byt5=False,
    meanflow=False,
    use_cond_type_embedding=False,
    vision_in_dim=None,
    meanflow_sum=False,
)
del HUNYUAN_VIDEO["txt_ids_dims"]
WAN = dict(
    image_model="wan2.1",
    model_type="t2v",
    dim=32,
    ffn_dim=64,
    freq_dim=32,
    text_dim=16,
    num_heads=2,
    num_layers=4,
    in_dim=16,
    out_dim=16,
    text_len=8,
)
LTXV = dict(
    image_model="ltxv",
    in_channels=128,
    cross_attention_dim=32,
    attention_head_dim=16,
    num_attention_heads=2,
    caption_channels=16,
    num_layers=3,
)
SD3 = dict(
    in_channels=16,
    pos_embed_scaling_factor=None,
    depth=2,  # MMDiT's width is 64 x depth
    patch_size=2,
    adm_in_channels=8,
    context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 16, "out_features": 128}},
    pos_embed_max_size=16,
    num_patches=256,
    qk_norm=None,
    x_block_self_attn_layers=[],
)
UNET = dict(  # SD1.5's layout, 32 channels wide, two levels
    context_dim=16,
    model_channels=32,
    use_linear_in_transformer=True,
    adm_in_channels=None,
    use_temporal_attention=False,
    use_temporal_resblock=False,
    in_channels=4,
    out_channels=4,
    num_res_blocks=[1, 1],
    channel_mult=[1, 2],
    transformer_depth=[1, 1],
    transformer_depth_output=[1, 1, 1, 1],
    transformer_depth_middle=1,
    use_spatial_transformer=True,
    legacy=False,
    num_heads=2,
    num_head_channels=-1,
    image_size=32,
)
# family: (supported_models class name, unet config, latent shape, extra conditioning)
FAMILIES = {
    "flux": ("FluxSchnell", FLUX, (1, 16, 8, 8), "pooled"),
    "chroma": ("Chroma", CHROMA, (1, 16, 8, 8), "pooled"),
    "wan": ("WAN21_T2V", WAN, (1, 16, 2, 8, 8), None),
    "hunyuan_video": ("HunyuanVideo", HUNYUAN_VIDEO, (1, 16, 2, 8, 8), "pooled"),
    "ltxv": ("LTXV", LTXV, (1, 128, 2, 4, 4), "mask"),
    "sd3": ("SD3", SD3, (1, 16, 8, 8), "pooled"),
    "unet": ("SD15", UNET, (1, 4, 8, 8), None),
}


def tiny_model(family: str, seed: int = 0, dtype: str = "float32"):
    """A ModelPatcher around a tiny native model of `family` (a key of FAMILIES) in `dtype`, on the CPU."""
    import torch

    comfy = import_comfy()
    import comfy.supported_models as sm

    config_name, unet_config, _, _ = FAMILIES[family]
    model_config = getattr(sm, config_name)(dict(unet_config))
    model_config.set_inference_dtype(getattr(torch, dtype), None)
    model = model_config.get_model({}, device="cpu")
    _randomize(model, seed)
    cpu = torch.device("cpu")
    return comfy.model_patcher.ModelPatcher(model, load_device=cpu, offload_device=cpu)


def conds(family: str, seed: int = 1):
    """Positive and negative conditioning as ComfyUI's samplers take them."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    kind = FAMILIES[family][3]

    def extra():
        if kind == "pooled":
            return {"pooled_output": torch.randn(1, 8, generator=generator)}
        return {"attention_mask": torch.ones(1, 4, dtype=torch.long)} if kind == "mask" else {}

    return [
        [[torch.randn(1, 4, 16, generator=generator), extra()]],
        [[torch.randn(1, 4, 16, generator=generator), extra()]],
    ]


def sample(model_patcher, family: str, steps: int = 10, cfg: float = 2.0, seed: int = 0, sampler: str = "euler"):
    """Sample a latent from zeros with ComfyUI's KSampler path (comfy.sample.sample)."""
    import torch

    comfy = import_comfy()
    latent = torch.zeros(FAMILIES[family][2])
    noise = comfy.sample.prepare_noise(latent, seed)
    positive, negative = conds(family)
    return comfy.sample.sample(
        model_patcher, noise, steps, cfg, sampler, "simple", positive, negative, latent, disable_pbar=True, seed=seed
    )
