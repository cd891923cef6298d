"""AMD Quark checkpoints: config resolution, scheme mapping, stored tensors -> mxpass layout.

Fixtures are Quark checkpoints written here from a tiny bf16 Llama: weights quantized with
mxpass's own numerics (mxpass/quant.py -> schemes/int8.py, fp8.py), stored under the tensor
names and in the layout that Quark exports and vLLM / transformers read, with a
``quantization_config`` shaped like Quark's ``QConfig.to_dict()``. Fields and their sources:

  quantization_config.quant_method "quark"; global_quant_config, layer_quant_config,
  layer_type_quant_config, exclude, algo_config, softmax_quant_spec, quant_mode, version
      quark/torch/quantization/config/config.py (QConfig.to_dict)
  each QTensorConfig: dtype, is_dynamic, qscheme, ch_axis, group_size, symmetric,
  round_method, scale_type, scale_format, scale_calculation_mode, mx_element_dtype,
  observer_cls, is_scale_quant
      same file (QTensorConfig.to_dict)
  export {kv_cache_group, min_kv_scale, pack_method, weight_format, weight_merge_groups}
      quark/torch/export/api.py (QuarkSafetensorsExporter), read by vLLM QuarkConfig.from_config
  <layer>.weight [N, K] int8 / float8_e4m3fn; .weight_scale float32, () per_tensor, (N,)
  per_channel; .weight_zero_point int8 of the scale's shape (int8 only); .input_scale ()
  and .input_zero_point () (static inputs)
      quark/torch/utils/pack.py (_infer_scale_zero_point_shape), realquantizer.py;
      vLLM quark/schemes/quark_w8a8_int8.py, quark_w8a8_fp8.py (create_weights);
      transformers quantizers/quantizer_quark.py (CHECKPOINT_KEYS)
"""

import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, LlamaConfig

from mxpass import quant, quark
from mxpass.formats import get_format
from mxpass.quark import QuarkConfig, QuarkConfigError
from mxpass.schemes import fp8 as fp8_scheme
from tests.test_checkpoint import edited_copy

# --- Quark config dicts, as QTensorConfig.to_dict() writes them ---


def spec(dtype, qscheme, *, dynamic=False, ch_axis=None, symmetric=True, **extra):
    observer = {"per_tensor": "PerTensorMinMaxObserver", "per_channel": "PerChannelMinMaxObserver"}
    d = dict(dtype=dtype, is_dynamic=dynamic, qscheme=qscheme, ch_axis=ch_axis, group_size=None,
             symmetric=symmetric, round_method="half_even" if dtype == "int8" else None,
             scale_type="float", scale_format=None, scale_calculation_mode=None,
             mx_element_dtype=None, observer_cls=observer.get(qscheme), is_scale_quant=False)
    d.update(extra)
    return d


def layer(weight, inp=None, output=None, bias=None):
    return dict(weight=weight, input_tensors=inp, output_tensors=output, bias=bias, target_device=None)


def w_channel(dtype):
    return spec(dtype, "per_channel", ch_axis=0)


def w_tensor(dtype):
    return spec(dtype, "per_tensor")


def a_token(dtype):
    return spec(dtype, "per_channel", dynamic=True, ch_axis=1)


def a_static(dtype):
    return spec(dtype, "per_tensor")


# Quark recipe -> (global layer config, mxpass format): the table in mxpass/quark.py
RECIPES = {
    "ptpc_int8": (layer(w_channel("int8"), a_token("int8")), "int8"),
    "int8_wtensor_atoken": (layer(w_tensor("int8"), a_token("int8")), "int8"),
    "int8_static": (layer(w_tensor("int8"), a_static("int8")), "int8-static"),
    "fp8": (layer(w_tensor("fp8_e4m3"), a_static("fp8_e4m3")), "fp8"),
    "ptpc_fp8": (layer(w_channel("fp8_e4m3"), a_token("fp8_e4m3")), "fp8-dynamic"),
    "fp8_wtensor_atoken": (layer(w_tensor("fp8_e4m3"), a_token("fp8_e4m3")), "fp8-dynamic"),
    "fp8_weight_only": (layer(w_channel("fp8_e4m3")), "fp8-w"),
}


def quark_config(global_cfg, *, layers=None, types=None, exclude=("lm_head",), **top):
    qc = dict(quant_method="quark", global_quant_config=global_cfg, layer_quant_config=layers or {},
              layer_type_quant_config=types or {}, kv_cache_quant_config={}, exclude=list(exclude),
              algo_config=None, softmax_quant_spec=None, quant_mode="eager_mode", version="0.11",
              export=dict(kv_cache_group=[], min_kv_scale=0.0, pack_method="reorder",
                          weight_format="real_quantized", weight_merge_groups=None))
    qc.update(top)
    return qc


# --- config resolution ---


