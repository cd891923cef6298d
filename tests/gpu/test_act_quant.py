"""One-pass activation quantization (kernels/triton/act_quant.py) on the GPU: against the ATen
reference on fresh random inputs, and in an HF Llama MLP compiled by the backend (down
projections take SiLU*mul quantized by the kernel; RMSNorm + quantize becomes a persistent
reduction)."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch._inductor.utils import run_and_get_code

import mxpass
from mxpass import quant
from mxpass.formats import get_format

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

SCHEMES = ("fp8-dynamic", "fp8-block", "int8")


def _inputs(m, k, dtype, wide=False):
    """[m, k] random rows (strided inside a wider tensor when ``wide``); from 5 rows on, an
    all-zero row, a row holding NaN, one holding Inf and a row of small values."""
    base = (torch.randn(m, k + 128, device="cuda") * 3).to(dtype)
    x = base[:, 64:64 + k] if wide else base[:, :k].contiguous()
    if m >= 5:
        x[1] = 0
        x[2, 5] = float("nan")
        x[3, 7] = float("inf")
        x[4] *= 1e-3
    return x


def _bytes(t):
    return t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 4096), (37, 14336), (300, 384)])
def test_rows_match_quantize_activation(scheme, dtype, m, k):
    """x alone (rows strided in a wider tensor): data and scales bit-identical to the ATen math."""
    from mxpass.kernels.triton.act_quant import act_quant_triton

    torch.manual_seed(m + k)
    x = _inputs(m, k, dtype, wide=True)
    ref_data, ref_scale = quant.quantize_activation(get_format(scheme), x, None)
    data, scale = act_quant_triton(x, None, scheme)
    assert torch.equal(_bytes(data), _bytes(ref_data))
    assert torch.equal(torch.nan_to_num(scale, nan=7.0), torch.nan_to_num(ref_scale.reshape(scale.shape), nan=7.0))


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 4096), (16, 14336), (300, 384)])
def test_mxfp8_rows_match_quantize(silu, dtype, m, k):
    """MXFP8 (E8M0 bytes per 32): x alone bit-identical to mxpass.schemes.mxfp8; silu(gate) * up
    within the fast-exp differences of the test below (a block's byte moves by one at most)."""
    from mxpass.kernels.triton.act_quant import act_quant_triton

    torch.manual_seed(m + k + silu)
    x = _inputs(m, k, dtype, wide=not silu)
    up = torch.randn(m, k, device="cuda").to(dtype) if silu else None
    ref_data, ref_scale = quant.quantize_activation(get_format("mxfp8"), F.silu(x) * up if silu else x, None)
    data, scale = act_quant_triton(x, up, "mxfp8")
    assert scale.dtype == torch.uint8 and scale.shape == (m, k // 32)
    ref_bytes = ref_scale.view(torch.uint8)
    if m >= 5:
        assert (scale[2:4] == 255).any(1).all() and not (scale[[0, 1, 4]] == 255).any()
    if not silu:
        assert torch.equal(scale, ref_bytes) and torch.equal(_bytes(data), _bytes(ref_data))
        return
    same_scale = (scale == ref_bytes).float().mean().item()
    same_data = (_bytes(data) == _bytes(ref_data)).float().mean().item()
    print(f"mxfp8 silu {dtype} M={m}: scales equal {same_scale:.6f}, data equal {same_data:.6f}")
    assert (scale.int() - ref_bytes.int()).abs().max() <= 1 and same_scale >= 0.99 and same_data >= 0.999


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m,k", [(1, 4096), (300, 768), (4096, 2048)])
def test_mx_fake_quant_matches_fake_quantize(dtype, m, k):
    """mxpass::mx_fake_quant_triton (h of the MoE path) bit-identical to mxfp8.fake_quantize,
    NaN/Inf/zero/small rows included, rows strided in a wider tensor; opcheck of the op."""
    from mxpass.schemes import mxfp8

    torch.manual_seed(m + k)
    x = _inputs(m, k, dtype, wide=True)
    y = torch.ops.mxpass.mx_fake_quant_triton(x)
    ref = mxfp8.fake_quantize(x)
    assert y.dtype == dtype and y.shape == (m, k)
    assert torch.equal(y.isnan(), ref.isnan())
    assert torch.equal(torch.nan_to_num(y).view(torch.int16), torch.nan_to_num(ref).view(torch.int16))
    # opcheck compares outputs with assert_close, which fails on NaN: finite rows only
    torch.library.opcheck(torch.ops.mxpass.mx_fake_quant_triton.default, (torch.randn_like(x),))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mx_fake_quant_of_silu_mul(dtype):
    """mxpass::mx_fake_quant_triton(gate, up) against mxfp8.fake_quantize(F.silu(gate) * up): the
    kernel's fast exp may move a last bit of SiLU(x), so a block's values (rarely its scale)
    can differ by a step of the e4m3 grid; every other value bit-identical; opcheck."""
    from mxpass.schemes import mxfp8

    torch.manual_seed(2)
    gate, up = _inputs(300, 14336, dtype), torch.randn(300, 14336, device="cuda").to(dtype)
    y = torch.ops.mxpass.mx_fake_quant_triton(gate, up)
    ref = mxfp8.fake_quantize(F.silu(gate) * up)
    assert y.dtype == dtype and y.shape == gate.shape
    assert torch.equal(y.isnan(), ref.isnan()) and y.isnan()[2:4].any(1).all()
    ok = ~ref.isnan()
    same = (y[ok].view(torch.int16) == ref[ok].view(torch.int16)).float().mean().item()
    print(f"mx fake silu {dtype}: values equal {same:.6f}")
    assert same >= 0.999
    blocks = ref.float().reshape(300, -1, 32).abs().amax(-1, keepdim=True).expand(-1, -1, 32).reshape(300, -1)
    assert ((y.float() - ref.float())[ok].abs() <= blocks[ok] * 2**-3).all()
    torch.library.opcheck(torch.ops.mxpass.mx_fake_quant_triton.default, (torch.randn_like(gate[:8]), up[:8]))


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_silu_mul_rows_match_quantize_activation(scheme, dtype):
    """silu(gate) * up: against the ATen math on F.silu(gate) * up. The kernel's SiLU uses the
    GPU's fast exp, so a bf16/fp16 rounding of SiLU(x) can differ in its last bit, and with it
    an element's code or, rarely, a row's scale; measured on these inputs (H200): see the bounds."""
    from mxpass.kernels.triton.act_quant import act_quant_triton

    torch.manual_seed(1)
    gate, up = _inputs(300, 14336, dtype), torch.randn(300, 14336, device="cuda").to(dtype)
    ref_data, ref_scale = quant.quantize_activation(get_format(scheme), F.silu(gate) * up, None)
    data, scale = act_quant_triton(gate, up, scheme)
    rs = ref_scale.reshape(scale.shape)
    same_scale = (torch.nan_to_num(scale, nan=7.0) == torch.nan_to_num(rs, nan=7.0)).float().mean().item()
    same_data = (_bytes(data) == _bytes(ref_data)).float().mean().item()
    print(f"{scheme} {dtype}: scales equal {same_scale:.6f}, data equal {same_data:.6f}")
    assert torch.isnan(scale[2:4]).any(1).all()
    assert same_scale >= 0.99 and same_data >= 0.999
    # where they differ, by one step of the quantized grid at most
    deq = quant.dequantize_activation(get_format(scheme), data, scale.reshape(ref_scale.shape))
    ref = quant.dequantize_activation(get_format(scheme), ref_data, ref_scale)
    ok = torch.isfinite(ref).all(-1)
    assert ((deq - ref)[ok].abs() <= ref[ok].abs() * 0.07 + 1e-3 * ref[ok].abs().amax()).all()


def _llama_mlp(hidden=512, inter=1536):
    import transformers

    cfg = transformers.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_hidden_layers=2,
                                   num_attention_heads=8, num_key_value_heads=4, vocab_size=512)
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).cuda().eval()


