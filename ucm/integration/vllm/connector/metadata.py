"""What the scheduler side sends the worker side each step, and what it keeps per request."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorMetadata

if TYPE_CHECKING:
    from vllm.v1.request import Request


@dataclass
class RequestMeta:
    """One request's transfers in one step: (ucm block ids, vLLM block ids) pairs."""

    req_id: str
    load_block_ids: tuple[list[bytes], list[int]] = field(default_factory=lambda: ([], []))
    dump_block_ids: tuple[list[bytes], list[int]] = field(default_factory=lambda: ([], []))
    # leading load blocks holding only cached tokens: this step's forward pass writes none of their
    # slots, so they may be filled layer by layer while it runs (a full hit's last block is not)
    load_whole_blocks: int = 0
    load_async: bool = False  # the request waits (not scheduled) until the worker reports its load done


@dataclass
class UCMConnectorMetadata(KVConnectorMetadata):
    requests: list[RequestMeta] = field(default_factory=list)
    preempted: set[str] = field(default_factory=set)
    step_tokens: int = 0  # tokens this step computes (the worker times its forward pass for the planner)
    blend: list[Any] = field(default_factory=list)  # blend.plan.BlendRequestMeta of blended requests


@dataclass
class Lookup:
    """What the last lookup of a request found (recorded in the journal when vLLM allocates it)."""

    blocks: int = 0  # full blocks of the prompt
    ucm_hits: int = 0  # leading blocks every rank's store has
    vllm_hits: int = 0  # blocks vLLM's own prefix cache had
    load_range: tuple[int, int] | None = None  # blocks [a, b) to load
    whole_blocks: int = 0  # of those, leading blocks holding only cached tokens
    plan: Any = None  # planner.LoadDecision: how many of the hits to load, and why


@dataclass
class RequestState:
    """Scheduler-side state of one request."""

    request: "Request"
    ids: list[bytes] = field(default_factory=list)  # chain ids of the full blocks hashed so far
    block_ids: list[int] = field(default_factory=list)  # vLLM blocks of the request, in order
    lookup: Lookup = field(default_factory=Lookup)
    load: tuple[list[bytes], list[int]] | None = None  # set after allocation, sent once
    load_whole_blocks: int = 0
    load_async: bool = False  # decided at the lookup: the load runs before the request is scheduled
    load_sources: dict = field(default_factory=dict)
    saved_upto: int = 0  # blocks [0, saved_upto) are stored, loaded, or scheduled for saving
    save_limit: int | None = None  # blocks at and after this are never saved (their KV is not exact)
    computed_upto: int = 0  # tokens computed once the last scheduled step has run
    dumps_scheduled: bool = False
