"""vLLM's OpenAI-compatible server (`python -m vllm.entrypoints.openai.api_server`, docs/serving.md) with
ucm's connector, for tests: start, complete, read /metrics, stop with SIGTERM."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from vllm_harness import model_path, omp_core


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """One server process; `extra`: the connector's kv_connector_extra_config (None: no connector);
    `kv_bytes`: vLLM's own KV cache."""

    def __init__(self, extra: dict | None, *, prefix_caching: bool = True, dtype: str = "bfloat16",
                 kv_bytes: int = 256 << 20):
        self.port = free_port()
        cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_path(),
               "--port", str(self.port), "--host", "127.0.0.1", "--block-size", "32", "--enforce-eager",
               "--max-model-len", "2048", "--dtype", dtype, "--kv-cache-memory-bytes", str(kv_bytes)]
        if extra is not None:
            ktc = {"kv_connector": "UCMConnector", "kv_role": "kv_both", "kv_connector_extra_config": extra}
            cmd += ["--kv-transfer-config", json.dumps(ktc)]
        if not prefix_caching:
            cmd.append("--no-enable-prefix-caching")
        env = dict(os.environ, VLLM_CPU_OMP_THREADS_BIND=omp_core(), VLLM_LOGGING_LEVEL="WARNING")
        self.log = tempfile.TemporaryFile("w+")  # the server's output, for failure messages
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT, env=env)

    def wait_ready(self, timeout: float = 300) -> "Server":
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc.poll() is None, f"the server died at start-up:\n{self.tail()}"
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return self
            except OSError:
                assert time.monotonic() < deadline, f"the server did not come up:\n{self.tail()}"
                time.sleep(1)

    def complete(self, prompt: list[int], max_tokens: int = 4) -> str:
        body = json.dumps({"model": model_path(), "prompt": prompt, "max_tokens": max_tokens,
                           "temperature": 0.0}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        return json.loads(urllib.request.urlopen(req, timeout=300).read())["choices"][0]["text"]

    def stream(self, prompt: list[int], max_tokens: int) -> tuple[str, float]:
        """(text, seconds to the first streamed token) of a greedy completion."""
        body = json.dumps({"model": model_path(), "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0,
                           "stream": True}).encode()
        req = urllib.request.Request(f"http://127.0.0.1:{self.port}/v1/completions", body,
                                     {"Content-Type": "application/json"})
        t0, first, text = time.perf_counter(), None, []
        with urllib.request.urlopen(req, timeout=300) as resp:
            for line in resp:
                line = line.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])["choices"][0]["text"]
                if first is None and chunk:
                    first = time.perf_counter() - t0
                text.append(chunk)
        return "".join(text), first if first is not None else time.perf_counter() - t0

    def rss_bytes(self) -> int:
        """Resident memory of the server and every process under it (vLLM's engine core)."""
        total, todo = 0, [self.proc.pid]
        while todo:
            pid = todo.pop()
            try:
                with open(f"/proc/{pid}/status") as f:
                    total += next(int(l.split()[1]) for l in f if l.startswith("VmRSS:")) * 1024
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo += [int(c) for c in f.read().split()]
            except (OSError, StopIteration):
                continue
        return total

    def metric(self, name: str, **labels: str) -> float:
        """Sum of the /metrics samples called `name` whose labels include `labels`."""
        text = urllib.request.urlopen(f"http://127.0.0.1:{self.port}/metrics", timeout=30).read().decode()
        total = 0.0
        for m in re.finditer(r"^([\w:]+)(?:\{([^}]*)\})? (\S+)$", text, re.M):
            if m.group(1) != name:
                continue
            got = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            if all(got.get(k) == v for k, v in labels.items()):
                total += float(m.group(3))
        return total

    def stop(self, timeout: float = 120) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def tail(self, n: int = 4000) -> str:
        self.log.seek(0)
        return self.log.read()[-n:]

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
        self.log.close()
