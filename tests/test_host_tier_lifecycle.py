"""The host tier (shared memory) goes with its last user on every exit path, and a tier left behind is
never served: a normal close, an exit that skips atexit, SIGKILL, vLLM in either process mode, SIGTERM
of an OpenAI-compatible server; a tier whose users all died without cleaning up is dropped by the next
opener rather than served against an SSD tier that no longer has its blocks."""

import os
import shutil
import signal
import tempfile
import time

import pytest

from conftest import run_child
from storekit import PAGE, bid, config, dump_commit, load_check
from ucm.tiers import TieredStore


@pytest.fixture
def shm_root():
    d = tempfile.mkdtemp(prefix="ucm-life-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    yield d
    shutil.rmtree(d, ignore_errors=True)


def _left(root: str) -> list[str]:
    """Files and directories of host tiers under root/host (nothing, once every tier is dropped)."""
    host = os.path.join(root, "host")
    if not os.path.isdir(host):
        return []
    return sorted(os.path.join(dp, x) for dp, dns, fns in os.walk(host) for x in dns + fns)


def _wait_gone(root: str, seconds: float = 15.0) -> list[str]:
    deadline = time.monotonic() + seconds
    while _left(root) and time.monotonic() < deadline:
        time.sleep(0.1)
    return _left(root)


def _hold_tier(root: str, kill_watcher: bool, q) -> None:
    """Child: store blocks in a host tier (no SSD), report, and wait to be killed."""
    store = TieredStore(config(root, ssd=None), PAGE)
    stored = dump_commit(store, [bid(k) for k in range(8)])
    watcher = store.host._reaper
    assert watcher is not None
    if kill_watcher:
        os.kill(watcher, signal.SIGKILL)
        while os.path.exists(f"/proc/{watcher}"):  # not our child: reaped by init
            time.sleep(0.01)
    q.put((os.getpid(), len(stored)))
    time.sleep(600)


def _run_and_kill(procs, root: str, kill_watcher: bool) -> None:
    q = procs.Queue()
    p = procs.Process(target=_hold_tier, args=(root, kill_watcher, q))
    p.start()
    pid, stored = q.get(timeout=120)
    assert stored == 8
    os.kill(pid, signal.SIGKILL)
    p.join(30)


def test_a_normal_close_drops_the_tier_and_its_directories(shm_root):
    """A host-only store: the connector's journal lives in the tier's directory and goes with it."""
    with TieredStore(config(shm_root, ssd=None), PAGE) as s:
        dump_commit(s, [bid(1)])
        os.makedirs(os.path.join(s.storage_path, "journal"))
        open(os.path.join(s.storage_path, "journal", "scheduler-1.json"), "w").write("{}")
        assert _left(shm_root)
    assert _left(shm_root) == []


def test_a_killed_process_leaves_nothing(procs, shm_root):
    _run_and_kill(procs, shm_root, kill_watcher=False)
    assert _wait_gone(shm_root) == [], "the watcher drops the tier of a process killed with SIGKILL"


def test_a_tier_left_by_a_killed_process_is_dropped_by_the_next_opener(procs, shm_root):
    """The process and its watcher were killed: the tier stays until someone opens it. The next opener
    finds no users and drops it, so it serves none of those blocks (here the SSD tier it now runs with is
    empty: serving them would make a cache that cannot be trusted to say what is on the SSD)."""
    _run_and_kill(procs, shm_root, kill_watcher=True)
    assert any(p.endswith("pages.bin") for p in _left(shm_root)), "without its watcher the tier stays"
    with TieredStore(config(shm_root), PAGE) as s:
        assert s.lookup([bid(k) for k in range(8)]) == [False] * 8
        assert dump_commit(s, [bid(100)]) == [bid(100)]
        assert load_check(s, [bid(100)]) == (0, 0)


def _second_user(root: str, q) -> None:
    with TieredStore(config(root, ssd=None), PAGE) as s:
        q.put(s.lookup([bid(7)]))


def test_a_tier_in_use_is_kept_when_another_user_leaves(procs, shm_root):
    with TieredStore(config(shm_root, ssd=None), PAGE) as s:
        dump_commit(s, [bid(7)])
        assert run_child(procs, _second_user, shm_root) == [True]  # it opened, saw the block, closed
        assert s.lookup([bid(7)]) == [True] and load_check(s, [bid(7)]) == (0, 0)


# ---- vLLM ----------------------------------------------------------------------------------------
@pytest.mark.vllm
@pytest.mark.parametrize("mp", [False, True], ids=["single-process", "multiprocessing"])
def test_nothing_of_the_host_tier_is_left_after_vllm_exits(shm_root, mp):
    """vLLM ends without closing ucm's store (os._exit, as its processes do): the tier still goes."""
    from vllm_harness import prompt_tokens, run_vllm, ucm_connector

    r = run_vllm([[prompt_tokens(300, 1000)]], connector=ucm_connector(shm_root, module_path=not mp),
                 multiprocessing=mp, close_store=False)
    assert r["phases"][0][0]["tokens"]
    assert _wait_gone(shm_root) == []


@pytest.mark.vllm
def test_nothing_of_the_host_tier_is_left_after_the_server_gets_sigterm(shm_root):
    """vLLM's OpenAI-compatible server with the connector, one request, then SIGTERM."""
    from serving import Server
    from vllm_harness import prompt_tokens, ucm_connector

    with Server(ucm_connector(shm_root)["extra"], prefix_caching=False) as server:
        server.wait_ready()
        assert server.complete(prompt_tokens(300, 1000)) is not None
        assert _left(shm_root), "the server holds a host tier"
        server.stop()
        tail = server.tail()
    assert _wait_gone(shm_root) == [], tail


def test_a_late_drop_never_removes_a_tier_made_again_meanwhile(shm_root):
    """A watcher that waits for the users lock of a dropped tier, while a new tier is made at the same
    path, must leave the new tier alone (it locked the old lock file, not the new one)."""
    import fcntl
    import threading

    from ucm.tiers.slab import TIER_FILES, USERS_LOCK, drop_if_unused

    d = os.path.join(shm_root, "tier")
    os.makedirs(d)
    lock = os.path.join(d, USERS_LOCK)
    user = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(user, fcntl.LOCK_SH)  # a user of the old tier
    result = []
    late = threading.Thread(target=lambda: result.append(drop_if_unused(d, wait_s=5.0)))
    late.start()
    time.sleep(0.3)  # it opened the old lock file and waits for it
    os.unlink(lock)  # the old tier is dropped by someone else, and a new one made at the same path
    new = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(new, fcntl.LOCK_SH)
    for f in TIER_FILES[:2]:
        open(os.path.join(d, f), "wb").write(b"new tier")
    os.close(user)  # the old tier's last user leaves: the late drop gets its lock
    late.join(timeout=10)
    assert result == [False]
    assert all(os.path.exists(os.path.join(d, f)) for f in TIER_FILES[:2] + (USERS_LOCK,)), os.listdir(d)
    os.close(new)
