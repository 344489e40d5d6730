"""Blend quality and time to first token on the real vLLM CPU build and SmolLM2-135M-Instruct; writes
bench/results/blend.md.

RAG prompts in SmolLM2's chat format: a system line, four documents of real text (256-512 tokens each,
from the repository's real-text corpus) separated by a separator token, and a question whose answer is
a fact planted in one of the documents ("The access code of the <name> archive is <4 digits>."), with
the answer primed ("The access code is"). Every document is first cached alone (one request each);
then each prompt runs once per configuration, in a fresh vLLM process per configuration:

* full prefill: no connector (the reference);
* BlendConnector at recompute ratios 0 (reuse only), 0.05, 0.15 (the default) and 0.30.

Reported per configuration: answer accuracy (the planted code in the first 32 greedy tokens), mean
leading agreement of those 32 tokens with full prefill, KL divergence of the next-token distribution at
the last prompt position from full prefill's (over full prefill's top-20 tokens; a token missing from
the other top-20 gets that list's lowest log-probability minus 1), and time to first token (median
over prompts of four 512-token documents, one request at a time, max_tokens=1).

Run: .venv/bin/python bench/blend.py [--prompts 20] [--ttft-prompts 5]
"""

from __future__ import annotations

import argparse
import datetime
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


def build(n_prompts: int, n_ttft: int, seed: int = 0):
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
        start = 1500 + k * 4000
        pool.append(corpus[start:start + n])
    long_pool = [corpus[2500 + k * 4000:2500 + k * 4000 + 512] for k in range(8)]
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
        prompts.append({"tokens": rag(doc_list, name), "code": code, "ttft": ttft})
    docs += pool + long_pool
    return [d + [SEP] for d in docs], prompts


def run_config(name, docs, prompts, connector):
    quality = [p for p in prompts if not p["ttft"]]
    timed = [p for p in prompts if p["ttft"]]
    phases = [docs] + [[p["tokens"]] for p in quality]
    r = run_vllm(phases, connector=connector, max_tokens=32, logprobs=20, max_num_batched_tokens=4096,
                 kv_cache_bytes=1 << 30, timeout=3000)
    outs = [ph[0] for ph in r["phases"][1:]]
    t = run_vllm([docs] + [[p["tokens"]] for p in timed] * 2, connector=connector, max_tokens=1,
                 max_num_batched_tokens=4096, kv_cache_bytes=1 << 30, timeout=3000)
    ttft = t["seconds"][1 + len(timed):]  # the second pass over the timed prompts (warm process)
    reused = sum(int(x) for x in __import__("re").findall(r"blend: (\d+) tokens of", r["log"]))
    print(f"{name}: done ({reused} tokens reused)", flush=True)
    return outs, ttft, reused


def kl(full: dict, other: dict) -> float:
    floor = min(other.values()) - 1.0
    return sum(math.exp(lp) * (lp - other.get(t, floor)) for t, lp in full.items())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=20)
    ap.add_argument("--ttft-prompts", type=int, default=5)
    ap.add_argument("--ratios", default=",".join(str(r) for r in RATIOS), help="recompute ratios to run")
    ap.add_argument("--chunk-start-tokens", type=int, default=0, help="blend.chunk_start_tokens")
    ap.add_argument("--span", type=int, default=16, help="blend.recompute_span")
    args = ap.parse_args()
    docs, prompts = build(args.prompts, args.ttft_prompts)
    tok = tokenizer()
    configs = [("full prefill", None)] + [(f"blend {round(100 * float(r))}%", float(r)) for r in args.ratios.split(",")]
    results = {}
    for name, ratio in configs:
        conn = None
        if ratio is not None:
            conn = ucm_connector(tempfile.mkdtemp(prefix="ucm-blend-bench-"), name="BlendConnector",
                                 host="2GiB", ssd=None, blend={"separator": SEP, "recompute_ratio": ratio,
                                                               "chunk_start_tokens": args.chunk_start_tokens,
                                                               "recompute_span": args.span})
        results[name] = run_config(name, docs, prompts, conn)
    quality = [p for p in prompts if not p["ttft"]]
    full_outs, full_ttft, _ = results["full prefill"]
    rows = []
    for name, _ in configs:
        outs, ttft, reused = results[name]
        acc = sum(p["code"] in tok.decode(o["tokens"]) for p, o in zip(quality, outs)) / len(quality)
        agree = []
        for o, f in zip(outs, full_outs):
            n = 0
            while n < len(f["tokens"]) and n < len(o["tokens"]) and o["tokens"][n] == f["tokens"][n]:
                n += 1
            agree.append(n)
        kls = [kl(f["first_top"], o["first_top"]) for o, f in zip(outs, full_outs)]
        med = statistics.median(ttft)
        rows.append(f"| {name} | {100 * acc:.0f}% | {statistics.mean(agree):.1f} / 32 | "
                    f"{sum(a == 32 for a in agree)} / {len(agree)} | {statistics.mean(kls):.4f} | {1e3 * med:.0f} | "
                    f"{statistics.median(full_ttft) / med:.2f}x | {reused} |")
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")),
               platform.machine())
    n_tok = statistics.mean(len(p["tokens"]) for p in quality)
    lines = [
        "# Blend quality and time to first token",
        "",
        f"{datetime.date.today()}, {cpu}, {os.cpu_count()} cores; vLLM 0.32 CPU build, SmolLM2-135M-Instruct (bf16), "
        f"block size 32, check layer 1, recompute_span {args.span}, chunk_start_tokens {args.chunk_start_tokens}. "
        f"`.venv/bin/python bench/blend.py --prompts {args.prompts} --ttft-prompts {args.ttft_prompts} --ratios "
        f"{args.ratios} --span {args.span} --chunk-start-tokens {args.chunk_start_tokens}`. {len(quality)} RAG prompts of four real-text documents (256-512 tokens each, "
        f"{n_tok:.0f} prompt tokens on average) with an access code planted in one document; every document was "
        "cached alone first. TTFT: median over "
        f"{args.ttft_prompts} prompts of four 512-token documents (~2,150 tokens), one request at a time in a warm "
        "process; blended prompts load the documents from the host tier.",
        "",
        "| configuration | answer accuracy | agreement with full prefill (first 32 greedy tokens) | all 32 equal | "
        "KL(full ‖ config), next token | TTFT ms | TTFT speed-up | tokens reused |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
        "Accuracy: the planted code appears in the first 32 generated tokens. KL over full prefill's top-20 "
        "next-token log-probabilities at the last prompt position (a token missing from the other "
        "configuration's top-20 gets its lowest log-probability minus 1). `tokens reused` counts the quality "
        "prompts' tokens whose KV came from the cache instead of full computation.",
    ]
    write_results("blend.md", lines)


if __name__ == "__main__":
    main()
