"""Deterministic block ids.

A block is `block_size` tokens of one model replica shard, across all layers. Its id is 16 bytes:

    id_0 = root(salt)            root = xxh3_128(canonical JSON of everything that changes the KV bytes)
    id_i = xxh3_128(id_{i-1} || uint32 LE tokens of block i)

Only full blocks get ids. Nothing depends on PYTHONHASHSEED or process state: the same prompt gives the
same ids in any process on any machine. Anything else that changes the KV of the same tokens (LoRA
adapter, a tenant's cache_salt, multimodal input hashes) enters the chain too: per request through
`salt` (mixed into the root) or per block through `block_extras`.
"""

from __future__ import annotations

import json
from array import array
from dataclasses import asdict, dataclass
from typing import Mapping, Sequence

import xxhash

FORMAT_VERSION = 1  # bump when the page layout written by ucm changes
BLOCK_ID_BYTES = 16

_xxh128 = xxhash.xxh3_128_digest


@dataclass(frozen=True)
class HashSeed:
    """Everything that makes the bytes of a block's KV differ for the same tokens."""

    model: str  # model identity: name or path plus revision
    dtype: str  # KV cache dtype, e.g. "bfloat16", "fp8_e4m3"
    kv_layout: str  # e.g. "cpu:[blocks,heads,block_size,2*head_dim]"
    block_size: int  # tokens per block
    tp_size: int = 1
    tp_rank: int = 0
    extra: str = ""  # anything else (e.g. pipeline stage), free text
    format_version: int = FORMAT_VERSION

    def root(self) -> bytes:
        blob = json.dumps(asdict(self), sort_keys=True, separators=(",", ":")).encode()
        return _xxh128(blob)


class RequestHasher:
    """Turns token ids into chained 16-byte block ids under one `HashSeed`."""

    def __init__(self, seed: HashSeed):
        self.seed = seed
        self._roots: dict[int, bytes] = {seed.block_size: seed.root()}

    @property
    def block_size(self) -> int:
        return self.seed.block_size

    def root(self, block_size: int | None = None, salt: bytes | str | None = None) -> bytes:
        """Root of the chain; a request's salt (cache_salt, LoRA name) gives a different root."""
        bs = block_size or self.seed.block_size
        base = self._roots.get(bs)
        if base is None:
            base = self._roots[bs] = HashSeed(**{**asdict(self.seed), "block_size": bs}).root()
        if salt:
            salt_bytes = salt.encode() if isinstance(salt, str) else bytes(salt)
            return _xxh128(base + b"salt:" + salt_bytes)
        return base

    def generate_block_hashes(
        self,
        token_ids: Sequence[int],
        block_size: int | None = None,
        *,
        salt: bytes | str | None = None,
        parent: bytes | None = None,
        block_extras: Mapping[int, bytes] | None = None,
    ) -> list[bytes]:
        """Ids of the full blocks of `token_ids` (len(token_ids) // block_size of them).

        `parent` continues a chain from an earlier id instead of the root (used for chunks and for
        incremental hashing of a growing request); `block_extras[i]` is mixed into block i's id.
        """
        bs = block_size or self.seed.block_size
        if bs <= 0:
            raise ValueError(f"block_size must be positive, got {bs}")
        n = len(token_ids) // bs
        if n == 0:
            return []
        try:
            buf = array("I", token_ids[: n * bs] if not isinstance(token_ids, array) else token_ids[: n * bs])
        except OverflowError as e:
            raise ValueError("token ids must be integers in [0, 2**32)") from e
        data = buf.tobytes()
        step = bs * 4
        prev = parent if parent is not None else self.root(bs, salt)
        out = [b""] * n
        h = _xxh128
        if block_extras:
            for i in range(n):
                extra = block_extras.get(i)
                chunk = data[i * step:(i + 1) * step]
                prev = h(prev + chunk + extra) if extra else h(prev + chunk)
                out[i] = prev
        else:
            for i in range(n):
                prev = h(prev + data[i * step:(i + 1) * step])
                out[i] = prev
        return out


def block_id_hex(block_id: bytes) -> str:
    """Short printable form of a block id for logs."""
    return block_id.hex()[:12]
