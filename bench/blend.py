"""Blend quality and time to first token on the real vLLM (the CPU build here; the GPU build on the GPU
machine, tests/gpu/README.md) and SmolLM2-135M-Instruct; writes bench/results/blend.md (`--out`).

RAG prompts in SmolLM2's chat format: a system line, four documents of real text (256-512 tokens each,
from the repository's real-text corpus) separated by a separator token, and a question whose answer is
a fact planted in one of the documents ("The access code of the <name> archive is <4 digits>."), with
the answer primed ("The access code is"). Every document is first cached alone (one request each;
`--doc-context` puts the prompts' first token or system line before it instead); then all prompts run
as one batch per configuration, in a fresh vLLM process per configuration:

* full prefill: no connector (the reference);
* BlendConnector at recompute ratios 0, 0.05, 0.15 (the default) and 0.30, at check layer 3 (the default:
  layers 0-3 run on every token);
* with `--reuse-only`: check layer 0 and ratio 0, the least recompute blending allows.

Reported per configuration: answer accuracy (the planted code in the first 32 greedy tokens), mean
leading agreement of those 32 tokens with full prefill, KL divergence of the next-token distribution at
the last prompt position from full prefill's (over full prefill's top-20 tokens; a token missing from
the other top-20 gets that list's lowest log-probability minus 1), and time to first token (median
over prompts of four 512-token documents, one request at a time, max_tokens=1).

Run: .venv/bin/python bench/blend.py [--prompts 100] [--ttft-prompts 5] [--reuse-only]  (about 13 minutes)
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import random
import statistics
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))
sys.path.insert(0, HERE)

from common import write_results  # noqa: E402
from vllm_harness import run_vllm, tokenizer, ucm_connector  # noqa: E402

SEP = 45596  # "|||", one token, absent from the corpus
RATIOS = [0.0, 0.05, 0.15, 0.30]
NAMES = ["Amber", "Birch", "Cobalt", "Delta", "Ember", "Falcon", "Garnet", "Harbor", "Indigo", "Juniper", "Kestrel",
         "Lantern", "Meadow", "Nimbus", "Onyx", "Pioneer", "Quartz", "Raven", "Sierra", "Topaz", "Umber", "Vesper",
         "Willow", "Xenon", "Yarrow", "Zephyr"]


HELD_OUT = {"seed": 1, "text_shift": 2000}  # other codes, document draws and text than the tuning set
# a second tuning set (2026-12-03): the first one no longer told selections apart (blend 15% answered as
# well as full prefill there, 82% of it on HELD_OUT); text between the two sets' documents, other codes
TUNE_B = {"seed": 2, "text_shift": 1000}


def build(n_prompts: int, n_ttft: int, doc_context: str = "alone", seed: int = 0, text_shift: int = 0):
    """(documents to cache, prompts). The defaults (ratio, check layer, span) were tuned on seed 0 with
    no text shift; `HELD_OUT` draws prompts from text 2,000 tokens further on, with other codes and
    other document choices, for figures the tuning did not see; `TUNE_B` (1,000 tokens on, seed 2) is
    a second tuning set for selections (bench/results/blend-tune-b.md)."""
    tok = tokenizer()
    from vllm_harness import real_text

    corpus = [t for t in tok(real_text())["input_ids"] if t != SEP]
    rng = random.Random(seed)
    enc = lambda s: [t for t in tok(s, add_special_tokens=False)["input_ids"] if t != SEP]  # noqa: E731
    system = enc("<|im_start|>system\nYou answer questions using the documents.<|im_end|>\n<|im_start|>user\n"
                 "Documents:\n")
    pool = []
    for k in range(10):
        n = rng.randint(256, 512)
        start = 1500 + text_shift + k * 4000
        pool.append(corpus[start:start + n])
    at = 2500 + text_shift
    long_pool = [corpus[at + k * 4000:at + k * 4000 + 512] for k in range(8)]
    docs, prompts = [], []

    def rag(doc_list, name):
        q = enc(f"\nQuestion: What is the access code of the {name} archive? Answer with the code."
                "<|im_end|>\n<|im_start|>assistant\nThe access code is")
        toks = list(system)
        for d in doc_list:
            toks += [SEP] + d
        return toks + [SEP] + q

    def fact_doc(base, name, code):
        fact = enc(f" The access code of the {name} archive is {code}. ")
        at = len(base) // 2
        return base[:at] + fact + base[at:]

    for i in range(n_prompts + n_ttft):
        ttft = i >= n_prompts
        src = long_pool if ttft else pool
        name, code = NAMES[i % len(NAMES)] + ("" if i < len(NAMES) else f"-{i}"), str(rng.randint(1000, 9999))
        others = rng.sample(range(len(src)), 4)
        fd = fact_doc(src[others[0]], name, code)
        if ttft:
            fd = fd[:512]  # four documents of exactly 512 tokens
            if code not in tok.decode(fd):
                fd = fact_doc(src[others[0]][:512 - len(enc(f" The access code of the {name} archive is {code}. "))],
                              name, code)
        doc_list = [fd] + [src[j] for j in others[1:]]
        rng.shuffle(doc_list)
        docs.append(fd)
        prompts.append({"tokens": rag(doc_list, name), "warmup": rag(doc_list[::-1], name), "code": code,
                        "ttft": ttft})
    docs += pool + long_pool
    ctx = {"alone": [], "first": system[:1] + [SEP], "system": system + [SEP]}[doc_context]
    return [ctx + d + [SEP] for d in docs], prompts


def run_config(name, docs, prompts, connector, batched: int = 4096):
    quality = [p for p in prompts if not p["ttft"]]
    timed = [p for p in prompts if p["ttft"]]
    r = run_vllm([docs, [p["tokens"] for p in quality]], connector=connector, max_tokens=32, logprobs=20,
                 max_num_batched_tokens=batched, kv_cache_bytes=1 << 30, timeout=3000)
    outs = r["phases"][1]
    ttft = [math.nan]
    if timed:
        # warm-up: the timed prompts with their documents in reverse order (a repeated prompt would be an
        # exact prefix hit, not a blend); then each timed prompt once, one request at a time
        warm = [[p["warmup"]] for p in timed]
        t = run_vllm([docs] + warm + [[p["tokens"]] for p in timed], connector=connector, max_tokens=1,
                     max_num_batched_tokens=batched, kv_cache_bytes=1 << 30, timeout=3000)
        ttft = t["seconds"][1 + len(timed):]
    reused = sum(int(x) for x in __import__("re").findall(r"blend: (\d+) tokens of", r["log"]))
    print(f"{name}: done ({reused} tokens reused)", flush=True)
    return outs, ttft, reused


def kl(full: dict, other: dict) -> float:
    floor = min(other.values()) - 1.0
    return sum(math.exp(lp) * (lp - other.get(t, floor)) for t, lp in full.items())


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% interval of a proportion k / n."""
    p, d = k / n, 1 + z * z / n
    c, h = (p + z * z / (2 * n)) / d, z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return max(0.0, c - h), min(1.0, c + h)


