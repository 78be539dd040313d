"""The Ray executor: one Ray actor per rank, on the nodes of a Ray cluster (vLLM's ``"ray"`` backend).

::

    llm = LLM(tensor_parallel_size=2, token_parallel_size=2, enable_token_parallel=True,
              distributed_executor_backend="ray", ray_placement="tp_per_node")

Compared with ``"mp"`` (:class:`~hybridpar.distributed.rank_pool.RankPool`), three things change:

* **Who starts the ranks.** Ray's raylet on each node starts a worker process per actor; the
  driver (this process) only asks for them. Like ``ray.init(address="auto")``, it joins a running cluster
  (``ray start --head`` / ``ray start --address ...``, or ``RAY_ADDRESS``); with none it starts a local one.
* **Where they go.** A placement group reserves one bundle per rank (``{"GPU": 1}`` on a GPU
  cluster, ``{"CPU": 1}`` otherwise) before any actor starts; :data:`PLACEMENTS` says how the
  bundles may spread over nodes.
* **How they find each other.** The driver asks the rank-0 actor for its node's IP and a free
  port there, and sends ``tcp://IP:PORT`` to every actor; each then joins the ``torch.distributed``
  world through :func:`~hybridpar.distributed.launcher.setup_rank` and builds its worker.

Messages between a call's start and its end travel through :class:`RankChannel`, which
:func:`~hybridpar.distributed.rank_pool.report_progress` uses inside an actor. Faults are those of
the ``mp`` pool: one :class:`~hybridpar.distributed.replies.RankFailedError` naming the root-cause
rank (a dead actor counts first), after which every actor is killed and the placement group removed.
"""
from __future__ import annotations

import importlib.util
import os
import socket
import threading
import time
import traceback
import weakref
from collections import deque
from pathlib import Path
from typing import Any, Callable

from hybridpar.config import RAY_PLACEMENTS as PLACEMENTS
from hybridpar.distributed import rank_pool
from hybridpar.distributed.launcher import free_port, setup_rank, teardown_rank
from hybridpar.distributed.rank_pool import PoolBrokenError
from hybridpar.distributed.replies import _SETTLE_S, LaunchTimeoutError, _Failure, _root_cause

_POLL_S = 0.25  # how often a waiting driver collects progress messages
# After a first failure, wait this long for the others: Ray reports a dead actor through its node's
# raylet, later than the peers' own errors about it ("connection closed"), which must not win.
_RAY_SETTLE_S = 4 * _SETTLE_S
INSTALL_HINT = 'distributed_executor_backend="ray" needs Ray, which is not installed: pip install "hybridpar[ray]"'


def check_ray_available() -> None:
    """One line that says how to install Ray, before anything starts."""
    if importlib.util.find_spec("ray") is None:
        raise ValueError(INSTALL_HINT)


class RankChannel:
    """Both directions between the driver and one rank actor, outside the call that is running.

    The actor runs two threads (``max_concurrency=2``): one inside ``call``, the other free for the
    driver's ``drain_progress`` / ``post``. Rank -> driver: ``report_progress`` queues a payload that the
    driver collects. Driver -> rank: ``post`` queues a payload that ``read_inbox`` returns.
    """

    def __init__(self) -> None:
        self._progress: deque[Any] = deque()
        self._inbox: deque[Any] = deque()
        self._arrived = threading.Condition()

    def report_progress(self, payload: Any) -> None:
        self._progress.append(payload)

    def drain_progress(self) -> list[Any]:
        return [self._progress.popleft() for _ in range(len(self._progress))]

    def post(self, payload: Any) -> None:
        with self._arrived:
            self._inbox.append(payload)
            self._arrived.notify_all()

    def read_inbox(self, timeout: float = 0.0) -> list[Any]:
        with self._arrived:
            if not self._inbox and timeout > 0:
                self._arrived.wait(timeout)
            return [self._inbox.popleft() for _ in range(len(self._inbox))]


