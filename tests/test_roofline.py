"""hybridpar.roofline: parameter, byte and time arithmetic against hand-computed values."""
from __future__ import annotations

import json

import pytest

from hybridpar.roofline import (
    HARDWARE_PRESETS,
    MODEL_PRESETS,
    HardwareSpec,
    ModelShape,
    allreduce_bytes_per_token,
    attainable_flops,
    decode_step_time,
    format_bytes,
    format_seconds,
    kv_bytes_per_token,
    kv_heads_per_rank,
    num_params,
    weight_bytes,
)

LLAMA = MODEL_PRESETS["llama-7b"]
QWEN = MODEL_PRESETS["qwen2.5-0.5b"]
H100 = HARDWARE_PRESETS["h100"]


def test_llama_7b_parameters_and_bf16_bytes() -> None:
    assert num_params(LLAMA) == 6_738_415_616  # the published Llama-2-7B count
    assert weight_bytes(LLAMA) == pytest.approx(13.48e9, rel=1e-3)
    assert format_bytes(weight_bytes(LLAMA)) == "13.5 GB"


def test_qwen_0_5b_parameters_with_tied_embeddings_and_qkv_bias() -> None:
    assert num_params(QWEN) == 494_032_768  # Qwen2.5-0.5B: 0.49B
    untied = ModelShape(**{**QWEN.__dict__, "tie_word_embeddings": False})
    assert num_params(untied) - num_params(QWEN) == QWEN.vocab_size * QWEN.hidden_size


@pytest.mark.parametrize("model", list(MODEL_PRESETS.values()), ids=list(MODEL_PRESETS))
def test_kv_bytes_per_token_formula(model: ModelShape) -> None:
    expected = 2 * model.num_layers * model.num_kv_heads * model.head_dim * 2
    assert kv_bytes_per_token(model) == expected
    assert kv_bytes_per_token(model, bytes_per_elem=1) == expected / 2


def test_kv_bytes_for_known_models() -> None:
    assert kv_bytes_per_token(LLAMA) == 512 * 1024  # 0.5 MiB per token (MHA)
    assert kv_bytes_per_token(QWEN) == 12 * 1024  # GQA with 2 KV heads


def test_tp_shards_weights_and_kv_heads() -> None:
    for t in (2, 4, 8):
        # Everything but the replicated norms is split t ways.
        norms = (2 * LLAMA.num_layers + 1) * LLAMA.hidden_size
        assert num_params(LLAMA, t) == (num_params(LLAMA) - norms) // t + norms
        assert kv_bytes_per_token(LLAMA, t) == kv_bytes_per_token(LLAMA) / t
    # More ranks than KV heads: each rank keeps one KV head (replicated).
    tiny = MODEL_PRESETS["tiny"]
    kv = tiny.num_kv_heads
    assert kv_heads_per_rank(tiny, kv) == 1 and kv_heads_per_rank(tiny, 2 * kv) == 1
    assert kv_bytes_per_token(tiny, 2 * kv) == kv_bytes_per_token(tiny, kv)


def test_invalid_tp_size_names_the_valid_choices() -> None:
    with pytest.raises(ValueError, match=r"choose one of \[1, 2\]"):
        weight_bytes(QWEN, tp_size=4)
    with pytest.raises(ValueError, match="int >= 1"):
        decode_step_time(LLAMA, H100, tp_size=0)
    with pytest.raises(ValueError, match="batch_size"):
        decode_step_time(LLAMA, H100, batch_size=0)
    with pytest.raises(KeyError, match="llama-7b"):
        ModelShape.preset("llama-70b")
    with pytest.raises(KeyError, match="h100"):
        HardwareSpec.preset("a100")


def test_allreduce_payload() -> None:
    assert allreduce_bytes_per_token(LLAMA) == (2 * 32 + 1) * 4096 * 2


def test_decode_batch_1_is_memory_bound_and_reads_all_weights() -> None:
    step = decode_step_time(LLAMA, H100, tp_size=1, batch_size=1, context_len=0)
    assert step.bound == "memory"
    assert step.comm_bytes == 0 and step.comm_time == 0
    # Without context, the bytes read are the matmul weights: all but the input embedding and norms.
    norms = (2 * LLAMA.num_layers + 1) * LLAMA.hidden_size
    matmul = num_params(LLAMA) - LLAMA.vocab_size * LLAMA.hidden_size - norms
    assert step.bytes_read == matmul * 2
    assert step.arithmetic_intensity == pytest.approx(1.0)  # 2 FLOPs per 2-byte weight
    assert step.step_time == pytest.approx(step.bytes_read / H100.memory_bandwidth)


def test_intensity_grows_with_batch_until_compute_bound() -> None:
    small = decode_step_time(LLAMA, H100, batch_size=8, context_len=0)
    big = decode_step_time(LLAMA, H100, batch_size=1024, context_len=0)
    assert small.arithmetic_intensity == pytest.approx(8.0)
    assert small.bound == "memory" and big.bound == "compute"
    assert big.tokens_per_second > small.tokens_per_second


def test_tp_cuts_memory_time_but_adds_communication() -> None:
    one = decode_step_time(LLAMA, H100, tp_size=1, batch_size=16)
    four = decode_step_time(LLAMA, H100, tp_size=4, batch_size=16)
    assert four.memory_time == pytest.approx(one.memory_time / 4, rel=0.01)
    assert four.comm_time > 0
    ring = 2 * 3 / 4 * allreduce_bytes_per_token(LLAMA)
    gather = 3 / 4 * LLAMA.vocab_size * 2
    assert four.comm_bytes == pytest.approx(16 * (ring + gather))
    assert four.step_time == pytest.approx(max(four.memory_time, four.compute_time) + four.comm_time)


def test_fits_checks_device_memory() -> None:
    assert decode_step_time(LLAMA, H100, batch_size=1, context_len=4096).fits
    # 512 requests * 4096 tokens * 0.5 MiB = 1.1 TB of KV cache.
    assert not decode_step_time(LLAMA, H100, batch_size=512, context_len=4096).fits


def test_roofline_ridge() -> None:
    ridge = H100.ridge_intensity
    assert attainable_flops(H100, ridge / 2) == pytest.approx(H100.peak_flops / 2)
    assert attainable_flops(H100, ridge * 10) == H100.peak_flops


def test_from_hf_config_round_trips_a_preset(tmp_path) -> None:
    config = {
        "model_type": "qwen2", "hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24,
        "num_attention_heads": 14, "num_key_value_heads": 2, "vocab_size": 151936, "tie_word_embeddings": True,
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    assert ModelShape.from_hf_config(path, name="qwen2.5-0.5b") == QWEN


def test_tiny_preset_is_the_shape_of_the_builtin_test_checkpoint() -> None:
    from hybridpar.models.default_checkpoint import BUILTIN_MODELS

    shape = ModelShape.from_hf_config(BUILTIN_MODELS["qwen2-tiny"].config, name="tiny")
    assert shape == MODEL_PRESETS["tiny"]


def test_formatting() -> None:
    assert format_bytes(12288) == "12.3 kB"
    assert format_bytes(3) == "3 B"
    assert format_seconds(0.0123) == "12.3 ms"
    assert format_seconds(2e-6) == "2 µs"
    assert format_seconds(0) == "0 s"
