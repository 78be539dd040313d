"""``hybridpar serve``: an OpenAI-compatible HTTP server on the engine (FastAPI + uvicorn, as vLLM and SGLang).

==============================  =================================================================
route                           what
==============================  =================================================================
``POST /v1/completions``        a completion; ``"stream": true`` for server-sent events
``POST /v1/chat/completions``   a chat reply through the tokenizer's chat template; streams too
``GET /v1/models``              the one model served
``GET /health``                 200 while every rank serves, 503 otherwise (no key needed)
``GET /metrics``                Prometheus text (:mod:`hybridpar.serving.metrics`)
``GET /server_info``            the engine's layout, rank PIDs and load (SGLang's ``get_server_info``)
==============================  =================================================================

Errors have OpenAI's body ``{"error": {"message", "type", "param", "code"}}``: malformed JSON and
fields of the wrong type or unknown give 400 (not FastAPI's usual 422), as do prompts too long for
the context and parameters the engine lacks; an unknown model 404; a missing or wrong API key
401; a dead engine 503. Shutdown (SIGTERM, Ctrl-C): uvicorn stops accepting connections and lets
the requests in flight finish (at most ``drain_timeout`` s), then the engine ends its ranks. If a
rank dies, open requests end with a 503 error, a log line says which rank, and the process exits.
"""
from __future__ import annotations

import asyncio
import logging
import secrets
from contextlib import asynccontextmanager
from typing import Any, Callable

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from hybridpar.engine.async_llm import AsyncLLM
from hybridpar.models.default_checkpoint import BUILTIN_PREFIX, DEFAULT_MODEL
from hybridpar.serving.metrics import ServerMetrics
from hybridpar.serving.openai_serving import OpenAIServing, error_response
from hybridpar.serving.protocol import ChatCompletionRequest, CompletionRequest

logger = logging.getLogger("hybridpar.serve")
EXIT_AFTER_DEATH_S = 1.0  # time for the 503 events to reach the clients before the process exits


def build_app(engine: AsyncLLM, model_name: str, api_key: str | None = None, drain_timeout: float = 30.0,
              exit_server: Callable[[], None] | None = None) -> FastAPI:
    """The server's app over a built ``engine`` (its ranks up); the app's lifespan starts and ends it.

    ``exit_server``: called when the engine dies, to end the process (uvicorn's ``should_exit``).
    """
    metrics = ServerMetrics(model_name)
    serving = OpenAIServing(engine, model_name, metrics)

    def on_dead(exc: BaseException) -> None:
        logger.error("hybridpar serve: %s; the engine's ranks are gone, exiting", str(exc).splitlines()[0])
        if exit_server is not None:
            asyncio.get_running_loop().call_later(EXIT_AFTER_DEATH_S, exit_server)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.on_dead = on_dead
        engine.start()
        yield
        await engine.shutdown(drain_timeout)

    async def check_api_key(request: Request) -> None:
        """Every route but /health: a plain dependency (no HTTP middleware in the path of a stream)."""
        given = request.headers.get("authorization", "")
        if api_key is not None and not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
            raise HTTPException(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'")

    app = FastAPI(title="hybridpar", lifespan=lifespan)
    keyed = [Depends(check_api_key)]

    @app.exception_handler(RequestValidationError)
    async def bad_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join("malformed JSON" if e["type"] == "json_invalid" else
                             f"{'.'.join(str(x) for x in e['loc'][1:]) or 'body'}: {e['msg']}" for e in exc.errors())
        return error_response(f"invalid request: {problems}", 400)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        return error_response(str(exc.detail), exc.status_code)

    @app.post("/v1/completions", dependencies=keyed)
    async def completions(req: CompletionRequest, raw: Request) -> Any:
        return await serving.create_completion(req, raw)

    @app.post("/v1/chat/completions", dependencies=keyed)
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Any:
        return await serving.create_completion(req, raw)

    @app.get("/v1/models", dependencies=keyed)
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "hybridpar",
                                             "max_model_len": engine.llm.max_model_len}]}

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/metrics", dependencies=keyed)
    async def prometheus() -> Response:
        metrics.observe_load(engine.total_load())
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/server_info", dependencies=keyed)
    async def server_info() -> dict[str, Any]:
        c = engine.llm.config
        return {"model": model_name, "tensor_parallel_size": c.tensor_parallel_size,
                "token_parallel_size": c.token_parallel_size, "token_parallel": c.token_parallel,
                "data_parallel_size": c.data_parallel_size, "enable_prefix_caching": c.enable_prefix_caching,
                "max_model_len": engine.llm.max_model_len, "rank_pids": engine.llm.pids,
                "num_requests": engine.num_requests, "load": vars(engine.total_load()),
                "prefix_cache_hit_rate": metrics.cached_tokens / max(metrics.prompt_tokens, 1)}

    return app


def run_server(engine_args: dict[str, Any], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
               served_model_name: str | None = None, drain_timeout: float = 30.0, log_level: str = "info") -> int:
    """Build the engine, serve until SIGTERM / Ctrl-C (or a rank dies), end the ranks. Exit status: 0, or 1
    when the engine died."""
    import uvicorn

    logging.basicConfig(level=getattr(logging, log_level.upper()), format="%(levelname)s %(name)s: %(message)s")
    engine = AsyncLLM(**engine_args)
    name = served_model_name or engine_args.get("model") or BUILTIN_PREFIX + DEFAULT_MODEL
    server: uvicorn.Server | None = None

    def exit_server() -> None:
        if server is not None:
            server.should_exit = True

    app = build_app(engine, name, api_key, drain_timeout, exit_server)
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=drain_timeout)
    server = uvicorn.Server(config)
    logger.info("hybridpar serve: %s on %d rank(s) (PIDs %s) at http://%s:%d", name, len(engine.llm.pids),
                engine.llm.pids, host, port)
    try:
        server.run()
    finally:
        engine.llm.shutdown()  # idempotent; covers a server that failed before its lifespan ended
    return 1 if engine.errored is not None else 0
