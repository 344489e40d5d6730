"""YAML configuration -> typed, frozen dataclasses.

Every error is a `ConfigError` naming the file, the dotted key and the bad value. Unknown keys are
errors. Sizes are strings with a unit (`4GiB`, `512MiB`, `4096B`); paths expand `~`, `$VAR`,
`${VAR}` and `${VAR:-default}`.

Which file: an explicit path, else `$UCM_CONFIG_FILE`, else the embedded `configs/ucm_config.yaml`.
"""

from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import yaml

CONFIG_ENV = "UCM_CONFIG_FILE"
EMBEDDED_CONFIG = Path(__file__).parent / "configs" / "ucm_config.yaml"  # ucm/configs -> ../configs

WRITE_POLICIES = ("write_through", "write_back")
SSD_WRITERS = ("process", "thread")
GPU_TRANSFER_MODES = ("staged", "direct")
LOAD_MODES = ("auto", "sync", "async")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names file, key and value."""

    def __init__(self, source: str, key: str, value: Any, problem: str):
        self.source, self.key, self.value, self.problem = source, key, value, problem
        super().__init__(f"{source}: key '{key}': {problem} (got {value!r})")


@dataclass(frozen=True)
class HostTierConfig:
    capacity: int  # bytes
    path: str  # directory of the shared-memory tier, or "auto"
    keep_after_exit: bool = False
    staging: bool = False  # no `host` section: a small area that only stages pages for the lower tiers


STAGING_CAPACITY = 256 << 20  # bytes of host memory staging pages when the YAML has no `host` section


@dataclass(frozen=True)
class RemoteTierConfig:
    """A Redis/Valkey server (or cluster) shared by every instance using the same `key_prefix`."""

    urls: tuple[str, ...]  # redis://, rediss:// (TLS) or unix:// ; a cluster takes one or more seed nodes
    cluster: bool = False
    key_prefix: str = "ucm:"
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never logged
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    timeout_ms: int = 1000  # per command; a slower server counts as unreachable
    reconnect_max_ms: int = 10000  # longest wait between reconnection attempts (backoff from 250 ms)
    write_queue: int = 256 << 20  # bytes of pages waiting to be sent; beyond it, saves to the server are dropped
    batch_bytes: int = 16 << 20  # bytes of pages per pipelined round trip


@dataclass(frozen=True)
class SSDTierConfig:
    path: str
    capacity: int  # bytes
    slab_size: int = 1 << 30  # bytes per slab file
    direct_io: bool = True
    fsync: bool = False
    writer: str = "process"  # who writes committed pages to the SSD: a helper process, or threads here


@dataclass(frozen=True)
class TransferConfig:
    """How blocks move between a GPU KV cache and host pages (see ucm/kernels/transfer.py)."""

    gpu_mode: str = "staged"  # staged: kernel into a GPU ring + DMA; direct: kernel writes host memory (UVA)
    direct_programs: int = 8  # persistent grid of the direct kernel (SMs it may occupy)
    layerwise_load: bool = True  # loads arrive layer by layer during the forward pass (GPU: host copies; CPU: SSD reads)
    layer_read_bytes: int = 512 << 10  # bytes of a page per read of a layer-wise load (first group: one layer)
    # sync: a request's hits load in the step that computes it (a failed load is recomputed by vLLM after
    # that step); async: before it is scheduled (vLLM's WAITING_FOR_REMOTE_KVS); auto: async where vLLM
    # cannot recompute correctly after a sync load error (versions.load_error_recovery)
    load_mode: str = "auto"
    load_planner: bool = True  # load only the leading hits that make the first token come sooner (planner.py)


@dataclass(frozen=True)
class BlendConfig:
    """CacheBlend reuse of documents that are not a prefix (ucm/integration/vllm/blend_connector.py)."""

    separator: int | None = None  # token id that ends a chunk (a document); None: boundaries per request only
    recompute_ratio: float = 0.15  # share of reused tokens recomputed: those whose keys deviate most
    check_layer: int = 3  # layers up to this one are computed for every token; the selection is made here
    min_chunk_tokens: int = 64  # shorter chunks are computed, not looked up
    chunk_start_tokens: int = 0  # the first tokens of every reused chunk are recomputed regardless
    recompute_span: int = 16  # tokens selected together (runs that the attention kernel takes as blocks)


@dataclass(frozen=True)
class UCMConfig:
    host: HostTierConfig | None
    ssd: SSDTierConfig | None
    write_policy: str = "write_through"
    io_threads: int = 4
    transfer: TransferConfig = TransferConfig()
    remote: RemoteTierConfig | None = None
    blend: BlendConfig | None = None
    source: str = field(default="<defaults>", compare=False)

    def replace(self, **changes: Any) -> "UCMConfig":
        return dataclasses.replace(self, **changes)


_UNITS = {"b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]+)\s*$")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$([A-Za-z_][A-Za-z0-9_]*)")


def parse_size(value: Any, source: str, key: str) -> int:
    """'4GiB' -> bytes. Unit-less numbers, negative and zero sizes are errors."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ConfigError(source, key, value, "a size needs a unit, e.g. '4GiB', '512MiB' or '4096B'")
    m = _SIZE_RE.match(value)
    if not m:
        raise ConfigError(source, key, value, "not a size; write a positive number and a unit "
                          "(B, KiB, MiB, GiB, TiB, KB, MB, GB, TB)")
    unit = m.group(2).lower()
    if unit not in _UNITS:
        raise ConfigError(source, key, value, f"unknown size unit '{m.group(2)}'; use B, KiB, MiB, GiB, TiB")
    n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ConfigError(source, key, value, "size must be positive")
    return n


