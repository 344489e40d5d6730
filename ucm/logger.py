"""Tagged loggers: `get_logger("Store")` writes lines tagged `[UCM.Store]`.

The level comes from `UNIFIED_CACHE_LOG_LEVEL` (DEBUG, INFO, WARNING, ERROR; default INFO).
Tags in use: Connector, Patch, Hasher, Load, Save, Store, Tier, Config, Kernel, Blend, Step, Bench.
"""

from __future__ import annotations

import logging
import os
import sys

LEVEL_ENV = "UNIFIED_CACHE_LOG_LEVEL"
_root = logging.getLogger("UCM")
_configured = False


class _TagFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        record.tag = record.name  # "UCM.Store"
        return super().format(record)


def _configure() -> None:
    global _configured
    if _configured:
        return
    _configured = True
    level_name = os.environ.get(LEVEL_ENV, "INFO").upper()
    level = logging.getLevelName(level_name)
    if not isinstance(level, int):
        level = logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    # milliseconds: a request's lookup, load and first step are milliseconds apart
    handler.setFormatter(_TagFormatter("%(asctime)s.%(msecs)03d %(levelname)s [%(tag)s] %(message)s", "%H:%M:%S"))
    _root.addHandler(handler)
    _root.setLevel(level)
    _root.propagate = False


def get_logger(tag: str) -> logging.Logger:
    """Logger whose lines carry `[UCM.<tag>]`."""
    _configure()
    return logging.getLogger(f"UCM.{tag}")
