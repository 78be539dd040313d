"""ModelRunner: executes a step plan on one rank. It decides nothing.

The scheduler (:mod:`hybridpar.radix.scheduler`) decides which requests run and where their KV
goes; :mod:`hybridpar.radix.step_sync` brings that decision to every TP rank. Then every rank
calls :meth:`ModelRunner.execute` with the same :class:`~hybridpar.core.StepPlan`: build the
forward batch from the plan's rows, lengths and KV slots, run this rank's shard of the model
(which stores this rank's KV heads at those slots and takes part in the TP collectives), and
return the full-vocabulary logits of the rows to sample. Decode steps can replay a CUDA graph
(:mod:`hybridpar.models.cuda_graph`), captured at the first decode step.
"""
from __future__ import annotations

from typing import Any

import torch

from hybridpar.core import SamplingParams, StepPlan
from hybridpar.models.attention_backend import AttentionBackend, ForwardBatch
from hybridpar.models.sampling import sample
from hybridpar.radix.mem_pool import MHATokenToKVPool, ReqToTokenPool


class ModelRunner:
    """Runs plans through ``model`` over ``backend`` (a paged KV pool) on ``device``.

    ``use_cuda_graph``: decode steps go through a
    :class:`~hybridpar.models.cuda_graph.PagedDecodeRunner` for up to ``max_running_requests``,
    whose decode attention is ``attention_backend`` (``"torch_native"``, ``"triton"``; ``None``: the
    device's default).
    """

    def __init__(self, model: Any, backend: AttentionBackend, req_to_token_pool: ReqToTokenPool,
                 kv_pool: MHATokenToKVPool, device: torch.device, max_running_requests: int,
                 use_cuda_graph: bool = False, attention_backend: str | None = None) -> None:
        self.model, self.backend, self.device = model, backend, device
        self.attention_backend = attention_backend
        self.req_to_token_pool, self.kv_pool = req_to_token_pool, kv_pool
        self.max_running_requests, self.use_cuda_graph = max_running_requests, use_cuda_graph
        self.graph_runner: Any = None  # PagedDecodeRunner, built at the first decode step
        self._graph_step = False  # whether the last execute replayed the decode graph

    @torch.no_grad()
    def execute(self, plan: StepPlan) -> torch.Tensor | None:
        """The plan's forward on this rank; the logits of ``plan.sample_rows`` (``None`` if there are none)."""
        self._graph_step = plan.kind == "decode" and self.use_cuda_graph
        if self._graph_step:
            return self._graph_decode(plan)
        loc = torch.tensor(plan.out_cache_loc, dtype=torch.int64, device=self.device)
        fb = ForwardBatch.build(self.backend, plan.req_pool_indices, plan.prefix_lens, plan.extend_lens, self.device,
                                out_cache_loc=loc)
        return self.forward(plan, fb)

    def forward(self, plan: StepPlan, fb: ForwardBatch) -> torch.Tensor | None:
        """Run the model over a built forward batch; logits of the rows to sample."""
        input_ids = torch.tensor(plan.input_ids, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, fb.positions, fb)
        if not plan.sample_rows:
            return None
        rows = fb.last_token_indices()[torch.tensor(plan.sample_rows, device=self.device)]
        return self.model.compute_logits(hidden[rows])

    def sample(self, logits: torch.Tensor | None, params: list[SamplingParams],
               generators: list[torch.Generator]) -> list[int]:
        """The next token of each sampled row (rank 0). After a graph-replayed decode step, the graph
        runner's (greedy requests: the step's own argmax, read back in one copy); otherwise
        :func:`~hybridpar.models.sampling.sample`."""
        if self._graph_step:
            return self.graph_runner.sample(logits, params, generators)
        return sample(logits, params, generators) if params else []

    def _graph_decode(self, plan: StepPlan) -> torch.Tensor:
        if self.graph_runner is None:
            from hybridpar.models.cuda_graph import PagedDecodeRunner

            self.graph_runner = PagedDecodeRunner(self.model, self.kv_pool, self.req_to_token_pool.req_to_token,
                                                  self.max_running_requests, scaling=self.backend.scaling,
                                                  attention_backend=self.attention_backend)
        seq_lens = [p + 1 for p in plan.prefix_lens]
        logits = self.graph_runner.run(plan.req_pool_indices, seq_lens, plan.input_ids)
        self.backend.filled[self.graph_runner.out_loc[: len(seq_lens)]] = True  # the step found the slots itself
        return logits
