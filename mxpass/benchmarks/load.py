"""``mxpass bench load``: load time and peak GPU memory of ``mxpass.load`` on a Qwen3-MoE
checkpoint with Qwen3-30B-A3B's shapes (4 of its 48 layers).

Shape legend: V vocab, H hidden, E experts, I expert intermediate, L layers.

:func:`write_checkpoint` generates the checkpoint: random bf16 weights (normal, std 0.02)
quantized with mxpass's schemes (bit-identical to compressed-tensors' presets) and written
as compressed-tensors does, experts per expert as the Qwen3-MoE checkpoints store them
(``mlp.experts.N.gate_proj.weight`` ...), one safetensors shard per layer; lm_head and the
router gates stay bf16 (``ignore``); ``scheme=None`` writes the same weights in bf16.
:func:`measure` loads a checkpoint onto the GPU (stored quantized, or bf16 with ``scheme=``:
quantized while loading) and reports the peak allocated (and reserved) device memory
against the bytes the model needs (quantized weights and scales plus unquantized tensors):
the target is at most 1.1x. :func:`measure_transformers` is the baseline: transformers'
``from_pretrained`` of the bf16 checkpoint.

    mxpass bench load                       # per scheme: stored, and online from bf16
    python -m mxpass.benchmarks.load --json rows.json   # both schemes, one bf16 checkpoint, baseline
"""

from __future__ import annotations

import gc
import json
import os
import time

import torch

from mxpass.benchmarks.suite import write_json

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


def write_checkpoint(path: str, scheme: str | None = "fp8-dynamic", overrides: dict | None = None,
                     seed: int = 0, device: str | None = None) -> dict:
    """Write the Qwen3-MoE checkpoint (module docstring) in ``scheme`` to ``path`` (None: the
    bf16 checkpoint, no ``quantization_config``; the same seed gives the same bf16 weights);
    returns {"quantized_bytes", "unquantized_bytes"} as stored (weights and scales, the rest)."""
    from safetensors.torch import save_file
    from transformers import Qwen3MoeConfig

    from mxpass.checkpoint.compressed_tensors import scheme_args, stored_format
    from mxpass.formats import get_format

    fmt = get_format(scheme) if scheme is not None else None
    if fmt is not None and fmt.static_activation:
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
        tensors = make() if callable(make) else make
        tensors = _quantize_file(tensors, fmt, ignore) if fmt is not None else {k: t.cpu() for k, t in tensors.items()}
        for key, t in tensors.items():
            quantized = key.endswith(".weight_scale") or t.dtype in (torch.float8_e4m3fn, torch.int8)
            sizes["quantized_bytes" if quantized else "unquantized_bytes"] += t.nbytes
            weight_map[key] = name
        save_file(tensors, os.path.join(path, name), metadata={"format": "pt"})
        del tensors
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(sizes.values())}, "weight_map": weight_map}, f)
    if fmt is None:
        return sizes
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


#: the issue's target: peak allocated device memory over the bytes the model needs
TARGET = 1.1


def environment() -> dict:
    """Versions and device of this run (recorded with every row): ``mxpass bench``'s, plus
    transformers and CUDA."""
    import transformers

    from mxpass.benchmarks.suite import environment as suite_environment

    return {**suite_environment(), "transformers": transformers.__version__, "cuda": torch.version.cuda}


class _DeviceMemory:
    """Peak and resident device memory of one block, relative to before it (CUDA's caching
    allocator: ``max_memory_allocated`` / ``max_memory_reserved`` after
    ``reset_peak_memory_stats``)."""

    def __init__(self, device: str):
        self.cuda = torch.device(device).type == "cuda"

    def __enter__(self):
        if self.cuda:
            gc.collect()
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.allocated, self.reserved = torch.cuda.memory_allocated(), torch.cuda.memory_reserved()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
        self.seconds = time.perf_counter() - self.start
        if self.cuda:
            self.row = {"peak_allocated_bytes": torch.cuda.max_memory_allocated() - self.allocated,
                        "peak_reserved_bytes": torch.cuda.max_memory_reserved() - self.reserved,
                        "resident_bytes": torch.cuda.memory_allocated() - self.allocated}
        else:
            self.row = {}
        return False


def _release(device: str) -> None:
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def measure(path: str, device: str | None = None, progress: bool | None = False, scheme: str | None = None) -> dict:
    """Load ``path`` with ``mxpass.load`` (``scheme``: quantize while loading); time, peak
    and resident device memory (CUDA) and the bytes placed, against :data:`TARGET`."""
    import mxpass
    from mxpass.checkpoint import info

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with _DeviceMemory(device) as mem:
        model = mxpass.load(path, device=device, progress=progress, scheme=scheme)
    details = info(model)
    needed = details.quantized_bytes + details.unquantized_bytes
    row = {"bench": "load", "loader": "mxpass.load", "online": scheme is not None, "seconds": mem.seconds,
           "quantized_bytes": details.quantized_bytes, "unquantized_bytes": details.unquantized_bytes,
           "needed_bytes": needed, "linears": len(details.formats), "experts": len(details.experts),
           "formats": sorted(set(details.formats.values()) | set(details.experts.values())), **mem.row}
    if mem.cuda:
        row.update(peak_over_needed=row["peak_allocated_bytes"] / needed,
                   reserved_over_needed=row["peak_reserved_bytes"] / needed, target=TARGET,
                   meets_target=row["peak_allocated_bytes"] <= TARGET * needed)
    del model, details
    _release(device)
    return row


