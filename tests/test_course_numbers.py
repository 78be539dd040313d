"""Self-checks of the course's prose: the numbers chapters and labs state (in the text and in their
exercise solutions) are recomputed from the package, and the solutions' code runs and prints what
the solution says. A number in the prose cannot drift from the code unnoticed."""
from __future__ import annotations

import ast
import contextlib
import io
import re
from collections.abc import Callable

import nbformat
import pytest

from hybridpar.book.build import ROOT
from hybridpar.roofline import (
    HARDWARE_PRESETS, MODEL_PRESETS, decode_step_time, kv_bytes_per_token, unread_embedding_params, weight_bytes,
)

llama, qwen, h100 = MODEL_PRESETS["llama-7b"], MODEL_PRESETS["qwen2.5-0.5b"], HARDWARE_PRESETS["h100"]
H100 = "nvidia-h100-80gb-hbm3"  # the device slug of issue 15's single-GPU runs


def text_of(doc: str) -> str:
    """The prose of a chapter (.md) or of a lab's markdown cells (.ipynb), whitespace collapsed."""
    path = ROOT / doc
    if path.suffix == ".ipynb":
        raw = "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")
    else:
        raw = path.read_text()
    return " ".join(raw.split())


def qwen_tp_sizes() -> str:
    from hybridpar.layers.linear import valid_tp_sizes

    sizes = [t for t in valid_tp_sizes(qwen.num_heads, qwen.num_kv_heads) if qwen.intermediate_size % t == 0]
    return " and ".join(map(str, sizes))


def decode_row(model: str, batch: int, device: str = "nvidia-h200") -> dict:
    from hybridpar.bench import latest
    from hybridpar.viz.perf_plots import decode_rows

    rows = decode_rows(latest("decode", device_slug=device))
    return next(r for r in rows if r["model"] == model and r["batch"] == batch)


def hit_rate(system_len: int, page_size: int) -> float:
    from hybridpar.radix.workload import SharedPrefixWorkload

    return SharedPrefixWorkload(num_groups=4, prompts_per_group=8, system_len=system_len, question_len=16,
                                output_len=4).theoretical_hit_rate(page_size=page_size)


def tknp_exchange() -> tuple[int, int, int]:
    from hybridpar.viz.tknp_flow import FlowRequest, step_flow

    flow = step_flow("llama-7b", 1, 4, [FlowRequest(4000, 10)] * 64, max_new_tokens=64)
    return flow.scatter_bytes(), flow.gather_bytes(), flow.kv_read_bytes(0)


def tknp_small_budget() -> list[int]:
    from hybridpar.models.config import ModelConfig
    from hybridpar.models.default_checkpoint import resolve_model
    from hybridpar.tknp.memory import decoder_param_bytes, plan_memory, shape_of

    config = ModelConfig.from_pretrained(resolve_model("qwen2-tiny"))
    plan = plan_memory(shape_of(config), 12_000_000, tensor_parallel_size=1, token_parallel_size=2,
                       bytes_per_param=4, bytes_per_elem=4, granularity=16, reserved_tokens=16,
                       param_bytes=decoder_param_bytes(config, 1, bytes_per_param=4))
    return [r.kv_tokens for r in plan.ranks]


def busbw_solution() -> list[str]:
    """Chapter 2's benchmark exercise: 256 MiB all-reduced on 8 GPUs in 1.9 ms, then on 4."""
    from hybridpar.distributed.bandwidth import bus_factor

    size = 256 * 2**20
    algbw = size / 1.9e-3 / 1e9
    busbw = round(algbw) * bus_factor("all_reduce", 8)
    seconds_4 = bus_factor("all_reduce", 4) * size / (round(busbw) * 1e9)
    return [f"{size / 1e6:.1f}\\ \\text{{MB}} / 1.9\\ \\text{{ms}} \\approx {algbw:.0f}\\ \\text{{GB/s}}",
            f"\\approx {busbw:.0f}\\ \\text{{GB/s}}", f"\\approx {seconds_4 * 1e3:.2f}$ ms"]


