"""The store and the journal of one side of the connector, opened on first use."""

from __future__ import annotations

from ucm.config import UCMConfig
from ucm.hashing import HashSeed
from ucm.integration.vllm.journal import Journal
from ucm.tiers import TieredStore
from ucm.tiers.rates import Rates, shared_rates
from ucm.tiers.store import shared_store


class StoreAccess:
    """This process's store for (config, page size), shared by both sides in vLLM's single-process mode,
    and the journal of one role ("scheduler", "worker<rank>") next to it, seeded with the chain's root."""

    def __init__(self, config: UCMConfig, page_size: int, seed: HashSeed, role: str):
        self.config, self.page_size, self.seed, self.role = config, page_size, seed, role
        self._store: TieredStore | None = None
        self._journal: Journal | None = None

    @property
    def opened(self) -> bool:
        return self._store is not None

    @property
    def store(self) -> TieredStore:
        if self._store is None:
            self._store = shared_store(self.config, self.page_size)
        return self._store

    @property
    def journal(self) -> Journal:
        """Lookups and counters left next to the store for `ucm doctor` and `ucm stats`."""
        if self._journal is None:
            self._journal = Journal(self.store.storage_path, self.role)
            self._journal.seed(self.seed)
        return self._journal

    @property
    def rates(self) -> Rates:
        """The measured tier bandwidths and prefill rate, shared through the store's directory."""
        return shared_rates(self.store.storage_path)

    def close_journal(self) -> None:
        if self._journal is not None:
            self._journal.close()
