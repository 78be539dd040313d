"""The engine's LLM API: same tokens as transformers in every layout, persistent ranks, clean faults."""
from __future__ import annotations

import functools
import multiprocessing
import time

import psutil
import pytest

from hybridpar import LLM, SamplingParams
from hybridpar.config import ParallelConfigError
from hybridpar.distributed.rank_pool import PoolBrokenError
from hybridpar.distributed.replies import RankFailedError
from hybridpar.models.default_checkpoint import resolve_model
from hybridpar.models.verify import hf_reference
from tests.engine_workers import FaultyWorker

PROMPTS = ["The radix cache", "Tensor parallelism splits each layer", "A token-parallel group"]
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
LONG = list(range(5, 45))  # more than two KV pages of 16 tokens: the radix cache keeps whole pages


def _gone(pids: list[int], within: float = 10.0) -> bool:
    """Every process of ``pids`` has exited (or is a zombie) within ``within`` seconds."""
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        if not any(psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE for p in pids):
            return True
        time.sleep(0.1)
    return False


@pytest.fixture(scope="module")
def reference() -> list[list[int]]:
    """transformers' greedy continuations of PROMPTS on the built-in model."""
    from transformers import AutoTokenizer

    path = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(str(path))
    return hf_reference(path, [tok(p).input_ids for p in PROMPTS], max_new_tokens=GREEDY.max_tokens).continuations


@pytest.mark.slow
@pytest.mark.parametrize("layout", [dict(tensor_parallel_size=2), dict(token_parallel_size=2),
                                    dict(tensor_parallel_size=2, token_parallel_size=2),
                                    dict(data_parallel_size=2)], ids=["tp2", "tknp2", "tp2xtknp2", "dp2"])
def test_llm_matches_transformers(layout: dict, reference: list[list[int]]) -> None:
    with LLM(**layout, backend="gloo") as llm:
        outs = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert [o.outputs[0].token_ids for o in outs] == reference
        assert [o.prompt for o in outs] == PROMPTS and [o.request_id for o in outs] == ["0", "1", "2"]
        first, again = (llm.generate([LONG], GREEDY, use_tqdm=False)[0] for _ in range(2))
        assert again.outputs[0].token_ids == first.outputs[0].token_ids
        assert first.num_cached_tokens == 0 and again.num_cached_tokens >= 32  # the ranks kept their radix trees


@pytest.mark.slow
def test_ranks_persist_and_shutdown_leaves_no_process() -> None:
    llm = LLM(tensor_parallel_size=2, backend="gloo")
    pids = llm.pids
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    first = llm.generate([LONG], SamplingParams(max_tokens=3), use_tqdm=False)
    second = llm.generate([LONG], SamplingParams(max_tokens=3), use_tqdm=False)
    assert llm.pids == pids and all(psutil.pid_exists(p) for p in pids)
    assert first[0].outputs[0].token_ids == second[0].outputs[0].token_ids
    assert second[0].num_cached_tokens > 0  # the first call's KV is still in the ranks' pools
    # stop strings: the text is cut before the stop string, and the reason is reported
    text = first[0].outputs[0].text
    if len(text.strip()) > 1:
        stop = text.strip()[-1]
        cut = llm.generate([LONG], SamplingParams(max_tokens=3, stop=stop), use_tqdm=False)[0].outputs[0]
        assert stop not in cut.text and cut.stop_reason == stop and cut.finish_reason == "stop"
    llm.shutdown()
    assert _gone(pids)
    with pytest.raises(PoolBrokenError, match="build a new one"):
        llm.generate("x", use_tqdm=False)


