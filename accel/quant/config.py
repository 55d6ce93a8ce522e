"""`QuantConfig`: what `accel.patch(..., quant=...)` and `accel.quant.quantize` do to the weights."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .._validate import check_bool, check_callable, check_choice, check_int, check_str_tuple, fail

SUPPORTED_BITS = (4,)
GROUP_SIZES = (16, 32, 64, 128, 256)  # the GEMM tiles K by min(group, 64); tl.dot needs K-tiles of 16+
KERNELS = ("auto", "triton", "dequant", "w4a8", "reference", "w4a8-reference")
ACTIVATIONS = ("16bit", "int8")
W4A8_MIN_GROUP = 32  # the W4A8 GEMM takes an int8 dot per group; Triton's int8 tl.dot needs K-tiles of 32+


@dataclass
class QuantConfig:
    """4-bit weights (W4A16, or W4A8 with `activations="int8"`) for the `nn.Linear` layers of a denoiser or
    language model.

    Each row of a weight is cut into groups of `group_size` input channels; a group stores 4-bit codes
    q in 0..15 and its own scale and zero in the model's dtype: w = (q - zero) * scale.
    """

    bits: int = 4
    """Only 4 is supported."""

    group_size: int = 128
    """Input channels per scale/zero pair: 16, 32, 64, 128 or 256, and it must divide every quantized
    layer's in_features. 128 stores 4.5 bits per weight on average (bf16 scale+zero per 128 codes)."""

    search: bool = True
    """Search each group's clipping range, then refit its scale and zero by least squares, keeping what
    lowers the (activation-weighted, when calibrated) error. False: plain round-to-nearest of min/max."""

    calibration: Callable[[], Any] | None = None
    """Activation-aware scaling (AWQ idea): a callable that runs the model on real inputs, e.g.
    `lambda: pipe(prompt, num_inference_steps=4)`. accel records per-channel input statistics of every
    layer it quantizes during that run, then scales salient input channels up before quantizing (and
    divides them back inside the dequantization), choosing the strength per layer by output error."""

    calibration_tokens: int = 128
    """Input rows kept per layer (on the CPU) to measure output error during the scaling search."""

    rank: int = 0
    """Low-rank correction (SVDQuant idea): keep a rank-`rank` 16-bit part of each weight and quantize
    only the rest. 0 turns it off. Costs (in + out) * rank 16-bit values per layer."""

    exclude: tuple[str, ...] = ()
    """Extra glob patterns over module names (e.g. "*.proj_out", "blocks.0.*") to keep in 16-bit."""

    include: tuple[str, ...] | None = None
    """If set, only layers whose names match one of these patterns are quantized (exclusions still apply)."""

    default_exclusions: bool = True
    """Keep the model family's sensitive layers in 16-bit (embedders, final projection, lm_head, vision
    tower; the adapter's `quant_exclude`). False quantizes them too."""

    min_features: int = 256
    """Layers with in_features or out_features below this stay in 16-bit: too small to matter for memory."""

    activations: str = "16bit"
    """"16bit": activations stay in the compute dtype (W4A16, the default). "int8" (opt-in, adds error):
    where the GPU has fast INT8 tensor cores (sm_80+) and a call has many tokens, each token's input is
    rounded to int8 with its own scale and the W4A8 GEMM runs (about twice the bf16 tensor-core rate);
    elsewhere the layer stays W4A16 and the report says why. Needs group_size >= 32. With `calibration`,
    the activation-aware scaling strength is chosen under int8 activations (it also tames activation
    outlier channels), and the report gives each layer's W4A8 output error on the calibration rows."""

    kernel: str = "auto"
    """"auto": on CUDA the fused Triton W4A16 GEMM for few tokens, Triton dequantize + cuBLAS for many
    (or, with activations="int8", the Triton W4A8 GEMM for many); the PyTorch reference on CPU.
    "triton", "dequant", "w4a8" or "reference" force one path; "w4a8-reference" is the PyTorch model of
    the W4A8 GEMM (any device: shows its accuracy on a CPU). The W4A8 ones need activations="int8"."""

    keep_original: bool = True
    """Keep the original layers (moved to CPU memory when the model is on a GPU) so that `accel.unpatch`
    restores them bit for bit. False frees them: quantization is then one-way and unpatch refuses."""

    def __post_init__(self) -> None:
        check_int(self, "bits")
        check_choice(self, "bits", SUPPORTED_BITS, hint="only bits=4 is supported")
        check_int(self, "group_size")
        check_choice(self, "group_size", GROUP_SIZES)
        check_bool(self, "search")
        check_callable(
            self,
            "calibration",
            optional=True,
            hint="a function that runs the model, e.g. lambda: pipe(prompt, num_inference_steps=4)",
        )
        check_int(self, "calibration_tokens", low=1)
        check_int(self, "rank", low=0, hint="0 turns low-rank correction off")
        check_str_tuple(self, "exclude", hint="a tuple of glob patterns, e.g. ('*.proj_out',)")
        check_str_tuple(self, "include", optional=True, hint="a tuple of glob patterns, e.g. ('blocks.*',)")
        check_bool(self, "default_exclusions")
        check_int(self, "min_features", low=0)
        check_choice(self, "activations", ACTIVATIONS)
        check_choice(self, "kernel", KERNELS)
        check_bool(self, "keep_original")
        if self.kernel.startswith("w4a8") and self.activations != "int8":
            fail(self, "kernel", self.kernel, "rounds activations to int8; opt in with activations='int8'")
        if self.activations == "int8" and self.group_size < W4A8_MIN_GROUP:
            fail(
                self,
                "activations",
                self.activations,
                f"needs group_size >= {W4A8_MIN_GROUP} (the W4A8 GEMM's "
                f"int8 tensor-core tiles), got group_size={self.group_size}",
            )