class RankActor:
    """One rank, inside a Ray worker process (wrapped by ``ray.remote`` in :class:`RayExecutor`)."""

    def __init__(self, rank: int, world_size: int) -> None:
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(world_size))
        self.rank, self.world_size = rank, world_size
        self.channel = rank_pool._CHANNEL = RankChannel()
        self.obj: Any = None

    def where(self) -> tuple[str, str, int]:
        """(node id, node IP, pid) of this actor."""
        import ray

        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), os.getpid()

    def rendezvous_port(self, ip: str) -> int:
        return free_port(ip)

    def start(self, factory: Callable[..., Any], config: Any, backend: str, address: tuple[str, int],
              local_rank: int) -> tuple[str, Any, float]:
        """Join the world at ``address`` (rank 0's IP and port), then build ``factory(config)``."""
        os.environ.update(LOCAL_RANK=str(local_rank), MASTER_ADDR=address[0], MASTER_PORT=str(address[1]))

        def build() -> None:
            # device 0: with a {"GPU": 1} bundle Ray shows the actor only its own GPU (CUDA_VISIBLE_DEVICES)
            setup_rank(backend, self.rank, self.world_size, 0, f"tcp://{address[0]}:{address[1]}",
                       rank_pool._PG_TIMEOUT)
            self.obj = factory(config)

        return self._run("start-up", build)

    def call(self, method: str, args: tuple, kwargs: dict) -> tuple[str, Any, float]:
        return self._run(method, lambda: getattr(self.obj, method)(*args, **kwargs))

    def _run(self, stage: str, fn: Callable[[], Any]) -> tuple[str, Any, float]:
        """``("ok", value, 0)`` or ``("err", traceback, wall time)``: a raise is reported, never re-raised."""
        try:
            return "ok", fn(), 0.0
        except BaseException:
            return "err", f"[during {stage}]\n{traceback.format_exc()}", time.time()

    def drain_progress(self) -> list[Any]:
        return self.channel.drain_progress()

    def post(self, payload: Any) -> None:
        self.channel.post(payload)

    def close(self) -> None:
        close = getattr(self.obj, "close", None)
        if close is not None:
            close()
        teardown_rank()


def placement_groups(world_size: int, tp: int, placement: str) -> tuple[str, list[list[int]]]:
    """Ray's strategy and the ranks of each placement group (bundle i of a group holds its i-th rank).

    TP groups are runs of consecutive ranks (:mod:`~hybridpar.distributed.layout`), so
    ``"tp_per_node"`` makes one STRICT_PACK group of each run: Ray must fit it on one node.
    """
    if placement == "tp_per_node":
        return "STRICT_PACK", [list(range(i, i + tp)) for i in range(0, world_size, tp)]
    return {"pack": "PACK", "spread": "SPREAD"}[placement], [list(range(world_size))]


def _running_cluster() -> str | None:
    """A Ray cluster to join: ``RAY_ADDRESS``, else the one ``ray start`` recorded here, if it answers."""
    recorded = Path(os.environ.get("RAY_TMPDIR", "/tmp")) / "ray" / "ray_current_cluster"
    address = os.environ.get("RAY_ADDRESS") or (recorded.read_text().strip() if recorded.exists() else "")
    if not address or address.startswith("ray://"):
        return address or None
    host, port = address.rsplit(":", 1)
    try:  # a stale record (a cluster that was killed) would make ray.init retry for minutes
        socket.create_connection((host, int(port)), timeout=2).close()
    except (OSError, ValueError):
        return None
    return address


def _connect_ray(num_cpus: int) -> Any:
    """The Ray session: the one already initialised, else a running cluster, else a new local one."""
    import ray

    if not ray.is_initialized():
        quiet = dict(log_to_driver=False, configure_logging=False)
        address = _running_cluster()
        if address is not None:  # what ray.init(address="auto") would join
            ray.init(address=address, **quiet)
        else:
            ray.init(address="local", num_cpus=max(num_cpus, os.cpu_count() or 1), include_dashboard=False, **quiet)
    return ray


