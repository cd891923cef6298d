"""The load benchmark (mxpass/benchmarks/load.py) on CPU with tiny Qwen3-MoE shapes: the
generated checkpoint loads through the compressed-tensors reader, experts included, and the
row adds up."""

import pytest

from mxpass.benchmarks import load as bench

TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
            max_position_embeddings=64)


@pytest.mark.parametrize("scheme", ["fp8-dynamic", "mxfp8"])
def test_load_benchmark_runs_on_tiny_shapes(tmp_path, scheme):
    rows = bench.run(scheme, root=str(tmp_path), overrides=TINY)
    (row,) = rows
    assert row["scheme"] == scheme and row["layers"] == 2
    assert row["linears"] == 4 * 2 and row["experts"] == 2 and row["formats"] == [scheme]
    assert row["unquantized_bytes"] == row["stored_unquantized_bytes"]  # everything placed once
    if scheme == "mxfp8":  # E8M0 bytes as stored; FP8 scales are bf16 on disk, float32 in mxpass
        assert row["quantized_bytes"] == row["stored_quantized_bytes"]
    assert row["seconds"] > 0 and "peak_bytes" not in row  # no CUDA here
    assert scheme in bench.format_table(rows)