def sign_test(b: int, c: int) -> float:
    """Two-sided exact p of b wins against c losses on paired prompts (McNemar's exact test)."""
    n = b + c
    return min(1.0, 2 * sum(math.comb(n, k) for k in range(min(b, c) + 1)) / 2 ** n) if n else 1.0


def configurations(args) -> list[tuple[str, float | None, int | None]]:
    """(name, recompute ratio, check layer); "reuse only" recomputes nothing after layer 0."""
    configs = [("full prefill", None, None)] + [(f"blend {round(100 * float(r))}%", float(r), args.check_layer)
                                                for r in args.ratios.split(",")]
    if args.reuse_only:
        configs.append(("reuse only (check layer 0, 0%)", 0.0, 0))
    return configs


def run_all(args, configs, docs, prompts) -> dict:
    results = {}
    key = [args.prompts, args.ttft_prompts, args.max_num_batched_tokens]
    if args.full_cache and os.path.exists(args.full_cache):
        cached = json.load(open(args.full_cache))
        if cached["key"] == key:
            results["full prefill"] = cached["result"]
    for name, ratio, check_layer in configs:
        if name in results:
            continue
        conn = None
        if ratio is not None:
            conn = ucm_connector(tempfile.mkdtemp(prefix="ucm-blend-bench-"), name="BlendConnector",
                                 host="2GiB", ssd=None, blend={"separator": SEP, "recompute_ratio": ratio,
                                                               "chunk_start_tokens": args.chunk_start_tokens,
                                                               "recompute_span": args.span,
                                                               "check_layer": check_layer})
        results[name] = run_config(name, docs, prompts, conn, args.max_num_batched_tokens)
        if ratio is None and args.full_cache:
            json.dump({"key": key, "result": results[name]}, open(args.full_cache, "w"))
    return results


