"""The block store: host LRU tier, SSD tier, and the TieredStore composing them. No vLLM imports."""

from ucm.tiers.store import Task, TieredStore

__all__ = ["Task", "TieredStore"]