def measure_transformers(path: str, device: str | None = None) -> dict:
    """Baseline: transformers' ``from_pretrained`` of the bf16 checkpoint onto the device."""
    from transformers import AutoModelForCausalLM

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    with _DeviceMemory(device) as mem:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16, device_map=device)
    needed = sum(t.nbytes for t in [*model.parameters(), *model.buffers()])
    row = {"bench": "load", "loader": "transformers.from_pretrained", "online": False, "seconds": mem.seconds,
           "quantized_bytes": 0, "unquantized_bytes": needed, "needed_bytes": needed, **mem.row}
    if mem.cuda:
        row.update(peak_over_needed=row["peak_allocated_bytes"] / needed,
                   reserved_over_needed=row["peak_reserved_bytes"] / needed)
    del model
    _release(device)
    return row


def run_all(schemes=("fp8-dynamic", "mxfp8"), online=("fp8-dynamic", "mxfp8"), baseline: bool = True,
            root: str | None = None, overrides: dict | None = None) -> list[dict]:
    """For each of ``schemes``: write its checkpoint (under ``root``, a temporary directory by
    default), load it, delete it. Then the bf16 checkpoint (same weights), loaded with each
    of ``online`` as ``scheme=`` and, with ``baseline``, by transformers."""
    import shutil
    import tempfile

    shape = {**QWEN3_30B_A3B, **(overrides or {})}
    common = {"layers": shape["num_hidden_layers"], **environment()}
    rows = []
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        for scheme in schemes:
            path = os.path.join(tmp, f"qwen3-30b-a3b-4l-{scheme}")
            start = time.perf_counter()
            stored = write_checkpoint(path, scheme, overrides)
            written = time.perf_counter() - start
            rows.append({**measure(path), "scheme": scheme, "checkpoint": scheme, "write_seconds": written,
                         "stored_quantized_bytes": stored["quantized_bytes"],
                         "stored_unquantized_bytes": stored["unquantized_bytes"], **common})
            shutil.rmtree(path)
        if online or baseline:
            path = os.path.join(tmp, "qwen3-30b-a3b-4l-bf16")
            start = time.perf_counter()
            stored = write_checkpoint(path, None, overrides)
            written = time.perf_counter() - start
            extra = {"checkpoint": "bf16", "write_seconds": written,
                     "stored_unquantized_bytes": stored["unquantized_bytes"], **common}
            for scheme in online:
                rows.append({**measure(path, scheme=scheme), "scheme": scheme, **extra})
            if baseline:
                try:
                    rows.append({**measure_transformers(path), "scheme": "bf16", **extra})
                except Exception as e:  # noqa: BLE001  (the baseline is optional; say why it is missing)
                    rows.append({"bench": "load", "loader": "transformers.from_pretrained", "scheme": "bf16",
                                 "error": f"{type(e).__name__}: {e}", **extra})
    return rows


def run(scheme: str = "fp8-dynamic", root: str | None = None, overrides: dict | None = None,
        online: bool = True) -> list[dict]:
    """``mxpass bench load`` for one scheme: its checkpoint loaded as stored and, with
    ``online``, the bf16 checkpoint quantized to it while loading."""
    return run_all((scheme,), (scheme,) if online else (), baseline=False, root=root, overrides=overrides)


def format_table(rows: list[dict]) -> str:
    lines = ["mxpass.load, Qwen3-MoE 30B-A3B shapes (peak: max allocated since the load began; target "
             f"peak/needed <= {TARGET})",
             f"{'loader':<29} {'checkpoint':<12} {'scheme':<12} {'layers':>6} {'load s':>7} {'GB needed':>9} "
             f"{'peak GB':>8} {'reserved GB':>11} {'peak/needed':>11} {'reserved/needed':>15} {'target':>7}"]
    nan = float("nan")
    for r in rows:
        if "error" in r:
            lines.append(f"{r['loader']:<29} {r['checkpoint']:<12} {r['scheme']:<12} failed: {r['error']}")
            continue
        gb = lambda key: r[key] / 1e9 if key in r else nan  # noqa: E731
        lines.append(f"{r['loader']:<29} {r.get('checkpoint', r['scheme']):<12} {r['scheme']:<12} {r['layers']:>6} "
                     f"{r['seconds']:>7.2f} {gb('needed_bytes'):>9.3f} {gb('peak_allocated_bytes'):>8.3f} "
                     f"{gb('peak_reserved_bytes'):>11.3f} {r.get('peak_over_needed', nan):>11.3f} "
                     f"{r.get('reserved_over_needed', nan):>15.3f} "
                     f"{({True: 'met', False: 'MISSED'}.get(r.get('meets_target'), '-')):>7}")
    return "\n".join(lines)


def main(argv: list[str] | None = None, overrides: dict | None = None) -> int:
    """``python -m mxpass.benchmarks.load``: both schemes stored and online, the transformers
    baseline, one bf16 checkpoint; ``--json`` writes the rows."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m mxpass.benchmarks.load")
    parser.add_argument("--schemes", nargs="*", default=["fp8-dynamic", "mxfp8"])
    parser.add_argument("--online", nargs="*", default=["fp8-dynamic", "mxfp8"])
    parser.add_argument("--no-baseline", action="store_true")
    parser.add_argument("--root", help="directory for the generated checkpoints (default: $TMPDIR)")
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args(argv)
    rows = run_all(args.schemes, args.online, baseline=not args.no_baseline, root=args.root,
                   overrides=overrides)
    print(format_table(rows))
    write_json(args.json, rows)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
