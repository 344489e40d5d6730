"""Strided copies done by the copy engine in one call each (CUDA's cudaMemcpy2DAsync), which torch
does not expose: `height` rows of `width` bytes, rows `spitch` bytes apart at the source and `dpitch`
bytes apart at the destination. A layer group of a run of host pages is one such copy.

The function is taken from the CUDA runtime library torch itself loaded (found in /proc/self/maps),
so it shares torch's context and streams. `available()` is False where that library is not a shared
object of this process (a CPU build, or a torch linked statically); callers then use a kernel.
"""

from __future__ import annotations

import ctypes
import functools

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
