"""The connector's configuration, from vLLM's kv_connector_extra_config."""

from __future__ import annotations

from typing import Any

from ucm.config import UCMConfig, from_dict, load_config

CONFIG_FILE_KEY = "UCM_CONFIG_FILE"


def connector_config(extra: dict[str, Any] | None) -> UCMConfig:
    """UCMConfig from kv_connector_extra_config: a file, inline YAML keys, or the embedded default."""
    extra = dict(extra or {})
    path = extra.pop(CONFIG_FILE_KEY, None)
    if path and extra:
        raise ValueError(f"kv_connector_extra_config: give either {CONFIG_FILE_KEY} or inline keys, "
                         f"not both (inline keys: {sorted(extra)})")
    if path:
        return load_config(path)
    if extra:
        return from_dict(extra, source="kv_connector_extra_config")
    return load_config()
