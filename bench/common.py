"""Shared by the benchmarks: writing a results table, dropping a file's pages from the page cache."""

from __future__ import annotations

import os

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_results(name: str, lines: list[str]) -> str:
    """Write bench/results/<name> and print it; returns the text."""
    text = "\n".join(lines) + "\n"
    os.makedirs(RESULTS_DIR, exist_ok=True)
    with open(os.path.join(RESULTS_DIR, name), "w") as f:
        f.write(text)
    print(text)
    return text


def drop_page_cache(path: str) -> None:
    """Make later reads of every file under `path` come from the disk (posix_fadvise DONTNEED)."""
    for root, _, files in os.walk(path):
        for f in files:
            fd = os.open(os.path.join(root, f), os.O_RDONLY)
            try:
                os.fdatasync(fd)
            except OSError:
                pass
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            os.close(fd)
