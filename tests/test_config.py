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
    ("ssd: {path: /tmp/x, capacity: 1GiB}\nwrite_policy: write_back\n", "write_policy", "configure a `host`"),
    ("io_threads: 2\n", "host", "at least one tier"),
    ("remote: {key_prefix: 'a:'}\n", "remote.url", "missing"),
    ("remote: {url: 'http://cache:6379'}\n", "remote.url", "scheme"),
    ("remote: {url: 'redis://:6379'}\n", "remote.url", "no host name"),
    ("remote: {url: 'redis://cache:port'}\n", "remote.url", "not a valid URL"),
    ("remote: {url: 'redis://cache:6379/zero'}\n", "remote.url", "database number"),
    ("remote: {url: [redis://a:7000, redis://b:7000]}\n", "remote.url", "cluster: true"),
    ("remote: {url: [redis://a:7000, 'redis://b'], cluster: true}\n", "remote.url[1]", "needs a port"),
    ("remote: {url: 'unix:///run/r.sock', cluster: true}\n", "remote.url", "over TCP"),
    ("remote: {url: 'redis://a:1', key_prefix: 'my prefix'}\n", "remote.key_prefix", "without spaces"),
    ("remote: {url: 'redis://a:1', timeout_ms: 0}\n", "remote.timeout_ms", "integer"),
    ("remote: {url: 'redis://a:1', write_queue: 10}\n", "remote.write_queue", "unit"),
    ("remote: {url: 'redis://a:1', tls_ca_file: /surely/not/here.pem}\n", "remote.tls_ca_file", "no such file"),
    ("remote: {url: 'redis://a:1', password: '${UCM_SURELY_UNSET_VAR}'}\n", "remote.password", "not set"),
    ("remote: {url: 'redis://a:1', passwd: x}\n", "remote.passwd", "unknown key"),
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


@pytest.mark.parametrize("yaml_text,tiers", [
    ("host: {capacity: 64MiB}\n", ("host",)),
    ("ssd: {path: /tmp/x, capacity: 1GiB}\n", ("staging", "ssd")),
    ("remote: {url: 'redis://10.0.0.5:6379/0'}\n", ("staging", "remote")),
    ("host: {capacity: 64MiB}\nremote: {url: 'rediss://user:pw@10.0.0.5:6380/2'}\n", ("host", "remote")),
    ("host: {capacity: 64MiB}\nssd: {path: /tmp/x, capacity: 1GiB}\n"
     "remote: {url: [redis://10.0.0.5:7000, redis://10.0.0.6:7000], cluster: true}\n", ("host", "ssd", "remote")),
])
def test_tier_combinations(tmp_path, yaml_text, tiers):
    """host-only, SSD-only, remote-only and stacked configurations are all valid; without a host section
    a staging area of host memory carries pages to the lower tiers."""
    cfg = load_config(write(tmp_path, yaml_text))
    got = ("staging" if cfg.host.staging else "host",) + tuple(t for t in ("ssd", "remote") if getattr(cfg, t))
    assert got == tiers


def test_remote_password_is_never_shown(tmp_path, monkeypatch):
    monkeypatch.setenv("UCM_TEST_REDIS_PW", "s3cret-pw")
    cfg = load_config(write(tmp_path, "remote: {url: 'redis://a:1', password: '${UCM_TEST_REDIS_PW}'}\n"))
    assert cfg.remote.password == "s3cret-pw" and "s3cret-pw" not in repr(cfg)
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, "remote: {url: 'http://user:s3cret-pw@a:1'}\n"))
    assert "s3cret-pw" not in str(ei.value) and "***" in str(ei.value)