def render(args, configs, prompts, results) -> list[str]:
    tok = tokenizer()
    quality = [p for p in prompts if not p["ttft"]]
    right = {name: [p["code"] in tok.decode(o["tokens"]) for p, o in zip(quality, results[name][0])]
             for name, _, _ in configs}
    full_outs, full_ttft, _ = results["full prefill"]
    rows = []
    for name, _, _ in configs:
        outs, ttft, reused = results[name]
        k, n = sum(right[name]), len(quality)
        lo, hi = wilson(k, n)
        agree = []
        for o, f in zip(outs, full_outs):
            m = 0
            while m < len(f["tokens"]) and m < len(o["tokens"]) and o["tokens"][m] == f["tokens"][m]:
                m += 1
            agree.append(m)
        kls = [kl(f["first_top"], o["first_top"]) for o, f in zip(outs, full_outs)]
        med = statistics.median(ttft)
        rows.append(f"| {name} | {100 * k / n:.0f}% ({100 * lo:.0f}-{100 * hi:.0f}%) | "
                    f"{100 * k / max(1, sum(right['full prefill'])):.0f}% | {statistics.mean(agree):.1f} / 32 | "
                    f"{sum(a == 32 for a in agree)} / {len(agree)} | {statistics.mean(kls):.4f} | {1e3 * med:.0f} | "
                    f"{statistics.median(full_ttft) / med:.2f}x | {reused} |")
    paired = []
    for base in ("full prefill", "blend 0%"):
        for name, ratio, _ in configs:
            if base in right and ratio and name != base:
                b = sum(x and not y for x, y in zip(right[name], right[base]))
                c = sum(y and not x for x, y in zip(right[name], right[base]))
                paired.append(f"{name} answers {b} prompts that {base} misses and misses {c} that it answers "
                              f"(exact sign test p = {sign_test(b, c):.2g})")
    n_tok = statistics.mean(len(p["tokens"]) for p in quality)
    return [
        "# Blend quality and time to first token",
        "",
        f"{args.date}, {args.platform}, SmolLM2-135M-Instruct (bf16), "
        f"block size 32, check layer {args.check_layer}, recompute_span {args.span}, chunk_start_tokens "
        f"{args.chunk_start_tokens}, documents cached behind: {args.doc_context}. "
        f"`.venv/bin/python bench/blend.py --prompts {args.prompts} --ttft-prompts {args.ttft_prompts} --ratios "
        f"{args.ratios} --span {args.span} --chunk-start-tokens {args.chunk_start_tokens} --check-layer "
        f"{args.check_layer} --doc-context {args.doc_context}{' --reuse-only' if args.reuse_only else ''}"
        f"{' --held-out' if getattr(args, 'held_out', False) else ''}{' --tune-b' if getattr(args, 'tune_b', False) else ''} "
        f"--max-num-batched-tokens {args.max_num_batched_tokens} --out {args.out}`. "
        + ("Held-out prompts: other text, codes and document choices than the set the defaults were tuned on "
           "(`HELD_OUT` in bench/blend.py). " if getattr(args, "held_out", False) else
           "The second tuning set (`TUNE_B` in bench/blend.py). " if getattr(args, "tune_b", False) else "Tuning set. ")
        + f"{len(quality)} RAG prompts of four real-text documents (256-512 tokens each, "
        f"{n_tok:.0f} prompt tokens on average) with an access code planted in one document; every document was "
        "cached first, in a request of its own. TTFT: median over "
        f"{args.ttft_prompts} prompts of four 512-token documents (~2,150 tokens), one request at a time in a warm "
        "process; blended prompts load the documents from the host tier.",
        "",
        "| configuration | answer accuracy (95% interval) | of full prefill's | agreement with full prefill (first 32 "
        "greedy tokens) | all 32 equal | KL(full ‖ config), next token | TTFT ms | TTFT speed-up | tokens reused |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Accuracy: the planted code appears in the first 32 generated tokens (Wilson 95% interval). KL over full "
        "prefill's top-20 next-token log-probabilities at the last prompt position (a token missing from the other "
        "configuration's top-20 gets its lowest log-probability minus 1). `tokens reused` counts the quality "
        "prompts' tokens whose KV came from the cache instead of full computation.",
        "",
        *(f"- Paired, same prompts: {line}." for line in paired),
    ]


