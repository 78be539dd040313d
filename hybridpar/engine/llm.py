"""``LLM``: vLLM's offline API on hybridpar's engine, with ranks that persist between calls.

::

    from hybridpar import LLM, SamplingParams

    llm = LLM(tensor_parallel_size=2)                        # starts 2 ranks once (the built-in model)
    outs = llm.generate(["The KV cache"], SamplingParams(max_tokens=16))
    print(outs[0].outputs[0].text)
    outs = llm.generate([...])                               # same ranks, warm radix cache
    llm.shutdown()                                           # or `with LLM(...) as llm:`

The parent process holds the tokenizer, checks every input, splits the requests over the DP
replicas and turns the ranks' results into :class:`~hybridpar.engine.outputs.RequestOutput`. The
ranks (:class:`~hybridpar.engine.worker.EngineWorker` in a
:class:`~hybridpar.distributed.rank_pool.RankPool`) hold the model shards, KV pools and radix
trees. A rank that fails makes ``generate`` raise at once with that rank's traceback; the ranks
are then gone and the object refuses further calls.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Callable

from hybridpar.engine.config import EngineConfig
from hybridpar.engine.executor import make_executor
from hybridpar.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from hybridpar.engine.worker import EngineWorker
from hybridpar.core import SamplingParams

Prompt = str | Sequence[int]


class LLM:
    """An engine for offline batched generation; see the module docstring and :class:`EngineConfig`.

    ``backend``: "auto" (NCCL with one GPU per rank, else gloo), "gloo" or "nccl".
    ``distributed_executor_backend``: ``"mp"`` spawns the ranks; ``"torchrun"`` (or ``"external_launcher"``)
    makes this process one rank of a torchrun job (every rank runs the same script); ``"ray"`` starts
    one Ray actor per rank, placed as ``ray_placement`` says (:mod:`~hybridpar.engine.executor`).
    ``start_timeout``: seconds the ranks may take to start.
    ``worker_cls``: what each rank builds from the config (tests inject faults through it).
    """

    def __init__(self, model: str | None = None, *, tensor_parallel_size: int = 1, token_parallel_size: int = 1,
                 enable_token_parallel: bool | None = None, data_parallel_size: int = 1,
                 enable_expert_parallel: bool = False, dtype: str = "auto",
                 page_size: int = 16, enable_prefix_caching: bool = True, schedule_policy: str = "lpm",
                 max_num_seqs: int = 64, max_model_len: int | None = None, kv_cache_tokens: int | None = None,
                 gpu_memory_utilization: float = 0.85, seed: int = 0, debug_checks: bool = False,
                 enforce_eager: bool = False, attention_backend: str | None = None, backend: str = "auto",
                 distributed_executor_backend: str = "mp",
                 ray_placement: str = "pack", start_timeout: float = 300.0,
                 worker_cls: Callable[[EngineConfig], Any] = EngineWorker) -> None:
        self.config = EngineConfig(
            model=model, tensor_parallel_size=tensor_parallel_size, token_parallel_size=token_parallel_size,
            enable_token_parallel=enable_token_parallel, data_parallel_size=data_parallel_size,
            enable_expert_parallel=enable_expert_parallel, dtype=dtype,
            page_size=page_size, enable_prefix_caching=enable_prefix_caching, schedule_policy=schedule_policy,
            max_num_seqs=max_num_seqs, max_model_len=max_model_len, kv_cache_tokens=kv_cache_tokens,
            gpu_memory_utilization=gpu_memory_utilization, seed=seed, debug_checks=debug_checks,
            enforce_eager=enforce_eager, attention_backend=attention_backend)
        self.model_config = self.config.check()
        self.max_model_len = self.config.context_len(self.model_config)
        self._tokenizer: Any = None
        self._next_id = 0
        self._pool = make_executor(distributed_executor_backend, worker_cls, self.config, backend, start_timeout,
                                   ray_placement)

    # ---------------------------------------------------------------- tokenizer
    def get_tokenizer(self) -> Any:
        """The checkpoint's tokenizer (``transformers.AutoTokenizer``), loaded in this process on first use."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from hybridpar.models.default_checkpoint import resolve_model

            self._tokenizer = AutoTokenizer.from_pretrained(str(resolve_model(self.config.model)))
        return self._tokenizer

    # ---------------------------------------------------------------- generation
    def generate(self, prompts: Prompt | Sequence[Prompt], sampling_params: SamplingParams
                 | Sequence[SamplingParams] | None = None, use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate for each prompt (text or token ids); one :class:`RequestOutput` per prompt, in order.

        ``sampling_params``: one for all prompts or one per prompt (default: greedy, 32 tokens).
        Every prompt and parameter is checked here, before any rank sees it.
        """
        prompts = self._as_list(prompts)
        params = self._params_for(prompts, sampling_params)
        texts = [p if isinstance(p, str) else None for p in prompts]
        ids = [self._encode(p) for p in prompts]
        for i, (tokens, sp) in enumerate(zip(ids, params)):
            self.check_request(tokens, sp, f"prompt {i}")
        replicas = self.num_replicas
        batches: list[list[tuple[list[int], SamplingParams]]] = [[] for _ in range(replicas)]
        for i, (tokens, sp) in enumerate(zip(ids, params)):
            batches[i % replicas].append((tokens, sp))  # round robin over the DP replicas
        bar = self._progress_bar(len(prompts), use_tqdm)
        try:
            per_rank = self._pool.call("generate", batches, on_progress=None if bar is None else bar.advance)
        finally:
            if bar is not None:
                bar.close()
        by_replica = self._reporter_results(per_rank)  # prompt i is result i // replicas of replica i % replicas
        return [self._output(by_replica[i % replicas][i // replicas], text, tokens, sp)
                for i, (text, tokens, sp) in enumerate(zip(texts, ids, params))]

    def chat(self, messages: list[dict[str, str]] | list[list[dict[str, str]]],
             sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
             use_tqdm: bool = True) -> list[RequestOutput]:
        """Generate replies to one conversation or a list of them, through the tokenizer's chat template."""
        tok = self.get_tokenizer()
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"the tokenizer of {self.config.model or 'the built-in default model'} has no chat "
                             "template, so llm.chat() cannot format messages; use llm.generate(prompts) or a "
                             "chat model")
        conversations = [messages] if messages and isinstance(messages[0], dict) else messages
        prompts = [tok.apply_chat_template(c, add_generation_prompt=True, tokenize=False) for c in conversations]
        return self.generate(prompts, sampling_params, use_tqdm)

    def stats(self) -> list[dict[str, Any]]:
        """Cumulative scheduler metrics of each replica (cache hit rate, tokens, preemptions)."""
        return [s for s in self._pool.call("stats") if s is not None]

    # ---------------------------------------------------------------- lifetime
    @property
    def pids(self) -> list[int]:
        """The ranks' process ids (the same for every call of this object)."""
        return list(self._pool.pids)

    def shutdown(self) -> None:
        """End the ranks; idempotent. Later calls raise."""
        self._pool.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    # ---------------------------------------------------------------- helpers
    @staticmethod
    def _as_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
        if isinstance(prompts, str) or (isinstance(prompts, Sequence) and prompts and
                                        all(isinstance(t, int) and not isinstance(t, bool) for t in prompts)):
            return [prompts]  # type: ignore[list-item]
        prompts = list(prompts)  # type: ignore[arg-type]
        if not prompts:
            raise ValueError("prompts is empty; pass a string, a list of token ids, or a list of them")
        return prompts

    @staticmethod
    def _params_for(prompts: list[Prompt], sampling_params: Any) -> list[SamplingParams]:
        if sampling_params is None:
            return [SamplingParams()] * len(prompts)
        if isinstance(sampling_params, SamplingParams):
            return [sampling_params] * len(prompts)
        params = list(sampling_params)
        if len(params) != len(prompts) or not all(isinstance(p, SamplingParams) for p in params):
            raise ValueError(f"sampling_params must be one SamplingParams or one per prompt ({len(prompts)}), "
                             f"got {len(params)} items")
        return params

    def _encode(self, prompt: Prompt) -> list[int]:
        if isinstance(prompt, str):
            return list(self.get_tokenizer()(prompt).input_ids)
        if not isinstance(prompt, Sequence) or not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
            raise ValueError("a prompt must be a string or a list of int token ids")
        return list(prompt)

    def check_request(self, ids: list[int], sp: SamplingParams, what: str = "the prompt") -> None:
        """Raise a one-line ``ValueError`` if the request cannot run: empty, ids outside the vocabulary, or
        prompt + ``max_tokens`` beyond ``max_model_len`` (the message gives both numbers)."""
        vocab = self.model_config.vocab_size
        if not ids:
            raise ValueError(f"{what} is empty; give at least one token")
        if any(not 0 <= t < vocab for t in ids):
            raise ValueError(f"{what} has token ids outside [0, {vocab}) (the model's vocabulary)")
        if len(ids) + sp.max_tokens > self.max_model_len:
            raise ValueError(f"{what} ({len(ids)} tokens) + max_tokens ({sp.max_tokens}) exceeds max_model_len="
                             f"{self.max_model_len}; shorten the prompt or lower max_tokens")

    @property
    def num_replicas(self) -> int:
        """Independent schedulers: the DP replicas (one under token parallelism)."""
        return 1 if self.config.token_parallel else self.config.data_parallel_size

    def reporter_rank(self, replica: int) -> int:
        """The rank that leads ``replica`` (its TP rank 0): it returns results and reads the inbox."""
        return replica * self.config.tensor_parallel_size

    @property
    def executor(self) -> Any:
        """Where the ranks live (:mod:`~hybridpar.engine.executor`): ``call``, ``post``, ``pids``, ``close``."""
        return self._pool

    def _reporter_results(self, per_rank: list[Any]) -> dict[int, list[Any]]:
        """``{replica: results}`` from the one reporting rank of each replica."""
        return {r: per_rank[self.reporter_rank(r)] for r in range(self.num_replicas)}

    def _output(self, result: Any, prompt: str | None, ids: list[int], sp: SamplingParams) -> RequestOutput:
        text = self.get_tokenizer().decode(result.output_ids, skip_special_tokens=True)
        finish, stop_reason = ("stop" if result.finish_reason in ("eos", "stop") else "length"), None
        for s in sp.stop:
            if s in text:
                text, stop_reason = text[:text.index(s)], s
                break
        request_id = str(self._next_id)
        self._next_id += 1
        metrics = RequestMetrics(result.cached_tokens, result.num_preemptions, result.ttft_s, result.latency_s)
        return RequestOutput(request_id, prompt, ids, [CompletionOutput(0, text, list(result.output_ids), finish,
                                                                        stop_reason)], True, metrics)

    @staticmethod
    def _progress_bar(total: int, use_tqdm: bool) -> Any:
        if not use_tqdm or int(os.environ.get("RANK", "0")) != 0:
            return None
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="Processed prompts", unit="req", dynamic_ncols=True)
        bar.tokens = 0

        def advance(rank: int, payload: tuple[int, int]) -> None:
            bar.tokens += payload[1]
            rate = bar.tokens / max(bar.format_dict["elapsed"], 1e-9)
            bar.set_postfix_str(f"output {rate:.0f} tok/s", refresh=False)
            bar.update(1)

        bar.advance = advance
        return bar
