"""``mxpass bench load``: load time and peak GPU memory of ``mxpass.load`` on a Qwen3-MoE
checkpoint with Qwen3-30B-A3B's shapes (4 of its 48 layers).

Shape legend: V vocab, H hidden, E experts, I expert intermediate, L layers.

:func:`write_checkpoint` generates the checkpoint: random bf16 weights (normal, std 0.02)
quantized with mxpass's schemes (bit-identical to compressed-tensors' presets) and written
as compressed-tensors does, experts per expert as the Qwen3-MoE checkpoints store them
(``mlp.experts.N.gate_proj.weight`` ...), one safetensors shard per layer; lm_head and the
router gates stay bf16 (``ignore``). :func:`measure` loads it onto the GPU and reports the
peak allocated memory against the bytes the model needs (quantized weights and scales plus
unquantized tensors): the target is at most 1.1x.
"""

from __future__ import annotations

import json
import os
import time

import torch

# Qwen3-30B-A3B (Qwen/Qwen3-30B-A3B config.json), 4 of 48 layers
QWEN3_30B_A3B = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
                     num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
                     num_experts_per_tok=8, num_hidden_layers=4, max_position_embeddings=40960,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=False)


def _tensors_of_layer(cfg, layer: int, gen: torch.Generator, device) -> dict[str, torch.Tensor]:
    """Layer ``layer``'s bf16 tensors, in the checkpoint's (per-expert) names."""
    h, i, e = cfg.hidden_size, cfg.moe_intermediate_size, cfg.num_experts
    q, kv, d = cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, cfg.head_dim
    p = f"model.layers.{layer}."
    shapes = {p + "self_attn.q_proj.weight": (q, h), p + "self_attn.k_proj.weight": (kv, h),
              p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, q),
              p + "mlp.gate.weight": (e, h)}
    for x in range(e):
        shapes.update({f"{p}mlp.experts.{x}.gate_proj.weight": (i, h), f"{p}mlp.experts.{x}.up_proj.weight": (i, h),
                       f"{p}mlp.experts.{x}.down_proj.weight": (h, i)})
    out = {name: (torch.randn(shape, generator=gen, device=device) * 0.02).to(torch.bfloat16)
           for name, shape in shapes.items()}
    for norm, size in (("input_layernorm", h), ("post_attention_layernorm", h), ("self_attn.q_norm", d),
                       ("self_attn.k_norm", d)):
        out[f"{p}{norm}.weight"] = torch.ones(size, dtype=torch.bfloat16, device=device)
    return out


def _quantize_file(tensors: dict[str, torch.Tensor], fmt, ignore) -> dict[str, torch.Tensor]:
    """Quantize every 2-D weight not matched by ``ignore`` (compressed-tensors' layout)."""
    from mxpass import quant
    from mxpass.checkpoint.save import _stored_scale
    from mxpass.config import QuantConfig

    rules = QuantConfig(ignore=ignore)
    out = {}
    for name, t in tensors.items():
        module = name[: -len(".weight")]
        if t.dim() != 2 or "embed_tokens" in name or rules.ignored_by(module):
            out[name] = t.cpu()
            continue
        data, scale = quant.quantize_weight(fmt, t, module)
        out[name] = data.cpu()
        out[f"{module}.weight_scale"] = _stored_scale(fmt, scale, t.dtype).cpu()
    return out


