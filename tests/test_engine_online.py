"""The online engine (AsyncLLM): requests that arrive, stream and leave while the ranks run, in every layout."""
from __future__ import annotations

import asyncio

import pytest

from hybridpar import SamplingParams
from hybridpar.engine.async_llm import AsyncLLM, RequestRejectedError
from hybridpar.models.default_checkpoint import resolve_model
from hybridpar.models.verify import hf_reference

PROMPTS = ["The radix cache", "Tensor parallelism splits each layer", "A token-parallel group"]
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module")
def prompts_and_reference() -> tuple[list[list[int]], list[list[int]]]:
    from transformers import AutoTokenizer

    path = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(str(path))
    ids = [tok(p).input_ids for p in PROMPTS]
    return ids, hf_reference(path, ids, max_new_tokens=GREEDY.max_tokens).continuations


async def _collect(engine: AsyncLLM, ids: list[int], params: SamplingParams, rid: str) -> tuple[list[int], str]:
    tokens, reason = [], ""
    async for delta in engine.generate(ids, params, rid):
        tokens += delta.token_ids
        if delta.finished is not None:
            assert delta.finished.output_ids == tokens  # the streamed tokens are the result's
            reason = delta.finished.finish_reason
    return tokens, reason


@pytest.mark.slow
@pytest.mark.parametrize("layout,pool_tokens", [(dict(token_parallel_size=2), None), (dict(data_parallel_size=2), 160)],
                         ids=["tknp2", "dp2"])
def test_online_engine_matches_transformers_and_aborts_cleanly(layout: dict, pool_tokens: int | None,
                                                               prompts_and_reference) -> None:
    """Under TKNP each rank's pool is sized for max_num_seqs whole requests; under DP ``pool_tokens`` is small
    enough that one request can never fit, and the replica rejects it."""
    ids, reference = prompts_and_reference

    async def run() -> None:
        engine = AsyncLLM(**layout, max_model_len=256, kv_cache_tokens=pool_tokens, debug_checks=True)
        engine.start()
        try:
            streams = [_collect(engine, p, GREEDY, f"r{k}-{i}") for k in range(3) for i, p in enumerate(ids)]
            results = await asyncio.gather(*streams)
            assert [t for t, _ in results] == reference * 3 and {r for _, r in results} == {"length"}
            long = SamplingParams(max_tokens=100, ignore_eos=True)
            leaver = engine.generate(ids[0], long, "leaves")
            assert len((await anext(leaver)).token_ids) >= 1
            await leaver.aclose()  # the consumer leaves: the request is aborted on the ranks
            if pool_tokens is not None:
                with pytest.raises(RequestRejectedError, match="KV pages"):  # larger than the replica's whole pool
                    await _collect(engine, list(range(3, 250)), SamplingParams(max_tokens=5), "huge")
            for _ in range(200):
                if engine.num_requests == 0:
                    break
                await asyncio.sleep(0.05)
            load = engine.total_load()
            assert engine.num_requests == 0 and load.kv_used_tokens == 0 and load.running == load.waiting == 0
            longest = SamplingParams(max_tokens=(pool_tokens or 256) - len(ids[1]), ignore_eos=True)
            busy = engine.generate(ids[1], longest, "cut-by-stop")
            tokens = (await anext(busy)).token_ids  # it runs: hundreds of steps to go
        finally:
            await engine.shutdown(drain_timeout=0.0)  # aborts what runs, then ends the ranks
        reason = ""
        async for delta in busy:
            tokens += delta.token_ids
            reason = delta.finished.finish_reason if delta.finished is not None else reason
        assert reason == "abort" and len(tokens) < longest.max_tokens
        assert engine.final_stats is not None and not engine.is_running

    asyncio.run(run())