def test_precedence_layer_name_then_type_then_global():
    static, ptpc, fp8 = (RECIPES[k][0] for k in ("int8_static", "ptpc_int8", "fp8"))
    cfg = QuarkConfig.from_dict(quark_config(
        ptpc, layers={"*down_proj": static, "model.layers.1.*": fp8}, types={"Linear": fp8},
        exclude=["lm_head", "re:.*layers\\.0\\.self_attn\\.[qk]_proj$", "*.mlp.gate", "model.vision"]))
    r = cfg.resolve
    assert r("model.layers.0.mlp.down_proj", "Linear").source == "layer_quant_config['*down_proj']"
    assert r("model.layers.1.mlp.down_proj", "Linear").source == "layer_quant_config['*down_proj']"  # first match
    assert r("model.layers.1.mlp.up_proj", "Linear").source == "layer_quant_config['model.layers.1.*']"
    assert r("model.layers.0.mlp.up_proj", "Linear").source == "layer_type_quant_config['Linear']"
    assert r("model.layers.0.mlp.up_proj", "Conv1D").source == "global_quant_config"
    assert r("model.layers.0.mlp.up_proj", "Conv1D").spec == cfg.global_quant_config
    for name, hit in [("lm_head", "'lm_head'"), ("model.layers.0.self_attn.k_proj", "'re:"),
                      ("model.layers.3.mlp.gate", "'*.mlp.gate'"),
                      ("model.vision.blocks.0.proj", "'model.vision'")]:  # Quark adds "<entry>.*"
        res = r(name, "Linear")
        assert res.spec is None and res.source.startswith(f"exclude[{hit}"), name
    assert r("model.layers.0.self_attn.v_proj", "Linear").spec is not None
    assert r("model.layers.10.self_attn.k_proj", "Linear").spec is not None  # re: anchored at layers.0
    assert r("model.layers.3.mlp.gate_proj", "Linear").spec is not None  # "*.mlp.gate" is not a prefix match


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_recipe_maps_to_mxpass_format(recipe):
    cfg, name = RECIPES[recipe]
    p = quark.layer_plan(QuarkConfig.from_dict(quark_config(cfg)), "model.layers.0.mlp.up_proj")
    fmt = get_format(name)
    assert p.format == fmt
    assert p.weight == "model.layers.0.mlp.up_proj.weight"
    assert p.weight_scale == "model.layers.0.mlp.up_proj.weight_scale"
    assert (p.input_scale is not None) == fmt.static_activation
    int8 = fmt.family == "int8"
    assert ("model.layers.0.mlp.up_proj.weight_zero_point" in p.zero_points) == int8
    assert ("model.layers.0.mlp.up_proj.input_zero_point" in p.zero_points) == (int8 and fmt.static_activation)


