"""A step-by-step timeline of the worker's connector calls, for finding where a request's time goes.

Off unless `UNIFIED_CACHE_STEP_TRACE=1` (and the log level is DEBUG): it writes a few lines per engine
step, tagged [UCM.Step]. Each step: when vLLM bound its metadata (ms since the previous step ended on the
CPU), how long start_load_kv took, when the forward pass was launched (wait_for_save), how long
get_finished took (an idle step may wait there for an async load), and, once the GPU has run it, the
pass's GPU time and the GPU time since the last traced pass ended (CUDA events on the compute stream,
never waited for).
"""

from __future__ import annotations

import logging
import os
import time

from ucm.integration.vllm.connector.planner import CudaMarks
from ucm.logger import get_logger

TRACE_ENV = "UNIFIED_CACHE_STEP_TRACE"
log = get_logger("Step")


def trace_enabled() -> bool:
    return os.environ.get(TRACE_ENV, "") not in ("", "0") and log.isEnabledFor(logging.DEBUG)


class StepTrace:
    """Marks of one worker's steps (CPU times in ms; GPU times from events when `gpu`)."""

    MAX_PENDING = 16

    def __init__(self, gpu: bool):
        self.gpu = gpu
        self._marks = CudaMarks() if gpu else None
        self.step = 0
        self._t0 = 0.0  # this step's bind, perf_counter seconds
        self._ended = None  # the previous step's end
        self._pending: list[tuple[int, object, object]] = []  # (step, begin event, end event) not yet run
        self._last_gpu_end = None  # the end event of the last step reported
        self._begin_ev = None  # this step's begin event, until its forward pass is launched

    def begin(self, tokens: int, requests: int, loads: int) -> None:
        self.step += 1
        self._t0 = time.perf_counter()
        gap = "" if self._ended is None else f", {1e3 * (self._t0 - self._ended):.2f} ms after the last one ended"
        self._begin_ev = self._marks.now() if self.gpu and tokens else None
        self._report_gpu()
        log.debug("step %d begins: %d tokens, %d requests, %d with loads%s", self.step, tokens, requests, loads, gap)

    def mark(self, what: str) -> None:
        log.debug("step %d: %s at +%.2f ms", self.step, what, 1e3 * (time.perf_counter() - self._t0))

    def launched(self) -> None:
        """wait_for_save: the forward pass is launched (done on a CPU)."""
        if self._begin_ev is not None:
            self._pending = (self._pending + [(self.step, self._begin_ev, self._marks.now())])[-self.MAX_PENDING:]
            self._begin_ev = None
        self.mark("forward launched")

    def end(self, finished_loads: set[str]) -> None:
        self._ended = time.perf_counter()
        done = f", async loads reported done: {sorted(finished_loads)}" if finished_loads else ""
        log.debug("step %d ends at +%.2f ms%s", self.step, 1e3 * (self._ended - self._t0), done)

    def _report_gpu(self) -> None:
        while self._pending and self._pending[0][2].query():
            step, a, b = self._pending.pop(0)
            since = "" if self._last_gpu_end is None else \
                f", {self._last_gpu_end.elapsed_time(a):.2f} ms after the last traced pass ended there"
            log.debug("step %d ran on the GPU: %.2f ms%s", step, a.elapsed_time(b), since)
            self._last_gpu_end = b
