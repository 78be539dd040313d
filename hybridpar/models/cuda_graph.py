"""CUDA-graph decode: record one decode step per batch-size bucket, replay it every step.

A decode step of a small model, or of any model at batch 1, launches hundreds of small kernels
(norms, RoPE, projections, attention, all-reduces per layer). Launched one by one from Python,
the GPU waits on the CPU between them; the step costs far more than its bytes. A CUDA graph
records the launches once and replays them with one call, so the GPU runs them back to back.

A graph replays *fixed* kernels on *fixed* addresses: every tensor it reads must live in the same
buffer at every replay, with the same shape. :class:`DecodeGraphRunner` therefore owns static
input buffers (token ids, sequence lengths, KV write slots, a slot table) sized for its largest
bucket, and runs the model over a :class:`~hybridpar.models.decode_attention.StaticDecodeBackend`
bound to slices of them. A step of ``B`` requests with at most ``n`` tokens of context runs in
the bucket ``(Bb, Lb)``: ``Bb`` the smallest batch bucket ``>= B``, ``Lb`` the smallest length
bucket ``>= n``. Padding entries (``B <= i < Bb``) decode a dummy token of length 1 whose K/V go
to a *scratch slot* that no request owns; their logits are dropped. Each bucket is captured on
first use (two eager warm-up passes, then ``torch.cuda.graph``); all graphs share one memory pool.

Under tensor parallelism every rank runs the same steps, so every rank captures the same buckets
in the same order, all-reduces included (NCCL kernels are recorded like any other).

On the CPU (or with ``use_cuda_graph=False``) the runner executes the same static step eagerly:
the batched, padded decode path with no per-request Python loop, which the CPU tests compare with
the reference backends.

Two front ends fill the buffers from a cache:

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
    ``scratch_slot``: a slot no request owns (padding writes there). ``use_cuda_graph``: capture and
    replay on CUDA (ignored on the CPU, where the step always runs eagerly). ``attention_backend``:
    ``"torch_native"`` or ``"triton"`` (:func:`~hybridpar.models.decode_attention.resolve_attention_backend`).
    """

    def __init__(self, model: torch.nn.Module, k_flat: Sequence[torch.Tensor], v_flat: Sequence[torch.Tensor],
                 scratch_slot: int, max_batch_size: int, max_seq_len: int, use_cuda_graph: bool = True,
                 scaling: float | None = None, attention_backend: str | None = None) -> None:
        self.model = model
        self.device = k_flat[0].device
        self.use_graph = use_cuda_graph and self.device.type == "cuda"
        self.scratch_slot = int(scratch_slot)
        self.batch_buckets = batch_buckets(max_batch_size)
        self.length_buckets = length_buckets(max_seq_len)
        self.max_batch_size, self.max_seq_len = max_batch_size, max_seq_len
        head_dim = k_flat[0].shape[-1]
        self.backend = StaticDecodeBackend(k_flat, v_flat, scaling if scaling is not None else head_dim ** -0.5,
                                           attention_backend)
        kw = dict(dtype=torch.int64, device=self.device)
        self.input_ids = torch.zeros(max_batch_size, **kw)
        self.seq_lens = torch.ones(max_batch_size, **kw)
        self.out_loc = torch.full((max_batch_size,), self.scratch_slot, **kw)
        # one flat store, viewed as a contiguous [Bb, Lb] per bucket (see _slots): a strided slice of a
        # [max_batch, max_seq_len] table would send the K/V gather down PyTorch's slow strided-index path
        self.slot_store = torch.full((max_batch_size * max_seq_len,), self.scratch_slot, **kw)
        self.graphs: dict[tuple[int, int], torch.cuda.CUDAGraph] = {}
        self.outputs: dict[tuple[int, int], torch.Tensor] = {}
        self._pool = None
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
    def run(self, input_ids: torch.Tensor, seq_lens: torch.Tensor, out_loc: torch.Tensor, slots: torch.Tensor,
            max_len: int) -> torch.Tensor:
        """Logits ``[B, V]`` of one decode step (a view of a static buffer: valid until the next call).

        ``input_ids``, ``seq_lens``, ``out_loc`` ``[B]``; ``slots [B, W]`` with ``W >= max_len``
        (only the first ``Lb`` columns are read); ``max_len = max(seq_lens)``, passed by the caller,
        who knows it without a device sync.
        """
        b = input_ids.shape[0]
        bb, lb = self.bucket(b, max_len)
        w = min(slots.shape[1], lb)
        table = self._slots(bb, lb)
        self.input_ids[:b].copy_(input_ids)
        self.seq_lens[:b].copy_(seq_lens)
        self.out_loc[:b].copy_(out_loc)
        table[:b, :w].copy_(slots[:, :w])
        if w < lb:
            table[:b, w:].fill_(self.scratch_slot)
        if bb > b:  # padding entries: one dummy token of length 1 at the scratch slot
            self.input_ids[b:bb].zero_()
            self.seq_lens[b:bb].fill_(1)
            self.out_loc[b:bb].fill_(self.scratch_slot)
            table[b:].fill_(self.scratch_slot)
        if not self.use_graph:
            return self._forward(bb, lb)[:b]
        key = (bb, lb)
        if key not in self.graphs:
            self._capture(key)
        self.graphs[key].replay()
        return self.outputs[key][:b]

    def _slots(self, bb: int, lb: int) -> torch.Tensor:
        """The bucket's slot table: the first ``bb * lb`` entries of the store, contiguous ``[bb, lb]``."""
        return self.slot_store[: bb * lb].view(bb, lb)

    def _forward(self, bb: int, lb: int) -> torch.Tensor:
        self.backend.bind(self._slots(bb, lb), self.seq_lens[:bb], self.out_loc[:bb])
        positions = self.seq_lens[:bb] - 1
        fb = ForwardBatch(ForwardMode.DECODE, [], [], [], positions, self.backend)
        hidden = self.model(self.input_ids[:bb], positions, fb)
        return self.model.compute_logits(hidden)

    def _capture(self, key: tuple[int, int]) -> None:
        """Warm up (cuBLAS handles, NCCL communicators) on a side stream, then record the step."""
        start = time.perf_counter()
        torch.cuda.synchronize(self.device)
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(2):  # the warm-up recomputes this very step: its K/V writes are idempotent
                self._forward(*key)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            self.outputs[key] = self._forward(*key)
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
        self.runner = DecodeGraphRunner(model, flat_kv(self.cache.k_buffer), flat_kv(self.cache.v_buffer),
                                        self.scratch_row * max_seq_len, max_batch_size, max_seq_len,
                                        use_cuda_graph, self.cache.scaling, attention_backend)
        self._positions = torch.arange(max_seq_len, device=self.runner.device)

    def fits(self, batch_size: int, seq_len: int) -> bool:
        return batch_size <= self.max_batch_size and seq_len <= self.max_seq_len

    def decode(self, rows: Sequence[int], seq_lens: Sequence[int], input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]`` of one decode step: request ``i`` in cache row ``rows[i]`` reaches ``seq_lens[i]``."""
        device = self.runner.device
        max_len = max(seq_lens)
        _, lb = self.runner.bucket(len(rows), max_len)
        rows_t = torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
        lens_t = torch.tensor(seq_lens, dtype=torch.int64).to(device, non_blocking=True)
        base = rows_t * self.max_seq_len
        slots = base[:, None] + self._positions[None, :lb]
        return self.runner.run(input_ids, lens_t, base + lens_t - 1, slots, max_len)


class PagedDecodeRunner:
    """Graph runner over RadixAttention's paged pool: slots come from ``req_to_token`` rows.

    ``kv_pool``: :class:`~hybridpar.radix.mem_pool.MHATokenToKVPool`; ``req_to_token``: the
    ``[rows, max_context_len]`` table of a :class:`~hybridpar.radix.mem_pool.ReqToTokenPool`.
    Slot 0 (reserved page 0, never allocated) is the scratch slot.
    """

    def __init__(self, model: torch.nn.Module, kv_pool: object, req_to_token: torch.Tensor, max_batch_size: int,
                 use_cuda_graph: bool = True, scaling: float | None = None, attention_backend: str | None = None) -> None:
        self.req_to_token = req_to_token
        self.runner = DecodeGraphRunner(model, kv_pool.k_buffer, kv_pool.v_buffer, 0, max_batch_size,
                                        req_to_token.shape[1], use_cuda_graph, scaling, attention_backend)

    def decode(self, req_pool_indices: Sequence[int], seq_lens: Sequence[int], out_cache_loc: torch.Tensor,
               input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, V]``; ``out_cache_loc [B]`` are the new tokens' slots (already in ``req_to_token``)."""
        device = self.runner.device
        max_len = max(seq_lens)
        _, lb = self.runner.bucket(len(seq_lens), max_len)
        rows = torch.tensor(req_pool_indices, dtype=torch.int64).to(self.req_to_token.device, non_blocking=True)
        slots = self.req_to_token[rows, :lb].to(device, torch.int64)
        lens_t = torch.tensor(seq_lens, dtype=torch.int64).to(device, non_blocking=True)
        return self.runner.run(input_ids, lens_t, out_cache_loc.to(device, torch.int64), slots, max_len)


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
