"""Operator tools: `ucm` cli, stats, doctor, verify, debug connectors, the demo and the model export.
They use the store and the vLLM integration; nothing in ucm imports them."""
