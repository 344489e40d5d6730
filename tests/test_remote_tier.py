"""The remote tier against real redis-server processes: sharing between stores with separate host tiers,
cluster mode, verification of every load, outages and reconnection, a slow server, bad credentials."""

import logging
import os
import subprocess
import time

import pytest
import redis
import torch

from redis_servers import RedisCluster, RedisServer, redis_bin
from ucm.config import ConfigError, from_dict
from ucm.tiers.remote import HEADER
from ucm.tiers.store import TieredStore

PAGE = 64 << 10


def pages(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = [bytes(torch.randint(0, 256, (16,), generator=g, dtype=torch.uint8).tolist()) for _ in range(n)]
    return ids, torch.randint(0, 256, (n, PAGE), generator=g, dtype=torch.uint8)


def store(tmp_path, name: str, remote: dict, ssd: bool = False) -> TieredStore:
    cfg = {"host": {"capacity": "32MiB", "path": str(tmp_path / f"host-{name}")},
           "remote": {"timeout_ms": 500, "reconnect_max_ms": 200, **remote}}
    if ssd:
        cfg["ssd"] = {"path": str(tmp_path / f"ssd-{name}"), "capacity": "32MiB"}
    return TieredStore(from_dict(cfg, f"<{name}>"), PAGE)


def save(s: TieredStore, ids, src) -> None:
    t = s.dump(ids, 0, src)
    assert s.wait(t) == 0
    s.commit(ids)
    s.flush(timeout=30)


def load(s: TieredStore, ids):
    dst = torch.zeros(len(ids), PAGE, dtype=torch.uint8)
    t = s.load(ids, 0, dst)
    s.wait(t)
    return dst, t.errors


class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())


@pytest.fixture
def remote_log():
    h = Records()
    lg = logging.getLogger("UCM.Remote")
    lg.addHandler(h)
    yield h.lines
    lg.removeHandler(h)


@pytest.fixture
def server(tmp_path):
    s = RedisServer(str(tmp_path))
    yield s
    s.kill()


def test_two_stores_share_pages_through_one_server(tmp_path, server):
    a = store(tmp_path, "a", {"url": server.url})
    b = store(tmp_path, "b", {"url": server.url}, ssd=True)
    ids, src = pages(12)
    save(a, ids, src)
    assert a.remote.stats.written == 12
    assert b.where(ids, remote=False) == ["none"] * 12 and b.lookup_prefix(ids) == 12
    assert b.where(ids) == ["remote"] * 12
    got, errors = load(b, ids)
    assert not errors and torch.equal(got, src)
    assert b.stats.remote_hits == 12
    b.flush(timeout=30)  # a remote hit is promoted into host memory and written through to the SSD
    assert b.where(ids, remote=False) == ["host"] * 12 and b.ssd.lookup(ids) == [True] * 12
    save(b, ids, src)  # the server already has them: nothing is sent again
    assert b.remote.stats.written == 0
    a.close(), b.close()


def test_prefix_lookup_stops_at_the_first_block_the_server_lacks(tmp_path, server):
    a = store(tmp_path, "a", {"url": server.url})
    ids, src = pages(6, seed=1)
    save(a, ids[:3] + ids[4:], torch.cat([src[:3], src[4:]]))
    b = store(tmp_path, "b", {"url": server.url})
    assert b.lookup_prefix(ids) == 3
    a.close(), b.close()


@pytest.mark.parametrize("damage,why", [
    ("flip", "checksum mismatch"),
    ("truncate", "truncated"),
    ("foreign", "not a ucm page"),
    ("swap", "holds another block"),
    ("evict", "not in the remote tier"),
])
def test_every_load_is_verified(tmp_path, server, damage, why):
    a = store(tmp_path, "a", {"url": server.url, "key_prefix": "v:"})
    ids, src = pages(4, seed=2)
    save(a, ids, src)
    key, r = a.remote.key(ids[1]), redis.Redis(port=server.port)  # a client of the test's own
    if damage == "flip":
        at = HEADER.size + 5000
        r.setrange(key, at, bytes([r.getrange(key, at, at)[0] ^ 0x10]))
    elif damage == "truncate":
        r.set(key, r.get(key)[:HEADER.size + 1000])
    elif damage == "foreign":
        r.set(key, b"a value some other program wrote" * 4)
    elif damage == "swap":
        r.set(key, r.get(a.remote.key(ids[2])))
    else:
        r.delete(key)
    b = store(tmp_path, "b", {"url": server.url, "key_prefix": "v:"})
    got, errors = load(b, ids)
    assert set(errors) == {1} and why in errors[1], errors
    for i in (0, 2, 3):
        assert torch.equal(got[i], src[i])
    a.close(), b.close()


