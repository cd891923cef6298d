"""The load benchmark (mxpass/benchmarks/load.py) on CPU with tiny Qwen3-MoE shapes: the
generated checkpoints (quantized, and bf16 quantized while loading) load through the
compressed-tensors reader, experts included, and the rows add up."""

import json

import pytest

from mxpass.benchmarks import load as bench

TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2, num_hidden_layers=2,
            max_position_embeddings=64)


@pytest.mark.parametrize("scheme", ["fp8-dynamic", "mxfp8"])
def test_load_benchmark_runs_on_tiny_shapes(tmp_path, scheme):
    rows = bench.run(scheme, root=str(tmp_path), overrides=TINY)
    stored, online = rows
    assert (stored["checkpoint"], stored["online"]) == (scheme, False)
    assert (online["checkpoint"], online["online"]) == ("bf16", True)
    for row in rows:
        assert row["scheme"] == scheme and row["layers"] == 2
        assert row["linears"] == 4 * 2 and row["experts"] == 2 and row["formats"] == [scheme]
        assert row["seconds"] > 0 and "peak_allocated_bytes" not in row  # no CUDA here
        assert row["needed_bytes"] == row["quantized_bytes"] + row["unquantized_bytes"]
    assert stored["unquantized_bytes"] == stored["stored_unquantized_bytes"]  # everything placed once
    if scheme == "mxfp8":  # E8M0 bytes as stored; FP8 scales are bf16 on disk, float32 in mxpass
        assert stored["quantized_bytes"] == stored["stored_quantized_bytes"]
    # the same bf16 weights: quantized while loading or stored quantized, the same bytes
    assert (online["quantized_bytes"], online["unquantized_bytes"]) == \
        (stored["quantized_bytes"], stored["unquantized_bytes"])
    assert scheme in bench.format_table(rows)


def test_load_benchmark_main_writes_json(tmp_path, capsys):
    out = tmp_path / "rows.json"
    bench.main(["--schemes", "mxfp8", "--online", "mxfp8", "--no-baseline", "--root", str(tmp_path),
                "--json", str(out)], overrides=TINY)
    rows = json.loads(out.read_text())
    assert [(r["checkpoint"], r["scheme"]) for r in rows] == [("mxfp8", "mxfp8"), ("bf16", "mxfp8")]
    assert rows[0]["torch"] and "mxpass.load" in capsys.readouterr().out
