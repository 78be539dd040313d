"""Continuous batching on the TKNP roots: requests join and finish mid-run, each on its own rank.

:func:`hybridpar.models.generate.generate` runs one fixed batch to the end. A server instead
admits requests as they arrive and retires them as they finish, so one forward pass mixes
prompts being prefilled with requests being decoded. :class:`TknpEngine` does that, and is also
the scheduler of every rank's KV cache:

* **admission** (first in, first out): a request that has arrived is placed on a TKNP rank by
  :class:`~hybridpar.tknp.placement.RequestPlacer` (least reserved KV tokens among the ranks
  with a free cache row long enough for it) and takes a row of that rank's cache. It keeps
  that rank and row until it finishes. A request that fits nowhere waits; later arrivals wait
  behind it;
* **one pass per step** over all running requests: new ones bring their whole prompt, the
  others their last sampled token. The batch is a
  :class:`~hybridpar.tknp.attention.TknpForwardBatch`, so the root's
  :class:`~hybridpar.tknp.attention.TokenParallelAttention` knows where each request's KV is;
* **retirement**: on EOS (unless ``ignore_eos``) or after ``max_new_tokens``, the row and the
  placer's reservation are released. Rows are bookkeeping on the root only: a worker's cache
  is addressed by the row indices the root sends, and a reused row is simply overwritten.

Every root of a TP group runs the engine on the same requests and makes the same decisions;
the sampled tokens are agreed on TP rank 0 (the same helper as ``generate``). With
``TokenParallelAttention(local, group=None)`` the engine is a plain single-cache continuous
batcher: the TP-only reference.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from hybridpar.models.decoder import DecoderForCausalLM
from hybridpar.models.generate import GenerationOutput, _agree, _check_prompts
from hybridpar.models.sampling import SamplingParams, sample
from hybridpar.tknp.attention import TknpForwardBatch, TokenParallelAttention
from hybridpar.tknp.placement import RequestPlacer


@dataclass
class Request:
    """A prompt (token ids), how to sample it, and the engine step at which it arrives."""

    prompt_ids: list[int]
    sampling: SamplingParams = field(default_factory=SamplingParams)
    arrival_step: int = 0

    @property
    def max_tokens(self) -> int:
        """KV tokens the request can reach: prompt + new tokens (the last sampled one is never cached)."""
        return len(self.prompt_ids) + self.sampling.max_new_tokens - 1


@dataclass
class RequestOutput(GenerationOutput):
    """A finished request: its tokens and where and when it ran."""

    tknp_rank: int = -1
    row: int = -1
    admitted_step: int = -1
    finished_step: int = -1


@dataclass
class StepRecord:
    """One engine step, for plots: requests, new tokens and KV tokens on each TKNP rank."""

    step: int
    requests: list[int]
    new_tokens: list[int]
    kv_tokens: list[int]


@dataclass(eq=False)
class _Running:
    index: int
    request: Request
    rank: int
    row: int
    output: RequestOutput
    generator: torch.Generator
    prefilled: bool = False

    @property
    def length(self) -> int:
        return len(self.request.prompt_ids) + len(self.output.token_ids)


class TknpEngine:
    """Continuous batching over a (possibly token-parallel) attention backend; see the module docstring.

    Use :meth:`run` for a whole workload, or :meth:`add_request` + :meth:`step` to drive it by hand.
    """

    def __init__(self, model: DecoderForCausalLM, attn: TokenParallelAttention,
                 eos_token_ids: Sequence[int] | None = None, return_logits: bool = False) -> None:
        self.model, self.attn = model, attn
        self.eos = set(model.config.eos_token_ids if eos_token_ids is None else eos_token_ids)
        self.return_logits = return_logits
        self.device = model.lm_head.weight.device
        self.placer = RequestPlacer(attn.num_ranks)
        self.free_rows = [list(range(c.num_slots)) for c in attn.capacities]
        self.max_seq_lens = [c.max_seq_len if c.num_slots else 0 for c in attn.capacities]
        self.waiting: list[tuple[int, Request]] = []
        self.running: list[_Running] = []
        self.finished: dict[int, RequestOutput] = {}
        self.history: list[StepRecord] = []
        self.step_index = 0
        self._next_index = 0

    def add_request(self, request: Request) -> int:
        """Queue a request; returns its index (the key of its output). Checks it can ever fit."""
        _check_prompts(self.model, [request.prompt_ids], request.sampling.max_new_tokens)
        if request.max_tokens > max(self.max_seq_lens):
            raise ValueError(f"request needs {request.max_tokens} KV tokens but the longest cache row of any TKNP "
                             f"rank holds {max(self.max_seq_lens)}; shorten it or give the ranks longer rows")
        index = self._next_index
        self._next_index += 1
        self.waiting.append((index, request))
        self.waiting.sort(key=lambda item: (item[1].arrival_step, item[0]))
        return index

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def _admit(self) -> None:
        while self.waiting and self.waiting[0][1].arrival_step <= self.step_index:
            index, req = self.waiting[0]
            allowed = [bool(rows) and req.max_tokens <= max_len for rows, max_len in zip(self.free_rows,
                                                                                            self.max_seq_lens)]
            rank = self.placer.place(index, req.max_tokens, allowed)
            if rank is None:
                return
            self.waiting.pop(0)
            row = self.free_rows[rank].pop(0)
            out = RequestOutput(list(req.prompt_ids), [], "length", [] if self.return_logits else None,
                                tknp_rank=rank, row=row, admitted_step=self.step_index)
            self.running.append(_Running(index, req, rank, row, out, req.sampling.make_generator()))

    def _retire(self, run: _Running) -> None:
        run.output.finished_step = self.step_index
        if self.return_logits:
            run.output.logits = torch.stack(run.output.logits)
        self.free_rows[run.rank].append(run.row)
        self.free_rows[run.rank].sort()
        self.placer.release(run.index)
        self.finished[run.index] = run.output

    @torch.no_grad()
    def step(self) -> list[int]:
        """Admit, run one forward pass over the running requests, sample; returns the indices that finished."""
        if not self.running and self.waiting and self.waiting[0][1].arrival_step > self.step_index:
            self.step_index = self.waiting[0][1].arrival_step  # idle until the next arrival
        self._admit()
        if not self.running:
            if self.waiting:
                raise RuntimeError("no running request and the next one cannot be placed on any rank")
            return []
        batch = self.running
        prefix = [r.length - 1 if r.prefilled else 0 for r in batch]
        extend = [1 if r.prefilled else len(r.request.prompt_ids) for r in batch]
        ids = [t for r in batch for t in ([r.output.token_ids[-1]] if r.prefilled else r.request.prompt_ids)]
        fb = TknpForwardBatch.build_placed(self.attn, [r.rank for r in batch], [r.row for r in batch], prefix,
                                           extend, self.device)
        self._record(batch, fb)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        hidden = self.model(input_ids, fb.positions, fb)
        logits = self.model.compute_logits(hidden[fb.last_token_indices()])
        tokens = _agree(sample(logits, [r.request.sampling for r in batch], [r.generator for r in batch]),
                        self.model)
        done = []
        for j, (run, token) in enumerate(zip(batch, tokens)):
            run.prefilled = True
            run.output.token_ids.append(token)
            if self.return_logits:
                run.output.logits.append(logits[j].float().cpu())
            params: SamplingParams = run.request.sampling
            if token in self.eos and not params.ignore_eos:
                run.output.finish_reason = "eos"
                done.append(run)
            elif len(run.output.token_ids) >= params.max_new_tokens:
                done.append(run)
        for run in done:
            self._retire(run)
        self.running = [r for r in batch if r not in done]
        self.step_index += 1
        return [r.index for r in done]

    def _record(self, batch: list[_Running], fb: TknpForwardBatch) -> None:
        n = self.attn.num_ranks
        record = StepRecord(self.step_index, [0] * n, [0] * n, [0] * n)
        for run, new, total in zip(batch, fb.extend_seq_lens, fb.seq_lens):
            record.requests[run.rank] += 1
            record.new_tokens[run.rank] += new
            record.kv_tokens[run.rank] += total
        self.history.append(record)

    def run(self, requests: Sequence[Request]) -> list[RequestOutput]:
        """Serve ``requests`` (each arriving at its ``arrival_step``) to the end; outputs in input order."""
        indices = [self.add_request(r) for r in requests]
        while self.has_work:
            self.step()
        return [self.finished.pop(i) for i in indices]