@pytest.mark.parametrize("scheme, tokens", [(s, 300) for s in SCHEMES] + [("mxfp8", 4), ("mxfp8", 300)])
def test_llama_inputs_are_quantized_by_the_kernel(monkeypatch, scheme, tokens):
    """An HF Llama compiled by the backend: every down_proj takes SiLU*mul and every o_proj the
    attention output quantized by act_quant_triton (report and generated code), with fp8-block
    and mxfp8 every input (mxfp8 at 4 tokens: the CUDA GEMV, which takes a quantized input; at
    300: dequantize + cuBLAS, which takes it fake-quantized); the RMSNorm + quantize kernels
    are persistent reductions. Logits against the mxpass reference run op by
    op (compiler="eager", bf16 roundings as in eager PyTorch): no farther than the same graph
    with Inductor's quantization, which quantizes SiLU*mul without rounding it to bf16 first."""
    from mxpass.lowering import producers

    model = _llama_mlp()
    ids = torch.randint(0, 512, (1, tokens), device="cuda")
    with torch.inference_mode():
        torch._dynamo.reset()
        out, code = run_and_get_code(torch.compile(model, backend=mxpass.backend(scheme=scheme)), ids,
                                     use_cache=False)
        report = mxpass.last_report()
        torch._dynamo.reset()
        ref = torch.compile(model, backend=mxpass.backend(scheme=scheme, compiler="eager"))(ids, use_cache=False)
        monkeypatch.setattr(producers, "fusion_problem", lambda problem, choice: "off")
        torch._dynamo.reset()
        inductor = torch.compile(model, backend=mxpass.backend(scheme=scheme))(ids, use_cache=False)
    notes = [r.input_quant for r in report.rewritten]
    done = "fake-quantized" if scheme == "mxfp8" and tokens > 16 else "quantized"
    assert notes.count(f"input silu*mul {done} by act_quant_triton") == 2, notes
    assert notes.count(f"input attention output {done} by act_quant_triton") == 2, notes
    # 1 x 128 groups: every input (shared by q/k/v and by gate/up); per token: RMSNorm fuses it
    every = scheme in ("fp8-block", "mxfp8")
    assert notes.count(f"input activation {done} by act_quant_triton") == (10 if every else 0), notes
    src = code[0]
    launches = len(re.findall(r"_act_quant_kernel\w*\.run\(", src))
    assert launches == (8 if every else 4), launches
    bodies = dict(re.findall(r"async_compile\.triton\('(\w+)', '''(.*?)'''", src, re.S))
    quantizing = [n for n, b in bodies.items() if n.startswith("triton_") and ("float8e4nv" in b or "tl.int8" in b)]
    # the first layer's RMSNorm fused with the embedding gather stays a looped reduction
    looped = [n for n in quantizing if n.startswith("triton_red_") and "embedding" not in n]
    assert not looped and (quantizing or every), quantizing  # fp8-block, mxfp8: none left

    def rel(a, b):
        return ((a.logits.float() - b.logits.float()).norm() / b.logits.float().norm()).item()

    err, err_inductor = rel(out, ref), rel(inductor, ref)
    print(f"{scheme}: logits vs eager reference: act_quant {err:.4f}, Inductor's quantization {err_inductor:.4f}")
    assert err <= err_inductor * 1.1 + 1e-4, (err, err_inductor)


