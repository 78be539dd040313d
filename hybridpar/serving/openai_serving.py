"""From an OpenAI request to the engine and back: one request, whole or streamed as server-sent events.

:class:`OpenAIServing` turns a checked request into prompt ids and :class:`SamplingParams`, hands
them to :class:`~hybridpar.engine.async_llm.AsyncLLM` and builds OpenAI's answer. It waits for the
first delta before answering, so a request the engine refuses still gets a proper HTTP status
instead of a stream that breaks. Text is detokenized here, incrementally
(:class:`~hybridpar.serving.detokenizer.IncrementalDetokenizer`), and the latency metrics are
taken here, where the client sees them. A client that leaves (a closed stream, or a dropped
connection while a whole answer is computed) ends the engine's generator, which aborts the
request on the ranks.
"""
from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from hybridpar.engine.async_llm import AsyncLLM, EngineDeadError, StreamDelta
from hybridpar.serving.detokenizer import IncrementalDetokenizer
from hybridpar.serving.metrics import ServerMetrics
from hybridpar.serving.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    completion_object,
    error_body,
    new_id,
    usage,
)

FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort"}
DISCONNECT_POLL_S = 0.5


def error_response(message: str, status: int) -> JSONResponse:
    kind = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
            503: "ServiceUnavailableError"}.get(status, "InternalServerError")
    return JSONResponse(error_body(message, kind, status), status_code=status)


class OpenAIServing:
    """The completions and chat routes' logic over one engine, for the model ``model_name``."""

    def __init__(self, engine: AsyncLLM, model_name: str, metrics: ServerMetrics) -> None:
        self.engine, self.model_name, self.metrics = engine, model_name, metrics
        self.tokenizer = engine.tokenizer

    async def create_completion(self, req: CompletionRequest | ChatCompletionRequest, raw: Request) -> Any:
        arrival = time.perf_counter()
        chat = isinstance(req, ChatCompletionRequest)
        if req.model is not None and req.model != self.model_name:
            return error_response(f"The model `{req.model}` does not exist; this server serves "
                                  f"`{self.model_name}` (GET /v1/models)", 404)
        try:
            ids = self._prompt_ids(req)
            if chat:
                max_tokens = req.max_completion_tokens or req.max_tokens or self.engine.llm.max_model_len - len(ids)
            else:
                max_tokens = req.max_tokens or 16
            params = req.to_sampling_params(max(max_tokens, 1))
            rid = new_id("chatcmpl" if chat else "cmpl")
            stream = self.engine.generate(ids, params, rid)
            first = await anext(stream)  # the engine's checks run here; the request is queued
        except EngineDeadError as exc:
            return error_response(str(exc), 503)
        except ValueError as exc:
            return error_response(str(exc), 400)
        call = _Call(self, req, rid, ids, params.stop, arrival)
        if req.stream:
            return StreamingResponse(call.events(first, stream), media_type="text/event-stream")
        task = asyncio.ensure_future(call.drain(first, stream))
        while not task.done():  # a client that hangs up aborts the request
            await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if not task.done() and await raw.is_disconnected():
                task.cancel()
                return error_response("client disconnected", 499)
        try:
            return JSONResponse(task.result())
        except EngineDeadError as exc:
            return error_response(str(exc), 503)

    def _prompt_ids(self, req: CompletionRequest | ChatCompletionRequest) -> list[int]:
        if isinstance(req, ChatCompletionRequest):
            if not getattr(self.tokenizer, "chat_template", None):
                raise ValueError(f"the tokenizer of {self.model_name} has no chat template; use /v1/completions")
            messages = [{"role": m.role, "content": m.text()} for m in req.messages]
            prompt: str | list[int] = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                                        tokenize=False)
        else:
            prompt = req.single_prompt()
        return list(self.tokenizer(prompt).input_ids) if isinstance(prompt, str) else list(prompt)


class _Call:
    """One request in flight: its detokenizer, its metrics, and the objects that go back."""

    def __init__(self, serving: OpenAIServing, req: Any, rid: str, ids: list[int], stop: tuple[str, ...],
                 arrival: float) -> None:
        self.s, self.req, self.rid, self.ids, self.arrival = serving, req, rid, ids, arrival
        self.chat = isinstance(req, ChatCompletionRequest)
        self.detok = IncrementalDetokenizer(serving.tokenizer, stop)
        self.done = False  # its result came back (else, when the client leaves, it counts as aborted)
        self.first_token_s: float | None = None

    def on_delta(self, delta: StreamDelta) -> str:
        """Metrics for a delta, and the text it adds."""
        now = time.perf_counter() - self.arrival
        if delta.token_ids:
            self.s.metrics.observe_tokens(len(delta.token_ids))
            if self.first_token_s is None:
                self.first_token_s = now
                self.s.metrics.observe_first_token(now)
        text = self.detok.push(delta.token_ids, final=delta.finished is not None)
        if delta.finished is not None:
            self.done = True
            self.s.metrics.observe_finished(delta.finished, self.finish_reason(delta), self.first_token_s, now)
        return text

    def finish_reason(self, delta: StreamDelta) -> str:
        assert delta.finished is not None
        return "stop" if self.detok.stopped_by else FINISH_REASONS[delta.finished.finish_reason]

    def usage(self, delta: StreamDelta) -> dict[str, Any]:
        assert delta.finished is not None
        return usage(len(self.ids), len(delta.finished.output_ids), delta.finished.cached_tokens)

    def choice(self, text: str, finish: str | None, chunk: bool) -> dict[str, Any]:
        if not self.chat:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
        body = {"role": "assistant", "content": text}
        return {"index": 0, ("delta" if chunk else "message"): body, "logprobs": None, "finish_reason": finish}

    async def drain(self, first: StreamDelta, stream: AsyncIterator[StreamDelta]) -> dict[str, Any]:
        """The whole answer (non-streaming)."""
        text, last = self.on_delta(first), first
        try:
            async for delta in stream:
                text += self.on_delta(delta)
                last = delta
        finally:
            await self._close(stream)  # cancelled (client gone): the engine aborts the request
        return completion_object(self.rid, self.s.model_name, self.choice(text, self.finish_reason(last), False),
                                 self.chat, False, self.usage(last))

    async def events(self, first: StreamDelta, stream: AsyncIterator[StreamDelta]) -> AsyncIterator[str]:
        """Server-sent events: one chunk per delta with text, a last chunk with the finish reason, [DONE]."""
        name, delta = self.s.model_name, first
        try:
            if self.chat:
                yield _sse(completion_object(self.rid, name, self.choice("", None, True) | {
                    "delta": {"role": "assistant", "content": ""}}, True, True))
            text = self.on_delta(first)
            while True:
                if delta.finished is not None:
                    yield _sse(completion_object(self.rid, name, self.choice(text, self.finish_reason(delta), True),
                                                 self.chat, True))
                    break
                if delta.token_ids:  # one event per step that sampled tokens, even while their text is held back
                    yield _sse(completion_object(self.rid, name, self.choice(text, None, True), self.chat, True))
                delta = await anext(stream)
                text = self.on_delta(delta)
            options = self.req.stream_options
            if options is not None and options.include_usage:
                yield _sse(completion_object(self.rid, name, {}, self.chat, True, self.usage(delta)))
        except EngineDeadError as exc:
            yield _sse(error_body(str(exc), "ServiceUnavailableError", 503))
        finally:
            await self._close(stream)  # the client left mid-stream: the engine aborts the request
        yield "data: [DONE]\n\n"

    async def _close(self, stream: Any) -> None:
        await stream.aclose()
        if not self.done:
            self.s.metrics.observe_aborted()


def _sse(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"
