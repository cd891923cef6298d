"""MXFP8 reference numerics (mxpass.schemes.mxfp8) against compressed-tensors' own code.

The reference is compressed-tensors itself, preset MXFP8 / MXFP8A16: its dynamic
activation path (``compute_dynamic_scales_and_zp`` + ``quantize``, what
``forward_quantize`` runs; for weights the same group min/max a min-max observer
gives) and its ``MXFP8QuantizationCompressor`` for checkpoint bytes. Every
comparison is bit for bit (atol=0).
"""

import re

import pytest
import torch
from compressed_tensors.compressors.mx_utils import compress_mx_scale
from compressed_tensors.compressors.mxfp8.base import MXFP8QuantizationCompressor
from compressed_tensors.quantization import QuantizationScheme
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp
from torch._inductor.utils import run_and_get_code

from mxpass.schemes import mxfp8

ACT_ARGS = PRESET_SCHEMES["MXFP8"]["input_activations"]
WEIGHT_ARGS = PRESET_SCHEMES["MXFP8"]["weights"]

_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}
# Just below 1.75 * 2**127 (2.98e38), where compressed-tensors' power of two overflows.
_BIG = 2.9e38


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT[t.element_size()])


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal bits everywhere, except that any NaN equals any NaN (a NaN's sign means nothing)."""
    assert a.dtype == b.dtype and a.shape == b.shape
    nan_a, nan_b = a.float().isnan(), b.float().isnan()
    assert torch.equal(nan_a, nan_b)
    assert torch.equal(_bits(a)[~nan_a], _bits(b)[~nan_b])


def edge_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Random blocks over the whole exponent range of dtype, plus fixed edge blocks.

    Each block gets a magnitude 2**e (e from the subnormals to 2**125) and a spread of
    up to 40 binades inside it, so one block mixes huge, normal and subnormal values.
    """
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-24, 15) if dtype == torch.float16 else (-140, 126)
    groups = (*shape[:-1], shape[-1] // 32)
    e = torch.randint(lo, hi, (*groups, 1), generator=g).float()
    width = torch.randint(0, 40, (*groups, 1), generator=g)
    spread = torch.rand((*groups, 32), generator=g) * width
    x = torch.randn((*groups, 32), generator=g) * torch.exp2(e - spread)
    big = 60000.0 if dtype == torch.float16 else _BIG
    x = x.clamp(-big, big).flatten(-2).to(dtype)
    rows = x.view(-1, shape[-1])
    rows[0, :32] = 0.0  # all-zero block
    rows[0, 32:64] = -0.0
    if shape[-1] >= 128 and dtype != torch.float16:
        mixed = [_BIG, -1e38, 1.0, -1e-30, 1e-40, -1e-44, 2.0**100, -(2.0**-43)]
        rows[-1, 64:96] = torch.tensor(mixed * 4).to(dtype)
        rows[-1, 96:128] = torch.linspace(-1e-38, 1e-38, 32).to(dtype)  # subnormals, zero
        # x / scale = -2**-135: rounds to -0 in bf16 (stored +0), stays nonzero in fp32
        rows[-1, :32] = torch.tensor([2.0**100, -(2.0**-43), -(2.0**-40), 2.0**-45] * 8).to(dtype)
    return x


def ct_quantize_activation(x: torch.Tensor):
    scale, zero_point = compute_dynamic_scales_and_zp(x, ACT_ARGS, module=None)
    data = ct_quantize(x, scale, zero_point, ACT_ARGS, dtype=torch.float8_e4m3fn)
    return data, scale, ct_fake_quantize(x, scale, zero_point, ACT_ARGS)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape", [(7, 256), (3, 5, 64), (1, 32)])
def test_activation_path_matches_compressed_tensors(dtype, shape):
    for seed in range(4):
        x = edge_tensor(shape, dtype, seed)
        ct_data, ct_scale, ct_fq = ct_quantize_activation(x)
        data, scale = mxfp8.quantize(x)
        assert data.dtype == torch.float8_e4m3fn and scale.dtype == torch.float8_e8m0fnu
        assert torch.equal(_bits(data), _bits(ct_data))
        assert torch.equal(scale.view(torch.uint8), compress_mx_scale(ct_scale, torch.uint8))
        assert torch.equal(_bits(mxfp8.scale_to_float(scale).to(dtype)), _bits(ct_scale))
        assert torch.equal(_bits(mxfp8.fake_quantize(x)), _bits(ct_fq))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_weight_bytes_match_the_compressed_tensors_compressor(dtype):
    assert PRESET_SCHEMES["MXFP8A16"]["weights"] == WEIGHT_ARGS  # one weight format, two presets
    scheme = QuantizationScheme(targets=["Linear"], weights=WEIGHT_ARGS)
    w = edge_tensor((33, 384), dtype, seed=11)
    scale, zero_point = compute_dynamic_scales_and_zp(w, WEIGHT_ARGS, module=None)
    state = {"weight": w, "weight_scale": scale, "weight_zero_point": zero_point}
    stored = MXFP8QuantizationCompressor.compress(state, scheme)
    data, scale = mxfp8.quantize_weight(w, "model.layers.0.mlp.down_proj.weight")
    assert torch.equal(_bits(data), _bits(stored["weight"]))
    assert torch.equal(scale.view(torch.uint8), stored["weight_scale"])
    # compressed-tensors decompresses MX weights to bf16 (decompress_mx_scale)
    restored = MXFP8QuantizationCompressor.decompress(stored, scheme)["weight"]
    assert torch.equal(_bits(mxfp8.dequantize(data, scale, torch.bfloat16)), _bits(restored))


def test_fp16_matches_compressed_tensors_in_its_normal_range():
    # Below 2**-14 (fp16 subnormal) and from 57344 on, compressed-tensors' fp16 scale
    # is undefined; see test_where_compressed_tensors_is_undefined.
    g = torch.Generator().manual_seed(3)
    e = torch.randint(-13, 15, (9, 4, 1), generator=g).float()
    x = (torch.randn((9, 4, 32), generator=g) * torch.exp2(e)).to(torch.float16)
    amax = x.float().abs().amax(-1, keepdim=True)
    x = torch.where((amax >= 2**-14) & (amax < 57344), x, 1.0).flatten(-2)
    ct_data, ct_scale, ct_fq = ct_quantize_activation(x)
    data, scale = mxfp8.quantize(x)
    assert torch.equal(_bits(data), _bits(ct_data))
    assert torch.equal(scale.view(torch.uint8), compress_mx_scale(ct_scale, torch.uint8))
    assert torch.equal(_bits(mxfp8.fake_quantize(x)), _bits(ct_fq))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_scale_rounds_up_at_significand_1_75_and_448_is_reached(dtype):
    below = 1.7421875 if dtype == torch.bfloat16 else 1.75 - 2.0**-23  # largest below 1.75
    k = 3  # block amax = significand * 2**3
    sig = torch.tensor([1.0, 1.5, below, 1.75, 1.99])
    x = torch.zeros(5, 32)
    x[:, 0] = sig * 2.0**k
    x[:, 1] = -0.5
    x = x.to(dtype)
    data, scale = mxfp8.quantize(x)
    rounds_up = torch.tensor([0, 0, 0, 1, 1], dtype=torch.uint8)
    assert torch.equal(scale.view(torch.uint8).flatten(), 127 + k - 8 + rounds_up)
    # Just below the threshold, x / scale lands on E4M3_MAX exactly (the clamp edge);
    # at 1.75 the scale doubles and the element becomes 224.
    assert data.float()[:, 0].tolist() == [256.0, 384.0, 448.0, 224.0, 256.0]
    ct_data, ct_scale, _ = ct_quantize_activation(x)
    assert torch.equal(_bits(data), _bits(ct_data))
    assert torch.equal(scale.view(torch.uint8), compress_mx_scale(ct_scale, torch.uint8))


def test_zero_blocks_and_tiny_blocks_use_the_smallest_scale():
    x = torch.zeros(3, 64, dtype=torch.bfloat16)
    x[1, :32] = 2.0**-125  # E = 2 -> byte clamps to 0
    x[2, 32:] = -(2.0**-133)  # bf16 subnormal
    data, scale = mxfp8.quantize(x)
    assert scale.view(torch.uint8).tolist() == [[0, 0], [0, 0], [0, 0]]
    assert torch.equal(mxfp8.dequantize(data, scale, torch.bfloat16), x)
    ct_data, ct_scale, _ = ct_quantize_activation(x)
    assert torch.equal(_bits(data), _bits(ct_data))
    assert torch.equal(scale.view(torch.uint8), compress_mx_scale(ct_scale, torch.uint8))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_where_compressed_tensors_is_undefined(dtype):
    # amax >= 1.75 * 2**127: compressed-tensors' power of two overflows to inf (scale
    # NaN, data all 0); mxpass keeps going with byte 247 = 255 - 8.
    x = torch.full((1, 32), 3.2e38).to(dtype)
    x[0, 1:] = (torch.linspace(-1, 1, 31) * 3e38).to(dtype)
    _, ct_scale, _ = ct_quantize_activation(x)
    assert torch.isinf(ct_scale).all()
    data, scale = mxfp8.quantize(x)
    assert scale.view(torch.uint8).item() == 247
    # within half an e4m3 step: 2**-4 relative for normals, 2**-10 * scale for subnormals
    half_step = torch.maximum(x.float().abs() * 2.0**-4, mxfp8.scale_to_float(scale) * 2.0**-10)
    assert ((mxfp8.fake_quantize(x).float() - x.float()).abs() <= half_step).all()
    # fp16: amax >= 57344 overflows fp16 in compressed-tensors; mxpass gives 127 + 16 - 8.
    fp16_big = torch.full((1, 32), 60000.0, dtype=torch.float16)
    assert torch.isinf(ct_quantize_activation(fp16_big)[1]).all()
    assert mxfp8.quantize(fp16_big).scale.view(torch.uint8).item() == 135
    # fp16 amax below 2**-14: the rule on amax's float32 value (2**-20 -> 127 - 20 - 8).
    tiny = torch.full((1, 32), 2.0**-20, dtype=torch.float16)
    assert mxfp8.quantize(tiny).scale.view(torch.uint8).item() == 127 - 20 - 8
    assert torch.equal(mxfp8.fake_quantize(tiny), tiny)


def test_nonfinite_activation_blocks_become_nan_blocks():
    x = edge_tensor((3, 128), torch.bfloat16, seed=5)
    bad = x.clone()
    bad[0, 40] = float("nan")  # block (0, 1)
    bad[1, 64] = float("inf")  # block (1, 2)
    bad[2, 31] = -float("inf")  # block (2, 0)
    nan_blocks = torch.zeros(3, 4, dtype=torch.bool)
    nan_blocks[0, 1] = nan_blocks[1, 2] = nan_blocks[2, 0] = True
    nan_elems = nan_blocks.repeat_interleave(32, dim=-1)

    data, scale = mxfp8.quantize(bad)
    assert torch.equal(scale.view(torch.uint8) == mxfp8.E8M0_NAN, nan_blocks)
    assert torch.equal(mxfp8.dequantize(data, scale).isnan(), nan_elems)
    assert torch.equal(mxfp8.fake_quantize(bad).isnan(), nan_elems)
    clean_data, clean_scale = mxfp8.quantize(x)  # the other blocks are untouched
    assert torch.equal(_bits(data)[~nan_elems], _bits(clean_data)[~nan_elems])
    assert torch.equal(_bits(scale)[~nan_blocks], _bits(clean_scale)[~nan_blocks])
    # compressed-tensors: same data bytes (x / inf), inf scale, NaN fake-quantized blocks
    ct_data, ct_scale, ct_fq = ct_quantize_activation(bad)
    assert_same_bits(data, ct_data)
    assert torch.equal(torch.isinf(ct_scale), nan_blocks)
    assert torch.equal(ct_fq.isnan(), nan_elems)


def test_quantize_weight_rejects_nonfinite_values():
    w = torch.randn(4, 64)
    w[0, 0], w[1, 5], w[3, 63] = float("nan"), float("inf"), -float("inf")
    with pytest.raises(ValueError, match=r"'lm_head.weight' has 3 non-finite values"):
        mxfp8.quantize_weight(w, "lm_head.weight")


def test_k_must_be_a_multiple_of_32():
    x = torch.randn(2, 48)
    with pytest.raises(ValueError, match=r"'q_proj.weight'.*K \(last dim\) = 48.*multiple of 32"):
        mxfp8.quantize_weight(x, "q_proj.weight")
    for fn in (mxfp8.quantize, mxfp8.fake_quantize):
        with pytest.raises(ValueError, match="multiple of 32"):
            fn(x)


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, torch.float8_e4m3fn])
def test_other_input_dtypes_are_rejected(dtype):
    x = torch.zeros(2, 64).to(dtype)
    for fn in (mxfp8.quantize, mxfp8.fake_quantize, lambda t: mxfp8.quantize_weight(t, "w")):
        with pytest.raises(TypeError, match=str(dtype)):
            fn(x)


def test_scale_to_float_covers_every_byte():
    byte = torch.arange(256, dtype=torch.int32).to(torch.uint8)
    got = mxfp8.scale_to_float(byte.view(torch.float8_e8m0fnu))
    expected = torch.tensor([2.0 ** (b - 127) for b in range(255)] + [float("nan")])
    assert_same_bits(got, expected.float())
    assert got[:255].isfinite().all() and got[255].isnan()
    assert_same_bits(got, byte.view(torch.float8_e8m0fnu).float())  # torch's own cast
    assert_same_bits(mxfp8.scale_to_float(byte), got)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_fake_quantize_is_dequantize_of_quantize(dtype):
    x = edge_tensor((5, 3, 128), dtype, seed=7)
    x[0, 0, 3], x[1, 2, 100], x[4, 1, 60] = float("nan"), float("inf"), -float("inf")
    expected = mxfp8.dequantize(*mxfp8.quantize(x), dtype)
    assert torch.equal(_bits(mxfp8.fake_quantize(x)), _bits(expected))


def _compiled(fn, x):
    """Result of fn under the default Inductor backend, and the host code that calls its kernels."""
    torch._dynamo.reset()
    result, (code,) = run_and_get_code(torch.compile(fn, fullgraph=True), x)
    return result, code[code.index("def call") :]


def test_compiled_matches_eager_and_fuses():
    # Small on purpose: each Inductor compile takes ~5 s on 2 cores.
    x = edge_tensor((5, 128), torch.bfloat16, seed=9)
    x[1, 40], x[2, 70], x[3, 100] = float("nan"), float("inf"), -float("inf")
    eager_data, eager_scale = mxfp8.quantize(x)

    fake, host = _compiled(mxfp8.fake_quantize, x)
    assert torch.equal(_bits(fake), _bits(mxfp8.dequantize(eager_data, eager_scale, x.dtype)))
    assert host.count("cpp_fused_") == 1 and "torch.ops." not in host  # one kernel, no e8m0

    (data, scale), host = _compiled(mxfp8.quantize, x)
    assert data.dtype == torch.float8_e4m3fn and scale.dtype == torch.float8_e8m0fnu
    assert torch.equal(_bits(data), _bits(eager_data))
    assert torch.equal(_bits(scale), _bits(eager_scale))
    # one kernel for data and scale; the e8m0 cast is the only op left outside it
    assert host.count("cpp_fused_") == 1
    extern_ops = re.findall(r"torch\.ops\.[\w.]+\(", host)
    assert extern_ops == ["torch.ops.prims.convert_element_type.default("]