def platform_line() -> str:
    """Where the configurations ran: the GPU, or the CPU and its cores, and vLLM's build."""
    import torch
    import vllm

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()}; vLLM {vllm.__version__} GPU build (eager, FlashAttention)"
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.machine())
    return f"{cpu}, {os.cpu_count()} cores; vLLM {vllm.__version__} CPU build"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=100)
    ap.add_argument("--ttft-prompts", type=int, default=5)
    ap.add_argument("--ratios", default=",".join(str(r) for r in RATIOS), help="recompute ratios to run")
    ap.add_argument("--chunk-start-tokens", type=int, default=0, help="blend.chunk_start_tokens")
    ap.add_argument("--span", type=int, default=16, help="blend.recompute_span")
    ap.add_argument("--doc-context", choices=["alone", "first", "system"], default="alone",
                    help="what precedes a document in the request that caches it: nothing, the prompts' first "
                         "token, or their whole system line")
    ap.add_argument("--check-layer", type=int, default=3, help="blend.check_layer")
    ap.add_argument("--reuse-only", action="store_true", help="add a configuration that recomputes nothing after "
                                                               "layer 0 (check layer 0, ratio 0)")
    ap.add_argument("--full-cache", default="", help="JSON file: reuse full prefill's results from an earlier run "
                                                     "with the same prompts (written if absent)")
    ap.add_argument("--max-num-batched-tokens", type=int, default=4096,
                    help="vLLM's prefill step size; below the prompt length, prompts are prefilled in several steps")
    ap.add_argument("--held-out", action="store_true", help="the prompts the defaults were not tuned on (HELD_OUT)")
    ap.add_argument("--tune-b", action="store_true", help="the second tuning set (TUNE_B)")
    ap.add_argument("--out", default="blend.md", help="results file in bench/results/")
    ap.add_argument("--dump", default="", help="JSON file: write the arguments and every configuration's outputs")
    ap.add_argument("--from-dump", default="", help="JSON file from --dump: write the table again, run nothing")
    args = ap.parse_args()
    if args.from_dump:
        d = json.load(open(args.from_dump))
        args = argparse.Namespace(**{"platform": "vLLM 0.32 CPU build", **vars(ap.parse_args([])), **d["args"]})
        results = d["results"]
    else:
        args.date, args.platform = str(datetime.date.today()), platform_line()
        results = None
    docs, prompts = build(args.prompts, args.ttft_prompts, args.doc_context,
                          **(HELD_OUT if getattr(args, "held_out", False) else
                             TUNE_B if getattr(args, "tune_b", False) else {}))
    configs = configurations(args)
    if results is None:
        results = run_all(args, configs, docs, prompts)
        if args.dump:
            json.dump({"args": vars(args), "results": results}, open(args.dump, "w"))
    write_results(args.out, render(args, configs, prompts, results))


if __name__ == "__main__":
    main()