def _expand_vars(value: str, source: str, key: str) -> str:
    """Expand $VAR, ${VAR}, ${VAR:-default}; an unset variable without default is an error."""

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(3)
        if name in os.environ and os.environ[name] != "":
            return os.environ[name]
        if m.group(2) is not None:
            return m.group(2)
        raise ConfigError(source, key, value, f"environment variable ${name} is not set")

    return _VAR_RE.sub(sub, value)


def expand_path(value: Any, source: str, key: str) -> str:
    """Expand $VAR, ${VAR}, ${VAR:-default} and ~; an unset variable without default is an error."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(source, key, value, "a path must be a non-empty string")
    return os.path.abspath(os.path.expanduser(_expand_vars(value, source, key)))


def _check_keys(section: Mapping, allowed: tuple[str, ...], source: str, prefix: str) -> None:
    for k in section:
        if k not in allowed:
            raise ConfigError(source, f"{prefix}{k}", section[k],
                              f"unknown key; allowed here: {', '.join(allowed)}")


def _bool(section: Mapping, name: str, default: bool, source: str, prefix: str) -> bool:
    v = section.get(name, default)
    if not isinstance(v, bool):
        raise ConfigError(source, prefix + name, v, "must be true or false")
    return v


def _int_in(section: Mapping, name: str, default: int, lo: int, hi: int, source: str, prefix: str) -> int:
    v = section.get(name, default)
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ConfigError(source, prefix + name, v, f"must be an integer from {lo} to {hi}")
    return v


def _mapping(value: Any, source: str, key: str) -> Mapping:
    if not isinstance(value, Mapping):
        raise ConfigError(source, key, value, "must be a mapping of keys to values")
    return value


def from_dict(data: Mapping[str, Any], source: str = "<dict>") -> UCMConfig:
    """Validate a parsed YAML mapping into a `UCMConfig`."""
    data = _mapping(data, source, "<top level>")
    _check_keys(data, ("host", "ssd", "remote", "write_policy", "io_threads", "transfer", "blend"), source, "")
    host = ssd = None
    if data.get("host") is not None:
        h = _mapping(data["host"], source, "host")
        _check_keys(h, ("capacity", "path", "keep_after_exit"), source, "host.")
        if "capacity" not in h:
            raise ConfigError(source, "host.capacity", None, "missing; give the host tier's size, e.g. '4GiB'")
        path = h.get("path", "auto")
        host = HostTierConfig(
            capacity=parse_size(h["capacity"], source, "host.capacity"),
            path="auto" if path == "auto" else expand_path(path, source, "host.path"),
            keep_after_exit=_bool(h, "keep_after_exit", False, source, "host."),
        )
    if data.get("ssd") is not None:
        s = _mapping(data["ssd"], source, "ssd")
        _check_keys(s, ("path", "capacity", "slab_size", "direct_io", "fsync", "writer"), source, "ssd.")
        for req in ("path", "capacity"):
            if req not in s:
                raise ConfigError(source, f"ssd.{req}", None, "missing")
        ssd = SSDTierConfig(
            path=expand_path(s["path"], source, "ssd.path"),
            capacity=parse_size(s["capacity"], source, "ssd.capacity"),
            slab_size=parse_size(s.get("slab_size", "1GiB"), source, "ssd.slab_size"),
            direct_io=_bool(s, "direct_io", True, source, "ssd."),
            fsync=_bool(s, "fsync", False, source, "ssd."),
            writer=s.get("writer", "process"),
        )
        if ssd.writer not in SSD_WRITERS:
            raise ConfigError(source, "ssd.writer", ssd.writer, f"must be one of {', '.join(SSD_WRITERS)}")
    remote = _remote(data["remote"], source) if data.get("remote") is not None else None
    if host is None and ssd is None and remote is None:
        raise ConfigError(source, "host", None, "configure at least one tier (host, ssd or remote)")
    policy = data.get("write_policy", "write_through")
    if policy not in WRITE_POLICIES:
        raise ConfigError(source, "write_policy", policy, f"must be one of {', '.join(WRITE_POLICIES)}")
    if host is None:
        if policy == "write_back":
            raise ConfigError(source, "write_policy", policy, "write_back keeps blocks in the host tier until "
                              "it fills; configure a `host` section or use write_through")
        host = HostTierConfig(capacity=STAGING_CAPACITY, path="auto", staging=True)
    threads = _int_in(data, "io_threads", 4, 1, 256, source, "")
    transfer = TransferConfig()
    if data.get("transfer") is not None:
        t = _mapping(data["transfer"], source, "transfer")
        _check_keys(t, ("gpu_mode", "direct_programs", "layerwise_load", "layer_read_size", "load_mode",
                        "load_planner"), source, "transfer.")
        mode = t.get("gpu_mode", "staged")
        if mode not in GPU_TRANSFER_MODES:
            raise ConfigError(source, "transfer.gpu_mode", mode, f"must be one of {', '.join(GPU_TRANSFER_MODES)}")
        load_mode = t.get("load_mode", "auto")
        if load_mode not in LOAD_MODES:
            raise ConfigError(source, "transfer.load_mode", load_mode, f"must be one of {', '.join(LOAD_MODES)}")
        transfer = TransferConfig(mode, _int_in(t, "direct_programs", 8, 1, 1024, source, "transfer."),
                                  _bool(t, "layerwise_load", True, source, "transfer."),
                                  parse_size(t.get("layer_read_size", "512KiB"), source, "transfer.layer_read_size"),
                                  load_mode, _bool(t, "load_planner", True, source, "transfer."))
    blend = _blend(data["blend"], source) if data.get("blend") is not None else None
    return UCMConfig(host=host, ssd=ssd, write_policy=policy, io_threads=threads, transfer=transfer,
                     remote=remote, blend=blend, source=source)


def _blend(section: Any, source: str) -> BlendConfig:
    b = _mapping(section, source, "blend")
    _check_keys(b, ("separator", "recompute_ratio", "check_layer", "min_chunk_tokens", "chunk_start_tokens",
                    "recompute_span"), source, "blend.")
    sep = b.get("separator")
    if sep is not None and (isinstance(sep, bool) or not isinstance(sep, int) or sep < 0):
        raise ConfigError(source, "blend.separator", sep, "must be a token id (an integer >= 0) or null")
    ratio = b.get("recompute_ratio", 0.15)
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= 1.0:
        raise ConfigError(source, "blend.recompute_ratio", ratio, "must be a number from 0 to 1 (0.15 = 15%)")
    return BlendConfig(separator=sep, recompute_ratio=float(ratio),
                       check_layer=_int_in(b, "check_layer", 3, 0, 1023, source, "blend."),
                       min_chunk_tokens=_int_in(b, "min_chunk_tokens", 64, 1, 1 << 20, source, "blend."),
                       chunk_start_tokens=_int_in(b, "chunk_start_tokens", 0, 0, 1 << 20, source, "blend."),
                       recompute_span=_int_in(b, "recompute_span", 16, 1, 4096, source, "blend."))


REMOTE_SCHEMES = ("redis", "rediss", "unix")


def _redis_url(value: Any, source: str, key: str, cluster: bool) -> str:
    """Check one server URL: scheme, host and port (the password may be in it; it is never echoed)."""
    from urllib.parse import urlsplit

    if not isinstance(value, str) or not value.strip():
        raise ConfigError(source, key, value, "a server URL must be a non-empty string, e.g. redis://127.0.0.1:6379/0")
    shown = re.sub(r"//[^@/]*@", "//***@", value)
    try:
        u = urlsplit(value)
        port = u.port
    except ValueError as e:
        raise ConfigError(source, key, shown, f"not a valid URL: {e}") from None
    if u.scheme not in REMOTE_SCHEMES:
        raise ConfigError(source, key, shown, "the scheme must be redis:// , rediss:// (TLS) or unix://")
    if u.scheme == "unix":
        if cluster:
            raise ConfigError(source, key, shown, "a cluster is reached over TCP (redis:// or rediss://), not unix://")
        if not u.path:
            raise ConfigError(source, key, shown, "unix:// needs a socket path, e.g. unix:///run/redis.sock")
        return value
    if not u.hostname:
        raise ConfigError(source, key, shown, "no host name; write e.g. redis://127.0.0.1:6379/0")
    if port is None and cluster:
        raise ConfigError(source, key, shown, "a cluster seed needs a port, e.g. redis://10.0.0.5:7000")
    db = u.path.strip("/")
    if db and (not db.isdigit() or (cluster and db != "0")):
        raise ConfigError(source, key, shown, "the path must be a database number (a cluster has only /0)")
    return value


def _remote(section: Any, source: str) -> RemoteTierConfig:
    r = _mapping(section, source, "remote")
    keys = ("url", "cluster", "key_prefix", "username", "password", "tls_ca_file", "tls_cert_file",
            "tls_key_file", "timeout_ms", "reconnect_max_ms", "write_queue", "batch_size")
    _check_keys(r, keys, source, "remote.")
    if "url" not in r:
        raise ConfigError(source, "remote.url", None, "missing; e.g. redis://127.0.0.1:6379/0 "
                          "(a list of seed nodes for a cluster)")
    cluster = _bool(r, "cluster", False, source, "remote.")
    raw = r["url"]
    if isinstance(raw, list):
        if not raw:
            raise ConfigError(source, "remote.url", raw, "an empty list; give at least one server")
        if len(raw) > 1 and not cluster:
            raise ConfigError(source, "remote.url", raw, "several URLs are seed nodes of a cluster; set "
                              "remote.cluster: true, or give one URL")
        urls = tuple(_redis_url(u, source, f"remote.url[{i}]", cluster) for i, u in enumerate(raw))
    else:
        urls = (_redis_url(raw, source, "remote.url", cluster),)
    prefix = r.get("key_prefix", "ucm:")
    if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
        raise ConfigError(source, "remote.key_prefix", prefix, "must be a non-empty string without spaces")
    strings = {}
    for k in ("username", "password"):
        v = r.get(k)
        if v is not None and not isinstance(v, str):
            raise ConfigError(source, f"remote.{k}", "***" if k == "password" else v, "must be a string")
        strings[k] = _expand_vars(v, source, f"remote.{k}") if v else None
    tls = {}
    for k in ("tls_ca_file", "tls_cert_file", "tls_key_file"):
        v = r.get(k)
        if v is None:
            tls[k] = None
            continue
        path = expand_path(v, source, f"remote.{k}")
        if not os.path.isfile(path):
            raise ConfigError(source, f"remote.{k}", v, "no such file")
        tls[k] = path
    if any(tls.values()) and not all(u.startswith("rediss://") for u in urls):
        raise ConfigError(source, "remote.url", urls[0], "TLS options need rediss:// URLs")
    return RemoteTierConfig(
        urls=urls, cluster=cluster, key_prefix=prefix, **strings, **tls,
        timeout_ms=_int_in(r, "timeout_ms", 1000, 10, 600_000, source, "remote."),
        reconnect_max_ms=_int_in(r, "reconnect_max_ms", 10000, 10, 3_600_000, source, "remote."),
        write_queue=parse_size(r.get("write_queue", "256MiB"), source, "remote.write_queue"),
        batch_bytes=parse_size(r.get("batch_size", "16MiB"), source, "remote.batch_size"),
    )


def merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """`override` over `base`, key by key: mappings merge recursively, any other value replaces, and a
    key set to null (YAML `~`/`null`, Python None) is removed (`ssd: null` turns the SSD tier off)."""
    out = dict(base)
    for key, value in override.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def embedded_defaults() -> dict[str, Any]:
    """The embedded default configuration (configs/ucm_config.yaml) as a mapping."""
    return read_yaml(EMBEDDED_CONFIG)


def layered(*layers: tuple[Mapping[str, Any], str]) -> UCMConfig:
    """Validate the embedded default with each (mapping, source) merged over it in turn; an error names
    the last layer that set its key (the last layer for a key missing everywhere)."""
    data, sources = embedded_defaults(), [({}, str(EMBEDDED_CONFIG))]
    for layer, where in layers:
        data = merge(data, _mapping(layer, where, "<top level>"))
        sources.append((layer, where))
    try:
        return from_dict(data, sources[-1][1])
    except ConfigError as e:  # name the layer that set the key (the last one for a missing key)
        where = next((w for layer, w in reversed(sources) if _has_key(layer, e.key)), sources[-1][1])
        if where == e.source:
            raise
        raise ConfigError(where, e.key, e.value, e.problem) from None


def _has_key(data: Mapping[str, Any], dotted: str) -> bool:
    for part in dotted.split("."):
        if not isinstance(data, Mapping) or part not in data:
            return False
        data = data[part]
    return True


def read_yaml(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML file's top-level mapping; errors name the file (and line and column)."""
    source = str(path)
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(source, "<file>", source, f"cannot read the configuration file: {e.strerror}") from e
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "unknown position"
        raise ConfigError(source, "<yaml>", where, f"not valid YAML: {getattr(e, 'problem', e)}") from e
    if data is None:
        raise ConfigError(source, "<top level>", None, "the file is empty")
    return _mapping(data, source, "<top level>")


