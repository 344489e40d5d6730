"""RemoteTier: pages in a Redis or Valkey server (standalone or cluster), shared by every instance that
uses the same server and key prefix.

Each page is one string value under `<key_prefix>p<page_size>:<block id hex>`:

    header (40 B): magic b"UCMR", format u16, 0 u16, payload bytes u32, xxh3-64 of the payload u64,
                   block id (16 B), 4 zero bytes
    payload: the page (`page_size` bytes)

A SET replaces a value atomically, so a reader never sees part of a page; the header's id, length and
checksum are verified on every load, so a foreign, truncated or corrupt value is a load error, never
wrong bytes. Capacity and eviction are the server's (`maxmemory` with `allkeys-lru`).

Nothing here stalls the caller on a slow or absent server:
* writes go through a bounded queue to one writer thread (a full queue drops saves, counted);
* a failed command marks the tier down (one log line); while down, lookups answer "missing" and loads
  fail at once, and a prober thread reconnects with backoff (250 ms doubling to `reconnect_max_ms`),
  logging once when the server is back;
* every command has `timeout_ms`, and the client never retries on its own.
"""

from __future__ import annotations

import re
import struct
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Callable, Sequence
from urllib.parse import urlsplit

from ucm.config import ConfigError, RemoteTierConfig
from ucm.logger import get_logger
from ucm.tiers.slab import TierError, page_checksum

log = get_logger("Remote")

HEADER = struct.Struct("<4sHHIQ16s4x")
MAGIC, FORMAT = b"UCMR", 1
assert HEADER.size == 40


def redact(url: str) -> str:
    """The URL without its password."""
    return re.sub(r"//([^@/:]*)(:[^@/]*)?@", lambda m: f"//{m.group(1)}{':***' if m.group(2) else ''}@", url)


def encode_page(block_id: bytes, page) -> bytearray:
    """Header + page bytes, in one buffer (one copy of the page)."""
    mv = memoryview(page).cast("B")
    out = bytearray(HEADER.size + len(mv))
    HEADER.pack_into(out, 0, MAGIC, FORMAT, 0, len(mv), page_checksum(mv), block_id)
    out[HEADER.size:] = mv
    return out


def decode_page(block_id: bytes, value: bytes | None, page_size: int) -> memoryview:
    """The verified payload of a stored value; raises TierError saying what is wrong with it."""
    if value is None:
        raise TierError(0, "not in the remote tier (evicted by the server)")
    if len(value) < HEADER.size:
        raise TierError(0, f"remote value of {len(value)} B is shorter than its header")
    magic, fmt, _, n, checksum, bid = HEADER.unpack_from(value, 0)
    if magic != MAGIC or fmt != FORMAT:
        raise TierError(0, "remote value is not a ucm page (another program wrote this key?)")
    if bid != block_id:
        raise TierError(0, "remote value holds another block (key collision)")
    payload = memoryview(value)[HEADER.size:]
    if n != page_size or len(payload) != n:
        raise TierError(0, f"remote page holds {len(payload)} B, expected {page_size} B (truncated)")
    if page_checksum(payload) != checksum:
        raise TierError(0, "remote checksum mismatch (corrupt page)")
    return payload


@dataclass
class RemoteStats:
    hits: int = 0  # pages read and verified
    written: int = 0  # pages sent to the server
    skipped: int = 0  # pages the server already had
    dropped: int = 0  # saves not sent: queue full, server down, or page gone from host memory
    errors: int = 0  # failed commands
    outages: int = 0  # times the server became unreachable


