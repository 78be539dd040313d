"""OpenAI's request and response schemas, as far as hybridpar serves them (pydantic models).

Requests are checked here, before the engine sees them: wrong types and malformed JSON fail in
pydantic (answered 400 by the server, with OpenAI's error body), and :meth:`sampling_params`
turns what the engine cannot do (``n > 1``, ``logprobs``, penalties, ``echo``, ``best_of``) into a
``ValueError`` that says so. Fields OpenAI has that change nothing here (``user``, ``metadata``)
are accepted and ignored; a field nobody knows is an error (as OpenAI answers "Unrecognized request
argument"), so a misspelt ``temprature`` does not pass silently. Defaults are OpenAI's:
``temperature=1``, ``max_tokens=16`` for completions and the rest of the context for chat.
"""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from hybridpar.core import SamplingParams


class StreamOptions(BaseModel):
    include_usage: bool = False


class _SamplingRequest(BaseModel):
    """The fields completions and chat share."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = None
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = -1  # vLLM's extra: -1 (or 0) = off
    seed: int | None = Field(None, ge=0)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    logprobs: Any = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    ignore_eos: bool = False  # vLLM's extra
    user: str | None = None
    metadata: dict[str, str] | None = None

    def _unsupported(self) -> list[str]:
        out = []
        if self.n != 1:
            out.append(f"n={self.n} (only n=1 is supported)")
        if self.logprobs not in (None, False):
            out.append("logprobs (not supported)")
        if self.presence_penalty or self.frequency_penalty:
            out.append("presence_penalty / frequency_penalty (only 0 is supported)")
        return out

    def to_sampling_params(self, max_tokens: int) -> SamplingParams:
        bad = self._unsupported()
        if bad:
            raise ValueError("unsupported parameter: " + "; ".join(bad))
        return SamplingParams(max_tokens=max_tokens, temperature=self.temperature, top_p=self.top_p,
                              top_k=self.top_k, seed=self.seed, ignore_eos=self.ignore_eos, stop=self.stop)


class CompletionRequest(_SamplingRequest):
    """``POST /v1/completions``. ``prompt``: text, token ids, or a list of one of them."""

    prompt: str | list[int] | list[str] | list[list[int]]
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    best_of: int | None = None
    suffix: str | None = None

    def single_prompt(self) -> str | list[int]:
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise ValueError(f"a batch of {len(p)} prompts in one request is not supported; send one request "
                                 "per prompt")
            p = p[0]
        if self.echo or self.suffix is not None or (self.best_of or 1) > 1:
            raise ValueError("unsupported parameter: echo / suffix / best_of")
        return p


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[dict[str, Any]]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        parts = [p.get("text") for p in self.content if p.get("type") == "text"]
        if len(parts) != len(self.content) or any(not isinstance(t, str) for t in parts):
            raise ValueError("only text content parts are supported")
        return "".join(parts)


class ChatCompletionRequest(_SamplingRequest):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# ------------------------------------------------------------------------------- responses (plain dicts)
def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> dict[str, Any]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def completion_object(rid: str, model: str, choice: dict[str, Any], chat: bool, chunk: bool,
                      usage_: dict[str, Any] | None = None) -> dict[str, Any]:
    """A completion (or a stream chunk of one); ``choice`` is the single choice (``{}``: none)."""
    kind = ("chat.completion" if chat else "text_completion") + (".chunk" if chunk and chat else "")
    return {"id": rid, "object": kind, "created": int(time.time()), "model": model,
            "choices": [choice] if choice else [], "usage": usage_}


def error_body(message: str, type_: str, code: int) -> dict[str, Any]:
    """OpenAI's error object."""
    return {"error": {"message": message, "type": type_, "param": None, "code": code}}
