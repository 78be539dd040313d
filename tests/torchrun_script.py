"""Run by tests/test_launcher.py under ``python -m torch.distributed.run --nproc_per_node=2``."""
import json

from hybridpar.distributed.launcher import is_torchrun, run_torchrun
from tests.launcher_workers import sum_of_ranks

if __name__ == "__main__":
    assert is_torchrun()
    out = run_torchrun(sum_of_ranks)
    if out["rank"] == 0:
        print("RESULT " + json.dumps(out), flush=True)
