"""Version-keyed patches of vLLM, applied by an import hook (see apply_patch.py).

ucm patches vLLM only where the KV connector V1 API has no hook; each vLLM version has its own folder
under patch_funcs/ (v0_32 for vLLM 0.32.x). Must not import vLLM or torch at import time.
"""
