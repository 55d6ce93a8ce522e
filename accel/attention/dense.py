"""Dense attention routes (int8, sdpa, flash, xformers) and the full-precision policy.

Each kernel declares its constraints (`_check_*`, in the router's sense); a call that fails one runs SDPA
exactly as the model asked, is counted under the reason, and the first decline of each reason is a warning.
Calls the full-precision policy keeps dense are counted by rule, without a warning.
"""

from __future__ import annotations

import importlib.util
import math
from collections import Counter
from collections.abc import Callable

import torch

from .._private import tensor_version
from ..errors import ConfigError
from . import int8
from .config import AttentionConfig
from .route import AttentionCall, Constraint, Route


def _check_no_dropout(call: AttentionCall) -> str | None:
    return "dropout_p > 0 (training)" if call.dropout_p > 0 else None


def _check_causal_aligned(call: AttentionCall) -> str | None:
    if call.is_causal and call.query.shape[-2] != call.key.shape[-2]:
        return "causal attention with query and key lengths that differ (SDPA aligns top-left)"
    return None


def _check_int8_dtype(call: AttentionCall) -> str | None:
    dtype = call.query.dtype
    return None if dtype in (torch.float16, torch.bfloat16, torch.float32) else f"dtype {dtype}"


def _check_int8_head_dim(call: AttentionCall) -> str | None:
    head_dim, largest = call.query.shape[-1], max(int8.HEAD_DIMS)
    return f"head dim {head_dim} > {largest}" if head_dim > largest else None


def _check_kv_heads_divide(call: AttentionCall) -> str | None:
    heads, kv_heads = call.query.shape[1], call.key.shape[1]
    return f"{heads} query heads are not a multiple of {kv_heads} key/value heads" if heads % kv_heads else None


def _check_cuda(library: str) -> Constraint:
    def check(call: AttentionCall) -> str | None:
        return None if call.query.is_cuda else f"{library} needs CUDA tensors"

    return check


def _check_flash_dtype(call: AttentionCall) -> str | None:
    dtype = call.query.dtype
    return None if dtype in (torch.float16, torch.bfloat16) else f"flash-attn needs fp16/bf16, got {dtype}"


def _check_flash_no_mask(call: AttentionCall) -> str | None:
    return "flash-attn takes no attention mask" if call.attn_mask is not None else None


def _check_xformers_causal_mask(call: AttentionCall) -> str | None:
    return "causal attention with an extra mask" if call.is_causal and call.attn_mask is not None else None


