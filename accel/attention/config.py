"""`AttentionConfig`: which kernel computes a patched model's attention, and where it must not."""

from __future__ import annotations

from dataclasses import dataclass

from .._validate import check_bool, check_choice, check_int, check_int_tuple, check_str_tuple

KERNELS = ("int8", "sdpa", "flash", "xformers")
SDPA_BACKENDS = ("flash", "cudnn", "efficient", "math")
ROLES = ("self", "cross", "joint", "causal", "vision")


@dataclass
class AttentionConfig:
    """Attention kernel and precision policy for `accel.patch(..., attention=...)`.

    kernel: "int8" (accel's SageAttention-style Triton kernel: INT8 Q·Kᵀ with K smoothing, 16-bit
        P·V), "sdpa" (torch's scaled_dot_product_attention), "flash" (the flash-attn package) or
        "xformers". A string passed to `accel.patch(attention=...)` sets this field.
    dense_blocks: blocks (DiT), transformer blocks (UNet) or decoder layers (VLM) whose attention stays
        in full precision (SDPA); negative indices count from the end. SageAttention2 found the first
        and last layers of some models sensitive: `dense_blocks=(0, -1)`.
    dense_first_steps / dense_last_steps: denoising steps at the start / end of each pipeline call
        that stay in full precision (needs the pipeline to be patched, not a bare model).
    dense_roles: attention roles that stay in full precision, e.g. ("cross",) or ("vision",); roles
        are "self", "cross", "joint" (text and visual tokens in one sequence), "causal" (language
        model), "vision" (a VLM's vision encoder).
    min_query_len: calls with fewer query tokens (a language model decoding token by token) use SDPA:
        a quantised kernel gains nothing there. The report counts them.
    sdpa_backend: for kernel="sdpa", force one of torch's SDPA backends ("flash", "cudnn",
        "efficient", "math"); None lets torch choose.
    smooth_q: int8 only: also subtract Q's token mean (exact correction added back); helps Q with a
        large shared bias, costs a little.
    granularity: int8 only: "token" (default) gives every Q and K row its own INT8 scale, which keeps
        0.999 cosine on heavy-tailed inputs where one scale per tile ("block", SageAttention v1) drops
        to about 0.9985.
    pv: int8 only: "fp16" (P·V in the inputs' 16-bit type) or "fp8" (e4m3 with V smoothed, GPUs of
        compute capability 8.9 and later).
    """

    kernel: str = "int8"
    dense_blocks: tuple[int, ...] = ()
    dense_first_steps: int = 0
    dense_last_steps: int = 0
    dense_roles: tuple[str, ...] = ()
    min_query_len: int = 16
    sdpa_backend: str | None = None
    smooth_q: bool = False
    granularity: str = "token"
    pv: str = "fp16"

    def __post_init__(self) -> None:
        check_choice(self, "kernel", KERNELS)
        check_int_tuple(self, "dense_blocks", hint="block indices, e.g. (0, -1)")
        check_int(self, "dense_first_steps", low=0)
        check_int(self, "dense_last_steps", low=0)
        check_str_tuple(self, "dense_roles", choices=ROLES, hint='e.g. ("cross",)')
        check_int(self, "min_query_len", low=0)
        check_choice(self, "sdpa_backend", SDPA_BACKENDS, optional=True)
        check_bool(self, "smooth_q")
        check_choice(self, "granularity", ("token", "block"))
        check_choice(self, "pv", ("fp16", "fp8"))