BAD = {
    "unknown dtype": (layer(spec("int4", "per_channel", ch_axis=0), a_token("int4")), "weight dtype 'int4'"),
    "per_group": (layer(spec("int8", "per_group", ch_axis=1, group_size=128), a_token("int8")),
                  "weight qscheme 'per_group'"),
    "asymmetric int8 weight": (layer(spec("int8", "per_channel", ch_axis=0, symmetric=False), a_token("int8")),
                               "asymmetric int8 weights"),
    "asymmetric int8 input": (layer(w_tensor("int8"), spec("int8", "per_tensor", symmetric=False)),
                              "asymmetric int8 activations"),
    "dynamic per-tensor input": (layer(w_tensor("fp8_e4m3"), spec("fp8_e4m3", "per_tensor", dynamic=True)),
                                 "input qscheme 'per_tensor' with is_dynamic=True"),
    "channel weight, static input": (layer(w_channel("int8"), a_static("int8")), "have no mxpass format"),
    "mixed dtypes": (layer(w_channel("fp8_e4m3"), a_token("int8")), "input dtype 'int8' differs"),
    "int8 weight-only": (layer(w_channel("int8")), "have no mxpass format"),
    "weight ch_axis 1": (layer(spec("int8", "per_channel", ch_axis=1), a_token("int8")), "ch_axis 1"),
    "output quantized": (layer(w_tensor("fp8_e4m3"), a_static("fp8_e4m3"), output=a_static("fp8_e4m3")),
                         "output_tensors quantization"),
    "two-stage weight": (layer([w_tensor("fp8_e4m3"), w_channel("int8")], a_token("fp8_e4m3")),
                         "a list of 2 specs"),
    "mx scales": (layer(spec("fp8_e4m3", "per_channel", ch_axis=0, scale_format="e8m0"), a_token("fp8_e4m3")),
                  "scale_format 'e8m0'"),
    "e5m3 scales": (layer(w_tensor("fp8_e4m3"), spec("fp8_e4m3", "per_tensor", scale_type="float8_e5m3")),
                    "input scale_format None / scale_type 'float8_e5m3'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_unsupported_layer_config_is_a_clear_error(case):
    cfg, what = BAD[case]
    qc = quark_config(RECIPES["ptpc_int8"][0], layers={"*.mlp.down_proj": cfg})
    config = QuarkConfig.from_dict(qc) if case != "two-stage weight" else None
    if config is None:
        with pytest.raises(QuarkConfigError, match=r"layer_quant_config\['\*.mlp.down_proj'\]\.weight: " + what):
            QuarkConfig.from_dict(qc)
        return
    assert isinstance(quark.layer_plan(config, "model.layers.0.mlp.up_proj"), quark.QuarkLayer)
    with pytest.raises(QuarkConfigError, match=r"layer model\.layers\.0\.mlp\.down_proj "
                                               r"\(layer_quant_config\['\*\.mlp\.down_proj'\]\): .*" + what):
        quark.layer_plan(config, "model.layers.0.mlp.down_proj")


@pytest.mark.parametrize("top, what", [
    (dict(quant_method="fp8"), "quant_method is 'fp8'"),
    (dict(export=dict(weight_format="fake_quantized")), "fake_quantized"),
    (dict(export=dict(kv_cache_group=["*k_proj", "*v_proj"])), "KV-cache quantization"),
    (dict(exclude=["re:(unclosed"]), "not a valid regex"),
    (dict(algo_config=[{"name": "rotation"}]), "algo_config 'rotation'"),
])
def test_unsupported_checkpoint_config_is_a_clear_error(top, what):
    with pytest.raises(QuarkConfigError, match=what):
        QuarkConfig.from_dict(quark_config(RECIPES["ptpc_int8"][0], **top))


# --- stored tensors -> mxpass layout ---


def test_per_tensor_weight_scale_broadcasts_to_channel_exactly():
    torch.manual_seed(0)
    w = torch.randn(24, 40).bfloat16()
    data, s = quant.quantize_weight(get_format("int8-static"), w, "w")  # per-tensor, scale [1]
    stored = s.reshape(())  # Quark: shape ()
    fmt = get_format("int8")
    scale = quark.convert_weight_scale("w.weight_scale", stored, "per_tensor", fmt, 24)
    assert scale.shape == (24, 1) and scale.dtype == torch.float32
    assert torch.equal(quant.dequantize_weight(fmt, data, scale),
                       quant.dequantize_weight(get_format("int8-static"), data, s))
    kept = quark.convert_weight_scale("w.weight_scale", stored, "per_tensor", get_format("int8-static"), 24)
    assert kept.shape == (1,) and torch.equal(kept, s)


@pytest.mark.parametrize("stored, qscheme, what", [
    (torch.ones(23), "per_channel", r"shape \(23,\); expected \(24,\)"),
    (torch.ones(2), "per_tensor", r"shape \(2,\); expected a per-tensor scale"),
    (torch.ones(24, dtype=torch.int8), "per_channel", "dtype torch.int8; expected a float scale"),
    (torch.zeros(24), "per_channel", "finite and > 0"),
])
def test_bad_weight_scale_is_a_clear_error(stored, qscheme, what):
    with pytest.raises(QuarkConfigError, match=r"'m\.weight_scale'.*" + what):
        quark.convert_weight_scale("m.weight_scale", stored, qscheme, get_format("int8"), 24)


def test_zero_points_must_be_zero():
    quark.check_zero_point("m.weight_zero_point", torch.zeros(8, dtype=torch.int8))
    bad = torch.zeros(8, dtype=torch.int8)
    bad[3] = 2
    with pytest.raises(QuarkConfigError, match=r"'m\.weight_zero_point' has 1 nonzero values .*symmetric"):
        quark.check_zero_point("m.weight_zero_point", bad)
    with pytest.raises(QuarkConfigError, match="expected an integer zero point"):
        quark.check_zero_point("m.input_zero_point", torch.zeros(()))


# --- MoE: fused gate/up of one expert ---


def _shards(family, seed):
    """Two per-tensor-quantized [I, K] projections (gate, up) with different scales."""
    g = torch.Generator().manual_seed(seed)
    gate = torch.randn(16, 32, generator=g).bfloat16()
    up = (3 * torch.randn(16, 32, generator=g)).bfloat16()  # larger: up owns the max scale
    fmt = get_format("fp8" if family == "fp8" else "int8-static")
    return fmt, [quant.quantize_weight(fmt, t, n) for t, n in ((gate, "gate"), (up, "up"))]


@pytest.mark.parametrize("family", ["int8", "fp8"])
def test_requantize_to_max_scale_follows_vllm(family):
    fmt, ((gd, gs), (ud, us)) = _shards(family, 1)
    assert us > gs
    data, scale = quark.requantize_to_max_scale([(gd, gs.reshape(())), (ud, us.reshape(()))], "e0")
    assert torch.equal(scale, us)
    # the shard that owns the max scale comes back bit for bit
    assert torch.equal(data[16:].view(torch.uint8), ud.view(torch.uint8))
    # the other is the nearest grid point of the max scale to its float16 dequantized values
    dq = (gd.to(torch.float16) * gs).float()
    got = data[:16].float() * us
    if family == "int8":
        assert torch.equal(data[:16], torch.round(dq / us).clamp(-128, 127).to(torch.int8))
        assert ((got - dq).abs() <= us / 2 * (1 + 1e-6)).all()
    else:
        ref = (dq * (1 / us)).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(data[:16].view(torch.uint8), ref.view(torch.uint8))
        # e4m3: within half a step (2**-3 relative) of the dequantized value, above subnormals
        normal = dq.abs() >= us * 2 ** -6
        assert ((got - dq).abs()[normal] <= dq.abs()[normal] * 2 ** -4 * (1 + 1e-6)).all()
        # and within an ulp of mxpass's float32 rule for fused per-tensor shards
        f32 = fp8_scheme.requantize_fused_per_tensor(
            [fp8_scheme.QTensor(gd, gs), fp8_scheme.QTensor(ud, us)])
        assert torch.equal(f32.scale, scale)
        diff = (f32.data.view(torch.uint8).int() - data.view(torch.uint8).int()).abs()
        assert diff.max() <= 1


# --- checkpoints written from a tiny Llama ---

# per recipe: how the fixture quantizes a weight (mxpass format with the stored granularity)
_WEIGHT_FORMAT = {("int8", "per_channel"): "int8", ("int8", "per_tensor"): "int8-static",
                  ("fp8_e4m3", "per_channel"): "fp8-dynamic", ("fp8_e4m3", "per_tensor"): "fp8"}
KEPT = {"lm_head", "model.layers.1.mlp.down_proj"}
QUANTIZED = 13  # 2 layers x 7 Linears, less the excluded down_proj


def _tiny_llama():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def write_quark_checkpoint(path: str, model, layer_cfg: dict, kept=KEPT, seed=1) -> dict:
    """``model`` saved as a Quark checkpoint whose Linears (but ``kept``) all use ``layer_cfg``.

    Returns {fqn: static input scale} for static recipes (random calibration activations,
    amax / q_max as float32)."""
    os.makedirs(path, exist_ok=True)
    w_spec, a_spec = layer_cfg["weight"], layer_cfg["input_tensors"]
    wfmt = get_format(_WEIGHT_FORMAT[(w_spec["dtype"], w_spec["qscheme"])])
    int8 = w_spec["dtype"] == "int8"
    static = a_spec is not None and not a_spec["is_dynamic"]
    tensors = {k: v.detach().clone() for k, v in model.state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    input_scales = {}
    for fqn, m in model.named_modules():
        if not isinstance(m, torch.nn.Linear) or fqn in kept:
            continue
        data, s = quant.quantize_weight(wfmt, m.weight.detach(), fqn)
        s = s.reshape(-1) if w_spec["qscheme"] == "per_channel" else s.reshape(())
        tensors[f"{fqn}.weight"] = data
        tensors[f"{fqn}.weight_scale"] = s
        if int8:
            tensors[f"{fqn}.weight_zero_point"] = torch.zeros(s.shape, dtype=torch.int8)
        if static:
            x = torch.randn(8, m.in_features, generator=gen)
            a = (x.abs().amax() / (127.5 if int8 else 448.0)).float().reshape(())
            tensors[f"{fqn}.input_scale"] = a
            input_scales[fqn] = float(a)
            if int8:
                tensors[f"{fqn}.input_zero_point"] = torch.zeros((), dtype=torch.int8)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = quark_config(layer_cfg, exclude=sorted(kept))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return input_scales


E2E = ["ptpc_int8", "int8_wtensor_atoken", "int8_static", "fp8", "ptpc_fp8", "fp8_wtensor_atoken"]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """recipe -> (path, original bf16 model, static input scales); written once per module."""
    root = tmp_path_factory.mktemp("quark")
    model = _tiny_llama()
    return {r: (str(root / r), model, write_quark_checkpoint(str(root / r), model, RECIPES[r][0]))
            for r in E2E}


def _meta_model(path):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(path)
    qc = cfg.quantization_config
    del cfg.quantization_config
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16), qc


@pytest.mark.parametrize("recipe", E2E)
def test_plan_reads_the_bytes_mxpass_computes(checkpoints, recipe):
    """The plan of a written checkpoint names every stored tensor, and its conversions give
    exactly what mxpass computes online for the mapped format (per-tensor weight scales
    repeated per row for the per-channel formats)."""
    path, original, input_scales = checkpoints[recipe]
    meta, qc = _meta_model(path)
    plan = quark.read_plan(qc, meta)
    fmt = get_format(RECIPES[recipe][1])
    assert set(plan.kept) == KEPT and len(plan.layers) == QUANTIZED
    assert all("excluded by exclude[" in why for why in plan.kept.values())
    stored = load_file(os.path.join(path, "model.safetensors"))
    read = set()
    for fqn, p in plan.layers.items():
        assert p.format == fmt and p.source == "global_quant_config"
        n, k = original.get_submodule(fqn).weight.shape
        data = stored[p.weight]
        assert data.dtype == fmt.weight and data.shape == (n, k), fqn
        scale = p.weight_scale_to_mxpass(stored[p.weight_scale], n)
        for z in p.zero_points:
            quark.check_zero_point(z, stored[z])
        w = original.get_submodule(fqn).weight.detach()
        wq = RECIPES[recipe][0]["weight"]
        ref_data, ref_scale = quant.quantize_weight(get_format(_WEIGHT_FORMAT[(wq["dtype"], wq["qscheme"])]),
                                                    w, fqn)
        if fmt.weight_granularity == "channel":
            ref_scale = ref_scale.reshape(-1, 1).expand(n, 1)
        assert torch.equal(data.view(torch.uint8), ref_data.view(torch.uint8)), fqn
        assert scale.dtype == torch.float32 and torch.equal(scale, ref_scale), fqn
        if p.input_scale:
            assert p.input_scale_to_mxpass(stored[p.input_scale]) == input_scales[fqn]
        read.update(p.tensors)
    unquantized = {k for k in meta.state_dict() if k.rsplit(".", 1)[0] not in plan.layers}
    assert read | unquantized == set(stored)


# --- mxpass.load ---

# recipes stored in a format mxpass computes online (same bytes) / with per-tensor weight
# scales that the load repeats per row (same values, different layout than online)
EXACT = ["ptpc_int8", "int8_static", "fp8", "ptpc_fp8"]
BROADCAST = ["int8_wtensor_atoken", "fp8_wtensor_atoken"]
IDS = torch.randint(0, 96, (2, 9), generator=torch.Generator().manual_seed(2))


def _logits(model, backend):
    torch._dynamo.reset()
    with torch.no_grad():
        return torch.compile(model, backend=backend, fullgraph=True)(IDS).logits  # no graph break


class _PerTensorReference(torch.nn.Module):
    """A Linear as mxpass's reference computes it (quant.linear_reference), with the weight
    dequantized from its per-tensor scale: y = fq(x) @ (data * s)^T in fp32."""

    def __init__(self, fmt, data, scale):
        super().__init__()
        self.fmt, self.data, self.scale = fmt, data, scale

    def forward(self, x):
        xq = quant.fake_quantize_activation(self.fmt, x, None)
        return torch.matmul(xq.float(), (self.data.float() * self.scale.reshape(())).t()).to(x.dtype)


def _reference_with_per_tensor_weights(original, recipe, path):
    import copy

    ref = copy.deepcopy(original)
    stored = load_file(os.path.join(path, "model.safetensors"))
    fmt = get_format(RECIPES[recipe][1])
    for fqn, m in list(ref.named_modules()):
        if isinstance(m, torch.nn.Linear) and fqn not in KEPT:
            owner, _, leaf = fqn.rpartition(".")
            setattr(ref.get_submodule(owner), leaf,
                    _PerTensorReference(fmt, stored[f"{fqn}.weight"], stored[f"{fqn}.weight_scale"]))
    return ref


@pytest.mark.parametrize("recipe", EXACT + BROADCAST)
def test_load_then_compile_equals_the_mapped_scheme(checkpoints, recipe):
    """mxpass.load + torch.compile(backend=mxpass.backend) gives exactly the logits of the
    original model compiled with the mapped scheme (EXACT: same bytes, quantized online;
    BROADCAST: the per-tensor weights through mxpass's reference math)."""
    import mxpass
    from mxpass.checkpoint import info

    path, original, input_scales = checkpoints[recipe]
    fmt = RECIPES[recipe][1]
    model = mxpass.load(path)
    i = info(model)
    assert i.reader == "quark" and set(i.formats.values()) == {fmt} and len(i.formats) == QUANTIZED
    assert set(i.kept) == KEPT and i.unused_tensors == ()
    assert i.activation_scales == input_scales
    loaded = _logits(model, mxpass.backend(compiler="eager"))
    report = mxpass.last_report()
    assert len(report.rewritten) == QUANTIZED and {k.fqn for k in report.kept} == KEPT
    assert {r.scheme for r in report.rewritten} == {fmt}
    if recipe in EXACT:
        ref = _logits(original, mxpass.backend(scheme=fmt, ignore=sorted(KEPT), compiler="eager",
                                               activation_scales=input_scales))
    else:
        ref = _logits(_reference_with_per_tensor_weights(original, recipe, path), "eager")
    assert torch.isfinite(loaded).all()
    assert torch.equal(loaded, ref)


def test_inductor_runs_a_loaded_quark_model(checkpoints):
    import mxpass

    path, original, _ = checkpoints["ptpc_int8"]
    loaded = _logits(mxpass.load(path), mxpass.backend)
    online = _logits(original, mxpass.backend(scheme="int8", ignore=sorted(KEPT)))
    assert torch.equal(loaded, online)


def test_load_bad_checkpoints_are_clear_errors(checkpoints, tmp_path):
    import mxpass

    src = checkpoints["int8_static"][0]
    key = "model.layers.0.mlp.up_proj.input_zero_point"
    path = edited_copy(src, tmp_path / "zp", tensors=lambda t: t.update({key: torch.tensor(3, dtype=torch.int8)}))
    with pytest.raises(QuarkConfigError, match=rf"'{key}' has 1 nonzero values"):
        mxpass.load(path)

    key = "model.layers.1.self_attn.o_proj.weight_scale"
    path = edited_copy(src, tmp_path / "missing", tensors=lambda t: t.pop(key))
    with pytest.raises(KeyError, match=rf"'{key}'.*missing"):
        mxpass.load(path)

    path = edited_copy(src, tmp_path / "asym", config=lambda qc: qc["layer_quant_config"].update(
        {"*.o_proj": layer(w_tensor("int8"), spec("int8", "per_tensor", symmetric=False))}))
    with pytest.raises(QuarkConfigError, match=r"layer model\.layers\.0\.self_attn\.o_proj "
                                               r"\(layer_quant_config\['\*\.o_proj'\]\): asymmetric int8"):
        mxpass.load(path)

    path = edited_copy(src, tmp_path / "dtype",
                       config=lambda qc: qc["global_quant_config"]["weight"].update(dtype="uint4"))
    with pytest.raises(QuarkConfigError, match=r"global_quant_config\): weight dtype 'uint4'"):
        mxpass.load(path)

    # the config says per_channel, the checkpoint holds per-tensor scales
    path = edited_copy(src, tmp_path / "disagree", config=lambda qc: qc["global_quant_config"].update(
        weight=w_channel("int8"), input_tensors=a_token("int8")))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.q_proj\.weight_scale.*shape \(\); "
                                         r"expected \(64,\) or \(64, 1\)"):
        mxpass.load(path)


# --- MoE: experts stored per expert (QuarkExperts names), planned for the loader ---


class _DictIndex:
    """A TensorIndex (mxpass/checkpoint/plan.py) over a dict of tensors."""

    def __init__(self, tensors):
        self.t = tensors

    def __contains__(self, name):
        return name in self.t

    def names(self):
        return list(self.t)

    def shape(self, name):
        return tuple(self.t[name].shape)

    def dtype(self, name):
        return self.t[name].dtype

    def get(self, name):
        return self.t[name]


def _qwen3_moe():
    from transformers import Qwen3MoeConfig

    cfg = Qwen3MoeConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=16, num_experts=3,
                         num_experts_per_tok=2, moe_intermediate_size=16)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)


