"""An OpenAI-compatible server on the engine: ``hybridpar serve`` and, for notebooks, :func:`start_server`.

Layers, top down: :mod:`~hybridpar.serving.api_server` (FastAPI routes, errors, keys, lifespan),
:mod:`~hybridpar.serving.openai_serving` (a request to the engine and back, whole or streamed),
:mod:`~hybridpar.serving.protocol` (OpenAI's schemas), :mod:`~hybridpar.serving.detokenizer`,
:mod:`~hybridpar.serving.metrics` (Prometheus); underneath,
:class:`~hybridpar.engine.async_llm.AsyncLLM`.
"""
from hybridpar.serving.launch import ServerHandle, ServerStartError, start_server

__all__ = ["ServerHandle", "ServerStartError", "start_server"]
