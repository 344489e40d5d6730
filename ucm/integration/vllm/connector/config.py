"""The connector's configuration, from vLLM's kv_connector_extra_config."""

from __future__ import annotations

import os
from typing import Any

from ucm.config import CONFIG_ENV, UCMConfig, layered, load_config, read_yaml

CONFIG_FILE_KEY = "UCM_CONFIG_FILE"


def connector_config(extra: dict[str, Any] | None) -> UCMConfig:
    """UCMConfig from kv_connector_extra_config, in layers, each key by key over the one before
    (ucm.config.merge): the embedded default; the file named by its UCM_CONFIG_FILE key (else by the
    $UCM_CONFIG_FILE environment variable); its other keys, inline."""
    extra = dict(extra or {})
    path = extra.pop(CONFIG_FILE_KEY, None) or os.environ.get(CONFIG_ENV)
    layers = [(read_yaml(path), str(path))] if path else []
    if extra:
        layers.append((extra, "kv_connector_extra_config"))
    return layered(*layers) if layers else load_config()
