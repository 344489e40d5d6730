"""Saves of newly full blocks, and the bookkeeping that keeps a request's blocks until they are saved.

Two ways to run a save, chosen once when the KV cache is registered:

* `gpu=True`: on a background thread and a high-priority CUDA stream, after an event that marks the end
  of the step's forward pass; the forward pass of the next step runs meanwhile.
* `gpu=False` (vLLM's CPU backend): inline, between steps. There is no copy engine, and a copy thread
  competes with the forward pass's OpenMP threads (a descheduled thread stalls every barrier), so the
  copy into the host tier runs in `wait_for_save`; only the SSD write-through stays in the background.

A request whose saves are in flight keeps its blocks: `finished()` reports it only once they are done.
`fence()` waits for the saves of preempted requests before their blocks can be reused.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable

from ucm.tiers.flush import background_priority

SaveJob = Callable[[object], None]  # job(stream): copies and commits one step's blocks; never raises


class Saves:
    def __init__(self, gpu: bool):
        self.gpu = gpu
        self._cv = threading.Condition()
        self._pending: dict[str, int] = {}  # req id -> saves not yet finished
        self._had_saves: set[str] = set()
        self._finished: set[str] = set()
        self._q: queue.Queue | None = None
        self._thread: threading.Thread | None = None
        self.stream = None
        if gpu:
            import torch

            self.stream = torch.cuda.Stream(priority=-1)
            self._q = queue.Queue()
            self._thread = threading.Thread(target=self._loop, name="ucm-save", daemon=True)
            self._thread.start()

    def step_event(self):
        """An event at the end of this step's forward pass (GPU), which the save kernels wait for."""
        if not self.gpu:
            return None
        import torch

        event = torch.cuda.Event()
        event.record()
        return event

    def submit(self, req_ids: list[str], job: SaveJob, event) -> None:
        """Run `job` (the saves of these requests in one step) after `event`."""
        with self._cv:
            for r in req_ids:
                self._pending[r] = self._pending.get(r, 0) + 1
                self._had_saves.add(r)
        if self._q is not None:
            self._q.put((req_ids, job, event))
        else:
            self._run(req_ids, job, None)

    def _run(self, req_ids: list[str], job: SaveJob, event) -> None:
        try:
            if event is not None:
                import torch

                with torch.cuda.stream(self.stream):
                    self.stream.wait_event(event)
                    job(self.stream)
            else:
                job(None)
        finally:
            with self._cv:
                for r in req_ids:
                    self._pending[r] -= 1
                self._cv.notify_all()

    def _loop(self) -> None:
        background_priority()
        while True:
            item = self._q.get()
            if item is None:
                return
            self._run(*item)

    def fence(self, req_ids) -> None:
        """Wait until the saves of these requests finished (their blocks may be reused next)."""
        with self._cv:
            self._cv.wait_for(lambda: all(self._pending.get(r, 0) == 0 for r in req_ids))

    def finished(self, finished_req_ids: set[str]) -> set[str]:
        """Of the requests vLLM finished (now or before), those with saves whose saves are all done."""
        with self._cv:
            self._finished |= {r for r in finished_req_ids if r in self._had_saves}
            done = {r for r in self._finished if self._pending.get(r, 0) == 0}
            self._finished -= done
            for r in done:
                self._had_saves.discard(r)
                self._pending.pop(r, None)
        return done

    def close(self, timeout: float = 60) -> None:
        if self._q is not None:
            self._q.put(None)
            self._thread.join(timeout=timeout)
