"""CUDA-graph decode: record one decode step per batch-size bucket, replay it every step.

A decode step of a small model, or of any model at batch 1, launches hundreds of small kernels
(norms, RoPE, projections, attention, all-reduces per layer). Launched one by one from Python,
the GPU waits on the CPU between them; the step costs far more than its bytes. A CUDA graph
records the launches once and replays them with one call, so the GPU runs them back to back.

A graph replays *fixed* kernels on *fixed* addresses: every tensor it reads must live in the same
buffer at every replay, with the same shape. :class:`DecodeGraphRunner` therefore owns static
input buffers (each request's row in a slot table, its length, a live flag, its input token)
sized for its largest bucket; the recorded step gathers its slots from the slot table, runs the
model over a :class:`~hybridpar.models.decode_attention.StaticDecodeBackend` bound to them, takes
the greedy tokens and advances its own inputs (no host round trip between steady steps). A step of ``B`` requests with at most ``n`` tokens of context runs in
the bucket ``(Bb, Lb)``: ``Bb`` the smallest batch bucket ``>= B``, ``Lb`` the smallest length
bucket ``>= n``. Padding entries (``B <= i < Bb``) decode a dummy token of length 1 whose K/V go
to a *scratch slot* that no request owns; their logits are dropped. Each bucket is captured on
first use (two eager warm-up passes, then ``torch.cuda.graph``); all graphs share one memory pool.

Under tensor parallelism every rank runs the same steps, so every rank captures the same buckets
in the same order, all-reduces included (NCCL kernels are recorded like any other).

On the CPU (or with ``use_cuda_graph=False``) the runner executes the same static step eagerly:
the batched, padded decode path with no per-request Python loop, which the CPU tests compare with
the reference backends.

Two front ends give it a cache and its slot table:

* :class:`ContiguousDecodeRunner` owns a :class:`~hybridpar.models.attention_backend.ContiguousKVCache`
  (one extra row as scratch); :func:`~hybridpar.models.generate.generate` uses it with
  ``use_cuda_graph=True``;
* :class:`PagedDecodeRunner` reads RadixAttention's paged pool through ``req_to_token``
  (slot 0 of the reserved page 0 is the scratch slot); :class:`~hybridpar.radix.scheduler.TPScheduler`
  uses it when ``ServerArgs.use_cuda_graph`` is set.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Sequence

import torch

from hybridpar.models.attention_backend import ContiguousKVCache, ForwardBatch, ForwardMode
from hybridpar.models.decode_attention import StaticDecodeBackend, flat_kv
from hybridpar.models.sampling import SamplingParams, sample

DEFAULT_BATCH_BUCKETS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)


def length_buckets(max_seq_len: int) -> list[int]:
    """Context buckets: 64, 128, 256, then multiples of 256, the last one ``max_seq_len``."""
    out = [b for b in (64, 128, 256) if b < max_seq_len]
    nxt = 512
    while nxt < max_seq_len:
        out.append(nxt)
        nxt += 256
    return out + [max_seq_len]


def batch_buckets(max_batch_size: int, buckets: Sequence[int] = DEFAULT_BATCH_BUCKETS) -> list[int]:
    """The buckets up to ``max_batch_size``, which is always the last one."""
    return [b for b in buckets if b < max_batch_size] + [max_batch_size]


class DecodeGraphRunner:
    """Static decode step over flat per-layer K/V stores; graph-captured per ``(batch, length)`` bucket on CUDA.

    ``k_flat``/``v_flat``: per-layer ``[N, Hkv, d]`` stores (:func:`~hybridpar.models.decode_attention.flat_kv`).
    ``slot_table [R, >= max_seq_len]`` (on the device): row ``r`` holds the slots of positions
    ``0, 1, ...`` of the request in row ``r`` (the paged pool's ``req_to_token``; for a contiguous
    cache, ``r * S + pos``). ``scratch_slot``: a slot no request owns (padding writes there).
    ``use_cuda_graph``: capture and replay on CUDA (ignored on the CPU, where the step runs
    eagerly). ``attention_backend``: ``"torch_native"`` or ``"triton"``
    (:func:`~hybridpar.models.decode_attention.resolve_attention_backend`).

    **No host round trip in a steady decode.** The step itself, inside the graph, gathers its slot
    table from ``slot_table`` by row, finds where each new K/V goes (``out_loc``), takes the greedy
    token (``argmax``) and prepares the next step: the token becomes the next input and every
    live length grows by one. :meth:`greedy_tokens` reads the batch's tokens back with one copy.
    When the next :meth:`run` is that very continuation (same rows, lengths + 1, those tokens as
    inputs) it copies nothing to the device; otherwise (a request joined or left, a token was
    sampled on the host) one block of four rows (table row, length, live flag, input token)
    goes over, as one host-to-device copy.
    """

    def __init__(self, model: torch.nn.Module, k_flat: Sequence[torch.Tensor], v_flat: Sequence[torch.Tensor],
                 slot_table: torch.Tensor, scratch_slot: int, max_batch_size: int, max_seq_len: int,
                 use_cuda_graph: bool = True, scaling: float | None = None, attention_backend: str | None = None,
                 pad_row: int = 0) -> None:
        self.model = model
        self.device = k_flat[0].device
        self.use_graph = use_cuda_graph and self.device.type == "cuda"
        self.slot_table, self.scratch_slot, self.pad_row = slot_table, int(scratch_slot), int(pad_row)
        self.batch_buckets = batch_buckets(max_batch_size)
        self.length_buckets = length_buckets(max_seq_len)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        head_dim = k_flat[0].shape[-1]
        self.backend = StaticDecodeBackend(k_flat, v_flat, scaling if scaling is not None else head_dim ** -0.5,
                                           attention_backend)
        # the step's inputs in one block, so that loading a new batch is one copy: row in slot_table,
        # length after the step, live (1) or padding (0), input token
        self.meta = torch.zeros(4, max_batch_size, dtype=torch.int64, device=self.device)
        self.rows, self.seq_lens, self.live, self.input_ids = self.meta.unbind(0)
        self.out_loc = torch.full((max_batch_size,), self.scratch_slot, dtype=torch.int64, device=self.device)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}  # (logits, greedy tokens)
        self._pool = None
        self._last: tuple[list[int], list[int], tuple[int, int]] | None = None  # rows, lengths, bucket of the last run
        self._tokens: list[int] | None = None  # the last run's greedy tokens, once read
        self._on_device: tuple[list[int], list[int], list[int]] | None = None  # what meta holds for the next step
        self.steps = 0  # runs
        self.loads = 0  # runs that copied a batch to the device (the others continued on the device)
        self.captures = 0
        self.capture_seconds = 0.0  # wall time spent capturing (one-time cost, for benchmarks to report)

    def bucket(self, batch_size: int, max_len: int) -> tuple[int, int]:
        """The ``(Bb, Lb)`` bucket of a step of ``batch_size`` requests whose longest has ``max_len`` tokens."""
        if not 1 <= batch_size <= self.max_batch_size:
            raise ValueError(f"decode batch of {batch_size} requests; this runner was built for 1..{self.max_batch_size}")
        if not 1 <= max_len <= self.max_seq_len:
            raise ValueError(f"sequence of {max_len} tokens; this runner was built for at most {self.max_seq_len}")
        bb = self.batch_buckets[bisect.bisect_left(self.batch_buckets, batch_size)]
        lb = self.length_buckets[bisect.bisect_left(self.length_buckets, max_len)]
        return bb, lb

    @torch.no_grad()
    def run(self, rows: Sequence[int], seq_lens: Sequence[int], input_ids: Sequence[int]) -> torch.Tensor:
        """Logits ``[B, V]`` of one decode step (a view of a static buffer: valid until the next call).

        Request ``i`` lives in ``slot_table`` row ``rows[i]``, reaches ``seq_lens[i]`` tokens with
        this step (its new K/V goes to ``slot_table[rows[i], seq_lens[i] - 1]``, which the caller
        has filled) and feeds ``input_ids[i]``.
        """
        rows, seq_lens, input_ids = list(rows), list(seq_lens), [int(t) for t in input_ids]
        key = self.bucket(len(rows), max(seq_lens))
        if self._on_device != (rows, seq_lens, input_ids):
            self._load(rows, seq_lens, input_ids, key[0])
        self._last, self._tokens, self._on_device = (rows, seq_lens, key), None, None
        self.steps += 1
        if not self.use_graph:
            self.outputs[key] = self._step(*key, advance=True)
        else:
            if key not in self.graphs:
                self._capture(key)
            self.graphs[key].replay()
        return self.outputs[key][0][: len(rows)]

    def sample(self, logits: torch.Tensor, params: Sequence[SamplingParams],
               generators: Sequence[torch.Generator]) -> list[int]:
        """The next token of each request of the last step: the step's own argmax when every request is
        greedy (:meth:`greedy_tokens`), else :func:`~hybridpar.models.sampling.sample` on ``logits``."""
        if all(p.greedy for p in params):
            return self.greedy_tokens()
        return sample(logits, list(params), list(generators))

    def greedy_tokens(self) -> list[int]:
        """The last step's greedy tokens (computed in the step; one device-to-host copy, made once)."""
        if self._last is None:
            raise RuntimeError("greedy_tokens() before run()")
        if self._tokens is None:
            rows, seq_lens, key = self._last
            self._tokens = self.outputs[key][1][: len(rows)].tolist()
            self._on_device = (rows, [n + 1 for n in seq_lens], self._tokens)
        return self._tokens

    def _load(self, rows: list[int], seq_lens: list[int], input_ids: list[int], bb: int) -> None:
        """Copy a batch (padded to ``bb`` with dummy requests of length 1) into ``meta``: one copy."""
        pad = bb - len(rows)
        block = torch.tensor([rows + [self.pad_row] * pad, seq_lens + [1] * pad, [1] * len(rows) + [0] * pad,
                              input_ids + [0] * pad], dtype=torch.int64)
        if self.device.type == "cuda":  # pinned: the copy is queued, the host does not wait
            block = block.pin_memory()
        self.meta[:, :bb].copy_(block, non_blocking=True)
        self.loads += 1

    def _step(self, bb: int, lb: int, advance: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The recorded step: slot table, ``out_loc``, forward, greedy tokens and (``advance``) the next inputs."""
        seq_lens, live = self.seq_lens[:bb], self.live[:bb]
        table = self.slot_table[self.rows[:bb], :lb].to(torch.int64)
        table = torch.where(live[:, None] > 0, table, self.scratch_slot)  # padding reads and writes scratch only
        self.out_loc[:bb].copy_(table.gather(1, (seq_lens - 1)[:, None]).squeeze(1))
        self.backend.bind(table, seq_lens, self.out_loc[:bb])
        positions = seq_lens - 1
        fb = ForwardBatch(ForwardMode.DECODE, [], [], [], positions, self.backend)
        logits = self.model.compute_logits(self.model(self.input_ids[:bb], positions, fb))
        tokens = logits.argmax(dim=-1)
        if advance:  # the next step's inputs, without the host: its token, one more position
            self.input_ids[:bb].copy_(tokens)
            seq_lens.add_(live)
        return logits, tokens

    def _capture(self, key: tuple[int, int]) -> None:
        """Warm up (cuBLAS handles, NCCL communicators, Triton kernels) on a side stream, then record the step."""
        start = time.perf_counter()
        torch.cuda.synchronize(self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # the warm-up recomputes this very step: its K/V writes are idempotent
                self._step(*key, advance=False)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self.outputs[key] = self._step(*key, advance=True)
        self._pool = graph.pool()
        self.graphs[key] = graph
        self.captures += 1
        torch.cuda.synchronize(self.device)
        self.capture_seconds += time.perf_counter() - start


class ContiguousDecodeRunner:
    """A :class:`ContiguousKVCache` of ``max_batch_size`` rows (plus a scratch row) and its graph runner.

    Prefill the cache's rows through ``self.cache`` as usual (it is an ordinary backend); run decode
    steps with :meth:`decode`.
    """

    def __init__(self, model: torch.nn.Module, max_batch_size: int, max_seq_len: int,
                 use_cuda_graph: bool = True, attention_backend: str | None = None) -> None:
        self.cache: ContiguousKVCache = model.make_kv_cache(max_batch_size + 1, max_seq_len)
        self.scratch_row = self.cache.alloc(1)[0]
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        device = self.cache.k_buffer[0].device
        positions = torch.arange(max_seq_len, device=device)
        slot_table = torch.arange(max_batch_size + 1, device=device)[:, None] * max_seq_len + positions[None, :]
        self.runner = DecodeGraphRunner(model, flat_kv(self.cache.k_buffer), flat_kv(self.cache.v_buffer), slot_table,
                                        self.scratch_row * max_seq_len, max_batch_size, max_seq_len,
                                        use_cuda_graph, self.cache.scaling, attention_backend, pad_row=self.scratch_row)

    def fits(self, batch_size: int, seq_len: int) -> bool:
        return batch_size <= self.max_batch_size and seq_len <= self.max_seq_len

    def decode(self, rows: Sequence[int], seq_lens: Sequence[int], input_ids: Sequence[int]) -> torch.Tensor:
        """Logits ``[B, V]`` of one decode step: request ``i`` in cache row ``rows[i]`` reaches ``seq_lens[i]``."""
        return self.runner.run(rows, seq_lens, input_ids)


class PagedDecodeRunner(DecodeGraphRunner):
    """Graph runner over RadixAttention's paged pool: the slot table is the pool's ``req_to_token``.

    ``kv_pool``: :class:`~hybridpar.radix.mem_pool.MHATokenToKVPool`; ``req_to_token``: the device
    ``[rows, max_context_len]`` table of a :class:`~hybridpar.radix.mem_pool.ReqToTokenPool`, where the
    scheduler has written each request's new slot before the step. Slot 0 (reserved page 0, never
    allocated) is the scratch slot.
    """

    def __init__(self, model: torch.nn.Module, kv_pool: object, req_to_token: torch.Tensor, max_batch_size: int,
                 use_cuda_graph: bool = True, scaling: float | None = None, attention_backend: str | None = None) -> None:
        super().__init__(model, kv_pool.k_buffer, kv_pool.v_buffer, req_to_token, 0, max_batch_size,
                         req_to_token.shape[1], use_cuda_graph, scaling, attention_backend)


def contiguous_runner_for(model: torch.nn.Module, batch_size: int, seq_len: int,
                          use_cuda_graph: bool = True, attention_backend: str | None = None) -> ContiguousDecodeRunner:
    """The model's cached :class:`ContiguousDecodeRunner`, rebuilt only when it is too small.

    Kept on the model so that repeated ``generate`` calls reuse the cache and the captured graphs.
    A rebuilt runner is sized to the larger of the old and the requested sizes.
    """
    runner: ContiguousDecodeRunner | None = getattr(model, "_hybridpar_decode_runner", None)
    if runner is not None and runner.fits(batch_size, seq_len) and runner.runner.use_graph == (
            use_cuda_graph and runner.runner.device.type == "cuda") and (
            attention_backend is None or runner.runner.backend.attention_backend == attention_backend):
        return runner
    if runner is not None:
        batch_size, seq_len = max(batch_size, runner.max_batch_size), max(seq_len, runner.max_seq_len)
        model._hybridpar_decode_runner = None
        del runner
    runner = ContiguousDecodeRunner(model, batch_size, seq_len, use_cuda_graph, attention_backend)
    model._hybridpar_decode_runner = runner
    return runner
