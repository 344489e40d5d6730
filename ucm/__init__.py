"""ucm: a tiered KV cache for vLLM (host memory and SSD tiers, Triton transfer kernels).

Importing ucm installs the vLLM patch import hook unless UCM_DISABLE_PATCHES=1
(ucm/integration/vllm/patch/apply_patch.py); vLLM itself is not imported here.
"""

__version__ = "0.1.0"


def _install_patches() -> None:
    from ucm.integration.vllm.patch.apply_patch import install_import_hook

    install_import_hook()


_install_patches()