class DenseAttention:
    """The dense route chosen by `AttentionConfig`: `route` is what the router calls."""

    def __init__(self, config: AttentionConfig, warn: Callable[[str], None], num_blocks: int):
        self.config = config
        self.warn = warn  # PatchContext.warn_now: into the report, shown once
        self.num_blocks = num_blocks
        outside = [b for b in config.dense_blocks if not -num_blocks <= b < num_blocks]
        if outside:
            raise ConfigError(
                f"AttentionConfig.dense_blocks={config.dense_blocks}: {outside} name no block of this model, which "
                f"has {num_blocks} (use indices {-num_blocks}..{num_blocks - 1})"
            )
        self.dense_blocks = {b % num_blocks for b in config.dense_blocks}
        self.counts: Counter[str] = Counter()  # calls computed, by path
        self.padded: Counter[str] = Counter()  # int8 calls by "head dim->kernel head dim"
        self._mask: torch.Tensor | None = None  # the last attention mask seen, and what it was found to be
        self._mask_version = -1
        self._mask_answer: tuple[torch.Tensor, bool] | None = None
        compute, constraints = {
            "int8": (
                self._int8,
                (
                    _check_no_dropout,
                    _check_int8_dtype,
                    _check_int8_head_dim,
                    _check_causal_aligned,
                    _check_kv_heads_divide,
                    self._check_int8_mask,
                ),
            ),
            "sdpa": (self._sdpa, ()),
            "flash": (
                self._flash,
                (
                    _check_no_dropout,
                    _check_cuda("flash-attn"),
                    _check_flash_dtype,
                    _check_flash_no_mask,
                    _check_causal_aligned,
                ),
            ),
            "xformers": (self._xformers, (_check_no_dropout, _check_cuda("xFormers"), _check_xformers_causal_mask)),
        }[config.kernel]
        self.route = Route(config.kernel, compute, constraints, exempt=self._policy, on_decline=self._warn_decline)

    def _policy(self, call: AttentionCall) -> str | None:
        cfg = self.config
        if self.config.kernel != "sdpa" and call.query.shape[-2] < cfg.min_query_len:
            return f"fewer than min_query_len={cfg.min_query_len} query tokens, e.g. decoding"
        if call.role in cfg.dense_roles:
            return f"role {call.role}"
        if call.layer in self.dense_blocks and call.role != "vision":
            return f"block {call.layer}"
        if call.step is not None:
            if call.step < cfg.dense_first_steps:
                return "first steps"
            if call.num_steps is not None and call.step >= call.num_steps - cfg.dense_last_steps:
                return "last steps"
        return None

    def _warn_decline(self, reason: str) -> None:
        self.warn(f"attention={self.config.kernel!r} falls back to SDPA for some calls: {reason}")

    def stats(self) -> dict:
        """For `report.stats["attention"]` (its layout is documented in `accel.report`)."""
        return {
            "kernel": self.config.kernel,
            "calls": dict(sorted(self.counts.items())),
            "padded_head_dims": dict(sorted(self.padded.items())),
            "sdpa_by_rule": dict(self.route.exempted),
            "sdpa_fallback": dict(self.route.declined),
        }

    # -- routes ----------------------------------------------------------------------------------
    def _check_int8_mask(self, call: AttentionCall) -> str | None:
        if call.attn_mask is None or self._mask_plan(call.attn_mask, *_mask_dims(call)) is not None:
            return None
        return "an attention mask that is neither key padding nor causal with key padding"

    def _int8(self, call: AttentionCall) -> torch.Tensor:
        q, k, v = call.query, call.key, call.value
        D = q.shape[-1]
        bias, causal = None, call.is_causal
        if call.attn_mask is not None:
            bias, causal = self._mask_plan(call.attn_mask, *_mask_dims(call))  # found by _check_int8_mask
        scale = call.scale if call.scale is not None else 1.0 / math.sqrt(D)
        padded = next(d for d in int8.HEAD_DIMS if d >= D)
        if padded != D:  # zero channels change no dot product; the extra output columns are dropped
            self.padded[f"{D}->{padded}"] += 1
            q, k, v = (torch.nn.functional.pad(t, (0, padded - D)) for t in (q, k, v))
        cfg = self.config
        kwargs = dict(
            causal=causal,
            sm_scale=scale,
            key_padding_mask=bias,
            smooth_q=cfg.smooth_q,
            pv=cfg.pv,
            granularity=cfg.granularity,
        )
        if q.is_cuda:
            if cfg.pv == "fp8" and torch.cuda.get_device_capability(q.device) < (8, 9):
                self.warn(
                    "AttentionConfig(pv='fp8') needs a GPU of compute capability 8.9 or later; "
                    "P·V runs in 16-bit on this one"
                )
                kwargs["pv"] = "fp16"
            out = int8.int8_attention(q, k, v, **kwargs)
            self.counts["int8"] += 1
        else:
            self.warn(
                "attention='int8' on CPU tensors runs the PyTorch reference of the kernel (slow; same "
                "quantisation, to preview quality); the Triton kernel needs a CUDA GPU"
            )
            out = int8.int8_attention_reference(q, k, v, **kwargs)
            self.counts["int8_reference"] += 1
        return out[..., :D] if padded != D else out

    def _mask_plan(self, mask: torch.Tensor, B: int, Nq: int, Nk: int) -> tuple[torch.Tensor, bool] | None:
        """(key-padding bias [B, Nk], causal) equivalent to an SDPA mask, or None.

        A language model's batched prefill passes causal AND key padding as one [B, 1, N, N] bool mask;
        that is recognised too. Every layer of a forward gets the same mask tensor, so the answer (which
        may cost a host sync) is kept for as long as that tensor is passed.
        """
        if self._mask is mask and self._mask_version == tensor_version(mask):
            return self._mask_answer
        answer = None
        bias = int8.key_padding_from_sdpa_mask(mask, B, Nq, Nk)
        if bias is not None:
            answer = (bias, False)
        elif mask.dtype == torch.bool and mask.dim() == 4 and mask.shape[1] == 1 and Nq == Nk and mask.shape[0] == B:
            keep = mask[:, 0].any(dim=-2)  # [B, Nk]: keys some query attends to
            causal = torch.ones(Nq, Nk, dtype=torch.bool, device=mask.device).tril()
            if torch.equal(mask[:, 0], causal & keep[:, None, :]):
                answer = (int8.key_padding_from_sdpa_mask(keep[:, None, None, :], B, Nq, Nk), True)
        self._mask, self._mask_version, self._mask_answer = mask, tensor_version(mask), answer
        return answer

    def _sdpa(self, call: AttentionCall) -> torch.Tensor:
        self.counts["sdpa" if self.config.sdpa_backend is None else f"sdpa_{self.config.sdpa_backend}"] += 1
        if self.config.sdpa_backend is None or not call.query.is_cuda:
            return call.sdpa()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {
            "flash": SDPBackend.FLASH_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "math": SDPBackend.MATH,
        }[self.config.sdpa_backend]
        with sdpa_kernel(backend):
            return call.sdpa()

    def _flash(self, call: AttentionCall) -> torch.Tensor:
        from flash_attn import flash_attn_func

        q, k, v = (t.transpose(1, 2) for t in (call.query, call.key, call.value))  # flash-attn: [B, S, H, D]
        out = flash_attn_func(q, k, v, softmax_scale=call.scale, causal=call.is_causal)
        self.counts["flash"] += 1
        return out.transpose(1, 2)

    def _xformers(self, call: AttentionCall) -> torch.Tensor:
        import xformers.ops as xops

        q, k, v = call.query, call.key, call.value
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
        bias = None
        if call.is_causal:
            bias = xops.LowerTriangularMask()
        elif call.attn_mask is not None:
            mask = call.attn_mask
            if mask.dtype == torch.bool:
                mask = torch.zeros(mask.shape, dtype=q.dtype, device=q.device).masked_fill(~mask, float("-inf"))
            bias = mask.to(q.dtype).expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # xFormers: [B, S, H, D]
        out = xops.memory_efficient_attention(q, k, v, attn_bias=bias, scale=call.scale)
        self.counts["xformers"] += 1
        return out.transpose(1, 2)


def _mask_dims(call: AttentionCall) -> tuple[int, int, int]:
    """(batch, query length, key length), as the mask is read."""
    return call.query.shape[0], call.query.shape[-2], call.key.shape[-2]


def check_available(kernel: str) -> str | None:
    """Why `kernel` cannot run in this environment (with the fix), or None."""
    if kernel == "int8" and importlib.util.find_spec("triton") is None:
        return "attention='int8' needs Triton (pip install triton; it ships with torch on Linux CUDA builds)"
    if kernel == "flash" and importlib.util.find_spec("flash_attn") is None:
        return "attention='flash' needs the flash-attn package (pip install flash-attn), or use attention='sdpa'"
    if kernel == "xformers" and importlib.util.find_spec("xformers") is None:
        return "attention='xformers' needs the xformers package (pip install xformers), or use attention='sdpa'"
    return None
