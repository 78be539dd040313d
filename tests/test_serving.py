"""`hybridpar serve` with real clients: the official openai client, 64 concurrent streams, bad input, faults.

One server (TP 2, API key, integrity checks after every step) serves most tests; the fault tests
start their own. Every server is a child process on 127.0.0.1 (`start_server`).
"""
from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import httpx
import openai
import pytest

from hybridpar import LLM, SamplingParams
from hybridpar.serving import ServerStartError, start_server
from tests.test_engine import _gone

KEY = "test-key"
MODEL = "hybridpar/qwen2-tiny"
SYSTEM = ("You are a careful assistant. You answer questions about distributed inference, tensor parallelism, "
          "radix caches and token parallelism in one short sentence, with numbers where they help. ")  # shared prefix
PROMPTS = ["The radix cache", "Tensor parallelism splits each layer", "A token-parallel group"]
CHAT = [{"role": "user", "content": "What is a radix tree?"}]

pytestmark = pytest.mark.slow


def _info(url: str) -> dict:
    return httpx.get(f"{url}/server_info", headers={"Authorization": f"Bearer {KEY}"}).json()


def _idle(url: str, within: float = 20.0) -> dict:
    """The server's info once no request is live (aborts take a step to reach the ranks)."""
    end = time.monotonic() + within
    while True:
        info = _info(url)
        if info["num_requests"] == 0 or time.monotonic() > end:
            return info
        time.sleep(0.1)


def _stream(url: str, body: dict, after: int, then) -> list[str]:
    """The data of every server-sent event of a streamed completion; ``then()`` runs after ``after`` events."""
    events = []
    with httpx.stream("POST", f"{url}/v1/completions", json=body, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line[6:])
                if len(events) == after:
                    then()
    return events


@pytest.fixture(scope="module")
def reference() -> dict:
    """Greedy texts from LLM (TP 2, like the server): completions of PROMPTS and the chat reply."""
    with LLM(tensor_parallel_size=2) as llm:
        greedy = SamplingParams(max_tokens=12)
        return {"completions": [o.outputs[0].text for o in llm.generate(PROMPTS, greedy, use_tqdm=False)],
                "chat": llm.chat(CHAT, SamplingParams(max_tokens=16), use_tqdm=False)[0].outputs[0].text,
                "shared": [o.outputs[0].text for o in llm.generate([SYSTEM + f"Question {i}." for i in range(8)],
                                                                    SamplingParams(max_tokens=8), use_tqdm=False)]}


@pytest.fixture(scope="module")
def server():
    with start_server(tensor_parallel_size=2, api_key=KEY, debug_checks=True) as handle:
        yield handle


def test_openai_client_matches_llm_generate(server, reference) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key=KEY)
    assert [m.id for m in client.models.list().data] == [MODEL]
    for prompt, expected in zip(PROMPTS, reference["completions"]):
        r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0)
        assert r.choices[0].text == expected and r.choices[0].finish_reason in ("length", "stop")
        assert r.usage.completion_tokens <= 12 and r.usage.prompt_tokens > 0
        chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=12, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == expected
        assert chunks[-1].usage.total_tokens == r.usage.total_tokens  # the usage chunk comes last
    chat = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0)
    assert chat.choices[0].message.content == reference["chat"] and chat.choices[0].message.role == "assistant"
    streamed = client.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=16, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == reference["chat"]


def test_64_concurrent_streams_match_serial_and_free_the_pool(server, reference) -> None:
    client = openai.AsyncOpenAI(base_url=server.base_url, api_key=KEY, max_retries=0, timeout=300)

    async def one_client(c: int) -> list[tuple[int, str]]:
        out = []
        for j in range(2):  # each client sends two requests, one after the other
            i = (c + j) % 8
            stream = await client.completions.create(model=MODEL, prompt=SYSTEM + f"Question {i}.", max_tokens=8,
                                                     temperature=0, stream=True)
            out.append((i, "".join([ch.choices[0].text async for ch in stream if ch.choices])))
        return out

    async def run() -> list[list[tuple[int, str]]]:
        return await asyncio.gather(*(one_client(c) for c in range(64)))

    results = [x for per_client in asyncio.run(run()) for x in per_client]
    assert len(results) == 128 and all(text == reference["shared"][i] for i, text in results)
    info = _idle(server.url)
    assert info["load"]["kv_used_tokens"] == 0 and info["load"]["running"] == 0 and info["load"]["waiting"] == 0
    assert info["prefix_cache_hit_rate"] > 0.3  # the shared system prompt came from the radix cache
    metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prefix_cache_hit_rate",
                 "prompt_tokens_total", "generation_tokens_total", "time_to_first_token_seconds_bucket",
                 "time_per_output_token_seconds_bucket"):
        assert f"hybridpar:{name}" in metrics