class RemoteTier:
    """Lookup, read and background write of pages on a Redis-protocol server."""

    def __init__(self, config: RemoteTierConfig, page_size: int, read_page: Callable[[bytes], bytes | None],
                 source: str = "<config>"):
        """`read_page(block id)`: for a queued write, the value to store (`encode_page` of the page read
        from a local tier), or None when the page is gone (the save is dropped)."""
        try:
            import redis  # noqa: F401
        except ImportError:
            raise ConfigError(source, "remote", "redis", "the remote tier needs redis-py: "
                              "pip install 'ucm-kvcache[remote]'") from None
        self.config, self.page_size, self.source = config, page_size, source
        self.name = "remote"
        self.where = ", ".join(redact(u) for u in config.urls)
        self.prefix = f"{config.key_prefix}p{page_size}:".encode()
        self.stats = RemoteStats()
        self._read_page = read_page
        self._client = None
        self._up = False
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._busy = False  # the writer holds a batch
        self._full_logged = False
        self._closed = False
        self._backoff = 0.25
        try:
            self._connect()
            self._up = True
            log.info("remote tier %s: connected (key prefix %r)", self.where, config.key_prefix)
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - unreachable at start: run without it and keep trying
            self.stats.outages += 1
            log.warning("%s: key 'remote.url': server %s unreachable at start-up (%s); lookups are misses "
                        "until it answers", source, self.where, _why(e))
        self._writer = threading.Thread(target=self._write_loop, name="ucm-remote-w", daemon=True)
        self._writer.start()
        self._prober = threading.Thread(target=self._probe_loop, name="ucm-remote-probe", daemon=True)
        self._prober.start()

    # ---- connection -----------------------------------------------------------------------------
    def _connect(self) -> None:
        """Build a client and PING it; a refused password is a ConfigError naming the key."""
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        c = self.config
        kw = dict(socket_timeout=c.timeout_ms / 1000, socket_connect_timeout=c.timeout_ms / 1000,
                  retry=Retry(NoBackoff(), 0), health_check_interval=0)
        if c.username:
            kw["username"] = c.username
        if c.password:
            kw["password"] = c.password
        if c.tls_ca_file:
            kw["ssl_ca_certs"] = c.tls_ca_file
        if c.tls_cert_file:
            kw["ssl_certfile"] = c.tls_cert_file
        if c.tls_key_file:
            kw["ssl_keyfile"] = c.tls_key_file
        try:
            if c.cluster:
                from redis.cluster import ClusterNode, RedisCluster

                first = urlsplit(c.urls[0])
                if first.password and "password" not in kw:
                    kw["password"] = first.password
                if first.username and "username" not in kw:
                    kw["username"] = first.username
                nodes = [ClusterNode(urlsplit(u).hostname, urlsplit(u).port) for u in c.urls]
                client = RedisCluster(startup_nodes=nodes, ssl=first.scheme == "rediss", **kw)
            else:
                client = redis.Redis.from_url(c.urls[0], **kw)
            client.ping()
        except (redis.exceptions.AuthenticationError, redis.exceptions.ResponseError) as e:
            text = str(e)
            if isinstance(e, redis.exceptions.ResponseError) and not any(
                    w in text for w in ("NOAUTH", "WRONGPASS", "HELLO", "AUTH")):
                raise
            given = bool(c.password or any(urlsplit(u).password for u in c.urls))
            if not given:
                raise ConfigError(self.source, "remote.password", None,
                                  f"server {self.where} requires a password; set remote.password") from None
            raise ConfigError(self.source, "remote.password", "***",
                              f"server {self.where} refused the user/password ({_why(e)})") from None
        except redis.exceptions.ConnectionError as e:
            if "CERTIFICATE_VERIFY_FAILED" in str(e) or "certificate verify failed" in str(e):
                raise ConfigError(self.source, "remote.tls_ca_file", c.tls_ca_file,
                                  f"the certificate of {self.where} is not trusted ({_why(e)})") from None
            raise
        old, self._client = self._client, client
        if old is not None:
            try:
                old.close()
            except Exception:  # noqa: BLE001
                pass

    @property
    def up(self) -> bool:
        return self._up

    def _failed(self, e: Exception, what: str) -> None:
        self.stats.errors += 1
        with self._lock:
            was_up, self._up = self._up, False
            self._cond.notify_all()
        if was_up:
            self.stats.outages += 1
            log.warning("remote tier %s unreachable (%s during %s); lookups are misses and saves are dropped "
                        "until it is back", self.where, _why(e), what)

    def _probe_loop(self) -> None:
        down_since = None
        while not self._closed:
            if self._up:
                down_since, self._backoff = None, 0.25
                with self._lock:
                    self._cond.wait(timeout=1.0)
                continue
            down_since = down_since or time.monotonic()
            time.sleep(self._backoff)
            if self._closed:
                return
            try:
                self._connect()
            except ConfigError as e:
                log.error("remote tier %s: %s", self.where, e)
            except Exception:  # noqa: BLE001 - still down
                self._backoff = min(self._backoff * 2, self.config.reconnect_max_ms / 1000)
                continue
            else:
                with self._lock:
                    self._up = True
                    self._cond.notify_all()
                log.info("remote tier %s is back after %.1f s", self.where, time.monotonic() - down_since)

    def key(self, block_id: bytes) -> bytes:
        return self.prefix + block_id.hex().encode()

    # ---- queries and reads ----------------------------------------------------------------------
    def exists(self, ids: Sequence[bytes]) -> list[bool]:
        """Per id: stored on the server. All False while the server is down (a miss, not an error)."""
        ids = list(ids)
        if not ids or not self._up:
            return [False] * len(ids)
        try:
            pipe = self._client.pipeline(transaction=False)
            for bid in ids:
                pipe.exists(self.key(bid))
            return [bool(n) for n in pipe.execute()]
        except Exception as e:  # noqa: BLE001
            self._failed(e, "lookup")
            return [False] * len(ids)

    def get(self, ids: Sequence[bytes]) -> list[memoryview | TierError]:
        """Per id: the verified page, or a TierError saying why it cannot be served."""
        ids = list(ids)
        if not self._up:
            return [TierError(0, f"remote tier {self.where} unreachable")] * len(ids)
        try:
            pipe = self._client.pipeline(transaction=False)
            for bid in ids:
                pipe.get(self.key(bid))
            values = pipe.execute()
        except Exception as e:  # noqa: BLE001
            self._failed(e, "load")
            return [TierError(0, f"remote tier {self.where} failed during the read: {_why(e)}")] * len(ids)
        out: list = []
        for bid, v in zip(ids, values):
            try:
                out.append(decode_page(bid, v, self.page_size))
                self.stats.hits += 1
            except TierError as e:
                out.append(e)
        return out

    # ---- background writes ----------------------------------------------------------------------
    def submit(self, ids: Sequence[bytes]) -> None:
        """Queue pages for the server; never blocks. Saves beyond `write_queue` bytes, or while the server
        is down, are dropped (counted in stats.dropped)."""
        ids = list(ids)
        if not ids or self._closed:
            return
        with self._lock:
            if not self._up:
                self.stats.dropped += len(ids)
                return
            room = max(0, (self.config.write_queue - self._queued_bytes) // self.page_size)
            take = ids[:room]
            self.stats.dropped += len(ids) - len(take)
            if len(take) < len(ids) and not self._full_logged:
                self._full_logged = True
                log.warning("remote tier %s: write queue full (%d B); dropping saves until it drains",
                            self.where, self.config.write_queue)
            self._queue.extend(take)
            self._queued_bytes += len(take) * self.page_size
            self._cond.notify_all()

    def _next_batch(self) -> list[bytes] | None:
        per = max(1, self.config.batch_bytes // self.page_size)
        with self._lock:
            while not self._queue and not self._closed:
                self._cond.wait()
            if not self._queue:
                return None
            batch = [self._queue.popleft() for _ in range(min(per, len(self._queue)))]
            self._queued_bytes -= len(batch) * self.page_size
            if not self._queue:
                self._full_logged = False
            self._busy = True
            return batch

    def _write_loop(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._write(batch)
            except Exception as e:  # noqa: BLE001 - the writer survives anything
                self.stats.dropped += len(batch)
                self._failed(e, "save")
            finally:
                with self._lock:
                    self._busy = False
                    self._cond.notify_all()

    def _write(self, batch: list[bytes]) -> None:
        if not self._up:
            self.stats.dropped += len(batch)
            return
        pipe = self._client.pipeline(transaction=False)
        for bid in batch:
            pipe.exists(self.key(bid))
        have = pipe.execute()
        pipe = self._client.pipeline(transaction=False)
        sent = 0
        for bid, there in zip(batch, have):
            if there:
                self.stats.skipped += 1
                continue
            value = self._read_page(bid)
            if value is None:
                self.stats.dropped += 1
                continue
            pipe.set(self.key(bid), value)
            sent += 1
        if sent:
            pipe.execute()
            self.stats.written += sent

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued page was sent (or dropped); False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._lock:
            while self._queue or self._busy:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cond.wait(timeout=left if left is not None else 0.5)
        return True

    def pending(self) -> int:
        """Pages queued or being sent."""
        return len(self._queue) + (1 if self._busy else 0)

    def close(self, timeout: float = 10.0) -> None:
        """Send what is queued (up to `timeout` seconds while the server answers), then stop."""
        if self._closed:
            return
        if self._up and not self.flush(timeout):
            log.warning("remote tier %s: %d queued pages not sent at close", self.where, len(self._queue))
        with self._lock:
            self._closed = True
            self.stats.dropped += len(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        self._writer.join(timeout=timeout)
        if self._client is not None:
            try:
                self._client.close()
            except Exception:  # noqa: BLE001
                pass

    def usage(self) -> dict:
        """Keys under this page size's prefix and the server's memory (diagnostics; may take a while on
        a large server: it scans)."""
        out = {"path": self.where, "up": self._up, "queued": self.pending()}
        if not self._up:
            return out
        try:
            n = sum(1 for _ in self._client.scan_iter(match=self.prefix + b"*", count=1000))
            info = self._client.info("memory")
            if isinstance(info, dict) and "used_memory" not in info:  # cluster: per node
                info = {"used_memory": sum(v.get("used_memory", 0) for v in info.values() if isinstance(v, dict)),
                        "maxmemory": sum(v.get("maxmemory", 0) for v in info.values() if isinstance(v, dict))}
            out.update(blocks=n, bytes=n * (self.page_size + HEADER.size), server_used=info.get("used_memory", 0),
                       capacity=info.get("maxmemory", 0))
        except Exception as e:  # noqa: BLE001
            self._failed(e, "usage")
        return out


def _why(e: Exception) -> str:
    text = str(e).strip() or type(e).__name__
    return text if len(text) < 200 else text[:200] + "..."
