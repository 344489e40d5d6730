"""The prompts and helpers of the BlendConnector tests on vLLM's CPU build (test_blend_vllm*.py): three
documents of real text, two RAG prompts that place them in new orders after new preambles, the separator
token, and full prefill's outputs of those prompts."""

import functools
import re

from vllm_harness import BLOCK, prompt_tokens, run_vllm, ucm_connector

SEP = 45596  # "|||": one token in SmolLM2's vocabulary, absent from the test text


def _text(n, offset):
    return [t for t in prompt_tokens(n, offset) if t != SEP]


DOCS = [_text(200, 600 * k) for k in range(3)]
PRE_A, PRE_B = _text(30, 3000), _text(40, 3200)
QUESTION = _text(20, 3400)
RAG = [PRE_B + [SEP] + DOCS[2] + [SEP] + DOCS[0] + [SEP] + DOCS[1] + [SEP] + QUESTION,
       PRE_A + [SEP] + DOCS[1] + [SEP] + DOCS[2] + [SEP] + QUESTION]
REUSED = [sum(len(DOCS[k]) // BLOCK * BLOCK for k in (2, 0, 1)), sum(len(DOCS[k]) // BLOCK * BLOCK for k in (1, 2))]


def blend(root, **kw) -> dict:
    c = ucm_connector(root, name="BlendConnector", blend={"separator": SEP, **kw})
    return c


def reused_tokens(log: str) -> list[int]:
    return [int(m) for m in re.findall(r"\[UCM\.Blend\] blend: (\d+) tokens of \d+ requests reused", log)]


@functools.lru_cache(maxsize=None)
def full_prefill() -> dict:
    return run_vllm([[p] for p in RAG], max_tokens=8)


def agreement(got, ref) -> int:
    n = 0
    for a, b in zip(got["tokens"], ref["tokens"]):
        if a != b:
            break
        n += 1
    return n