def test_dynamic_m_mxfp8_inputs_fake_quantized_by_the_kernel(monkeypatch):
    """An HF Llama compiled with dynamic=True (triton_mxfp8 for every M): every MXFP8 input is
    fake-quantized by mx_fake_quant_triton with a symbolic M (report and generated code), one
    graph serves M in {5, 17, 300}, and the logits against the op-by-op reference are no
    farther than with Inductor's quantization."""
    from mxpass.lowering import producers

    model = _llama_mlp()

    def rel(a, b):
        return ((a.logits.float() - b.logits.float()).norm() / b.logits.float().norm()).item()

    with torch.inference_mode():
        torch._dynamo.reset()
        fast = torch.compile(model, backend=mxpass.backend(scheme="mxfp8"), dynamic=True)
        ids = {t: torch.randint(0, 512, (1, t), device="cuda") for t in (5, 17, 300)}
        out, code = run_and_get_code(fast, ids[5], use_cache=False)
        report = mxpass.last_report()
        with torch._dynamo.config.patch(error_on_recompile=True):
            outs = {5: out, **{t: fast(ids[t], use_cache=False) for t in (17, 300)}}
        torch._dynamo.reset()
        eager = torch.compile(model, backend=mxpass.backend(scheme="mxfp8", compiler="eager"), dynamic=True)
        refs = {t: eager(ids[t], use_cache=False) for t in ids}
        monkeypatch.setattr(producers, "fusion_problem", lambda problem, choice: "off")
        torch._dynamo.reset()
        inductor = torch.compile(model, backend=mxpass.backend(scheme="mxfp8"), dynamic=True)
        inds = {t: inductor(ids[t], use_cache=False) for t in ids}
    notes = [r.input_quant for r in report.rewritten]
    assert {r.kernel.split(" ")[0] for r in report.rewritten} == {"triton_mxfp8"}
    assert notes.count("input silu*mul fake-quantized by act_quant_triton") == 2, notes
    assert notes.count("input attention output fake-quantized by act_quant_triton") == 2, notes
    assert notes.count("input activation fake-quantized by act_quant_triton") == 10, notes
    assert len(re.findall(r"_act_quant_kernel\w*\.run\(", code[0])) == 8
    for t in ids:
        err, err_inductor = rel(outs[t], refs[t]), rel(inds[t], refs[t])
        print(f"mxfp8 dynamic M={t}: logits vs eager reference: act_quant {err:.4f}, Inductor's {err_inductor:.4f}")
        assert err <= err_inductor * 1.1 + 1e-4, (t, err, err_inductor)
