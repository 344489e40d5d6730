"""The block store: host, SSD and remote tiers, promotion, flushing, and the TieredStore composing them.
No vLLM and no CUDA imports: device work belongs to the caller (ucm.kernels.transfer)."""

from ucm.tiers.store import Task, TieredStore, TierRoot, tier_roots

__all__ = ["Task", "TieredStore", "TierRoot", "tier_roots"]
