"""Dense attention routes (int8, sdpa, flash, xformers) and the full-precision policy.

Each route computes an `AttentionCall` or declines it with a reason; a declined call runs SDPA exactly
as the model asked, is counted under its reason, and the first decline of each reason is a warning.
"""

from __future__ import annotations

import importlib.util
import math
from typing import Callable
from collections import Counter

import torch

from .._private import tensor_version
from ..errors import AccelError, ConfigError
from . import int8
from .config import AttentionConfig
from .route import AttentionCall


class Decline(AccelError):
    """This route cannot compute this call; the message is the reason shown in the report."""


class DenseAttention:
    """The dense route chosen by `AttentionConfig`, callable on an `AttentionCall`."""

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
        self.counts: Counter[str] = Counter()
        self._mask: torch.Tensor | None = None  # the last attention mask seen, and what it was found to be
        self._mask_version = -1
        self._mask_answer: tuple[torch.Tensor, bool] | None = None
        self._route = {"int8": self._int8, "sdpa": self._sdpa, "flash": self._flash, "xformers": self._xformers}[
            config.kernel
        ]

    def __call__(self, call: AttentionCall) -> torch.Tensor:
        policy = self._policy(call)
        if policy is not None:
            self.counts[f"sdpa (by rule: {policy})"] += 1
            return call.sdpa()
        try:
            out = self._route(call)
        except Decline as reason:
            self._decline(str(reason))
            return call.sdpa()
        return out

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

    def _decline(self, reason: str) -> None:
        self.counts[f"sdpa (fallback: {reason})"] += 1
        self.warn(f"attention={self.config.kernel!r} falls back to SDPA for some calls: {reason}")

    def stats(self) -> dict:
        return {"kernel": self.config.kernel, "calls": dict(sorted(self.counts.items()))}

    # -- routes ----------------------------------------------------------------------------------
    def _common_checks(self, call: AttentionCall) -> None:
        if call.dropout_p > 0:
            raise Decline("dropout_p > 0 (training)")

    def _int8(self, call: AttentionCall) -> torch.Tensor:
        self._common_checks(call)
        q, k, v = call.query, call.key, call.value
        B, Hq, Nq, D = q.shape
        Nk = k.shape[-2]
        if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise Decline(f"dtype {q.dtype}")
        if D > max(int8.HEAD_DIMS):
            raise Decline(f"head dim {D} > {max(int8.HEAD_DIMS)}")
        if call.is_causal and Nq != Nk:
            raise Decline("causal attention with query and key lengths that differ (SDPA aligns top-left)")
        if Hq % k.shape[1]:
            raise Decline(f"{Hq} query heads are not a multiple of {k.shape[1]} key/value heads")
        bias, causal = None, call.is_causal
        if call.attn_mask is not None:
            plan = self._mask_plan(call.attn_mask, B, Nq, Nk)
            if plan is None:
                raise Decline("an attention mask that is neither key padding nor causal with key padding")
            bias, causal = plan
        scale = call.scale if call.scale is not None else 1.0 / math.sqrt(D)
        padded = next(d for d in int8.HEAD_DIMS if d >= D)
        note = ""
        if padded != D:  # zero channels change no dot product; the extra output columns are dropped
            note = f", head dim {D} padded to {padded}"
            q, k, v = (torch.nn.functional.pad(t, (0, padded - D)) for t in (q, k, v))
        cfg = self.config
        kwargs = dict(causal=causal, sm_scale=scale, key_padding_mask=bias, smooth_q=cfg.smooth_q, pv=cfg.pv,
                      granularity=cfg.granularity)
        if q.is_cuda:
            if cfg.pv == "fp8" and torch.cuda.get_device_capability(q.device) < (8, 9):
                self.warn("AttentionConfig(pv='fp8') needs a GPU of compute capability 8.9 or later; "
                                "P·V runs in 16-bit on this one")
                kwargs["pv"] = "fp16"
            out = int8.int8_attention(q, k, v, **kwargs)
            self.counts[f"int8{note}"] += 1
        else:
            self.warn(
                "attention='int8' on CPU tensors runs the PyTorch reference of the kernel (slow; same "
                "quantisation, to preview quality); the Triton kernel needs a CUDA GPU"
            )
            out = int8.int8_attention_reference(q, k, v, **kwargs)
            self.counts[f"int8 (PyTorch reference on CPU{note})"] += 1
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
        self.counts["sdpa" if self.config.sdpa_backend is None else f"sdpa ({self.config.sdpa_backend})"] += 1
        if self.config.sdpa_backend is None or not call.query.is_cuda:
            return call.sdpa()
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backend = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
                   "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[self.config.sdpa_backend]
        with sdpa_kernel(backend):
            return call.sdpa()

    def _flash(self, call: AttentionCall) -> torch.Tensor:
        self._common_checks(call)
        if not call.query.is_cuda:
            raise Decline("flash-attn needs CUDA tensors")
        if call.query.dtype not in (torch.float16, torch.bfloat16):
            raise Decline(f"flash-attn needs fp16/bf16, got {call.query.dtype}")
        if call.attn_mask is not None:
            raise Decline("flash-attn takes no attention mask")
        if call.is_causal and call.query.shape[-2] != call.key.shape[-2]:
            raise Decline("causal attention with query and key lengths that differ (SDPA aligns top-left)")
        from flash_attn import flash_attn_func

        q, k, v = (t.transpose(1, 2) for t in (call.query, call.key, call.value))  # flash-attn: [B, S, H, D]
        out = flash_attn_func(q, k, v, softmax_scale=call.scale, causal=call.is_causal)
        self.counts["flash"] += 1
        return out.transpose(1, 2)

    def _xformers(self, call: AttentionCall) -> torch.Tensor:
        self._common_checks(call)
        if not call.query.is_cuda:
            raise Decline("xFormers needs CUDA tensors")
        import xformers.ops as xops

        q, k, v = call.query, call.key, call.value
        groups = q.shape[1] // k.shape[1]
        if groups > 1:
            k, v = (t.repeat_interleave(groups, dim=1) for t in (k, v))
        bias = None
        if call.is_causal:
            if call.attn_mask is not None:
                raise Decline("causal attention with an extra mask")
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


def check_available(kernel: str) -> str | None:
    """Why `kernel` cannot run in this environment (with the fix), or None."""
    if kernel == "int8" and importlib.util.find_spec("triton") is None:
        return "attention='int8' needs Triton (pip install triton; it ships with torch on Linux CUDA builds)"
    if kernel == "flash" and importlib.util.find_spec("flash_attn") is None:
        return "attention='flash' needs the flash-attn package (pip install flash-attn), or use attention='sdpa'"
    if kernel == "xformers" and importlib.util.find_spec("xformers") is None:
        return "attention='xformers' needs the xformers package (pip install xformers), or use attention='sdpa'"
    return None
