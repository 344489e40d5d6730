"""vLLM integration: the UCM connectors, registered with vLLM through its plugin entry point."""

CONNECTORS = {
    "UCMConnector": ("ucm.integration.vllm.ucm_connector", "UCMConnector"),
    "UCMDirectConnector": ("ucm.integration.vllm.ucm_connector", "UCMDirectConnector"),
}


def register() -> None:
    """vLLM general plugin: make kv_connector="UCMConnector" resolvable without a module path."""
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    for name, (module, cls) in CONNECTORS.items():
        if name not in KVConnectorFactory._registry:
            KVConnectorFactory.register_connector(name, module, cls)
