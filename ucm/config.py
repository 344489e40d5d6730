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
GPU_TRANSFER_MODES = ("staged", "direct")


class ConfigError(ValueError):
    """A configuration value is wrong; the message names file, key and value."""

    def __init__(self, source: str, key: str, value: Any, problem: str):
        self.source, self.key, self.value = source, key, value
        super().__init__(f"{source}: key '{key}': {problem} (got {value!r})")


@dataclass(frozen=True)
class HostTierConfig:
    capacity: int  # bytes
    path: str  # directory of the shared-memory tier, or "auto"
    keep_after_exit: bool = False


@dataclass(frozen=True)
class SSDTierConfig:
    path: str
    capacity: int  # bytes
    slab_size: int = 1 << 30  # bytes per slab file
    direct_io: bool = True
    fsync: bool = False


@dataclass(frozen=True)
class TransferConfig:
    """How blocks move between a GPU KV cache and host pages (see ucm/kernels/transfer.py)."""

    gpu_mode: str = "staged"  # staged: kernel into a GPU ring + DMA; direct: kernel writes host memory (UVA)
    direct_programs: int = 8  # persistent grid of the direct kernel (SMs it may occupy)
    layerwise_load: bool = True  # SSD hits read layer group by layer group, overlapping the forward pass
    layer_read_bytes: int = 512 << 10  # bytes of a page per read of a layer-wise load (first group: one layer)


@dataclass(frozen=True)
class UCMConfig:
    host: HostTierConfig | None
    ssd: SSDTierConfig | None
    write_policy: str = "write_through"
    io_threads: int = 4
    transfer: TransferConfig = TransferConfig()
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


def expand_path(value: Any, source: str, key: str) -> str:
    """Expand $VAR, ${VAR}, ${VAR:-default} and ~; an unset variable without default is an error."""
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(source, key, value, "a path must be a non-empty string")

    def sub(m: re.Match) -> str:
        name = m.group(1) or m.group(3)
        if name in os.environ and os.environ[name] != "":
            return os.environ[name]
        if m.group(2) is not None:
            return m.group(2)
        raise ConfigError(source, key, value, f"environment variable ${name} is not set")

    return os.path.abspath(os.path.expanduser(_VAR_RE.sub(sub, value)))


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
    _check_keys(data, ("host", "ssd", "write_policy", "io_threads", "transfer"), source, "")
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
        _check_keys(s, ("path", "capacity", "slab_size", "direct_io", "fsync"), source, "ssd.")
        for req in ("path", "capacity"):
            if req not in s:
                raise ConfigError(source, f"ssd.{req}", None, "missing")
        ssd = SSDTierConfig(
            path=expand_path(s["path"], source, "ssd.path"),
            capacity=parse_size(s["capacity"], source, "ssd.capacity"),
            slab_size=parse_size(s.get("slab_size", "1GiB"), source, "ssd.slab_size"),
            direct_io=_bool(s, "direct_io", True, source, "ssd."),
            fsync=_bool(s, "fsync", False, source, "ssd."),
        )
    if host is None and ssd is None:
        raise ConfigError(source, "host", None, "configure at least one tier (host or ssd)")
    if host is None:
        raise ConfigError(source, "host", None, "the host tier is required: dumps land in host memory "
                          "before they reach the SSD")
    policy = data.get("write_policy", "write_through")
    if policy not in WRITE_POLICIES:
        raise ConfigError(source, "write_policy", policy, f"must be one of {', '.join(WRITE_POLICIES)}")
    threads = _int_in(data, "io_threads", 4, 1, 256, source, "")
    transfer = TransferConfig()
    if data.get("transfer") is not None:
        t = _mapping(data["transfer"], source, "transfer")
        _check_keys(t, ("gpu_mode", "direct_programs", "layerwise_load", "layer_read_size"), source, "transfer.")
        mode = t.get("gpu_mode", "staged")
        if mode not in GPU_TRANSFER_MODES:
            raise ConfigError(source, "transfer.gpu_mode", mode, f"must be one of {', '.join(GPU_TRANSFER_MODES)}")
        transfer = TransferConfig(mode, _int_in(t, "direct_programs", 8, 1, 1024, source, "transfer."),
                                  _bool(t, "layerwise_load", True, source, "transfer."),
                                  parse_size(t.get("layer_read_size", "512KiB"), source, "transfer.layer_read_size"))
    return UCMConfig(host=host, ssd=ssd, write_policy=policy, io_threads=threads, transfer=transfer,
                     source=source)


def load_config(path: str | os.PathLike | None = None) -> UCMConfig:
    """Load and validate a YAML file: `path`, else $UCM_CONFIG_FILE, else the embedded default."""
    if path is None:
        path = os.environ.get(CONFIG_ENV) or EMBEDDED_CONFIG
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
    return from_dict(data, source)


def check_writable(path: str, source: str, key: str) -> None:
    """Create `path` (mode 0700) if needed and check that this user can write there."""
    try:
        os.makedirs(path, mode=0o700, exist_ok=True)
    except OSError as e:
        raise ConfigError(source, key, path, f"cannot create the directory: {e.strerror}") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(source, key, path, "the directory is not writable by this user")
