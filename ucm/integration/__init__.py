"""Integrations with serving engines (vLLM)."""
