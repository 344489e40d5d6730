"""Configuration: units, paths, env override, and errors that name file, key and value."""

import os

import pytest

from ucm.config import EMBEDDED_CONFIG, ConfigError, load_config, parse_size
from ucm.tiers import TieredStore


def write(tmp_path, text, name="ucm.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_embedded_default_loads():
    cfg = load_config(EMBEDDED_CONFIG)
    assert cfg.host.capacity == 4 << 30
    assert cfg.ssd.capacity == 64 << 30
    assert cfg.ssd.path.endswith("/ucm/kv") and "~" not in cfg.ssd.path and "$" not in cfg.ssd.path
    assert cfg.write_policy == "write_through"
    assert cfg.transfer.gpu_mode == "staged" and cfg.transfer.direct_programs == 8


def test_env_override_of_config_path(tmp_path, monkeypatch):
    p = write(tmp_path, "host: {capacity: 64MiB}\nssd: {path: ~/x, capacity: 1GiB}\n")
    monkeypatch.setenv("UCM_CONFIG_FILE", str(p))
    cfg = load_config()
    assert cfg.source == str(p)
    assert cfg.host.capacity == 64 << 20
    assert cfg.ssd.path == os.path.expanduser("~/x")


@pytest.mark.parametrize("text,sz", [("512MiB", 512 << 20), ("4GiB", 4 << 30), ("4096B", 4096),
                                     ("1.5GiB", 3 << 29), ("10 MB", 10**7)])
def test_sizes_with_units(text, sz):
    assert parse_size(text, "f", "k") == sz


@pytest.mark.parametrize("yaml_text,key,needle", [
    ("host: {capacity: 4096}\n", "host.capacity", "unit"),
    ("host: {capacity: -1GiB}\n", "host.capacity", "not a size"),
    ("host: {capacity: 0GiB}\n", "host.capacity", "positive"),
    ("host: {capacity: 4 parsecs}\n", "host.capacity", "unknown size unit"),
    ("host: {capacity: 1GiB, colour: blue}\n", "host.colour", "unknown key"),
    ("host: {capacity: 1GiB}\nssd: {path: /tmp/x, capacity: 1GiB, direct: true}\n", "ssd.direct", "unknown key"),
    ("hots: {capacity: 1GiB}\n", "hots", "unknown key"),
    ("host: {capacity: 1GiB}\nwrite_policy: sometimes\n", "write_policy", "must be one of"),
    ("host: {capacity: 1GiB}\nio_threads: 0\n", "io_threads", "integer"),
    ("host: {capacity: 1GiB}\ntransfer: {gpu_mode: teleport}\n", "transfer.gpu_mode", "must be one of"),
    ("host: {capacity: 1GiB}\nssd: {path: '${UCM_SURELY_UNSET_VAR}/kv', capacity: 1GiB}\n", "ssd.path", "not set"),
    ("host: {capacity: 1GiB}\nssd: {capacity: 1GiB}\n", "ssd.path", "missing"),
    ("ssd: {path: /tmp/x, capacity: 1GiB}\n", "host", "required"),
])
def test_bad_values_name_file_key_and_value(tmp_path, yaml_text, key, needle):
    p = write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    msg = str(ei.value)
    assert str(p) in msg and f"'{key}'" in msg and needle in msg, msg


def test_bad_yaml_names_the_position(tmp_path):
    p = write(tmp_path, "host:\n  capacity: [1GiB\n")
    with pytest.raises(ConfigError) as ei:
        load_config(p)
    assert str(p) in str(ei.value) and "not valid YAML" in str(ei.value) and "line" in str(ei.value)


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "nope.yaml")


def test_unwritable_path_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    p = write(tmp_path, f"host: {{capacity: 1MiB, path: {tmp_path}/h}}\nssd: {{path: {blocker}/kv, capacity: 1GiB}}\n")
    with pytest.raises(ConfigError) as ei:
        TieredStore(load_config(p), 4096)
    assert "'ssd.path'" in str(ei.value) and str(p) in str(ei.value) and "cannot create" in str(ei.value)