def _expert_tensors(fmt_name, experts="model.layers.0.mlp.experts", e=3, inter=16, h=32):
    """Per-expert gate / up / down weights quantized per tensor (gate and up at different scales)."""
    fmt = get_format(fmt_name)
    g = torch.Generator().manual_seed(3)
    out, ref = {}, {}
    for x in range(e):
        for proj, (n, k), amp in (("gate_proj", (inter, h), 1.0), ("up_proj", (inter, h), 2.5),
                                  ("down_proj", (h, inter), 1.0)):
            w = (amp * torch.randn(n, k, generator=g)).bfloat16()
            data, s = quant.quantize_weight(fmt, w, proj)
            name = f"{experts}.{x}.{proj}"
            out[f"{name}.weight"], out[f"{name}.weight_scale"] = data, s.reshape(())
            if data.dtype == torch.int8:
                out[f"{name}.weight_zero_point"] = torch.zeros((), dtype=torch.int8)
            ref[name] = (data, s)
    return out, ref


def test_experts_plan_keeps_per_tensor_scales_per_row():
    model = _qwen3_moe()
    qc = quark_config(RECIPES["int8_wtensor_atoken"][0], exclude=["lm_head"])
    stored, ref = _expert_tensors("int8-static")
    plan = quark.QuarkReader().plan(qc, model, _DictIndex(stored))
    assert set(plan.layers) == {f"model.layers.0.self_attn.{p}_proj" for p in "qkvo"}
    ep = plan.experts["model.layers.0.mlp.experts"]
    assert ep.fmt.name == "int8" and ep.merge_gate_up is None and len(ep.experts) == 3
    for x, (gate, up, down) in enumerate(ep.experts):
        assert gate.weight == f"model.layers.0.mlp.experts.{x}.gate_proj.weight"
        assert gate.skip == (f"model.layers.0.mlp.experts.{x}.gate_proj.weight_zero_point",)
        # the loader concatenates [gate; up] rows and their converted scales
        scales = [lp.scale.convert(stored[lp.weight_scale]) for lp in (gate, up)]
        assert scales[0].shape == (16, 1) and scales[1].shape == (16, 1)
        data = torch.cat([stored[gate.weight], stored[up.weight]])
        got = quant.dequantize_weight(ep.fmt, data, torch.cat(scales))
        want = torch.cat([quant.dequantize_weight(get_format("int8-static"), *ref[f"model.layers.0.mlp.experts.{x}.{p}"])
                          for p in ("gate_proj", "up_proj")])
        assert torch.equal(got, want)
        assert down.scale.convert(stored[down.weight_scale]).shape == (32, 1)


