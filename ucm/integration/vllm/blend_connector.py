"""BlendConnector: reuse the KV of documents that are not a prefix (CacheBlend), on vLLM 0.32.

A prompt is split into chunks (a separator token, or `kv_transfer_params={"ucm_blend_chunks":
[[start, end], ...]}`); each chunk's blocks have ids that restart from the root seed, so a document
cached on its own is found anywhere in a later prompt.

Saving: every chunk a request computes rather than reuses is stored (its full blocks not stored yet, in
the blend page format below) once the chunk is computed, from the K/V captured during that forward
pass, with keys rotated back so the chunk's first token sits at position 0. A document is cached the
first time any prompt contains it, or by sending it alone; pages computed alone (the chunk started its
prompt) and in a prompt's context have ids of their own, and lookups prefer the alone ones (plan.py);
concurrent first saves of one block: the first publish wins.

Blending, for a request whose chunks are (partly) stored: vLLM is told of no external tokens and
computes the prompt; before each prefill step's forward pass the worker reads the stored blocks that
hold tokens of that step, rotates their keys to the new positions (ucm/kernels/rope.py), writes them
into the paged cache of every layer, and activates a `BlendStep` (blend/step.py): the layers up to
`blend.check_layer` run on every token of the step, the check layer keeps the `recompute_ratio` share
of the step's reused tokens whose keys deviate most (plus every token not reused, the prompt's last
token among them), and the later layers run on those tokens only. A prompt prefilled in several steps (chunked
prefill) is blended step by step; later steps attend to the KV the earlier ones left in the cache.
Anything that prevents blending (no chunks or hits, RoPE that is not a pure rotation, the patches not
applied) falls back to UCMConnector's prefix caching, with a log line.

The connector is UCMConnector's front with a blend component on each side (ucm/integration/vllm/blend/):
the planner decides prefix loads, chunk loads, chunk saves and the save limit; the worker part runs
around the forward pass.

Blend page of a chunk block: [layers, 2 (K, V), block_size, kv_heads, head_dim] in the cache dtype,
keys at canonical positions (the chunk's first token at position 0). Same bytes per page as
UCMConnector's pages; the ids differ (the seed's `extra` gains "|blend", or "|blend-in-context").
"""

from __future__ import annotations

from ucm.integration.vllm.blend.plan import CHUNKS_PARAM, BlendRequestMeta, ChunkLoad, ChunkSave
from ucm.integration.vllm.ucm_connector import UCMConnector

__all__ = ["CHUNKS_PARAM", "BlendConnector", "BlendRequestMeta", "ChunkLoad", "ChunkSave"]


class BlendConnector(UCMConnector):
    """kv_connector="BlendConnector"; the `blend` section of the YAML configures it."""

    _with_blend = True
