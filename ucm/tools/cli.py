"""`ucm` command line: demo, store-demo, stats, verify, doctor (each tool is a module of ucm.tools)."""

from __future__ import annotations

import argparse
import json
import os
import sys


def _store_demo(args: argparse.Namespace) -> int:
    """Dump, flush, reopen in a fresh store and load back: what each tier holds at each step."""
    import tempfile
    import time

    import torch

    from ucm.config import load_config
    from ucm.hashing import HashSeed, RequestHasher
    from ucm.tiers import TieredStore

    cfg = load_config(args.config)
    root = tempfile.mkdtemp(prefix="ucm-demo-")
    cfg = cfg.replace(host=cfg.host.__class__(capacity=64 << 20, path=os.path.join(root, "host")),
                      ssd=cfg.ssd.__class__(path=os.path.join(root, "ssd"), capacity=256 << 20))
    page = 30 * 3 * 128 * 128 * 2  # SmolLM2-135M, CPU layout, block 128, bf16: bytes per block
    hasher = RequestHasher(HashSeed("SmolLM2-135M-Instruct", "bfloat16", "cpu", 128))
    ids = hasher.generate_block_hashes(list(range(128 * 16)))
    src = torch.randint(0, 256, (len(ids), page), dtype=torch.uint8)
    with TieredStore(cfg, page) as s:
        t0 = time.perf_counter()
        s.wait(s.dump(ids, 0, src))
        s.commit(ids)
        t1 = time.perf_counter()
        s.flush()
        t2 = time.perf_counter()
        print(f"dumped {len(ids)} blocks ({src.numel() / 2**20:.0f} MiB) into host memory in {1e3 * (t1 - t0):.1f} ms, "
              f"flushed to SSD in {1e3 * (t2 - t1):.1f} ms")
        print("tiers:", json.dumps(s.usage(), indent=1))
    cfg2 = cfg.replace(host=cfg.host.__class__(capacity=64 << 20, path=os.path.join(root, "host-fresh")))
    with TieredStore(cfg2, page) as s:
        dst = torch.empty_like(src)
        print(f"fresh store: lookup_prefix = {s.lookup_prefix(ids)} of {len(ids)} blocks; where: {s.where(ids[:3])} ...")
        t0 = time.perf_counter()
        failed = s.wait(s.load(ids, 0, dst))
        t1 = time.perf_counter()
        print(f"loaded from SSD in {1e3 * (t1 - t0):.1f} ms, failed blocks: {failed}, bytes equal: {torch.equal(src, dst)}")
        print(f"after promotion: {s.where(ids[:3])} ...")
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from ucm.config import load_config
    from ucm.tools.doctor import diagnose, report

    if args.tokens:
        tokens = [int(t) for t in args.tokens.replace(" ", "").split(",") if t]
    else:
        if not args.model:
            print("ucm doctor: --text and --text-file need --model (its tokenizer)", file=sys.stderr)
            return 2
        from transformers import AutoTokenizer

        text = args.text if args.text is not None else open(args.text_file, encoding="utf-8").read()
        tokens = AutoTokenizer.from_pretrained(args.model)(text)["input_ids"]
    diag = diagnose(load_config(args.config), tokens, model=args.model, dtype=args.dtype, block_size=args.block_size,
                    tp_size=args.tp, salt=args.salt)
    print(report(diag))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="ucm", description="tiered KV cache for vLLM")
    ap.add_argument("--config", help="YAML file (default: $UCM_CONFIG_FILE or the embedded default)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    demo = sub.add_parser("demo", help="vLLM + the real small model, cold then warm in two processes")
    demo.add_argument("--tokens", type=int, default=2000)
    demo.add_argument("--prompts", type=int, default=2)
    sub.add_parser("store-demo", help="dump, flush and reload blocks through the tiers (no vLLM)")
    st = sub.add_parser("stats", help="blocks and bytes per tier; each process's hits, transfers and errors")
    st.add_argument("--json", action="store_true", help="one JSON object (for scripts)")
    st.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                    help="refresh every SECONDS (default 2) until Ctrl-C, with each process's changes since the last")
    st.add_argument("--count", type=int, help="with --watch: stop after this many refreshes")
    sub.add_parser("verify", help="patches, connector registration, config, storage, hash determinism")
    doc = sub.add_parser("doctor", help="why a prompt does not hit: where each block is, likely reasons")
    src = doc.add_mutually_exclusive_group(required=True)
    src.add_argument("--tokens", help="token ids, comma separated")
    src.add_argument("--text", help="prompt text (tokenized with --model's tokenizer)")
    src.add_argument("--text-file", help="file holding the prompt text")
    doc.add_argument("--model", help="model path or name your vLLM serves (tokenizer, and compared with the store)")
    doc.add_argument("--dtype", help="dtype your vLLM runs, e.g. bfloat16")
    doc.add_argument("--block-size", type=int, help="vLLM block size")
    doc.add_argument("--tp", type=int, help="tensor parallel size")
    doc.add_argument("--salt", help="the cache_salt your requests use")
    args = ap.parse_args(argv)
    if args.cmd == "demo":
        from ucm.tools.demo import main as demo_main

        return demo_main(["--tokens", str(args.tokens), "--prompts", str(args.prompts)])
    if args.cmd == "store-demo":
        return _store_demo(args)
    if args.cmd == "stats":
        from ucm.tools.stats import main as stats_main

        return stats_main(args.config, as_json=args.json, watch=args.watch, count=args.count)
    if args.cmd == "doctor":
        return _doctor(args)
    if args.cmd == "verify":
        from ucm.tools.verify import main as verify_main

        return verify_main(args.config)
    return 2


if __name__ == "__main__":
    sys.exit(main())
