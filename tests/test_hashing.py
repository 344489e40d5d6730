"""Block ids: chained, full blocks only, seeded by everything that changes KV bytes, process-independent."""

import subprocess
import sys

import xxhash

from ucm.hashing import FORMAT_VERSION, HashSeed, RequestHasher

SEED = HashSeed(model="SmolLM2-135M", dtype="bfloat16", kv_layout="cpu", block_size=4)


def test_chain_definition_and_full_blocks_only():
    h = RequestHasher(SEED)
    ids = h.generate_block_hashes(list(range(10)), 4)
    assert len(ids) == 2 and all(len(i) == 16 for i in ids)
    tok = lambda xs: b"".join(x.to_bytes(4, "little") for x in xs)
    assert ids[0] == xxhash.xxh3_128_digest(SEED.root() + tok(range(4)))
    assert ids[1] == xxhash.xxh3_128_digest(ids[0] + tok(range(4, 8)))
    assert h.generate_block_hashes([1, 2, 3], 4) == []


def test_prefix_property_and_divergence():
    h = RequestHasher(SEED)
    a = h.generate_block_hashes(list(range(16)))
    b = h.generate_block_hashes(list(range(8)) + [99] * 8)
    assert a[:2] == b[:2] and a[2] != b[2] and a[3] != b[3]


def test_every_seed_field_changes_ids():
    base = RequestHasher(SEED).generate_block_hashes(list(range(8)))
    for change in [dict(model="other"), dict(dtype="float16"), dict(kv_layout="gpu"), dict(tp_size=2),
                   dict(tp_rank=1), dict(extra="pp1"), dict(format_version=FORMAT_VERSION + 1)]:
        seed = HashSeed(**{**SEED.__dict__, **change})
        assert RequestHasher(seed).generate_block_hashes(list(range(8))) != base, change
    assert RequestHasher(SEED).generate_block_hashes(list(range(8)), 2)[0] != base[0]


def test_salt_isolates_and_extras_enter_the_chain():
    h = RequestHasher(SEED)
    plain = h.generate_block_hashes(list(range(8)))
    assert h.generate_block_hashes(list(range(8)), salt="tenant-a") != plain
    assert h.generate_block_hashes(list(range(8)), salt="tenant-a") == h.generate_block_hashes(list(range(8)), salt="tenant-a")
    assert h.generate_block_hashes(list(range(8)), salt="tenant-a") != h.generate_block_hashes(list(range(8)), salt="tenant-b")
    mm = h.generate_block_hashes(list(range(8)), block_extras={1: b"image-hash"})
    assert mm[0] == plain[0] and mm[1] != plain[1]


def test_same_ids_in_other_processes_whatever_the_hash_seed():
    code = ("from ucm.hashing import HashSeed, RequestHasher;"
            "h = RequestHasher(HashSeed('SmolLM2-135M', 'bfloat16', 'cpu', 4));"
            "print(b''.join(h.generate_block_hashes(list(range(40)), salt='s')).hex())")
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           env={"PYTHONHASHSEED": seed, "PATH": "/usr/bin"}).stdout for seed in ("0", "1", "12345")}
    here = b"".join(RequestHasher(SEED).generate_block_hashes(list(range(40)), salt="s")).hex()
    assert outs == {here + "\n"}
