"""vLLM integration: the UCM connectors, registered with vLLM through its plugin entry point."""

CONNECTORS = {
    "UCMConnector": ("ucm.integration.vllm.ucm_connector", "UCMConnector"),
    "UCMDirectConnector": ("ucm.integration.vllm.ucm_connector", "UCMDirectConnector"),
    "BlendConnector": ("ucm.integration.vllm.blend_connector", "BlendConnector"),
}


def register() -> None:
    """vLLM general plugin (every vLLM process runs it): make kv_connector="UCMConnector" resolvable
    without a module path, and apply ucm's patches for this vLLM version (unless UCM_DISABLE_PATCHES=1)."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    from ucm.integration.vllm.patch.apply_patch import install_import_hook

    install_import_hook()

    for name, (module, cls) in CONNECTORS.items():
        if name not in KVConnectorFactory._registry:
            KVConnectorFactory.register_connector(name, module, cls)