def test_experts_plan_per_tensor_format_merges_with_the_max_scale():
    model = _qwen3_moe()
    stored, ref = _expert_tensors("fp8-w-tensor")
    qc = quark_config(layer(w_tensor("fp8_e4m3")))
    ep = quark.QuarkReader().plan(qc, model, _DictIndex(stored)).experts["model.layers.0.mlp.experts"]
    assert ep.fmt.name == "fp8-w-tensor"
    gate, up, _ = ep.experts[1]
    gs, us = (lp.scale.convert(stored[lp.weight_scale]) for lp in (gate, up))
    assert gs.shape == (1,) and us > gs
    data, scale = ep.merge_gate_up(stored[gate.weight], gs, stored[up.weight], us)
    assert torch.equal(scale, us)
    want = quark.requantize_to_max_scale([(stored[gate.weight], gs), (stored[up.weight], us)], "e1")[0]
    assert torch.equal(data.view(torch.uint8), want.view(torch.uint8))


def test_experts_plan_errors_name_the_experts():
    model = _qwen3_moe()
    stored, _ = _expert_tensors("int8-static")
    index = _DictIndex(stored)
    static = quark_config(RECIPES["int8_static"][0])
    with pytest.raises(QuarkConfigError, match=r"experts of model\.layers\.0\.mlp\.experts: int8-static "
                                               r"\(global_quant_config\) has static activation scales"):
        quark.QuarkReader().plan(static, model, index)
    partly = quark_config(RECIPES["int8_wtensor_atoken"][0], exclude=["lm_head", "*.experts.2.down_proj"])
    with pytest.raises(QuarkConfigError, match=r"experts of model\.layers\.0\.mlp\.experts resolve differently "
                                               r"\(model\.layers\.0\.mlp\.experts\.2\.down_proj: excluded"):
        quark.QuarkReader().plan(partly, model, index)
    # all experts excluded: nothing planned for them (stored in the model dtype)
    none = quark_config(RECIPES["int8_wtensor_atoken"][0], exclude=["lm_head", "re:.*experts"])
    assert quark.QuarkReader().plan(none, model, index).experts == {}



