"""Block identity: which ucm block ids a vLLM request's tokens have, on which TP rank.

The one place that decides it, used by both connectors, `ucm doctor`, the debug helpers and the tests:

* the root seed (`hash_seed`): everything of the engine that changes a block's bytes (model, dtype,
  KV layout, block size, TP and PP size, ucm's format version);
* the request salt (`salt_string`): per-request inputs that change KV bytes, the tenant's `cache_salt`
  and the LoRA adapter; different salts never share a block;
* multimodal extras (`block_extras`): the hashes of the multimodal inputs whose placeholder tokens a
  block holds are mixed into that block's id (as vLLM's own block hashes do);
* TP shards (`BlockIdentity.for_rank`): each rank stores its shard of every layer under its own id
  (MLA KV is the same on every rank: rank 0's ids, saved by rank 0).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import xxhash

from ucm.hashing import HashSeed, RequestHasher

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request


def attention_group(kv_cache_config: "KVCacheConfig"):
    """The model's one KV cache group (ucm supports models with one)."""
    groups = kv_cache_config.kv_cache_groups
    if len(groups) != 1:
        raise ValueError(f"ucm supports models with one KV cache group; this model has {len(groups)} "
                         f"({[type(g.kv_cache_spec).__name__ for g in groups]})")
    return groups[0]


def page_size_of(kv_cache_config: "KVCacheConfig") -> int:
    """Bytes of one block across all layers of this rank."""
    g = attention_group(kv_cache_config)
    return g.kv_cache_spec.page_size_bytes * len(g.layer_names)


def hash_seed(vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> HashSeed:
    """Everything that changes the bytes of a block: model, dtype, layout, block size, TP size."""
    from vllm.platforms import current_platform

    mc, cc, pc = vllm_config.model_config, vllm_config.cache_config, vllm_config.parallel_config
    group = attention_group(kv_cache_config)
    spec = group.kv_cache_spec
    dtype = str(spec.dtype).replace("torch.", "")
    layout = (f"{current_platform.device_type}/{type(spec).__name__}/"
              f"{getattr(spec, 'num_kv_heads', 0)}x{getattr(spec, 'head_size', 0)}/{len(group.layer_names)}L")
    return HashSeed(model=f"{mc.model}@{mc.revision or ''}", dtype=f"{dtype}/{cc.cache_dtype}", kv_layout=layout,
                    block_size=cc.block_size, tp_size=pc.tensor_parallel_size, tp_rank=0,
                    extra=f"pp{pc.pipeline_parallel_size}")


def salt_string(cache_salt: str | None = None, lora_name: str | None = None, lora_id: int | str = "") -> str | None:
    """The salt mixed into a request's chain root, or None for an unsalted request."""
    parts = []
    if cache_salt:
        parts.append(f"salt={cache_salt}")
    if lora_name is not None:
        parts.append(f"lora={lora_name}:{lora_id}")
    return "|".join(parts) or None


def request_salt(request: "Request") -> str | None:
    """`salt_string` of a vLLM request: its cache_salt and LoRA adapter."""
    lora = getattr(request, "lora_request", None)
    return salt_string(getattr(request, "cache_salt", None), None if lora is None else lora.lora_name,
                       "" if lora is None else getattr(lora, "lora_int_id", ""))


def block_extras(request: "Request", block_size: int, first: int, n: int) -> dict[int, bytes] | None:
    """Extras of blocks [first, first + n) of a request, keyed from 0: the identifiers of the
    multimodal inputs whose placeholder tokens overlap each block, in input order; None if none."""
    out: dict[int, bytes] = {}
    for f in getattr(request, "mm_features", None) or ():
        pos = getattr(f, "mm_position", None)
        ident = getattr(f, "identifier", None) or getattr(f, "mm_hash", None)
        if pos is None or ident is None:
            continue
        a, b = pos.offset, pos.offset + pos.length
        for blk in range(max(first, a // block_size), min(first + n, -(-b // block_size))):
            out[blk - first] = out.get(blk - first, b"") + str(ident).encode() + b";"
    return out or None


def shard_ids(ids: list[bytes], rank: int, tp_size: int, mla: bool) -> list[bytes]:
    """The ids a TP rank stores: the rank enters the id (MLA KV is identical on every rank: rank 0's)."""
    if tp_size == 1 or mla:
        return ids
    tag = b"rank" + rank.to_bytes(4, "little")
    return [xxhash.xxh3_128_digest(i + tag) for i in ids]


@dataclass(frozen=True)
class BlockIdentity:
    """The block ids of one engine: its root seed, TP size and whether its KV is MLA (rank-independent)."""

    seed: HashSeed
    mla: bool = False

    @classmethod
    def from_vllm(cls, vllm_config: "VllmConfig", kv_cache_config: "KVCacheConfig") -> "BlockIdentity":
        spec = attention_group(kv_cache_config).kv_cache_spec
        return cls(hash_seed(vllm_config, kv_cache_config), "MLA" in type(spec).__name__)

    @classmethod
    def from_seed(cls, seed: HashSeed) -> "BlockIdentity":
        """From a recorded seed (the journal's): its KV layout names the spec, MLA or not."""
        return cls(seed, "MLA" in seed.kv_layout)

    def with_extra(self, tag: str) -> "BlockIdentity":
        """Another id space of the same engine (e.g. blend chunk pages: `|blend`)."""
        import dataclasses

        return BlockIdentity(dataclasses.replace(self.seed, extra=f"{self.seed.extra}|{tag}"), self.mla)

    @property
    def hasher(self) -> RequestHasher:
        return _hasher(self.seed)

    @property
    def tp_size(self) -> int:
        return self.seed.tp_size

    def ranks(self) -> range:
        """The ranks whose shards must all be stored for a block to hit (one for MLA)."""
        return range(1 if self.mla else self.tp_size)

    def for_rank(self, ids: list[bytes], rank: int) -> list[bytes]:
        return shard_ids(ids, rank, self.tp_size, self.mla)

    def saves_on(self, rank: int) -> bool:
        """Whether this rank stores its shard (MLA: rank 0 stores the one copy)."""
        return not self.mla or rank == 0

    def chain(self, tokens, salt: str | None = None, parent: bytes | None = None,
              extras: dict[int, bytes] | None = None) -> list[bytes]:
        """Chain ids of the full blocks of `tokens`: from the root (with `salt`) or after `parent`."""
        return self.hasher.generate_block_hashes(tokens, salt=None if parent is not None else salt, parent=parent,
                                                 block_extras=extras)

    def extend(self, request: "Request", have: list[bytes], n_blocks: int) -> list[bytes]:
        """A request's chain ids extended from `have` (its first blocks) to its first n_blocks."""
        if n_blocks <= len(have):
            return have[:n_blocks]
        bs = self.seed.block_size
        toks = request.all_token_ids[len(have) * bs:n_blocks * bs]
        return have + self.chain(toks, request_salt(request), have[-1] if have else None,
                                 block_extras(request, bs, len(have), n_blocks - len(have)))


_HASHERS: dict[HashSeed, RequestHasher] = {}


def _hasher(seed: HashSeed) -> RequestHasher:
    h = _HASHERS.get(seed)
    if h is None:
        h = _HASHERS[seed] = RequestHasher(seed)
    return h
