"""Model adapters: all model-specific knowledge lives here, one module per family."""

from __future__ import annotations

from typing import Any

from ..errors import UnsupportedModelError
from .base import Adapter, DiTAdapter, UNetAdapter, VLMAdapter
from .cogvideox import CogVideoXAdapter
from .flux import FluxAdapter
from .hunyuan_video import HunyuanVideoAdapter
from .llava import LlavaAdapter
from .llava_onevision import LlavaOnevisionAdapter
from .ltx import LTXAdapter
from .qwen2_vl import Qwen2_5_VLAdapter, Qwen2VLAdapter
from .sd3 import SD3Adapter
from .unet import UNet2DConditionAdapter
from .wan import WanAdapter

ADAPTERS: list[type[Adapter]] = [
    FluxAdapter,
    SD3Adapter,
    WanAdapter,
    HunyuanVideoAdapter,
    CogVideoXAdapter,
    LTXAdapter,
    UNet2DConditionAdapter,
    LlavaAdapter,
    LlavaOnevisionAdapter,
    Qwen2VLAdapter,
    Qwen2_5_VLAdapter,
]


def supported_families() -> str:
    def classes(adapter):
        return ", ".join(dict.fromkeys(path.split(":")[1] for path in adapter.model_classes))

    return "; ".join(f"{a.display_name} ({classes(a)})" for a in ADAPTERS)


def find_adapter(model: Any) -> Adapter:
    for adapter_cls in ADAPTERS:
        if adapter_cls.matches(model):
            return adapter_cls(model)
    raise UnsupportedModelError(
        f"accel does not support {type(model).__module__}.{type(model).__qualname__}. "
        f"Supported: {supported_families()}. Pass a diffusers pipeline or model, or a transformers VLM of "
        "these families; with strict=False accel.patch warns and leaves an unsupported model unchanged."
    )


__all__ = ["ADAPTERS", "Adapter", "DiTAdapter", "UNetAdapter", "VLMAdapter", "find_adapter", "supported_families"]