def _moe_model(kind: str):
    import transformers

    torch.manual_seed(0)
    tiny = dict(vocab_size=96, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts_per_tok=2)
    if kind == "qwen3_moe":
        cfg = transformers.Qwen3MoeConfig(**tiny, num_experts=4, moe_intermediate_size=32)
    else:
        cfg = transformers.MixtralConfig(**tiny, num_local_experts=4, sliding_window=None)
    return AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).eval()


def write_quark_moe_checkpoint(path: str, model, layer_cfg: dict, mixtral_v4_names=False) -> None:
    """A MoE model as Quark exports it: experts split into per-expert Linears (QuarkExperts:
    ``experts.<e>.gate_proj`` = rows [:I] of ``gate_up_proj[e]``, ``up_proj`` = rows [I:],
    ``down_proj``; or a transformers v4 Mixtral's ``block_sparse_moe.experts.<e>.w1/w3/w2``),
    every Linear in ``layer_cfg`` through ``layer_quant_config`` patterns on the stored names,
    router gates and lm_head excluded."""
    os.makedirs(path, exist_ok=True)
    w_spec = layer_cfg["weight"]
    wfmt = get_format(_WEIGHT_FORMAT[(w_spec["dtype"], w_spec["qscheme"])])
    names = ("w1", "w3", "w2") if mixtral_v4_names else ("gate_proj", "up_proj", "down_proj")
    stored = (lambda k: k.replace(".mlp.", ".block_sparse_moe.")) if mixtral_v4_names else (lambda k: k)
    weights, tensors = {}, {}
    for fqn, m in model.named_modules():
        if isinstance(m, torch.nn.Linear) and fqn != "lm_head":
            weights[fqn] = m.weight.detach()
        if getattr(m, "gate_up_proj", None) is not None and m.gate_up_proj.dim() == 3:
            inter = m.gate_up_proj.shape[1] // 2
            for e in range(m.gate_up_proj.shape[0]):
                for proj, w in zip(names, (m.gate_up_proj[e, :inter], m.gate_up_proj[e, inter:], m.down_proj[e])):
                    weights[f"{fqn}.{e}.{proj}"] = w.detach()
    for k, v in model.state_dict().items():
        if not k.endswith((".gate_up_proj", ".down_proj")) and k[: -len(".weight")] not in weights:
            tensors[stored(k)] = v.detach().clone()
    for fqn, w in weights.items():
        data, s = quant.quantize_weight(wfmt, w.contiguous(), fqn)
        s = s.reshape(-1) if w_spec["qscheme"] == "per_channel" else s.reshape(())
        fqn = stored(fqn)
        tensors[f"{fqn}.weight"], tensors[f"{fqn}.weight_scale"] = data, s
        if w_spec["dtype"] == "int8":
            tensors[f"{fqn}.weight_zero_point"] = torch.zeros(s.shape, dtype=torch.int8)
    save_file({k: v.contiguous() for k, v in tensors.items()}, os.path.join(path, "model.safetensors"),
              metadata={"format": "pt"})
    config = model.config.to_dict()
    moe = "*block_sparse_moe" if mixtral_v4_names else "*mlp"
    # every layer by name (stored names); the global config, which mxpass refuses, matches none
    int4 = layer(spec("int4", "per_group", ch_axis=1, group_size=32))
    config["quantization_config"] = quark_config(
        int4, layers={"*self_attn.*": layer_cfg, f"{moe}.experts.*": layer_cfg},
        exclude=["lm_head", f"{moe}.gate"])
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config, f, indent=2)


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral_v4_names"])
def test_load_quark_moe_checkpoint_equals_online(tmp_path, kind):
    """Per-expert ptpc INT8 experts are merged into transformers' 3-D layout with every byte
    kept: the loaded MoE model compiles to exactly the online-quantized original's logits.
    Mixtral with transformers v4 names: the config's patterns name the stored modules."""
    import mxpass
    from mxpass.checkpoint import info

    model = _moe_model("mixtral" if kind.startswith("mixtral") else kind)
    path = str(tmp_path / kind)
    write_quark_moe_checkpoint(path, model, RECIPES["ptpc_int8"][0], mixtral_v4_names=kind != "qwen3_moe")
    loaded = mxpass.load(path)
    i = info(loaded)
    assert i.experts == {"model.layers.0.mlp.experts": "int8"}
    assert set(i.formats.values()) == {"int8"} and len(i.formats) == 4  # q, k, v, o
    assert i.unused_tensors == ()
    got = _logits(loaded, mxpass.backend(compiler="eager"))
    assert "model.layers.0.mlp.experts" in {r.fqn for r in mxpass.last_report().rewritten}
    want = _logits(model, mxpass.backend(scheme="int8", compiler="eager"))
    assert torch.isfinite(got).all() and torch.equal(got, want)


