"""The OpenAI-compatible server with ucm under many concurrent chat clients; writes bench/results/serve_load.md.

Workload: `--clients` threads, each holding multi-turn conversations: one of a few system prompts
(`systems`, as several applications on one server), then `--turns` turns, each turn's prompt the whole history so far (previous prompt, the
model's answer, a new user message), so consecutive turns share all but their tail. vLLM's own KV cache
is small (`--kv-mib`) and so is ucm's host tier (`--host-mib`): both evict all the time, and repeats are
served from ucm's host tier or SSD. Greedy decoding in float32, so a no-connector server given the same
prompts must answer the same text: a sample of the recorded turns is replayed on one at the end.

Every `--every` seconds it records requests/s, TTFT percentiles (streamed, time to the first token),
the share of prompt tokens ucm served (vLLM's `prompt_tokens_by_source`), the server's resident memory
(its process and the engine core under it) and the host tier's memory in /dev/shm. Then the same load
runs on the no-connector server (the peer: vLLM alone with its own prefix cache), for the ratio.

Run: .venv/bin/python bench/serve_load.py [--seconds 180] [--clients 8]
(tests/test_serve_load.py runs `run()` for 25 s in CI and checks its invariants.)
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import random
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from common import write_results  # noqa: E402
from serving import Server  # noqa: E402

VOCAB = (200, 40000)  # token ids drawn for messages (SmolLM2's vocabulary has 49,152)
EXT = ("vllm:prompt_tokens_by_source_total", {"source": "external_kv_transfer"})


@dataclass
class Turn:
    prompt: list[int]
    text: str


@dataclass
class Sample:
    t: float  # seconds since the load started
    done: int
    failed: int
    ttfts: list[float]
    served_share: float  # prompt tokens ucm served / all prompt tokens, since the start
    rss: int  # bytes
    shm: int  # bytes of the host tier in /dev/shm


@dataclass
class LoadResult:
    samples: list[Sample] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    mismatches: list[int] = field(default_factory=list)  # indexes into `turns` of replayed turns that differed
    replayed: int = 0
    seconds: float = 0.0
    config: dict = field(default_factory=dict)


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(*VOCAB) for _ in range(n)]


def _shm_bytes(path: str) -> int:
    """Memory the host tier takes in /dev/shm (allocated blocks of its files)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.stat(os.path.join(root, f)).st_blocks * 512
            except FileNotFoundError:
                pass
    return total


def _client(k: int, server: Server, tokenizer, systems: list[list[int]], turns: int, user_tokens: int,
            answer_tokens: int, stop: threading.Event, out: LoadResult, ttfts: list[float], lock: threading.Lock) -> None:
    rng = random.Random(1000 + k)
    while not stop.is_set():
        history = list(rng.choice(systems))
        for _ in range(turns):
            if stop.is_set():
                return
            prompt = history + _tokens(rng, user_tokens)
            try:
                text, ttft = server.stream(prompt, answer_tokens)
            except Exception as e:  # noqa: BLE001 - every failure is counted and reported
                with lock:
                    out.failures.append(f"{type(e).__name__}: {e}"[:200])
                break
            with lock:
                out.turns.append(Turn(prompt, text))
                ttfts.append(ttft)
            history = prompt + tokenizer(text, add_special_tokens=False)["input_ids"]


def _drive(server: Server, out: LoadResult, tok, systems: list[list[int]], seconds: float, clients: int, turns: int,
           user_tokens: int, answer_tokens: int, every: float, shm: str | None) -> None:
    """The chat load on one server for `seconds`; fills `out` (samples, turns, failures, seconds)."""
    stop, lock, ttfts = threading.Event(), threading.Lock(), []
    threads = [threading.Thread(target=_client, args=(k, server, tok, systems, turns, user_tokens, answer_tokens,
                                                      stop, out, ttfts, lock), daemon=True) for k in range(clients)]
    t0 = time.monotonic()
    for th in threads:
        th.start()
    while True:
        time.sleep(max(0.0, min(every, t0 + seconds - time.monotonic())))
        with lock:
            window, ttfts[:] = list(ttfts), []
            done, failed = len(out.turns), len(out.failures)
        total = server.metric("vllm:prompt_tokens_by_source_total")
        out.samples.append(Sample(time.monotonic() - t0, done, failed, window,
                                  server.metric(EXT[0], **EXT[1]) / total if total else 0.0,
                                  server.rss_bytes(), _shm_bytes(shm) if shm else 0))
        if time.monotonic() >= t0 + seconds:
            break
    stop.set()
    for th in threads:
        th.join(timeout=300)
    out.seconds = time.monotonic() - t0


