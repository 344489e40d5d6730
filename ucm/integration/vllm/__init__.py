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
    _check_config_before_the_engine_starts()


def uses_ucm(kv_transfer_config) -> bool:
    """Whether a KVTransferConfig (or its dict) selects one of ucm's connectors."""
    get = kv_transfer_config.get if isinstance(kv_transfer_config, dict) else (
        lambda k, d=None: getattr(kv_transfer_config, k, d))
    module = get("kv_connector_module_path") or ""
    return get("kv_connector") in CONNECTORS or module.startswith("ucm.")


def _check_config_before_the_engine_starts() -> None:
    """Validate ucm's configuration when vLLM turns its arguments into the engine config, before any
    process starts or the model loads: a wrong key is one ConfigError naming file, key and value
    within a second, not after the model load. Installed once, by the plugin."""
    from vllm.engine.arg_utils import EngineArgs

    if getattr(EngineArgs.create_engine_config, "_ucm_checked", False):
        return
    create = EngineArgs.create_engine_config

    def create_engine_config(self, *args, **kwargs):
        ktc = self.kv_transfer_config
        if ktc is not None and uses_ucm(ktc):
            from ucm.integration.vllm.connector.config import connector_config

            extra = ktc.get("kv_connector_extra_config") if isinstance(ktc, dict) else ktc.kv_connector_extra_config
            connector_config(extra)  # raises ucm.config.ConfigError
        return create(self, *args, **kwargs)

    create_engine_config._ucm_checked = True
    EngineArgs.create_engine_config = create_engine_config
