"""The server's Prometheus metrics (``GET /metrics``), named after vLLM's with a ``hybridpar:`` prefix.

==========================================  =========  ==================================================
metric                                      type       what
==========================================  =========  ==================================================
``hybridpar:num_requests_running``          gauge      requests in a batch (prefilling or decoding)
``hybridpar:num_requests_waiting``          gauge      requests queued on the ranks
``hybridpar:kv_cache_usage_perc``           gauge      share of KV slots held by requests (0..1)
``hybridpar:prefix_cache_hit_rate``         gauge      cached prompt tokens / prompt tokens, so far
``hybridpar:prompt_tokens_total``           counter    prompt tokens of finished requests
``hybridpar:prefix_cache_hits_total``       counter    of which served from the radix cache
``hybridpar:generation_tokens_total``       counter    tokens generated
``hybridpar:request_success_total``         counter    ended requests, by finish reason (``abort``: client left)
``hybridpar:time_to_first_token_seconds``   histogram  HTTP request arrival -> first token
``hybridpar:time_per_output_token_seconds`` histogram  (last - first token time) / (tokens - 1)
``hybridpar:e2e_request_latency_seconds``   histogram  arrival -> last token
==========================================  =========  ==================================================

Times are measured in the server process, where a client sees them. Each server owns its own
registry, so several servers (or tests) in one process do not collide.
"""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics, generate_latest

from hybridpar.core import RequestResult, SchedulerLoad

disable_created_metrics()  # no ``*_created`` series next to every counter (as vLLM)
_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TPOT_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServerMetrics:
    """The metrics of one server; ``observe_*`` feed them, :meth:`render` writes the text format."""

    def __init__(self, model_name: str) -> None:
        self.registry = CollectorRegistry()
        r, labels = self.registry, ["model_name"]
        self._running = Gauge("hybridpar:num_requests_running", "Requests in a batch", labels, registry=r)
        self._waiting = Gauge("hybridpar:num_requests_waiting", "Requests waiting on the ranks", labels, registry=r)
        self._kv = Gauge("hybridpar:kv_cache_usage_perc", "Share of KV slots held by requests (0-1)", labels,
                         registry=r)
        self._hit_rate = Gauge("hybridpar:prefix_cache_hit_rate", "Cached prompt tokens / prompt tokens", labels,
                               registry=r)
        self._prompt = Counter("hybridpar:prompt_tokens", "Prompt tokens of finished requests", labels, registry=r)
        self._hits = Counter("hybridpar:prefix_cache_hits", "Prompt tokens served from the radix cache", labels,
                             registry=r)
        self._generated = Counter("hybridpar:generation_tokens", "Generated tokens", labels, registry=r)
        self._success = Counter("hybridpar:request_success", "Finished requests", labels + ["finished_reason"],
                                registry=r)
        self._ttft = Histogram("hybridpar:time_to_first_token_seconds", "Time to first token", labels,
                               buckets=_LATENCY_BUCKETS, registry=r)
        self._tpot = Histogram("hybridpar:time_per_output_token_seconds", "Time per output token after the first",
                               labels, buckets=_TPOT_BUCKETS, registry=r)
        self._e2e = Histogram("hybridpar:e2e_request_latency_seconds", "Request latency", labels,
                              buckets=_LATENCY_BUCKETS, registry=r)
        self.model_name = model_name
        self.prompt_tokens = self.cached_tokens = 0

    def observe_load(self, load: SchedulerLoad) -> None:
        m = self.model_name
        self._running.labels(m).set(load.running)
        self._waiting.labels(m).set(load.waiting)
        self._kv.labels(m).set(load.kv_usage)

    def observe_tokens(self, n: int) -> None:
        self._generated.labels(self.model_name).inc(n)

    def observe_first_token(self, ttft_s: float) -> None:
        self._ttft.labels(self.model_name).observe(ttft_s)

    def observe_finished(self, result: RequestResult, finish_reason: str, first_s: float | None, last_s: float) -> None:
        """A request ended: its prompt and cache counts, reason, latency and time per output token."""
        m = self.model_name
        self.prompt_tokens += len(result.prompt_ids)
        self.cached_tokens += result.cached_tokens
        self._prompt.labels(m).inc(len(result.prompt_ids))
        self._hits.labels(m).inc(result.cached_tokens)
        self._hit_rate.labels(m).set(self.cached_tokens / self.prompt_tokens if self.prompt_tokens else 0.0)
        self._success.labels(m, finish_reason).inc()
        self._e2e.labels(m).observe(last_s)
        n = len(result.output_ids)
        if first_s is not None and n > 1:
            self._tpot.labels(m).observe((last_s - first_s) / (n - 1))

    def observe_aborted(self) -> None:
        """A request whose client left before it finished (the engine aborted it)."""
        self._success.labels(self.model_name, "abort").inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
