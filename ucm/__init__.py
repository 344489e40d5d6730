"""ucm: a tiered KV cache for vLLM (host memory and SSD tiers, Triton transfer kernels)."""

__version__ = "0.1.0"
