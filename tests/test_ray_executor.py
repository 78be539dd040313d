"""The Ray executor on a simulated cluster of two Ray nodes on this machine (2 CPUs each).

One cluster for the module (Ray's start-up is paid once). Actors and placement groups are read
from the cluster's GCS tables (``Cluster.global_state``): Ray's state API (``ray.util.state``) needs
the dashboard, which would add seconds to the start-up of every run.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from hybridpar import LLM, SamplingParams
from hybridpar.distributed import rank_pool
from hybridpar.distributed.rank_pool import PoolBrokenError, report_progress
from hybridpar.distributed.replies import RankFailedError
from hybridpar.engine.config import EngineConfig
from tests.test_engine import _gone
from tests.torchrun_util import ROOT

ray = pytest.importorskip("ray")
pytestmark = pytest.mark.slow

PROMPTS = ["The radix cache", "Tensor parallelism splits each layer", "A token-parallel group"]
GREEDY = SamplingParams(max_tokens=8, ignore_eos=True)
TP2_TKNP2 = dict(tensor_parallel_size=2, token_parallel_size=2, enable_token_parallel=True, backend="gloo")


class Echo:
    """A tiny rank for the executor alone: progress, inbox, and a rank that raises."""

    def __init__(self, config: EngineConfig) -> None:
        self.rank = int(os.environ["RANK"])

    def ping(self, n: int) -> int:
        for i in range(n):
            report_progress(i)
        return self.rank

    def inbox(self, timeout: float) -> list[Any]:
        return rank_pool._CHANNEL.read_inbox(timeout)

    def boom(self) -> None:
        if self.rank == 1:
            raise KeyError("boom on rank 1")
        time.sleep(30)  # rank 0 is still busy when the driver gives up on the engine


@pytest.fixture(scope="module")
def cluster() -> Any:
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=2, include_dashboard=False))
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def _all_dead(cluster: Any, pids: list[int] | None = None) -> bool:
    """Every actor (or those with these pids) is DEAD in the GCS's table, within a few seconds."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        table = cluster.global_state.actor_table(None).values()
        if all(a["State"] == "DEAD" for a in table if pids is None or a["Pid"] in pids):
            return True
        time.sleep(0.2)
    return False


def _no_live_placement_groups(cluster: Any) -> bool:
    return all(pg["state"] == "REMOVED" for pg in cluster.global_state.placement_group_table().values())


def test_progress_inbox_and_a_raising_rank(cluster: Any) -> None:
    from hybridpar.engine.ray_executor import RayExecutor

    ex = RayExecutor(Echo, EngineConfig(tensor_parallel_size=2), backend="gloo")
    seen: list[tuple[int, int]] = []
    assert ex.call("ping", 3, on_progress=lambda rank, i: seen.append((rank, i))) == [0, 1]
    assert sorted(seen) == [(r, i) for r in (0, 1) for i in range(3)]
    ex.post(1, "hello")
    assert ex.call("inbox", 5.0) == [[], ["hello"]]
    start = time.monotonic()
    with pytest.raises(RankFailedError, match="rank 1 failed") as err:
        ex.call("boom")
    assert err.value.rank == 1 and "KeyError: 'boom on rank 1'" in str(err.value)
    assert time.monotonic() - start < 20  # not rank 0's 30 s sleep: the others are killed
    assert _all_dead(cluster, ex.pids) and _gone(ex.pids)
    with pytest.raises(PoolBrokenError):
        ex.call("ping", 0)


def test_a_placement_the_cluster_cannot_hold_fails_at_once(cluster: Any) -> None:
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"nodes have \[2.0, 2.0\] CPU, and each TP group \(4 ranks\) must fit"):
        LLM(tensor_parallel_size=4, backend="gloo", distributed_executor_backend="ray", ray_placement="tp_per_node")
    assert time.monotonic() - start < 30 and _no_live_placement_groups(cluster)


