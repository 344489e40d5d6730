"""Run the real vLLM (CPU build) on the real small model in this process; print one JSON result line.

Usage: python vllm_runner.py SPEC.json   (SPEC written by vllm_harness.run_vllm)

SPEC: {"model", "connector": null | {"kv_connector", "kv_connector_module_path"?, "extra"},
       "prefix_caching": bool, "dtype", "block_size", "max_tokens", "max_num_batched_tokens"?,
       "phases": [[prompt, ...], ...],   each phase is one llm.generate call (one batch); a prompt is a
                                         list of token ids or {"tokens": [...], "salt"?: cache_salt,
                                         "chunks"?: [[start, end], ...] (BlendConnector boundaries)}
       "hooks"?: {phase index: {"before": shell command, "during": [seconds, shell command]}},
       "close_store"?: false (exit without closing the store, as an exit that skips atexit does),
       "engine"?: {more LLM(...) keyword arguments}, "fault"?: "wrong_slot" (the first whole load of two
                  or more blocks copies its first page into the second block's slot too: a block loaded
                  into the wrong slot, for negative controls) or "layer_copy_fails" (the first layer-group
                  load enqueues its first groups' copies, then its copy engine raises), "blend_unrotated"
                  (reused keys are not rotated to their new positions), "blend_sync_loads" (a GPU's
                  reused KV is in the cache before the forward pass starts) or "blend_slow_stream" (a
                  GPU's reused KV arrives late: its stream sleeps before its copies and before its writes),
       "hold"?: true (after the result line, print UCM-HOLDING and wait for a signal)}
                 "before" runs (and must succeed) before the phase; "during" runs that long after it starts
Result: {"phases": [[{"tokens", "logprobs", "num_cached_tokens", "first_top"}, ...], ...], "seconds": [per phase],
         "metrics": {name{labels}: value}, "phase_metrics": [...per phase external tokens...]}
"""

import json
import os
import subprocess
import sys
import threading
import time


def _metric_values(llm) -> dict:
    out = {}
    for m in llm.get_metrics():
        if not hasattr(m, "value"):
            continue
        labels = ",".join(f"{k}={v}" for k, v in sorted(m.labels.items()) if k in ("source", "tier"))
        out[f"{m.name}{{{labels}}}" if labels else m.name] = m.value
    return out


def _load_into_wrong_slot() -> None:
    """Negative control: the first copy from host pages into the KV cache with two or more blocks also
    writes its first page into its second block (whose own page is lost). Single-process mode only (the
    worker runs in this process). Swapping two whole blocks would not do: attention sums over a
    request's blocks whatever their order, and each key carries its position."""
    from ucm.kernels.transfer import HostTransfer

    original, done = HostTransfer.from_host, []

    def from_host(self, block_ids, pages, slots):
        slots = list(slots)
        if not done and len(slots) >= 2:
            done.append(True)
            slots[1] = slots[0]
        return original(self, block_ids, pages, slots)

    HostTransfer.from_host = from_host


