"""The UCM connector, one concept per module (the front is ucm_connector.py):

    config.py     kv_connector_extra_config -> UCMConfig
    metadata.py   RequestMeta / UCMConnectorMetadata (scheduler -> worker, per step), RequestState
    scheduler.py  SchedulerSide: lookups, loads to make, blocks to save
    worker.py     WorkerSide: the CPU/GPU choice at registration, loads, layer-wise loads, saves
    saves.py      how saves run (inline on a CPU, on a stream and thread on a GPU) and their fences
    layers.py     LayerPlan: a page's layer groups; HostLayers: a GPU load copied layer by layer
    stats.py      UCMConnectorStats: vLLM's connector stats
"""
