"""Token parallelism over RadixAttention: a paged pool and a radix tree per TKNP rank (gloo, 4 ranks).

Runs inside the 4-rank launch of test_tknp_attention (TKNP 4, TP 2 x TKNP 2, and TKNP 2 as two
external-DP replicas). The roots serve shared-prefix prompts twice with the engine's
:class:`~hybridpar.tknp.radix_scheduler.TknpScheduler` (all at once, then arriving over time: the
second run hits the prefixes the first left in each rank's tree). Each worker's mirror pools must
equal the root's bookkeeping of that rank.
"""
from __future__ import annotations

import os

import pytest

from tests.test_tknp_attention import IDS, LAYOUTS, MODELS, _launch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.mark.parametrize("tp,tknp", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("model", MODELS)
def test_each_rank_tree_serves_the_second_run_from_cache(tp, tknp, model):
    leader = _launch()[(tp, tknp)][0]["models"][model]
    first, again = (leader["runs"][name]["requests"] for name in ("prefix", "prefix-again"))
    assert [o["tokens"] for o in again] == [o["tokens"] for o in first]  # the cache changes nothing but the work
    assert sum(o["cached"] for o in first) == 0 and sum(o["cached"] for o in again) > 0
    assert {o["rank"] for o in first} == set(range(tknp))  # the requests spread over the ranks' trees
    assert all(o["cached"] % 8 == 0 for o in again)  # whole pages of 8 tokens
    # each pass of the second run reads the cached prefix: fewer new tokens than the first run's passes
    new = [sum(sum(p.extend_lens) for p in leader["runs"][name]["passes"]) for name in ("prefix", "prefix-again")]
    assert new[1] == new[0] - sum(o["cached"] for o in again)


@pytest.mark.parametrize("tp,tknp", LAYOUTS, ids=IDS)
@pytest.mark.parametrize("model", MODELS)
def test_worker_mirrors_equal_the_root_bookkeeping(tp, tknp, model):
    ranks = _launch()[(tp, tknp)]
    size = tp * tknp
    for i, r in enumerate(ranks):
        m = r["models"][model]
        leader = ranks[i // size * size]["models"][model]
        if i % size >= tp:
            assert m["digest"] == leader["digests"][i % size // tp]
            assert m["stats"]["new_tokens"] > 0 and m["stats"]["peak_kv_tokens"] > 0
        elif i % size == 0:
            assert len(m["digests"]) == tknp
        else:
            assert m["digests"] is None  # only the leading root keeps the bookkeeping