def test_key_prefixes_separate_deployments(tmp_path, server):
    a = store(tmp_path, "a", {"url": server.url, "key_prefix": "team-a:"})
    b = store(tmp_path, "b", {"url": server.url, "key_prefix": "team-b:"})
    ids, src = pages(3, seed=3)
    save(a, ids, src)
    assert b.lookup_prefix(ids) == 0
    a.close(), b.close()


def test_outage_degrades_to_misses_and_hits_resume_without_a_restart(tmp_path, remote_log):
    server = RedisServer(str(tmp_path), appendonly=True)
    a = store(tmp_path, "a", {"url": server.url})
    ids, src = pages(8, seed=4)
    save(a, ids[:4], src[:4])
    b = store(tmp_path, "b", {"url": server.url})
    assert b.lookup_prefix(ids[:4]) == 4
    server.kill()
    # the first command to fail marks the tier down; everything after answers at once
    assert b.lookup_prefix(ids[:4]) == 0
    t0 = time.monotonic()
    for _ in range(50):
        assert b.lookup_prefix(ids[:4]) == 0
    got, errors = load(b, ids[:4])
    assert time.monotonic() - t0 < 1.0, "lookups and loads while the server is down must not wait on it"
    assert sorted(errors) == [0, 1, 2, 3] and all("unreachable" in e for e in errors.values())
    save(a, ids[4:], src[4:])  # saves while down are dropped, never block
    assert a.remote.stats.dropped >= 4
    down = [line for line in remote_log if "unreachable" in line]
    assert len(down) == 2, f"one line per state change and store, got {down}"
    server.start()  # appendonly: the server comes back with its data
    deadline = time.monotonic() + 10
    while not b.remote.up and time.monotonic() < deadline:
        time.sleep(0.05)
    assert b.remote.up and any("is back" in line for line in remote_log)
    got, errors = load(b, ids[:4])
    assert not errors and torch.equal(got, src[:4])
    a.close(), b.close()
    server.kill()