@pytest.mark.slow
def test_a_killed_rank_raises_names_it_and_leaves_nothing() -> None:
    llm = LLM(tensor_parallel_size=2, backend="gloo")
    pids = llm.pids
    psutil.Process(pids[1]).kill()
    start = time.monotonic()
    with pytest.raises(RankFailedError, match="rank 1"):
        llm.generate("The radix cache", GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 60
    assert _gone(pids)
    with pytest.raises(PoolBrokenError):
        llm.generate("again", use_tqdm=False)


@pytest.mark.slow
@pytest.mark.parametrize("rank,stage", [(0, "schedule"), (0, "forward"), (0, "sample"), (1, "schedule"),
                                        (1, "forward"), (1, "kill")])
def test_a_fault_surfaces_at_once_with_its_exception(rank: int, stage: str) -> None:
    worker = functools.partial(FaultyWorker, rank=rank, stage=stage)
    llm = LLM(tensor_parallel_size=2, backend="gloo", worker_cls=worker)
    pids = llm.pids
    start = time.monotonic()
    with pytest.raises(RankFailedError) as err:
        llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert time.monotonic() - start < 60  # seconds, not the call timeout (an hour) or a hang
    assert err.value.rank == rank
    if stage != "kill":
        assert f"InjectedFault: injected in {stage} on rank {rank}" in str(err.value)
    assert _gone(pids)


def test_invalid_configs_raise_before_any_rank_starts() -> None:
    cases = [
        (dict(token_parallel_size=2, data_parallel_size=2), ParallelConfigError, "mutually exclusive"),
        (dict(tensor_parallel_size=3), ValueError, "tensor_parallel_size"),
        (dict(tensor_parallel_size=0), ParallelConfigError, ">= 1"),
        (dict(dtype="fp8"), ValueError, "dtype"),
        (dict(schedule_policy="sjf"), ValueError, "schedule_policy"),
        (dict(page_size=0), ValueError, "page_size"),
        (dict(max_model_len=10**9), ValueError, "max_model_len"),
        (dict(model="/nonexistent/checkpoint"), FileNotFoundError, "qwen2-tiny"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            LLM(backend="gloo", **kwargs)
        assert multiprocessing.active_children() == [], kwargs


@pytest.mark.parametrize("kwargs", [dict(max_new_tokens=2.5), dict(temperature=float("nan")), dict(max_tokens=0),
                                    dict(top_p=0.0), dict(top_k=-2), dict(stop=[""]), dict(seed=-1)])
def test_bad_sampling_params_raise_at_construction(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


@pytest.mark.slow
def test_bad_prompts_raise_in_the_parent_and_the_engine_goes_on() -> None:
    with LLM(backend="gloo", max_model_len=64) as llm:
        for prompts, match in [([""], "prompt 0 is empty"), ([[]], "empty"), ([[10**9]], "outside"),
                               (["x" * 200], "exceeds max_model_len"), ([1.5], "string or a list")]:
            with pytest.raises(ValueError, match=match):
                llm.generate(prompts, use_tqdm=False)
        with pytest.raises(ValueError, match="one per prompt"):
            llm.generate(["a", "b"], [GREEDY], use_tqdm=False)
        tok = llm.get_tokenizer()
        chat = llm.chat([{"role": "user", "content": "What is a KV cache?"}], SamplingParams(max_tokens=4),
                        use_tqdm=False)[0]
        assert chat.prompt.startswith("<|im_start|>user") and len(chat.outputs[0].token_ids) == 4  # ChatML
        template, tok.chat_template = tok.chat_template, None
        with pytest.raises(ValueError, match="has no chat template"):
            llm.chat([{"role": "user", "content": "hi"}])
        tok.chat_template = template
        assert llm.generate("The", SamplingParams(max_tokens=2), use_tqdm=False)[0].outputs[0].token_ids


@pytest.mark.slow
def test_progress_bar_counts_every_request(capsys: pytest.CaptureFixture) -> None:
    with LLM(backend="gloo") as llm:
        llm.generate(PROMPTS, SamplingParams(max_tokens=3), use_tqdm=True)
    err = capsys.readouterr().err
    assert "Processed prompts" in err and "3/3" in err and "tok/s" in err