@pytest.mark.parametrize("body,status,needle", [
    ("{not json", 400, "malformed JSON"),
    ({"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
    ({"prompt": "x", "temprature": 0}, 400, "temprature"),
    ({"prompt": "x", "n": 2}, 400, "n=2"),
    ({"prompt": "x", "logprobs": 1}, 400, "logprobs"),
    ({"prompt": "x", "model": "gpt-4"}, 404, "gpt-4"),
    ({"prompt": "x", "max_tokens": 5000}, 400, "5000"),
    ({"prompt": list(range(600)), "max_tokens": 1}, 400, "600 tokens"),
], ids=["json", "type", "unknown-field", "n", "logprobs", "model", "max-tokens", "prompt-too-long"])
def test_bad_input_gets_an_openai_error_and_touches_nothing(server, body, status: int, needle: str) -> None:
    content = body if isinstance(body, str) else json.dumps(body)
    r = httpx.post(f"{server.url}/v1/completions", content=content,
                   headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})
    assert r.status_code == status
    error = r.json()["error"]
    assert needle in error["message"] and error["code"] == status and error["type"]
    assert _info(server.url)["num_requests"] == 0


def test_api_key_guards_every_route_but_health(server) -> None:
    assert httpx.get(f"{server.url}/health").status_code == 200
    for path in ("/v1/models", "/metrics", "/server_info"):
        r = httpx.get(f"{server.url}{path}", headers={"Authorization": "Bearer wrong"})
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    assert httpx.post(f"{server.url}/v1/completions", json={"prompt": "x"}).status_code == 401


def test_a_client_that_leaves_mid_stream_frees_its_kv(server) -> None:
    body = {"prompt": SYSTEM, "max_tokens": 400, "ignore_eos": True, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}) as r:
        lines = r.iter_lines()
        assert next(lines).startswith("data: ")
        assert _info(server.url)["load"]["kv_used_tokens"] > 0  # the request holds KV while it runs
    info = _idle(server.url)  # the client hung up after one chunk; the ranks aborted the request
    assert info["num_requests"] == 0 and info["load"]["kv_used_tokens"] == 0
    metrics = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert f'finished_reason="abort",model_name="{MODEL}"}} 1.0' in metrics
    assert httpx.get(f"{server.url}/health").status_code == 200  # integrity checks held after every step


def test_a_dead_rank_ends_streams_with_503_and_the_server_exits_without_orphans() -> None:
    with start_server(tensor_parallel_size=2) as handle:
        pids = httpx.get(f"{handle.url}/server_info").json()["rank_pids"]
        body = {"prompt": SYSTEM, "max_tokens": 440, "ignore_eos": True, "temperature": 0, "stream": True}
        events = _stream(handle.url, body, after=2, then=lambda: os.kill(pids[1], signal.SIGKILL))
        assert events[-1] == "[DONE]" and json.loads(events[-2])["error"]["code"] == 503
        assert handle.process.wait(timeout=60) == 1  # the process exits by itself
        assert _gone(pids, within=20.0) and "rank 1" in handle.log()


def test_sigterm_drains_requests_in_flight_then_ends_the_ranks() -> None:
    handle = start_server()
    pids = httpx.get(f"{handle.url}/server_info").json()["rank_pids"]
    body = {"prompt": SYSTEM, "max_tokens": 64, "ignore_eos": True, "temperature": 0, "stream": True}
    chunks = _stream(handle.url, body, after=1, then=lambda: handle.process.send_signal(signal.SIGTERM))
    assert chunks[-1] == "[DONE]" and json.loads(chunks[-2])["choices"][0]["finish_reason"] == "length"
    with pytest.raises(httpx.TransportError):  # no new requests once draining started
        httpx.post(f"{handle.url}/v1/completions", json={"prompt": "x"}, timeout=5)
    handle.process.wait(timeout=60)
    assert _gone(pids, within=20.0) and "Application shutdown complete" in handle.log()


def test_a_bad_layout_fails_in_one_line_before_any_rank_starts() -> None:
    with pytest.raises(ServerStartError, match="tensor_parallel_size"):
        start_server(tensor_parallel_size=3)
