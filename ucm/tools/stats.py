"""`ucm stats`: what each tier holds (read from the index files, so a stopped store works too, and
nothing is changed), the bandwidths and prefill rate the load planner measured, then each vLLM
process's lookups (with the hit blocks the planner did not load), hit rates, transfer rates and recent errors
from the connector's journal: running processes first, then stopped ones, each by pid, with its start
and last update times. `--json` prints the same as one JSON object."""

from __future__ import annotations

import json
import os
import time

from ucm.config import load_config
from ucm.integration.vllm.journal import read_counters
from ucm.tiers import tier_roots
from ucm.tiers.index import SlotIndex
from ucm.tiers.rates import Rates


def collect(cfg) -> dict:
    """{"tiers": [...], "processes": [...]}: per tier directory its blocks and bytes; per process its
    journal counters, `alive`, sorted running first, then by pid."""
    roots = tier_roots(cfg)
    tiers, journals = [], []
    for r in roots:
        if not os.path.isdir(r.root):
            tiers.append({"tier": r.name, "dir": r.root, "exists": False})
            continue
        for page in r.page_sizes():
            d, slot = r.tier_dir(page), r.slot_size(page)
            if not os.path.exists(os.path.join(d, "index.log")):
                continue
            slots = max(1, r.capacity // slot)  # capacity: whole slots, as the tier itself counts it
            idx = SlotIndex(d, slots, readonly=True)
            tiers.append({"tier": r.name, "dir": d, "exists": True, "page_bytes": page, "blocks": len(idx.entries),
                          "bytes": len(idx.entries) * slot, "capacity_bytes": slots * slot,
                          "unflushed": len(idx.dirty), "being_written": len(idx.reserved)})
            idx.close()
            if r is roots[-1]:
                journals.append(d)
    procs = [rec for d in journals for rec in read_counters(d)]
    procs.sort(key=lambda rec: (not rec["alive"], int(rec.get("pid", 0)), rec["role"]))
    rates = {d: Rates(d).describe() for d in journals}  # what the load planner works from
    return {"tiers": tiers, "processes": procs, "rates": rates}


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t)) if t else "?"


def main(config_path: str | None = None, as_json: bool = False, watch: float | None = None,
         count: int | None = None) -> int:
    cfg = load_config(config_path)
    if watch is None:
        show(collect(cfg), as_json)
        return 0
    before: dict | None = None
    shown = 0
    try:
        while count is None or shown < count:
            if shown:
                time.sleep(watch)
            data = collect(cfg)
            if not as_json and os.isatty(1):
                print("\033[H\033[2J", end="")  # clear the terminal
            if not as_json:
                print(f"ucm stats at {_when(time.time())} (every {watch:g} s; Ctrl-C stops)")
            show(data, as_json, before)
            print(flush=True)
            before, shown = data, shown + 1
    except KeyboardInterrupt:
        pass
    return 0


def _changes(rec: dict, before: dict | None) -> str:
    """'; since the last refresh: +N loaded, +M saved, +K flushed' for a process seen before."""
    if before is None or "connector" not in rec:
        return ""
    old = next((r for r in before["processes"] if r["pid"] == rec["pid"] and r["role"] == rec["role"]), None)
    if old is None or "connector" not in old:
        return ""
    c, o = rec["connector"], old["connector"]
    flushed = rec["store"]["flushed_blocks"] - old["store"]["flushed_blocks"]
    return (f"; since the last refresh: +{c['loaded_blocks'] - o['loaded_blocks']} loaded, "
            f"+{c['saved_blocks'] - o['saved_blocks']} saved, +{flushed} flushed")


def show(data: dict, as_json: bool = False, before: dict | None = None) -> None:
    """Print collect()'s data; `before`: the previous refresh of --watch (changes per process)."""
    if as_json:
        print(json.dumps(data, indent=1, default=str))
        return
    for t in data["tiers"]:
        if not t["exists"]:
            print(f"{t['tier']}: {t['dir']} (empty: directory does not exist)")
            continue
        print(f"{t['tier']}: {t['dir']}: {t['blocks']} blocks of {t['page_bytes']} B ({t['bytes'] / 2**20:.1f} MiB "
              f"of {t['capacity_bytes'] / 2**20:.0f} MiB), {t['unflushed']} not yet flushed, {t['being_written']} "
              "slots being written")
    for d, r in data.get("rates", {}).items():
        tiers = ", ".join(f"{t} {x['GBps']:.3g} GB/s ({x['samples']} loads, {x['age_s']:.0f} s ago)"
                          for t, x in r["tiers"].items()) or "no tier yet"
        prefill = (f"prefill {r['prefill_ms_per_1k_tokens']:.1f} ms per 1,000 tokens" if "prefill_ms_per_1k_tokens" in r
                   else "prefill rate not measured yet")
        print(f"measured for the load planner: {tiers}; {prefill}")
    for rec in data["processes"]:
        state = "RUNNING" if rec["alive"] else "stopped"
        head = (f"{rec['role']} pid {rec['pid']} [{state}, started {_when(rec.get('started'))}, "
                f"updated {_when(rec.get('time'))}]")
        if "lookups" in rec:
            c = rec["lookups"]
            rate = c["ucm_hit_blocks"] / c["blocks"] if c["blocks"] else 0.0
            print(f"{head}: {c['requests']} lookups, {c['blocks']} full blocks, ucm had {c['ucm_hit_blocks']} "
                  f"({100 * rate:.1f}%), vLLM's prefix cache had {c['vllm_hit_blocks']}, {c['loaded_tokens']} tokens loaded")
            skipped = c.get("skipped_blocks") or {}
            if skipped:
                print("  not worth loading (the load planner recomputed them): "
                      + ", ".join(f"{n} {t} hit blocks" for t, n in sorted(skipped.items())))
        if "connector" in rec:
            c, st = rec["connector"], rec["store"]
            load_gbs = c["load_bytes"] / c["load_seconds"] / 1e9 if c["load_seconds"] else 0.0
            save_gbs = c["save_bytes"] / c["save_seconds"] / 1e9 if c["save_seconds"] else 0.0
            print(f"{head}: loaded {c['loaded_blocks']} blocks ({c['host_hit_blocks']} from host, "
                  f"{c['ssd_hit_blocks']} from SSD, {c.get('remote_hit_blocks', 0)} from remote, {load_gbs:.2f} GB/s), "
                  f"{c['load_errors']} load errors; saved {c['saved_blocks']} ({save_gbs:.2f} GB/s), "
                  f"{c['save_failures']} save failures; flushed to SSD {st['flushed_blocks']}, "
                  f"{st['flush_failures']} flush failures{_changes(rec, before)}")
            if st.get("unflushed_evicted"):
                print(f"  the SSD wrote slower than blocks were saved: {st['unflushed_evicted']} blocks left host "
                      "memory for newer ones before they reached the SSD")
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