def _layer_copy_fails() -> None:
    """A fault the GPU cannot be made to produce: the first layer-group load (HostTransfer.from_host_groups)
    enqueues the copies of its first half of groups, then raises, as a copy engine failing in the middle
    of a load would. Single-process mode only."""
    from ucm.kernels.transfer import HostTransfer

    original, done = HostTransfer.from_host_groups, []

    def from_host_groups(self, batches, spans):
        if done:
            return original(self, batches, spans)
        done.append(True)
        original(self, batches, spans[:max(1, len(spans) // 2)])
        raise RuntimeError(f"copy engine fault (injected) after {max(1, len(spans) // 2)} of {len(spans)} groups")

    HostTransfer.from_host_groups = from_host_groups


def _blend_unrotated() -> None:
    """Negative control for blending: reused keys stay at the positions they were stored at (no rotation
    to their new ones). Single-process mode only."""
    from ucm.integration.vllm.blend import chunk_kv

    chunk_kv.rerotate = lambda keys, deltas, spec, backend="auto": None


def _blend_sync_loads() -> None:
    """A reference for blending on a GPU: the reused KV is in the cache before the forward pass starts (its
    stream synchronized), instead of arriving beside it. Single-process mode only."""
    from ucm.integration.vllm.blend.chunk_kv import ChunkKV

    original = ChunkKV.start

    def start(self):
        original(self)
        self._write(len(self._pending))  # the writes too, not spread over the first layers
        if self.stream is not None:
            self.stream.synchronize()

    ChunkKV.start = start


def _blend_slow_stream() -> None:
    """The reused KV's stream sleeps about 10 ms before its page copies and before each share of its
    writes (a copy engine or a device busier than here), so a layer that read the cache or the check
    layer's keys without waiting for them would see stale KV. Single-process mode only."""
    import torch

    from ucm.integration.vllm.blend.chunk_kv import ChunkKV

    def late(original):
        def method(self, *args):
            if self.stream is not None:
                with torch.cuda.stream(self.stream):
                    torch.cuda._sleep(20_000_000)  # GPU cycles
            return original(self, *args)

        return method

    ChunkKV._copy, ChunkKV._write = late(ChunkKV._copy), late(ChunkKV._write)


FAULTS = {"wrong_slot": _load_into_wrong_slot, "layer_copy_fails": _layer_copy_fails,
          "blend_unrotated": _blend_unrotated, "blend_sync_loads": _blend_sync_loads,
          "blend_slow_stream": _blend_slow_stream}


def main() -> None:
    spec = json.load(open(sys.argv[1]))
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    kw = dict(model=spec["model"], enforce_eager=True, dtype=spec.get("dtype", "bfloat16"),
              kv_cache_memory_bytes=spec.get("kv_cache_bytes", 256 << 20), max_model_len=spec.get("max_model_len", 4096),
              block_size=spec.get("block_size", 32), enable_prefix_caching=spec["prefix_caching"],
              disable_log_stats=False, seed=0)
    if spec.get("max_num_batched_tokens"):
        kw["max_num_batched_tokens"] = spec["max_num_batched_tokens"]
        kw["enable_chunked_prefill"] = True
    kw.update(spec.get("engine") or {})
    if spec.get("fault"):
        FAULTS[spec["fault"]]()
    c = spec.get("connector")
    if c:
        kw["kv_transfer_config"] = KVTransferConfig(kv_connector=c["kv_connector"], kv_role=c.get("kv_role", "kv_both"),
                                                    kv_connector_module_path=c.get("kv_connector_module_path"),
                                                    kv_connector_extra_config=c.get("extra") or {})
    llm = LLM(**kw)
    params = SamplingParams(max_tokens=spec.get("max_tokens", 8), temperature=0.0, logprobs=spec.get("logprobs", 1),
                            ignore_eos=True)

    def prompt(p):
        if isinstance(p, dict):
            kw = {"cache_salt": p["salt"]} if p.get("salt") else {}
            return TokensPrompt(prompt_token_ids=p["tokens"], **kw)
        return TokensPrompt(prompt_token_ids=p)

    def sampling(p):
        if isinstance(p, dict) and p.get("chunks") is not None:
            return SamplingParams(max_tokens=params.max_tokens, temperature=0.0, logprobs=params.logprobs,
                                  ignore_eos=True, extra_args={"kv_transfer_params": {"ucm_blend_chunks": p["chunks"]}})
        return params

    phases, phase_metrics, seconds = [], [], []
    for k, phase in enumerate(spec["phases"]):
        hook = (spec.get("hooks") or {}).get(str(k), {})
        if hook.get("before"):
            subprocess.run(hook["before"], shell=True, check=True)
        timer = None
        if hook.get("during"):
            delay, cmd = hook["during"]
            timer = threading.Timer(delay, subprocess.run, args=(cmd,), kwargs={"shell": True})
            timer.start()
        before = _metric_values(llm)
        t0 = time.perf_counter()
        outs = llm.generate([prompt(p) for p in phase], [sampling(p) for p in phase], use_tqdm=False)
        seconds.append(time.perf_counter() - t0)
        if timer is not None:
            timer.join()
        res = []
        for o in outs:
            comp = o.outputs[0]
            lps = [float(d[t].logprob) for t, d in zip(comp.token_ids, comp.logprobs)]
            res.append({"tokens": list(comp.token_ids), "logprobs": lps, "num_cached_tokens": o.num_cached_tokens,
                        "first_top": {str(t): float(lp.logprob) for t, lp in comp.logprobs[0].items()}})
        phases.append(res)
        after = _metric_values(llm)
        phase_metrics.append({k: after.get(k, 0) - before.get(k, 0) for k in after})
    print("UCM-RESULT " + json.dumps({"phases": phases, "phase_metrics": phase_metrics, "seconds": seconds,
                                     "metrics": _metric_values(llm)}), flush=True)
    if spec.get("hold"):  # stay up, as a server would, until a signal ends the process
        print("UCM-HOLDING", flush=True)
        while True:
            time.sleep(3600)
    llm.llm_engine.engine_core.shutdown()
    if spec.get("close_store", True):
        from ucm.tiers.store import close_shared

        close_shared()  # os._exit skips atexit: close the store (drops the host tier if this was its last user)
    os._exit(0)  # vLLM's background threads can delay a clean exit; results are printed


if __name__ == "__main__":
    main()
