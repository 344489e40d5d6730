"""Transfer kernels between vLLM's paged KV cache and contiguous pages. No vLLM imports."""

from ucm.kernels.copy_blocks import pack, unpack
from ucm.kernels.layout import KVLayout, UnsupportedLayout

__all__ = ["KVLayout", "UnsupportedLayout", "pack", "unpack"]
