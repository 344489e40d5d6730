"""Strided copies done by the copy engine in one call each (CUDA's cudaMemcpy2DAsync), which torch
does not expose: `height` rows of `width` bytes, rows `spitch` bytes apart at the source and `dpitch`
bytes apart at the destination. A layer group of a run of host pages is one such copy.

The function is taken from the CUDA runtime library torch itself loaded (found in /proc/self/maps),
so it shares torch's context and streams. `available()` is False where that library is not a shared
object of this process (a CPU build, or a torch linked statically); callers then use a kernel, or
`copy_runs` falls back to torch's copies.
"""

from __future__ import annotations

import ctypes
import functools
from typing import Iterable

import torch

COPY_DEFAULT = 4  # cudaMemcpyDefault: the direction follows from the (unified) addresses


@functools.lru_cache(maxsize=None)
def _memcpy2d():
    try:
        with open("/proc/self/maps") as f:
            paths = sorted({line.split()[-1] for line in f if "/libcudart.so" in line})
    except OSError:
        return None
    if not paths:
        return None
    try:
        fn = ctypes.CDLL(paths[0]).cudaMemcpy2DAsync
    except (OSError, AttributeError):
        return None
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t,
                   ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
    return fn


def available() -> bool:
    """True if `copy_2d` can run (CUDA initialised by torch in this process)."""
    return _memcpy2d() is not None


def copy_2d(dst: int, dpitch: int, src: int, spitch: int, width: int, height: int, stream: int) -> None:
    """Enqueue one strided copy (addresses and sizes in bytes) on `stream` (a cudaStream_t as an int)."""
    rc = _memcpy2d()(dst, dpitch, src, spitch, width, height, COPY_DEFAULT, stream)
    if rc != 0:
        raise RuntimeError(f"cudaMemcpy2DAsync failed with CUDA error {rc} (width {width} B, height {height}, "
                           f"pitches {spitch}/{dpitch} B)")


def copy_runs(dst: torch.Tensor, src: torch.Tensor, runs: Iterable[tuple[int, int, int]], stream=None) -> int:
    """dst[d:d + n] = src[s:s + n] for each run (d, s, n) of rows. `dst`, `src`: 2-D uint8 views of equal
    width whose rows may be strided (e.g. one span of every page). Into a CUDA tensor (`available()`):
    one strided DMA per run, on `stream` (default: the current one), so a pinned source must stay
    pinned until that stream has run them; otherwise torch's copies. Returns the number of copies."""
    if dst.dtype != torch.uint8 or src.dtype != torch.uint8 or dst.shape[1] != src.shape[1]:
        raise TypeError(f"copy_runs takes uint8 rows of one width, got {dst.dtype} x {dst.shape[1]} and "
                        f"{src.dtype} x {src.shape[1]}")
    width, n = dst.shape[1], 0
    if dst.is_cuda and available():
        cuda_stream = (stream or torch.cuda.current_stream(dst.device)).cuda_stream
        dpitch, spitch = dst.stride(0), src.stride(0)
        d0, s0 = dst.data_ptr(), src.data_ptr()
        for d, s, k in runs:
            copy_2d(d0 + d * dpitch, dpitch, s0 + s * spitch, spitch, width, k, cuda_stream)
            n += 1
        return n
    for d, s, k in runs:
        dst[d:d + k].copy_(src[s:s + k], non_blocking=True)
        n += 1
    return n
