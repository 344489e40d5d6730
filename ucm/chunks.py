"""Chunks of a prompt for blending: the documents whose KV may be reused wherever they appear.

A chunk is a run of tokens [start, end). Chunks come from a separator token (each maximal run of
tokens between separators; the separators themselves belong to no chunk) or from explicit boundaries
a request passes. Chunks shorter than `min_tokens` are dropped (computed, never looked up). A chunk's
block ids restart from the root seed (`RequestHasher.generate_block_hashes(tokens[start:end])`), so a
document cached alone is found inside any later prompt; only its full blocks have ids.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence


@dataclass(frozen=True)
class Chunk:
    start: int  # first token (position in the prompt)
    end: int  # one past the last token

    @property
    def tokens(self) -> int:
        return self.end - self.start


def split_by_separator(tokens: Sequence[int], separator: int, min_tokens: int = 1) -> list[Chunk]:
    """Maximal runs of non-separator tokens with at least `min_tokens` tokens."""
    out, start = [], 0
    for i, t in enumerate(list(tokens) + [separator]):
        if t == separator:
            if i - start >= min_tokens:
                out.append(Chunk(start, i))
            start = i + 1
    return out


def from_boundaries(boundaries, n_tokens: int, min_tokens: int = 1) -> list[Chunk]:
    """Chunks from [[start, end], ...]; raises ValueError naming a bad pair (out of range, reversed or
    overlapping)."""
    if not isinstance(boundaries, (list, tuple)):
        raise ValueError(f"chunk boundaries must be a list of [start, end] pairs, got {boundaries!r}")
    out: list[Chunk] = []
    last = 0
    for k, pair in enumerate(boundaries):
        if (not isinstance(pair, (list, tuple)) or len(pair) != 2
                or not all(isinstance(x, int) and not isinstance(x, bool) for x in pair)):
            raise ValueError(f"chunk {k}: {pair!r} is not a [start, end] pair of token positions")
        a, b = pair
        if not 0 <= a < b <= n_tokens:
            raise ValueError(f"chunk {k}: [{a}, {b}) is not inside the prompt's {n_tokens} tokens")
        if a < last:
            raise ValueError(f"chunk {k}: [{a}, {b}) overlaps the previous chunk or is out of order")
        last = b
        if b - a >= min_tokens:
            out.append(Chunk(a, b))
    return out