def write_checkpoint(path: str, scheme: str = "fp8-dynamic", overrides: dict | None = None,
                     seed: int = 0, device: str | None = None) -> dict:
    """Write the Qwen3-MoE checkpoint (module docstring) in ``scheme`` to ``path``; returns
    {"quantized_bytes", "unquantized_bytes"} as stored (weights and scales, the rest)."""
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    from mxpass.checkpoint.compressed_tensors import scheme_args, stored_format
    from mxpass.formats import get_format

    fmt = get_format(scheme)
    if fmt.static_activation:
        raise ValueError(f"{scheme}: the benchmark writes dynamic schemes only")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cfg = Qwen3MoeConfig(**{**QWEN3_30B_A3B, **(overrides or {})})
    cfg.architectures = ["Qwen3MoeForCausalLM"]
    os.makedirs(path, exist_ok=True)
    cfg.save_pretrained(path)
    ignore = ["lm_head", "re:.*mlp\\.gate$"]
    gen = torch.Generator(device=device).manual_seed(seed)
    v, h = cfg.vocab_size, cfg.hidden_size
    files = [{"model.embed_tokens.weight": (torch.randn(v, h, generator=gen, device=device) * 0.02).to(torch.bfloat16),
              "model.norm.weight": torch.ones(h, dtype=torch.bfloat16),
              "lm_head.weight": (torch.randn(v, h, generator=gen, device=device) * 0.02).to(torch.bfloat16)}]
    files += [lambda layer=layer: _tensors_of_layer(cfg, layer, gen, device) for layer in range(cfg.num_hidden_layers)]
    weight_map, sizes = {}, {"quantized_bytes": 0, "unquantized_bytes": 0}
    for index, make in enumerate(files):
        name = f"model-{index + 1:05d}-of-{len(files):05d}.safetensors"
        tensors = _quantize_file(make() if callable(make) else make, fmt, ignore)
        for key, t in tensors.items():
            quantized = key.endswith(".weight_scale") or t.dtype in (torch.float8_e4m3fn, torch.int8)
            sizes["quantized_bytes" if quantized else "unquantized_bytes"] += t.nbytes
            weight_map[key] = name
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        del tensors
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, f)
    # as compressed-tensors' ModelCompressor.update_config writes it
    from compressed_tensors import __version__
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    qconfig = QuantizationConfig(
        config_groups={"group_0": QuantizationScheme(targets=["Linear"], format=stored_format(fmt),
                                                     **scheme_args(fmt))},
        ignore=ignore, quantization_status="compressed", format=stored_format(fmt))
    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    config["quantization_config"] = {"version": __version__, "quant_method": "compressed-tensors",
                                     "sparsity_config": {}, "transform_config": {},
                                     **qconfig.model_dump(mode="json", exclude=["quant_method"])}
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return sizes


def measure(path: str, device: str | None = None, progress: bool | None = None) -> dict:
    """Load ``path`` with ``mxpass.load``; time, peak device memory (CUDA) and bytes placed."""
    import mxpass
    from mxpass.checkpoint import info

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    start = time.perf_counter()
    model = mxpass.load(path, device=device, progress=progress)
    if cuda:
        torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    details = info(model)
    placed = details.quantized_bytes + details.unquantized_bytes
    row = {"bench": "load", "seconds": seconds, "quantized_bytes": details.quantized_bytes,
           "unquantized_bytes": details.unquantized_bytes, "linears": len(details.formats),
           "experts": len(details.experts), "formats": sorted(set(details.formats.values()))}
    if cuda:
        peak = torch.cuda.max_memory_allocated() - before
        row.update(peak_bytes=peak, peak_over_needed=peak / placed)
    del model
    return row


def run(scheme: str = "fp8-dynamic", root: str | None = None, overrides: dict | None = None) -> list[dict]:
    """Write the checkpoint (under ``root``, a temporary directory by default), then measure."""
    import tempfile

    with tempfile.TemporaryDirectory(dir=root) as tmp:
        path = os.path.join(tmp, f"qwen3-30b-a3b-4l-{scheme}")
        start = time.perf_counter()
        stored = write_checkpoint(path, scheme, overrides)
        written = time.perf_counter() - start
        row = measure(path)
    shape = {**QWEN3_30B_A3B, **(overrides or {})}
    return [{**row, "scheme": scheme, "layers": shape["num_hidden_layers"], "write_seconds": written,
             "stored_quantized_bytes": stored["quantized_bytes"], "stored_unquantized_bytes": stored["unquantized_bytes"]}]


def format_table(rows: list[dict]) -> str:
    lines = ["mxpass.load, Qwen3-MoE 30B-A3B shapes",
             f"{'scheme':<12} {'layers':>6} {'load s':>8} {'GB placed':>10} {'peak GB':>8} {'peak/placed':>11}"]
    for r in rows:
        placed = (r["quantized_bytes"] + r["unquantized_bytes"]) / 1e9
        peak = r.get("peak_bytes")
        lines.append(f"{r['scheme']:<12} {r['layers']:>6} {r['seconds']:>8.2f} {placed:>10.2f} "
                     f"{(peak / 1e9 if peak else float('nan')):>8.2f} {r.get('peak_over_needed', float('nan')):>11.3f}")
    return "\n".join(lines)
