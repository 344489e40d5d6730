"""`ucm stats`: what each tier holds (read from the index files, so a stopped store works too, and
nothing is changed), then each vLLM process's lookups, hit rates, transfer rates and recent errors
from the connector's journal."""

from __future__ import annotations

import os

from ucm.config import load_config
from ucm.integration.vllm.journal import read_counters
from ucm.tiers import tier_roots
from ucm.tiers.index import SlotIndex


def main(config_path: str | None = None) -> int:
    """Blocks, bytes and capacity per tier (from the index files, so a stopped store works too), then
    each vLLM process's hit rates, transfer rates and recent errors from the connector's journal."""
    cfg = load_config(config_path)
    roots = tier_roots(cfg)
    journals = []
    for r in roots:
        if not os.path.isdir(r.root):
            print(f"{r.name}: {r.root} (empty: directory does not exist)")
            continue
        for page in r.page_sizes():
            d, slot = r.tier_dir(page), r.slot_size(page)
            if not os.path.exists(os.path.join(d, "index.log")):
                continue
            idx = SlotIndex(d, max(1, r.capacity // slot), readonly=True)
            print(f"{r.name}: {d}: {len(idx.entries)} blocks of {page} B ({len(idx.entries) * slot / 2**20:.1f} MiB "
                  f"of {r.capacity / 2**20:.0f} MiB), {len(idx.dirty)} not yet flushed, {len(idx.reserved)} slots "
                  "being written")
            idx.close()
            if r is roots[-1]:
                journals.append(d)
    for d in journals:
        for rec in read_counters(d):
            state = "running" if rec["alive"] else "stopped"
            if "lookups" in rec:
                c = rec["lookups"]
                rate = c["ucm_hit_blocks"] / c["blocks"] if c["blocks"] else 0.0
                print(f"{rec['role']} pid {rec['pid']} ({state}): {c['requests']} lookups, {c['blocks']} full blocks, "
                      f"ucm had {c['ucm_hit_blocks']} ({100 * rate:.1f}%), vLLM's prefix cache had "
                      f"{c['vllm_hit_blocks']}, {c['loaded_tokens']} tokens loaded")
            if "connector" in rec:
                c, st = rec["connector"], rec["store"]
                load_gbs = c["load_bytes"] / c["load_seconds"] / 1e9 if c["load_seconds"] else 0.0
                save_gbs = c["save_bytes"] / c["save_seconds"] / 1e9 if c["save_seconds"] else 0.0
                print(f"{rec['role']} pid {rec['pid']} ({state}): loaded {c['loaded_blocks']} blocks "
                      f"({c['host_hit_blocks']} from host, {c['ssd_hit_blocks']} from SSD, "
                      f"{c.get('remote_hit_blocks', 0)} from remote, {load_gbs:.2f} GB/s), "
                      f"{c['load_errors']} load errors; saved {c['saved_blocks']} ({save_gbs:.2f} GB/s), "
                      f"{c['save_failures']} save failures; flushed to SSD {st['flushed_blocks']}, "
                      f"{st['flush_failures']} flush failures")
                if c.get("blend_reused_tokens"):
                    print(f"  blend: {c['blend_reused_tokens']} tokens reused at new positions (not a prefix), "
                          f"{c.get('blend_recomputed_tokens', 0)} of them recomputed after the check layer")
                r = rec.get("remote")
                if r:
                    print(f"  remote tier {r['server']} ({'up' if r['up'] else 'DOWN'}): {c.get('remote_hit_blocks', 0)} "
                          f"blocks loaded from it, {r['written']} pages sent, {r['skipped']} already there, "
                          f"{r['dropped']} saves dropped, {r['outages']} outages")
                for e in rec.get("recent_errors", [])[-5:]:
                    print(f"  recent error: {e['op']}: {e['why']}")
    return 0
