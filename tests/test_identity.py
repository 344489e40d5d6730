"""Block identity (ucm/integration/vllm/identity.py): salts, multimodal extras, TP shards, incremental ids."""

from types import SimpleNamespace

from ucm.hashing import HashSeed
from ucm.integration.vllm.identity import BlockIdentity, block_extras, request_salt, salt_string

SEED = HashSeed("m", "bfloat16", "cuda/FullAttentionSpec/8x128/32L", 16, tp_size=2)


def _request(tokens, mm=(), salt=None, lora=None):
    feats = [SimpleNamespace(mm_position=SimpleNamespace(offset=o, length=n), identifier=i) for o, n, i in mm]
    return SimpleNamespace(all_token_ids=list(tokens), mm_features=feats, cache_salt=salt, lora_request=lora)


def test_request_salt_names_the_tenant_and_the_adapter():
    assert salt_string() is None and request_salt(_request([1])) is None
    assert request_salt(_request([1], salt="t1")) == "salt=t1"
    lora = SimpleNamespace(lora_name="a", lora_int_id=3)
    assert request_salt(_request([1], salt="t1", lora=lora)) == "salt=t1|lora=a:3"


def test_multimodal_inputs_enter_the_blocks_that_hold_their_placeholders():
    ident = BlockIdentity(SEED)
    tokens = list(range(160))  # 10 blocks
    a = ident.extend(_request(tokens, mm=[(40, 20, "img-a")]), [], 10)  # placeholders in blocks 2 and 3
    b = ident.extend(_request(tokens, mm=[(40, 20, "img-b")]), [], 10)
    plain = ident.extend(_request(tokens), [], 10)
    assert a[:2] == b[:2] == plain[:2], "blocks before the image do not depend on it"
    assert all(x != y for x, y in zip(a[2:], b[2:])), "from the first placeholder block on, the image decides"
    assert block_extras(_request(tokens, mm=[(40, 20, "i")]), 16, 0, 10) == {2: b"i;", 3: b"i;"}
    assert block_extras(_request(tokens, mm=[(40, 20, "i")]), 16, 3, 2) == {0: b"i;"}


def test_incremental_ids_equal_one_pass_and_salts_separate_tenants():
    ident = BlockIdentity(SEED)
    req = _request(range(320), mm=[(100, 50, "x")], salt="t")
    whole = ident.extend(req, [], 20)
    step = ident.extend(req, [], 7)
    assert ident.extend(req, step, 20) == whole
    assert ident.extend(_request(range(320), mm=[(100, 50, "x")], salt="u"), [], 20)[0] != whole[0]


def test_each_tp_rank_has_its_own_ids_and_mla_shares_rank_zeros():
    ids = BlockIdentity(SEED).chain(list(range(64)))
    ranks = [BlockIdentity(SEED).for_rank(ids, r) for r in range(2)]
    assert ranks[0] != ranks[1] and len(set(ranks[0]) | set(ranks[1])) == 2 * len(ids)
    assert list(BlockIdentity(SEED).ranks()) == [0, 1]
    mla = BlockIdentity.from_seed(HashSeed("m", "bfloat16", "cuda/MLAAttentionSpec/1x576/61L", 16, tp_size=8))
    assert mla.mla and list(mla.ranks()) == [0] and mla.for_rank(ids, 5) == ids
    assert mla.saves_on(0) and not mla.saves_on(5)
