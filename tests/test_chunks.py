"""Chunking of prompts for blending, and the `blend` section of the configuration."""

import pytest

from ucm.chunks import Chunk, from_boundaries, split_by_separator
from ucm.config import ConfigError, from_dict
from ucm.hashing import HashSeed, RequestHasher

S = 9


def test_split_by_separator_drops_separators_and_short_chunks():
    toks = [1, 2, 3, S, 4, 5, S, S, 6, 7, 8, 9 + 1]
    assert split_by_separator(toks, S) == [Chunk(0, 3), Chunk(4, 6), Chunk(8, 12)]
    assert split_by_separator(toks, S, min_tokens=3) == [Chunk(0, 3), Chunk(8, 12)]
    assert split_by_separator([S, S], S) == []


@pytest.mark.parametrize("bad,needle", [
    ("0-10", "list"), ([[0, 5, 7]], "pair"), ([[5, 3]], "inside"), ([[0, 50]], "inside"),
    ([[0, 5], [4, 8]], "overlaps"), ([[0, True]], "pair")])
def test_bad_boundaries_are_named(bad, needle):
    with pytest.raises(ValueError, match=needle):
        from_boundaries(bad, 20)


def test_a_documents_ids_do_not_depend_on_where_it_appears():
    h = RequestHasher(HashSeed("m", "bf16", "l", 4))
    doc = list(range(100, 116))
    alone = h.generate_block_hashes(doc)
    prompt = [1, 2, 3, S] + doc + [S, 7, 7]
    (c,) = [c for c in split_by_separator(prompt, S, min_tokens=5)]
    assert h.generate_block_hashes(prompt[c.start:c.end]) == alone
    assert h.generate_block_hashes(prompt[c.start:c.end], salt="t") != alone


def test_blend_config():
    cfg = from_dict({"host": {"capacity": "8MiB"}, "blend": {"separator": 45596, "recompute_ratio": 0.3}}, "b.yaml")
    assert (cfg.blend.separator, cfg.blend.recompute_ratio, cfg.blend.check_layer, cfg.blend.min_chunk_tokens) == \
        (45596, 0.3, 3, 64)
    for section, key in [({"recompute_ratio": 1.5}, "blend.recompute_ratio"), ({"separator": "###"}, "blend.separator"),
                         ({"check_layer": -1}, "blend.check_layer"), ({"ratio": 0.1}, "blend.ratio")]:
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            from_dict({"host": {"capacity": "8MiB"}, "blend": section}, "b.yaml")


def test_shipped_blend_yaml_loads():
    import os

    from ucm.config import load_config

    cfg = load_config(os.path.join(os.path.dirname(__file__), "..", "configs", "blend.yaml"))
    assert cfg.blend is not None and cfg.blend.recompute_ratio == 0.15