def test_a_hung_server_costs_one_timeout_not_one_per_request(tmp_path, server):
    """SIGSTOP: the kernel still accepts connections but nothing answers (a hung or blackholed server)."""
    import signal

    s = store(tmp_path, "a", {"url": server.url, "timeout_ms": 300})
    ids, src = pages(4, seed=10)
    save(s, ids, src)
    b = store(tmp_path, "b", {"url": server.url, "timeout_ms": 300})
    server.proc.send_signal(signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        assert b.lookup_prefix(ids) == 0  # this one waits for the timeout and marks the tier down
        for _ in range(20):
            assert b.lookup_prefix(ids) == 0
        _, errors = load(b, ids)
        took = time.monotonic() - t0
        assert len(errors) == 4 and took < 2.0, f"{took:.1f} s: requests kept waiting on a hung server"
    finally:
        server.proc.send_signal(signal.SIGCONT)
    s.close(), b.close()


def test_unreachable_at_start_is_a_warning_naming_the_key_and_it_connects_later(tmp_path, caplog):
    from redis_servers import free_port

    port = free_port()
    lines = Records()
    logging.getLogger("UCM.Remote").addHandler(lines)
    try:
        s = store(tmp_path, "a", {"url": f"redis://127.0.0.1:{port}/0"})
    finally:
        logging.getLogger("UCM.Remote").removeHandler(lines)
    assert any("'remote.url'" in line and "unreachable at start-up" in line for line in lines.lines), lines.lines
    ids, src = pages(2, seed=5)
    save(s, ids, src)  # works as a host-only cache meanwhile
    got, errors = load(s, ids)
    assert not errors and torch.equal(got, src)
    server = RedisServer(str(tmp_path), port=port)
    deadline = time.monotonic() + 10
    while not s.remote.up and time.monotonic() < deadline:
        time.sleep(0.05)
    assert s.remote.up
    s.close()
    server.kill()


def test_wrong_or_missing_password_is_a_clear_error(tmp_path):
    server = RedisServer(str(tmp_path), password="right-pw")
    with pytest.raises(ConfigError) as ei:
        store(tmp_path, "a", {"url": server.url, "password": "wrong-pw"})
    assert "'remote.password'" in str(ei.value) and "refused" in str(ei.value)
    assert "wrong-pw" not in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        store(tmp_path, "b", {"url": server.url})
    assert "'remote.password'" in str(ei.value) and "requires a password" in str(ei.value)
    s = store(tmp_path, "c", {"url": server.url, "password": "right-pw"})
    assert s.remote.up
    s.close()
    server.kill()


def test_a_slow_server_never_stalls_saves(tmp_path, server):
    s = store(tmp_path, "a", {"url": server.url, "timeout_ms": 5000, "write_queue": "256KiB"})
    busy = subprocess.Popen([redis_bin("redis-cli"), "-p", str(server.port), "debug", "sleep", "3"])
    time.sleep(0.3)
    ids, src = pages(16, seed=6)
    t0 = time.monotonic()
    t = s.dump(ids, 0, src)
    s.wait(t)
    s.commit(ids)
    took = time.monotonic() - t0
    assert took < 1.5, f"a commit waited {took:.1f} s for a busy server"
    assert s.remote.stats.dropped >= 12  # a 256 KiB queue holds 4 pages of 64 KiB
    busy.wait()
    s.close()


def test_server_eviction_is_a_miss_never_wrong_bytes(tmp_path):
    server = RedisServer(str(tmp_path), maxmemory="3mb")
    a = store(tmp_path, "a", {"url": server.url, "batch_size": "256KiB"})
    ids, src = pages(120, seed=7)
    for k in range(0, 120, 20):
        save(a, ids[k:k + 20], src[k:k + 20])
    b = store(tmp_path, "b", {"url": server.url})
    there = b.remote.exists(ids)
    assert 0 < sum(there) < 120, "the server evicts under maxmemory"
    got, errors = load(b, ids)
    for i in range(120):
        if i not in errors:
            assert torch.equal(got[i], src[i])
    assert set(errors) >= {i for i, t in enumerate(there) if not t}
    a.close(), b.close()
    server.kill()


def test_cluster_of_three_masters(tmp_path):
    cluster = RedisCluster(str(tmp_path))
    try:
        a = store(tmp_path, "a", {"url": cluster.urls[:1], "cluster": True})
        ids, src = pages(30, seed=8)
        save(a, ids, src)
        per_node = [int(n.cli("dbsize").strip()) for n in cluster.nodes]
        assert sum(per_node) == 30 and sum(1 for k in per_node if k) >= 2, per_node
        b = store(tmp_path, "b", {"url": cluster.urls, "cluster": True})
        assert b.lookup_prefix(ids) == 30
        got, errors = load(b, ids)
        assert not errors and torch.equal(got, src)
        a.close(), b.close()
    finally:
        cluster.kill()


def test_created_files_are_private(tmp_path, server):
    os.umask(0o022)
    s = store(tmp_path, "a", {"url": server.url}, ssd=True)
    ids, src = pages(3, seed=9)
    save(s, ids, src)
    from ucm.integration.vllm.journal import Journal

    j = Journal(s.storage_path, "worker")
    j.counters({"x": 1}, force=True)
    j.lookup({"first": "00"})
    j.close()
    from ucm.config import make_private_dirs

    make_private_dirs(str(tmp_path / "deep" / "er" / "still"))
    created = [tmp_path / "host-a", tmp_path / "ssd-a", tmp_path / "deep"]
    checked = 0
    for root in created:
        for dirpath, dirnames, filenames in os.walk(root):
            for name in [dirpath] + [os.path.join(dirpath, f) for f in filenames]:
                mode = os.stat(name).st_mode & 0o777
                assert mode & 0o077 == 0, f"{name} has mode {oct(mode)}"
                checked += 1
    assert checked >= 8
    s.close()


def test_ucm_verify_checks_the_remote_tier(tmp_path):
    from redis_servers import free_port
    from ucm.tools.verify import _config_checks

    server = RedisServer(str(tmp_path), password="pw")
    try:
        def check(remote: dict):
            p = tmp_path / "ucm.yaml"
            import yaml

            p.write_text(yaml.safe_dump({"host": {"capacity": "8MiB", "path": str(tmp_path / "h")},
                                         "remote": {"timeout_ms": 300, **remote}}))
            return next(c for c in _config_checks(str(p)) if c.title == "Storage (remote)")
        ok = check({"url": server.url, "password": "pw"})
        assert (ok.status, ok.level) == ("CONNECTED", "ok")
        bad = check({"url": server.url, "password": "nope"})
        assert (bad.status, bad.level) == ("REFUSED", "fail") and "remote.password" in bad.detail
        gone = check({"url": f"redis://127.0.0.1:{free_port()}/0"})
        assert (gone.status, gone.level) == ("UNREACHABLE", "warn")
    finally:
        server.kill()


def test_tls_with_a_ca_file_and_an_untrusted_certificate(tmp_path):
    server = RedisServer(str(tmp_path), tls=True)
    try:
        s = store(tmp_path, "a", {"url": server.url, "tls_ca_file": server.ca_file})
        assert s.remote.up
        ids, src = pages(3, seed=11)
        save(s, ids, src)
        b = store(tmp_path, "b", {"url": server.url, "tls_ca_file": server.ca_file})
        got, errors = load(b, ids)
        assert not errors and torch.equal(got, src)
        s.close(), b.close()
        with pytest.raises(ConfigError) as ei:  # the system's CAs do not know the test CA
            store(tmp_path, "c", {"url": server.url})
        assert "'remote.tls_ca_file'" in str(ei.value) and "not trusted" in str(ei.value)
    finally:
        server.kill()
