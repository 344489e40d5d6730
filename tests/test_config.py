"""Configuration: units, paths, env override, and errors that name file, key and value."""

import os
import re

import pytest

from ucm.config import EMBEDDED_CONFIG, ConfigError, embedded_defaults, load_config, merge, parse_size
from ucm.integration.vllm.connector.config import connector_config
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
    ("host: {capacity: 1GiB}\nssd: {path: null, capacity: 1GiB}\n", "ssd.path", "missing"),
    ("host: null\nssd: {path: /tmp/x, capacity: 1GiB}\nwrite_policy: write_back\n", "write_policy",
     "configure a `host`"),
    ("host: null\nssd: null\nio_threads: 2\n", "host", "at least one tier"),
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
    ("host: {capacity: 64MiB}\nssd: null\n", ("host",)),
    ("host: null\nssd: {path: /tmp/x, capacity: 1GiB}\n", ("staging", "ssd")),
    ("host: null\nssd: null\nremote: {url: 'redis://10.0.0.5:6379/0'}\n", ("staging", "remote")),
    ("ssd: null\nremote: {url: 'rediss://user:pw@10.0.0.5:6380/2'}\n", ("host", "remote")),
    ("host: {capacity: 64MiB}\nssd: {path: /tmp/x, capacity: 1GiB}\n"
     "remote: {url: [redis://10.0.0.5:7000, redis://10.0.0.6:7000], cluster: true}\n", ("host", "ssd", "remote")),
])
def test_tier_combinations(tmp_path, yaml_text, tiers):
    """host-only, SSD-only, remote-only and stacked configurations are all valid (`null` removes the
    default's tier); without a host section a staging area of host memory carries pages to the lower tiers."""
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


# ---- layers: embedded default, file, inline keys ------------------------------------------------------
def test_a_file_holds_only_what_differs_from_the_default(tmp_path):
    cfg = load_config(write(tmp_path, "ssd: {capacity: 200GiB}\ntransfer: {load_mode: async}\n"))
    default = load_config(EMBEDDED_CONFIG)
    assert cfg.ssd.capacity == 200 << 30 and cfg.ssd.path == default.ssd.path
    assert cfg.host == default.host and cfg.transfer.gpu_mode == "staged" and cfg.transfer.load_mode == "async"


def test_the_load_planner_switch(tmp_path):
    assert load_config(EMBEDDED_CONFIG).transfer.load_planner is True
    assert load_config(write(tmp_path, "transfer: {load_planner: false}\n")).transfer.load_planner is False
    with pytest.raises(ConfigError) as ei:
        load_config(write(tmp_path, "transfer: {load_planner: sometimes}\n"))
    assert "transfer.load_planner" in str(ei.value) and "sometimes" in str(ei.value) and "ucm.yaml" in str(ei.value)


def test_null_removes_a_key_or_a_section():
    assert merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": None}, "d": None}) == {"a": {"c": 2}}
    assert merge({"a": {"b": 1}}, {"a": 5}) == {"a": 5}, "a value replaces a section"
    assert merge({"a": 1}, {"a": {"b": 2}}) == {"a": {"b": 2}}


def test_inline_keys_override_the_file_which_overrides_the_default(tmp_path, monkeypatch):
    p = write(tmp_path, f"host: {{capacity: 64MiB}}\nssd: {{path: {tmp_path}/kv, capacity: 1GiB}}\n")
    cfg = connector_config({"UCM_CONFIG_FILE": str(p), "ssd": {"capacity": "2GiB"}, "io_threads": 2})
    assert (cfg.host.capacity, cfg.ssd.path, cfg.ssd.capacity, cfg.io_threads) == (64 << 20, f"{tmp_path}/kv", 2 << 30, 2)
    assert cfg.ssd.slab_size == 1 << 30, "from the embedded default"
    monkeypatch.setenv("UCM_CONFIG_FILE", str(p))
    assert connector_config({"ssd": None}).ssd is None and connector_config({}).host.capacity == 64 << 20
    monkeypatch.delenv("UCM_CONFIG_FILE")
    assert connector_config({"host": {"capacity": "8MiB"}}).ssd.capacity == 64 << 30, "inline alone: over the default"


def test_an_error_names_the_layer_its_key_came_from(tmp_path):
    p = write(tmp_path, "host: {capacity: 64MiB}\nssd: {capacity: lots}\n")
    with pytest.raises(ConfigError) as ei:
        connector_config({"UCM_CONFIG_FILE": str(p), "io_threads": 2})
    assert str(p) in str(ei.value) and "'ssd.capacity'" in str(ei.value)
    with pytest.raises(ConfigError) as ei:
        connector_config({"UCM_CONFIG_FILE": str(p), "ssd": {"capacity": "1GiB"}, "io_threads": 0})
    assert str(ei.value).startswith("kv_connector_extra_config: key 'io_threads'"), str(ei.value)


# ---- docs/configuration.md's table against the code ---------------------------------------------------
RENAMED = {"transfer.layer_read_size": "transfer.layer_read_bytes", "remote.batch_size": "remote.batch_bytes",
           "remote.url": "remote.urls"}


def _doc_defaults() -> dict[str, str]:
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "configuration.md")
    rows = {}
    for line in open(path):
        cells = [c.strip() for c in line.split("|")[1:-1]]
        if len(cells) >= 3 and cells[0].startswith("`"):
            for key in re.findall(r"`([a-z_.]+)`", cells[0]):
                rows[key] = cells[1].strip("`")
    return rows


def _as_documented(text: str, current):
    if text in ("(none)", "null"):
        return None
    if isinstance(current, bool):
        return {"true": True, "false": False}[text]
    if isinstance(current, int) and re.search(r"[A-Za-z]", text):
        return parse_size(text, "docs", "")
    if isinstance(current, (int, float)):
        return type(current)(text)
    if isinstance(current, tuple):
        return None if text == "(none)" else (text,)
    return text


def test_every_documented_default_is_the_real_one():
    rows = _doc_defaults()
    assert len(rows) >= 30, sorted(rows)
    cfg = connector_config({"remote": {"url": "redis://a:1"}, "blend": {}})  # sections the default leaves out
    raw = embedded_defaults()
    for key, text in rows.items():
        section, name = RENAMED.get(key, key).split(".") if "." in key else (None, key)
        current = getattr(getattr(cfg, section), name) if section else getattr(cfg, name)
        if key == "remote.url":
            continue  # required: no default
        if key == "ssd.path":
            assert raw["ssd"]["path"] == text, key
            continue
        assert _as_documented(text, current) == current, f"docs/configuration.md says {key} = {text}, code: {current!r}"