def run(seconds: float = 180, clients: int = 8, turns: int = 6, systems: int = 4, system_tokens: int = 400,
        user_tokens: int = 120, answer_tokens: int = 16, host_mib: int = 64, kv_mib: int = 100, every: float = 5.0,
        replay: int = 24, root: str | None = None, baseline: bool = False) -> tuple[LoadResult, LoadResult | None]:
    """Drive one ucm server for `seconds`, then replay `replay` recorded turns on a no-connector server;
    with `baseline`, the same load then runs on that server too (vLLM alone, its own prefix cache on)."""
    from vllm_harness import tokenizer as load_tokenizer

    tok = load_tokenizer()
    root = root or tempfile.mkdtemp(prefix="ucm-serve-load-")
    shm = tempfile.mkdtemp(prefix="ucm-serve-load-", dir="/dev/shm")
    extra = {"host": {"capacity": f"{host_mib}MiB", "path": shm},
             "ssd": {"path": os.path.join(root, "ssd"), "capacity": "2GiB"}}
    out = LoadResult(config={"clients": clients, "turns": turns, "systems": systems, "system_tokens": system_tokens,
                             "user_tokens": user_tokens, "answer_tokens": answer_tokens, "host_mib": host_mib,
                             "kv_mib": kv_mib, "seconds": seconds})
    rng = random.Random(7)
    prompts = [_tokens(rng, system_tokens) for _ in range(systems)]
    args = (tok, prompts, seconds, clients, turns, user_tokens, answer_tokens, every)
    base = None
    with Server(extra, dtype="float32", kv_bytes=kv_mib << 20) as server, \
            Server(None, dtype="float32", kv_bytes=kv_mib << 20) as plain:
        server.wait_ready()
        plain.wait_ready()
        _drive(server, out, *args, shm)
        step = max(1, len(out.turns) // max(1, replay))
        for i in range(0, len(out.turns), step)[:replay]:
            if plain.complete(out.turns[i].prompt, answer_tokens) != out.turns[i].text:
                out.mismatches.append(i)
            out.replayed += 1
        if baseline:
            server.stop()
            base = LoadResult(config=out.config)
            _drive(plain, base, *args, None)
    return out, base


def _pct(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _summary(r: LoadResult) -> str:
    ttfts = [x for s in r.samples for x in s.ttfts]
    return (f"{len(r.turns)} requests in {r.seconds:.0f} s ({len(r.turns) / r.seconds:.2f}/s), {len(r.failures)} failed; "
            f"TTFT p50 {1e3 * _pct(ttfts, 0.5):.0f} ms, p90 {1e3 * _pct(ttfts, 0.9):.0f} ms, "
            f"p99 {1e3 * _pct(ttfts, 0.99):.0f} ms")


def table(r: LoadResult, base: LoadResult | None = None) -> list[str]:
    c = r.config
    lines = ["# ucm under a concurrent multi-turn chat load (OpenAI-compatible server)", "",
             f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; vLLM CPU build "
             f"{__import__('vllm').__version__}; SmolLM2-135M shapes (the local test model), float32, block 32; date "
             f"{datetime.date.today()}.",
             f"Command: `.venv/bin/python bench/serve_load.py --seconds {c['seconds']:g} --clients {c['clients']}`",
             f"{c['clients']} clients, conversations of {c['turns']} turns: one of {c['systems']} "
             f"{c['system_tokens']}-token system prompts, {c['user_tokens']} new user tokens and {c['answer_tokens']} generated per turn, each "
             f"prompt the whole history. vLLM's KV cache {c['kv_mib']} MiB, ucm's host tier {c['host_mib']} MiB "
             "(both evict constantly), SSD 2 GiB.", "",
             "| t s | requests/s | TTFT p50 ms | TTFT p95 ms | TTFT p99 ms | prompt tokens served by ucm | "
             "server RSS MiB | host tier in /dev/shm MiB |", "|---|---|---|---|---|---|---|---|"]
    prev_t, prev_done = 0.0, 0
    for s in r.samples:
        rate = (s.done - prev_done) / (s.t - prev_t) if s.t > prev_t else 0.0
        lines.append(f"| {s.t:.0f} | {rate:.2f} | {1e3 * _pct(s.ttfts, 0.5):.0f} | {1e3 * _pct(s.ttfts, 0.95):.0f} | "
                     f"{1e3 * _pct(s.ttfts, 0.99):.0f} | {100 * s.served_share:.1f}% | {s.rss / 2**20:.0f} | "
                     f"{s.shm / 2**20:.1f} |")
        prev_t, prev_done = s.t, s.done
    lines += ["", f"With ucm: {_summary(r)}. {r.replayed} turns replayed on a server without the connector: "
              f"{len(r.mismatches)} answered differently."]
    if base is not None:
        lines.append(f"The same load on that server (vLLM alone, its prefix cache on), right after: {_summary(base)}; "
                     f"ucm's requests/s / vLLM alone: {len(r.turns) / r.seconds / (len(base.turns) / base.seconds):.2f}.")
    if r.failures:
        lines.append(f"First failures: {r.failures[:3]}")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=180)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--every", type=float, default=15.0)
    args = ap.parse_args()
    write_results("serve_load.md", table(*run(args.seconds, args.clients, every=args.every, baseline=True)))


if __name__ == "__main__":
    main()