class RayExecutor:
    """``world_size`` rank actors, each holding ``factory(config)``; the interface of ``RankPool``.

    ``backend``: "auto" (NCCL when the cluster has a GPU per rank, else gloo), "gloo" or "nccl".
    ``placement``: a key of :data:`PLACEMENTS`. ``node_ids``, ``pids``: per rank.
    """

    def __init__(self, factory: Callable[..., Any], config: Any, backend: str = "auto", placement: str = "pack",
                 start_timeout: float = 300.0) -> None:
        if placement not in PLACEMENTS:
            raise ValueError(f"ray_placement must be one of {sorted(PLACEMENTS)}, got {placement!r}")
        world, tp = config.world_size, config.tensor_parallel_size
        ray = _connect_ray(world)
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        gpus = ray.cluster_resources().get("GPU", 0)
        if backend == "auto":
            backend = "nccl" if gpus >= world else "gloo"
        if backend == "nccl" and gpus < world:
            raise ValueError(f"backend='nccl' needs one GPU per rank: {world} ranks but the Ray cluster has "
                             f"{gpus:g} GPU(s); use backend='gloo'")
        bundle = {"GPU": 1, "CPU": 1} if backend == "nccl" else {"CPU": 1}
        strategy, groups = placement_groups(world, tp, placement)
        self._pgs = [placement_group([bundle] * len(g), strategy=strategy) for g in groups]
        self._actors: list[Any] = []
        self._kill = weakref.finalize(self, _end, self._actors, self._pgs)  # also on garbage collection
        self._broken: str | None = None
        self.backend = backend
        try:
            self._reserve(ray, groups, bundle, placement, start_timeout)
            remote = ray.remote(num_cpus=1, num_gpus=bundle.get("GPU", 0), max_concurrency=2)(RankActor)
            for pg, ranks in zip(self._pgs, groups):
                for i, rank in enumerate(ranks):
                    where = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=i)
                    self._actors.append(remote.options(scheduling_strategy=where).remote(rank, world))
            places = self._wait([a.where.remote() for a in self._actors], "start-up", start_timeout, None, False)
            self.node_ids = [p[0] for p in places]
            self.pids = [p[2] for p in places]
            ip = places[0][1]
            address = (ip, ray.get(self._actors[0].rendezvous_port.remote(ip)))
            local = [self.node_ids[:r].count(self.node_ids[r]) for r in range(world)]  # index among its node's ranks
            starts = [a.start.remote(factory, config, backend, address, local[r]) for r, a in enumerate(self._actors)]
            self._wait(starts, "start-up", start_timeout, None)
        except BaseException as exc:
            self._broken = f"start-up failed: {type(exc).__name__}"
            self._kill()
            raise

    def _reserve(self, ray: Any, groups: list[list[int]], bundle: dict, placement: str, timeout: float) -> None:
        """Wait for the placement groups; fail at once if the cluster's nodes could never hold them."""
        strict, size, need = placement == "tp_per_node", len(groups[0]), sum(map(len, groups))
        nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
        for key, per_rank in bundle.items():
            slots = [int(n.get(key, 0) // per_rank) for n in nodes]  # ranks each node could hold
            if (sum(s // size * size for s in slots) if strict else sum(slots)) < need:
                raise ValueError(
                    f"the Ray cluster cannot place {need} ranks of {bundle} with ray_placement={placement!r}: its "
                    f"nodes have {[n.get(key, 0) for n in nodes]} {key}"
                    + (f", and each TP group ({size} ranks) must fit in one node" if strict else "")
                    + "; add nodes or resources, or use smaller sizes")
        ready, _ = ray.wait([pg.ready() for pg in self._pgs], num_returns=len(self._pgs), timeout=timeout)
        if len(ready) < len(self._pgs):
            raise TimeoutError(f"the Ray cluster has not granted the placement of {sum(map(len, groups))} ranks "
                               f"of {bundle} within {timeout:g} s: other jobs hold its resources")

    @property
    def alive(self) -> bool:
        return self._broken is None

    def call(self, method: str, *args: Any, timeout: float = 3600.0,
             on_progress: Callable[[int, Any], None] | None = None, **kwargs: Any) -> list[Any]:
        """Run ``method(*args, **kwargs)`` on every rank's object; return the values in rank order."""
        refs = [a.call.remote(method, args, kwargs) for a in self._live_actors()]
        return self._wait(refs, f"call {method!r}", timeout, on_progress)

    def post(self, rank: int, payload: Any) -> None:
        """Put ``payload`` in rank ``rank``'s inbox (read there with ``read_inbox``)."""
        self._live_actors()[rank].post.remote(payload)

    def _live_actors(self) -> list[Any]:
        if self._broken is not None:
            raise PoolBrokenError(f"this engine's ranks are gone ({self._broken}); build a new one")
        return self._actors

    def _wait(self, refs: list[Any], what: str, timeout: float, on_progress: Callable[[int, Any], None] | None,
              wrapped: bool = True) -> list[Any]:
        """The values of one reference per rank; ``wrapped``: they are ``RankActor._run``'s replies."""
        try:
            return self._collect(refs, timeout, on_progress, wrapped)
        except BaseException as exc:  # a rank failed, a timeout, Ctrl-C: no rank state can be trusted
            self._broken = f"{what} failed: {type(exc).__name__}"
            self._kill()
            raise

    def _collect(self, refs: list[Any], timeout: float, on_progress: Callable[[int, Any], None] | None,
                 wrapped: bool) -> list[Any]:
        import ray
        from ray.exceptions import RayActorError, RayError

        deadline = time.monotonic() + timeout
        pending, results, failures = {ref: rank for rank, ref in enumerate(refs)}, {}, []
        while pending:
            limit = min(deadline, failures[0].seen + _RAY_SETTLE_S) if failures else deadline
            ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=max(0.0, min(
                _POLL_S, limit - time.monotonic())))
            if on_progress is not None:
                self._relay_progress(ray, on_progress)
            for ref in ready:
                rank = pending.pop(ref)
                try:
                    reply = ray.get(ref)
                except RayActorError as exc:  # the actor's process died: a cause, never a consequence
                    failures.append(_Failure(rank, f"its Ray actor died: {exc}", time.monotonic(), float("-inf")))
                    continue
                except RayError as exc:
                    failures.append(_Failure(rank, str(exc), time.monotonic(), time.time()))
                    continue
                status, value, raised_at = reply if wrapped else ("ok", reply, 0.0)
                if status == "ok":
                    results[rank] = value
                else:
                    failures.append(_Failure(rank, value, time.monotonic(), raised_at))
            if pending and time.monotonic() >= limit:
                if failures:
                    break
                raise LaunchTimeoutError(sorted(pending.values()), timeout)
        if failures:
            raise _root_cause(failures)
        return [results[r] for r in sorted(results)]

    def _relay_progress(self, ray: Any, on_progress: Callable[[int, Any], None]) -> None:
        try:
            batches = ray.get([a.drain_progress.remote() for a in self._actors], timeout=_POLL_S * 4)
        except Exception:  # a dead actor: the call's own reply reports it
            return
        for rank, batch in enumerate(batches):
            for payload in batch:
                on_progress(rank, payload)

    def close(self) -> None:
        """End every actor (gracefully when they are idle) and remove the placement groups; idempotent."""
        if self._broken is None:
            self._broken = "closed"
            import ray

            try:
                ray.get([a.close.remote() for a in self._actors], timeout=10)
            except Exception:
                pass
        self._kill()

    def __enter__(self) -> RayExecutor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _end(actors: list[Any], pgs: list[Any]) -> None:
    """Kill every actor and remove the placement groups (Ray does both when the driver exits)."""
    import ray
    from ray.util.placement_group import remove_placement_group

    if ray.is_initialized():
        for actor in actors:
            ray.kill(actor, no_restart=True)
        for pg in pgs:
            remove_placement_group(pg)
    actors.clear()
    pgs.clear()
