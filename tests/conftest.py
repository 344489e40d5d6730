import multiprocessing as mp
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))

try:  # without a GPU, Triton kernels run in the interpreter (must be set before triton.jit runs)
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:
    pass


@pytest.fixture(scope="session")
def procs():
    """A forkserver context: children start from a process that never ran OpenMP work (fork-safe)."""
    ctx = mp.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "numpy", "ucm.tiers", "storekit"])
    return ctx


def run_child(ctx, target, *args, timeout=120):
    q = ctx.Queue()
    p = ctx.Process(target=target, args=(*args, q))
    p.start()
    import queue
    import time

    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                result = q.get(timeout=0.5)
                break
            except queue.Empty:
                assert p.is_alive(), f"{target.__name__} died with exit code {p.exitcode}"
                assert time.monotonic() < deadline, f"{target.__name__} timed out"
    finally:
        p.join(timeout=30)
    assert p.exitcode == 0, f"{target.__name__} exited with {p.exitcode}"
    return result


def run_children(ctx, target, arg_tuples, timeout=300) -> list:
    """Start one child per argument tuple (each gets a result queue last), all at once; their results."""
    qs, ps = [], []
    for args in arg_tuples:
        q = ctx.Queue()
        p = ctx.Process(target=target, args=(*args, q))
        p.start()
        qs.append(q)
        ps.append(p)
    results = [q.get(timeout=timeout) for q in qs]
    for p in ps:
        p.join(30)
        assert p.exitcode == 0, f"{target.__name__} exited with {p.exitcode}"
    return results