def load_config(path: str | os.PathLike | None = None) -> UCMConfig:
    """The configuration of a YAML file (`path`, else $UCM_CONFIG_FILE) merged over the embedded
    default (`merge`); with neither, the embedded default."""
    if path is None:
        path = os.environ.get(CONFIG_ENV)
    if path is None or Path(path).resolve() == EMBEDDED_CONFIG.resolve():
        return from_dict(embedded_defaults(), str(EMBEDDED_CONFIG))
    return layered((read_yaml(path), str(path)))


def make_private_dirs(path: str) -> None:
    """os.makedirs where every directory it creates (not only the last) gets mode 0700."""
    missing = []
    p = os.path.abspath(path)
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for d in reversed(missing):
        try:
            os.mkdir(d, 0o700)
        except FileExistsError:
            if not os.path.isdir(d):
                raise
        else:
            os.chmod(d, 0o700)  # mkdir's mode is masked by the umask; 0700 is what we mean


def check_writable(path: str, source: str, key: str) -> None:
    """Create `path` (every new directory mode 0700) if needed and check that this user can write there."""
    try:
        make_private_dirs(path)
    except OSError as e:
        raise ConfigError(source, key, path, f"cannot create the directory: {e.strerror}") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(source, key, path, "the directory is not writable by this user")