@pytest.mark.parametrize("recipe", ["int8_wtensor_atoken", "fp8_weight_only_tensor"])
def test_load_quark_moe_per_tensor_expert_scales(tmp_path, recipe):
    """Per-tensor expert weights. On the per-channel int8 format each projection's scale
    fills its rows of [gate; up] (no requantization); on fp8-w-tensor (one scale) gate and
    up are requantized to the larger scale (vLLM's rule). As seeded in the experts cache."""
    import mxpass
    from mxpass import weights

    cfg = RECIPES[recipe][0] if recipe in RECIPES else layer(w_tensor("fp8_e4m3"))
    fmt = get_format("int8" if recipe in RECIPES else "fp8-w-tensor")
    model = _moe_model("qwen3_moe")
    path = str(tmp_path / recipe)
    write_quark_moe_checkpoint(path, model, cfg)
    loaded = mxpass.load(path)
    stored = load_file(os.path.join(path, "model.safetensors"))
    experts = loaded.get_submodule("model.layers.0.mlp.experts")
    data, scale = weights.quantized_experts(experts.gate_up_proj, fmt, "gate_up_proj")
    assert data.shape == (4, 64, 64)
    for e in range(4):
        (gd, gs), (ud, us) = [[stored[f"model.layers.0.mlp.experts.{e}.{p}.{t}"] for t in ("weight", "weight_scale")]
                              for p in ("gate_proj", "up_proj")]
        if fmt.weight_granularity == "channel":
            assert torch.equal(data[e], torch.cat([gd, ud]))
            assert torch.equal(scale[e], torch.cat([gs.expand(32, 1), us.expand(32, 1)]))
        else:
            want, s = quark.requantize_to_max_scale([(gd, gs), (ud, us)], "e")
            assert gs != us and torch.equal(scale[e], s) and torch.equal(s.reshape(()), torch.maximum(gs, us))
            assert torch.equal(data[e].view(torch.uint8), want.view(torch.uint8))
    assert torch.isfinite(_logits(loaded, mxpass.backend(compiler="eager"))).all()
    assert mxpass.last_report().rewritten
