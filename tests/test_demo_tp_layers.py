"""The tensor-parallel layers demo (hybridpar.demos.tp_layers)."""
from __future__ import annotations

import pytest

from hybridpar.demos.tp_layers import main


def test_demo_prints_a_matching_table_sorted_by_rank(capsys):
    assert main(["--tp", "2", "--backend", "gloo"]) == 0
    text = capsys.readouterr().out
    out = text.splitlines()
    assert out[0] == "== Tensor-parallel layers ==" and "on 2 ranks, gloo (CPU)" in " ".join(text.split())
    start = next(i for i, line in enumerate(out) if line.startswith("rank  layer")) + 2
    rows = [line.split() for line in out[start:start + 12]]
    assert [r[0] for r in rows] == ["0"] * 6 + ["1"] * 6
    assert all(r[-1] == "yes" for r in rows)
    verdict = " ".join(text[text.index("verdict:"):].split())
    assert verdict.startswith("verdict: all 6 layers match the unsharded reference on every rank")


def test_demo_rejects_a_tp_size_that_cannot_shard_the_heads(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--tp", "3", "--backend", "gloo"])
    assert exc.value.code == 2
    assert "use one of [1, 2, 4, 8]" in capsys.readouterr().err