def test_hybridpar_generate_joins_the_running_cluster(cluster: Any) -> None:
    """The command finds the cluster as ray.init(address="auto") would (here: the address the Cluster recorded)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "hybridpar", "generate", "--distributed-executor-backend", "ray",
                           "--tensor-parallel-size", "2", "--force-cpu", "--prompt", PROMPTS[0], "--max-tokens", "4"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "on 2 rank(s) (TP 2 x DP 1, ray)" in proc.stdout and f"{PROMPTS[0]!r} -> '" in proc.stdout
    assert _all_dead(cluster)  # its driver is gone


@pytest.fixture(scope="module")
def engine(cluster: Any) -> Any:
    """TP 2 x TKNP 2 on the two nodes, each TP group kept inside one node."""
    with LLM(**TP2_TKNP2, distributed_executor_backend="ray", ray_placement="tp_per_node") as llm:
        yield llm


def test_tp2_x_tknp2_over_two_nodes_matches_transformers(cluster: Any, engine: LLM) -> None:
    from transformers import AutoTokenizer

    from hybridpar.models.default_checkpoint import resolve_model
    from hybridpar.models.verify import hf_reference

    path = resolve_model(None)
    tok = AutoTokenizer.from_pretrained(str(path))
    reference = hf_reference(path, [tok(p).input_ids for p in PROMPTS], max_new_tokens=GREEDY.max_tokens)
    outs = engine.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in outs] == reference.continuations
    table = {a["Pid"]: a for a in cluster.global_state.actor_table(None).values()}
    nodes = [table[p]["Address"]["NodeID"] for p in engine.pids]  # where Ray put each rank
    assert nodes == engine._pool.node_ids
    assert nodes[0] == nodes[1] and nodes[2] == nodes[3] and nodes[0] != nodes[2]  # one TP group per node


def test_killing_an_actor_mid_generate_names_it_and_leaves_nothing(cluster: Any, engine: LLM) -> None:
    """Runs after the test above (it ends the shared engine): rank 3 is SIGKILLed when the first request is done."""
    pids = engine.pids

    class KillOnFirstRequest:
        def advance(self, rank: int, payload: Any) -> None:
            os.kill(pids[3], signal.SIGKILL)

        def close(self) -> None:
            pass

    engine._progress_bar = lambda total, use_tqdm: KillOnFirstRequest()
    params = [SamplingParams(max_tokens=1, ignore_eos=True), SamplingParams(max_tokens=400, ignore_eos=True)]
    start = time.monotonic()
    with pytest.raises(RankFailedError, match="rank 3 failed(.|\n)*its Ray actor died") as err:
        engine.generate(PROMPTS[:2], params)
    assert err.value.rank == 3 and time.monotonic() - start < 60
    assert _gone(pids)
    assert _all_dead(cluster, pids) and _no_live_placement_groups(cluster)
    with pytest.raises(PoolBrokenError, match="build a new one"):
        engine.generate("again", use_tqdm=False)


def test_without_ray_the_backend_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(ValueError, match=r'pip install "hybridpar\[ray\]"'):
        LLM(distributed_executor_backend="ray")


def test_the_online_engine_serves_on_ray_actors(cluster: Any) -> None:
    """AsyncLLM (the server's engine) on Ray: requests reach the leader's inbox, tokens stream back."""
    import asyncio

    from hybridpar.engine.async_llm import AsyncLLM

    async def run() -> tuple[list[list[int]], list[list[int]]]:
        engine = AsyncLLM(tensor_parallel_size=2, backend="gloo", distributed_executor_backend="ray")
        engine.start()
        try:
            ids = [engine.tokenizer(p).input_ids for p in PROMPTS]

            async def one(i: int) -> list[int]:
                out: list[int] = []
                async for delta in engine.generate(ids[i], GREEDY, f"ray-{i}"):
                    out += delta.token_ids
                return out

            return list(await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))), ids
        finally:
            await engine.shutdown(drain_timeout=5.0)

    from hybridpar.models.default_checkpoint import resolve_model
    from hybridpar.models.verify import hf_reference

    online, ids = asyncio.run(run())
    assert online == hf_reference(resolve_model(None), ids, max_new_tokens=GREEDY.max_tokens).continuations
    assert _no_live_placement_groups(cluster)