# (document, what the prose says, the same computed by the package)
CLAIMS: list[tuple[str, Callable[[], list[str]]]] = [
    ("chapters/01_why_distribute.md", lambda: [f"about {h100.ridge_intensity:.0f} FLOPs per byte"]),
    ("chapters/01_why_distribute.md", lambda: [
        f"({decode_step_time(llama, h100, 1, 64, 4096).kv_cache_bytes / 1e9:.0f} GB, "]),
    ("chapters/01_why_distribute.md", lambda: [
        f"about {decode_step_time(llama, h100, 4, 1, 4096).step_time * 1e3:.2f} ms per step for TP=4 and "
        f"{decode_step_time(llama, h100, 8, 1, 4096).step_time * 1e3:.2f} ms for TP=8"]),
    ("chapters/01_why_distribute.md", lambda: [
        f"= {128 * 4096 * kv_bytes_per_token(llama) / 1e9:.0f}$ GB and the weights {weight_bytes(llama) / 1e9:.1f} GB"]),
    ("chapters/02_collectives.md", busbw_solution),
    ("chapters/02_collectives.md", lambda: [f"about {2 * 7 * 8 / 6:.0f} µs at $n = 8$"]),
    ("chapters/03_tp_layers.md", lambda: [f"allows only TP {qwen_tp_sizes()}"]),
    ("chapters/06_token_parallel.md", lambda: [f"\\approx {round(141e9 / 327_680, -4):,.0f}$ tokens".replace(",", "{,}")]),
    ("chapters/07_performance.md", lambda: [
        f"({(weight_bytes(llama) - 2 * unread_embedding_params(llama)) / 1e9:.1f} of Llama-7B's "
        f"{weight_bytes(llama) / 1e9:.1f} GB are read)"]),
    ("chapters/07_performance.md", lambda: [
        f"**{decode_row('llama-7b-shape', 1, H100)['fused_s'] * 1e3:.2f} ms, "
        f"{decode_row('llama-7b-shape', 1, H100)['fused_roofline_frac']:.0%} of the roofline**".replace("%", " %"),
        f"from {decode_row('llama-7b-shape', 1, H100)['graph_s'] * 1e3:.2f} ms with PyTorch's kernels",
        f"step reaches {decode_row('llama-7b-shape', 32, H100)['fused_roofline_frac']:.0%} of the roofline".replace("%", " %"),
        f"the roofline itself is {decode_row('llama-7b-shape', 32, H100)['roofline_s'] * 1e3:.2f} ms",
        f"reaches {decode_row('llama-7b-shape', 128)['graph_roofline_frac']:.0%} of the roofline".replace("%", " %")]),
    ("labs/03_tp_layers.ipynb", lambda: [
        (lambda s: f"rank 3 holds rows {s.start}-{s.end - 1}")(__import__(
            "hybridpar.layers.vocab_parallel_embedding", fromlist=["vocab_shard"]).vocab_shard(1000, 3, 4))]),
    ("labs/05_radix_attention.ipynb", lambda: [f"\\approx {hit_rate(440, 16):.3f}", f"\\approx {hit_rate(440, 1):.3f}"]),
    ("labs/06_token_parallel.ipynb", lambda: [(lambda s, g, kv: f"${s:,} + {g:,}".replace(",", "{,}") + f" \\approx {(s + g) / 1e6:.1f}$ MB")(
        *tknp_exchange()), f"about {tknp_exchange()[2] / 1e9:.2f} GB"]),
    ("labs/06_token_parallel.ipynb", lambda: [(lambda root, worker: f"{root} KV tokens")(*tknp_small_budget()),
                                             f"worker gets {tknp_small_budget()[1]:,}"]),
]


@pytest.mark.parametrize("doc, claim", CLAIMS, ids=[f"{d.split('/')[-1]}-{i}" for i, (d, _) in enumerate(CLAIMS)])
def test_stated_numbers_come_from_the_package(doc: str, claim: Callable[[], list[str]]) -> None:
    prose = text_of(doc)
    for needle in claim():
        assert " ".join(needle.split()) in prose, f"{doc} should say {needle!r} (recomputed from the package)"


# The names a chapter's solution code uses, set up as the chapter sets them up.
SOLUTION_SETUP = {
    "01_why_distribute.md": "from hybridpar.roofline import HARDWARE_PRESETS, MODEL_PRESETS, decode_step_time\n"
                            "llama, h100 = MODEL_PRESETS['llama-7b'], HARDWARE_PRESETS['h100']",
    "05_radix_attention.md": "from hybridpar.viz.radix_explorer import DEFAULT_SCRIPT, RadixSandbox",
}


def solution_checks() -> list[tuple[str, str, str]]:
    """``(chapter, code, expected)`` for every Python block of a chapter's solutions whose last line ends
    with ``# <what it evaluates to or prints>``."""
    checks = []
    for chapter in sorted((ROOT / "chapters").glob("0[1-7]_*.md")):
        for solution in re.finditer(r"(`{3,4})\{solution\}[^\n]*\n(.*?)\n\1", chapter.read_text(), re.S):
            for block in re.finditer(r"```python\n(.*?)```", solution[2], re.S):
                last = block[1].rstrip().splitlines()[-1]
                if "  # " in last and not last.lstrip().startswith("y = "):
                    checks.append((chapter.name, block[1], last.split("  # ", 1)[1]))
    return checks


@pytest.mark.parametrize("chapter, code, expected", solution_checks(), ids=lambda v: str(v)[:20])
def test_solution_code_gives_what_the_solution_says(chapter: str, code: str, expected: str) -> None:
    assert chapter in SOLUTION_SETUP, f"add the names {chapter}'s solutions use to SOLUTION_SETUP"
    namespace: dict = {}
    exec(SOLUTION_SETUP[chapter], namespace)
    *body, last = code.rstrip().splitlines()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec("\n".join(body), namespace)
        statement = last.split("  # ", 1)[0]
        value = eval(statement, namespace) if not statement.startswith("print(") else exec(statement, namespace)
    if statement.startswith("print("):
        assert out.getvalue().split() == expected.split(), (out.getvalue(), expected)
    else:
        assert value == ast.literal_eval(expected)


def test_there_are_solution_checks() -> None:
    assert {c for c, _, _ in solution_checks()} == set(SOLUTION_SETUP)


def test_documents_exist() -> None:
    assert all((ROOT / doc).is_file() for doc, _ in CLAIMS)
