"""Low-bit attention kernels (Triton) with exact PyTorch references beside them."""

from .int8 import int8_attention, int8_attention_reference

__all__ = ["int8_attention", "int8_attention_reference"]
