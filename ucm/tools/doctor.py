"""`ucm doctor`: why did this prompt not hit the cache?

Given a configuration and a prompt (token ids, or text and the model's tokenizer), report where each of
the prompt's full blocks is (host tier, SSD tier, remote tier, nowhere) under every chain root the store has seen,
and name the likely reasons for misses:

- store empty                       nothing was ever saved under this configuration's paths
- prompt shorter than a block       only full blocks are cached
- different root seed               the store's blocks were made by another model, dtype, block size,
                                    KV layout or TP size (the differing fields are named)
- cache_salt                        the stored requests used a salt (a tenant key): same salt, or no hit
- prompt diverges                   the first k blocks are stored, then the prompt differs from them
- chain broken                      block k is missing but later blocks are stored (evicted, or dropped
                                    after a failed load): a hit ends at block k
- vLLM's own prefix cache           the blocks are stored, but vLLM already had them (the journal shows
                                    it), so ucm had nothing to load
- remote tier unreachable           lookups count the server's blocks as misses until it is back
- patches disabled                  UCM_DISABLE_PATCHES=1 (on vLLM 0.32 this slows SSD loads, it does
                                    not cause misses)
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from ucm.config import UCMConfig
from ucm.hashing import HashSeed
from ucm.integration.vllm.identity import BlockIdentity, salt_string
from ucm.integration.vllm.journal import read_lookups, read_seeds
from ucm.tiers import TieredStore, tier_roots

SEED_FIELDS = ("model", "dtype", "kv_layout", "block_size", "tp_size", "extra", "format_version")


@dataclass
class Diagnosis:
    tokens: int
    seeds: dict[str, dict]  # root prefix -> seed fields, as recorded in the store's journal
    where: dict[str, list[str]] = field(default_factory=dict)  # root prefix -> per block: host/ssd/remote/none
    ranks: dict[str, dict[int, list[str]]] = field(default_factory=dict)  # root prefix -> TP rank -> per block
    held: dict[str, list[tuple[str, ...]]] = field(default_factory=dict)  # root prefix -> per block: every tier (rank 0)
    reasons: list[str] = field(default_factory=list)
    store_blocks: dict[str, int] = field(default_factory=dict)  # tier -> blocks
    remote_down: str = ""  # the unreachable remote tier's address
    lookups: list[dict] = field(default_factory=list)  # the connector's journal of scheduler lookups

    def best(self) -> tuple[str, list[str]] | None:
        if not self.where:
            return None
        def stored(kv):  # blocks held by any rank count, so a partly written TP store is the one shown
            shards = self.ranks.get(kv[0]) or {0: kv[1]}
            return sum(w != "none" for shard in shards.values() for w in shard)
        return max(self.where.items(), key=stored)


def _leading(where: list[str]) -> int:
    n = 0
    while n < len(where) and where[n] != "none":
        n += 1
    return n


def _store_pages(config: UCMConfig) -> list[int]:
    """Page sizes the store holds data for (one subdirectory p<bytes> per page size)."""
    return sorted({p for r in tier_roots(config) for p in r.page_sizes()})


def _seed(fields: dict) -> HashSeed:
    return HashSeed(**{k: fields[k] for k in SEED_FIELDS if k in fields}, tp_rank=fields.get("tp_rank", 0))


def recorded_chains(storage_path: str, tokens: list[int], salt: str | None = None
                    ) -> dict[str, tuple[BlockIdentity, list[bytes]]]:
    """Root prefix -> (its identity, the store ids of the prompt's full blocks under it, rank 0's), for
    every chain root recorded in the journal of the store at `storage_path`."""
    out = {}
    for root, fields in read_seeds(storage_path).items():
        identity = BlockIdentity.from_seed(_seed(fields))
        out[root] = identity, identity.chain(tokens, salt_string(salt))
    return out


def diagnose(config: UCMConfig, tokens: list[int], *, model: str | None = None, dtype: str | None = None,
             block_size: int | None = None, tp_size: int | None = None, salt: str | None = None) -> Diagnosis:
    """Look the prompt up under every recorded root, with the ids the connector gives it (identity.py:
    the request salt of `salt`, every TP rank's shard); model/dtype/block_size/tp_size: what the user's
    vLLM runs with (those given are compared with what the store holds). Opens the tiers read-only:
    the cache is left exactly as it was found."""
    seeds: dict[str, dict] = {}
    diag = Diagnosis(len(tokens), seeds)
    for page in _store_pages(config):
        with TieredStore(config, page, readonly=True) as store:
            seeds.update(read_seeds(store.storage_path))
            diag.lookups += read_lookups(store.storage_path)
            for tier, u in store.usage().items():
                diag.store_blocks[tier] = diag.store_blocks.get(tier, 0) + u.get("blocks", 0)
            if store.remote is not None and not store.remote.up:
                diag.remote_down = store.remote.where
            for root, (identity, ids) in recorded_chains(store.storage_path, tokens, salt).items():
                if not ids:
                    continue
                per_rank = {r: store.where(identity.for_rank(ids, r)) for r in identity.ranks()}
                diag.ranks[root] = per_rank
                diag.held[root] = store.holders(identity.for_rank(ids, 0))
                # a block hits only when every rank holds its shard
                diag.where[root] = [next((w[k] for w in per_rank.values() if w[k] == "none"), per_rank[0][k])
                                    for k in range(len(ids))]
    _explain(diag, config, tokens, model=model, dtype=dtype, block_size=block_size, tp_size=tp_size, salt=salt)
    return diag


def _explain(diag: Diagnosis, config: UCMConfig, tokens: list[int], **want) -> None:
    r = diag.reasons
    salt = want.pop("salt")
    if os.environ.get("UCM_DISABLE_PATCHES", "") not in ("", "0"):
        r.append("patches disabled (UCM_DISABLE_PATCHES=1): on vLLM 0.32 this does not cause misses; it makes "
                 "layer-wise SSD loads go through a bounce buffer")
    if diag.remote_down:
        r.append(f"remote tier unreachable: {diag.remote_down} did not answer, so its blocks count as misses "
                 "(the connector reconnects by itself; see the [UCM.Remote] log lines)")
    if not sum(diag.store_blocks.values()):
        r.append(f"store empty: no blocks under {config.host.path}" + (f" or {config.ssd.path}" if config.ssd else "")
                 + " (nothing saved yet, or vLLM ran with another UCM_CONFIG_FILE / storage path)")
        return
    if not diag.seeds:
        r.append("no recorded chain roots: the store's blocks were written without a journal (an older ucm, or "
                 "the journal directory was not writable), so doctor cannot recompute their ids")
    sizes = {f.get("block_size") for f in diag.seeds.values()}
    bs = want.get("block_size") or (min(sizes) if sizes else None)
    if bs and len(tokens) < bs:
        r.append(f"prompt shorter than a block: {len(tokens)} tokens < block_size {bs}; only full blocks are cached")
    mismatched = _seed_mismatch(diag.seeds, want)
    if mismatched:
        r.append(mismatched)
    best = diag.best()
    if best is None:
        return
    root, where = best
    found, lead = sum(w != "none" for w in where), _leading(where)
    lookups = [x for x in diag.lookups if x.get("seed") == root]
    bs = diag.seeds[root].get("block_size", bs)
    held = {k: sum(w != "none" for w in shard) for k, shard in diag.ranks.get(root, {}).items()}
    if len(set(held.values())) > 1:
        r.append(f"TP shards incomplete: the store was written with tp_size {len(held)}, and a block hits only when "
                 "every rank stored its shard; blocks held per rank: "
                 + ", ".join(f"rank {k} {n}" for k, n in held.items()))
    if found == 0 and any(held.values()):
        return
    if found == 0:
        salted = [x for x in lookups if x.get("salted")]
        if salt is None and salted:
            r.append(f"cache_salt: {len(salted)} of the {len(lookups)} recorded requests used a cache_salt; blocks "
                     "saved under a salt only hit requests with the same salt (pass --salt)")
        elif not mismatched:
            r.append("not stored: none of the prompt's blocks is in the store under any recorded root "
                     "(never sent, evicted, or the text/tokenization differs)")
        return
    if lead < found:
        r.append(f"chain broken: blocks 0..{lead - 1} are stored, block {lead} is not, and {found - lead} later blocks "
                 f"are: block {lead} was evicted (or dropped after a failed load); a hit ends at the first missing "
                 f"block, so the next request loads {lead * bs} tokens and recomputes from there" if lead else
                 f"chain broken at block 0: {found} later blocks are stored, but a hit starts at block 0, so "
                 "nothing loads until a request stores block 0 again")
    elif lead < len(where):
        r.append(f"prompt diverges: blocks 0..{lead - 1} are stored, block {lead} is not: the prompt differs from "
                 f"the stored ones at or after token {lead * bs}")
    first = _first_id(diag, root, tokens, salt)
    mine = [x for x in lookups if x.get("first") == first]
    if mine and found:
        last = mine[-1]
        if last.get("vllm", 0) and last.get("load_tokens", 0) == 0:
            r.append(f"vLLM's own prefix cache took the hit: the last lookup of this prompt found {last['vllm']} "
                     f"blocks already computed by vLLM, so ucm had nothing to load "
                     f"(vllm:prompt_tokens_by_source{{source=local_cache_hit}} counts them)")
        plan = last.get("plan") or {}
        if plan.get("load_blocks", 0) < plan.get("hit_blocks", 0):
            r.append(f"not worth loading: the last lookup of this prompt {plan.get('why', '')} (the load planner "
                     "predicted recomputing them sooner; transfer.load_planner: false loads every hit)")
    if found == len(where) and not r:
        r.append(f"all {found} full blocks are stored: the next request with this prompt loads "
                 f"{min(found * bs, len(tokens) - 1)} tokens from ucm")


def _first_id(diag: Diagnosis, root: str, tokens: list[int], salt: str | None) -> str:
    identity = BlockIdentity.from_seed(_seed(diag.seeds[root]))
    ids = identity.chain(tokens[:identity.seed.block_size], salt_string(salt))
    return ids[0].hex() if ids else ""


def _seed_mismatch(seeds: dict[str, dict], want: dict) -> str:
    """A sentence naming the fields the user's setup differs in from every recorded root, or ''."""
    given = {k: v for k, v in want.items() if v is not None}
    if not given or not seeds:
        return ""

    def differs(f: dict) -> list[str]:
        out = []
        for k, v in given.items():
            have = f.get(k)
            if k == "model":
                ok = str(have).split("@")[0].rstrip("/").endswith(str(v).rstrip("/"))
            elif k == "dtype":
                ok = str(have).split("/")[0] == str(v)
            else:
                ok = have == v
            if not ok:
                out.append(f"{k}: store has {have}, you run {v}")
        return out

    diffs = [differs(f) for f in seeds.values()]
    if any(not d for d in diffs):
        return ""
    closest = min(diffs, key=len)
    return "different root seed: the store's blocks were made with another setup (" + "; ".join(closest) + ")"


def report(diag: Diagnosis) -> str:
    lines = ["=== UCM Doctor ===", ""]
    lines.append("store: " + (", ".join(f"{t} {n} blocks" for t, n in diag.store_blocks.items()) or "nothing"))
    for root, f in diag.seeds.items():
        lines.append(f"root {root}: model={f.get('model')} dtype={f.get('dtype')} layout={f.get('kv_layout')} "
                     f"block_size={f.get('block_size')} tp={f.get('tp_size')}")
    lines.append(f"prompt: {diag.tokens} tokens")
    best = diag.best()
    if best:
        root, where = best
        counts = {t: where.count(t) for t in ("host", "ssd", "remote", "none")}
        lines.append(f"blocks under root {root}: {len(where)} full; host {counts['host']}, ssd {counts['ssd']}, "
                     f"remote {counts['remote']}, missing {counts['none']}")
        grid = lambda ws: " ".join(w[0].upper() if w != "none" else "." for w in ws)  # noqa: E731
        lines.append("  " + grid(where) + "   (the tier a load uses: H host, S ssd, R remote, . missing)")
        held = diag.held.get(root, [])
        for tier in ("host", "ssd", "remote"):
            if any(tier in h for h in held):
                row = " ".join(tier[0].upper() if tier in h else "." for h in held)
                lines.append(f"  {row}   held by the {tier} tier" + (" (rank 0)" if len(diag.ranks.get(root, {})) > 1 else ""))
        shards = diag.ranks.get(root, {})
        if len(shards) > 1:
            lines += [f"  rank {k}: {grid(ws)}" for k, ws in shards.items()]
    lines.append("")
    lines += [f"- {x}" for x in diag.reasons] or ["- no reason for a miss found"]
    return "\n".join(lines)
