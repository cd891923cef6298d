"""FP8 and INT8 reference numerics (mxpass.schemes.fp8 / int8) against compressed-tensors.

The reference is compressed-tensors itself, presets FP8_DYNAMIC, FP8, FP8_BLOCK and W8A8:
for weights, the min/max a min-max observer takes (llm-compressor's ``flatten_for_calibration``:
rows, the whole tensor, or zero-padded 128 x 128 blocks) fed to ``calculate_qparams``, then
the ``NaiveQuantizationCompressor`` (checkpoint bytes) and its ``decompress``; for dynamic
activations ``compute_dynamic_scales_and_zp`` + ``quantize`` / ``fake_quantize`` (what
``forward_quantize`` runs); for static activations ``quantize`` with the scale stored in
the input dtype. Every comparison is bit for bit (atol=0).
"""

import pytest
import torch
from compressed_tensors.compressors.naive_quantized.base import NaiveQuantizationCompressor
from compressed_tensors.quantization import QuantizationScheme, QuantizationStrategy
from compressed_tensors.quantization.lifecycle.forward import fake_quantize as ct_fake_quantize
from compressed_tensors.quantization.lifecycle.forward import quantize as ct_quantize
from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
from compressed_tensors.quantization.utils import (
    calculate_qparams,
    compute_dynamic_scales_and_zp,
    maybe_pad_tensor_for_block_quant,
)

from mxpass.schemes import fp8, int8

FP8_WEIGHT_ARGS = {
    "channel": PRESET_SCHEMES["FP8_DYNAMIC"]["weights"],
    "tensor": PRESET_SCHEMES["FP8"]["weights"],
    "block": PRESET_SCHEMES["FP8_BLOCK"]["weights"],
}
FP8_ACT_ARGS = {
    "token": PRESET_SCHEMES["FP8_DYNAMIC"]["input_activations"],
    "tensor": PRESET_SCHEMES["FP8"]["input_activations"],
    "group": PRESET_SCHEMES["FP8_BLOCK"]["input_activations"],
}
INT8_WEIGHT_ARGS = {
    "channel": PRESET_SCHEMES["W8A8"]["weights"],
    "tensor": PRESET_SCHEMES["W8A8"]["weights"].model_copy(update={"strategy": "tensor"}),
}
INT8_ACT_ARGS = {
    "token": PRESET_SCHEMES["W8A8"]["input_activations"],
    "tensor": PRESET_SCHEMES["W8A8"]["input_activations"].model_copy(
        update={"strategy": "tensor", "dynamic": False}
    ),
}
FLOATS = [torch.bfloat16, torch.float32]
_INT = {1: torch.uint8, 2: torch.int16, 4: torch.int32}


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT[t.element_size()])


def assert_same_bits(a: torch.Tensor, b: torch.Tensor) -> None:
    """Equal bits everywhere, except that any NaN equals any NaN (a NaN's sign means nothing)."""
    assert a.dtype == b.dtype and a.shape == b.shape, (a.dtype, b.dtype, a.shape, b.shape)
    nan_a, nan_b = a.float().isnan(), b.float().isnan()
    assert torch.equal(nan_a, nan_b)
    assert torch.equal(_bits(a)[~nan_a], _bits(b)[~nan_b])


def assert_same_bits_but_zero_sign(a: torch.Tensor, b: torch.Tensor) -> None:
    """``assert_same_bits`` where -0 equals +0.

    compressed-tensors' int8 fake_quantize keeps the sign of a quotient that rounds to 0
    (-0.0 * scale); int8 data has no -0, so dequantizing it gives +0.
    """
    assert a.dtype == b.dtype
    zero = (a == 0) & (b == 0)
    assert_same_bits(torch.where(zero, 0.0, a.float()), torch.where(zero, 0.0, b.float()))


def edge_tensor(
    shape: tuple[int, ...], dtype: torch.dtype, seed: int, exponents: tuple[int, int] | None = None
) -> torch.Tensor:
    """Rows of random magnitude 2**e (by default subnormals to ~2**120), each spread over up
    to 24 binades, plus fixed edge rows.

    Row 0 is all zero, row 1 all -0, row 2 subnormal-sized values, row 3 one huge value
    among ordinary ones; the rest are random. Every row mixes signs.
    """
    g = torch.Generator().manual_seed(seed)
    lo, hi = exponents or ((-20, 14) if dtype == torch.float16 else (-140, 120))
    rows = torch.Size(shape[:-1]).numel()
    e = torch.randint(lo, hi, (rows, 1), generator=g).float()
    width = torch.randint(0, 24, (rows, 1), generator=g)
    spread = torch.rand((rows, shape[-1]), generator=g) * width
    x = torch.randn((rows, shape[-1]), generator=g) * torch.exp2(e - spread)
    if rows >= 4:
        x[0] = 0.0
        x[1] = -0.0
        x[2] = torch.randn(shape[-1], generator=g) * (2.0**-20 if dtype == torch.float16 else 1e-39)
        x[3, 0] = 6e4 if dtype == torch.float16 else 1e38 if exponents is None else 2.0 ** (hi + 4)
    return x.to(dtype).reshape(shape)


# --- compressed-tensors, driven the way llm-compressor and forward_quantize drive it ---


def ct_weight(w: torch.Tensor, args):
    """(stored data, stored scale, decompressed weight) from compressed-tensors."""
    if args.strategy == QuantizationStrategy.TENSOR:
        lo, hi = torch.aminmax(w)
    elif args.strategy == QuantizationStrategy.CHANNEL:
        lo, hi = w.amin(dim=-1, keepdim=True), w.amax(dim=-1, keepdim=True)
    else:  # BLOCK: zero-padded, (block_rows, block_cols, 128 * 128)
        padded = maybe_pad_tensor_for_block_quant(w, tuple(args.block_structure))
        bh, bw = args.block_structure
        blocks = padded.reshape(padded.shape[0] // bh, bh, padded.shape[1] // bw, bw)
        blocks = blocks.transpose(1, 2).flatten(-2)
        lo, hi = blocks.amin(dim=-1), blocks.amax(dim=-1)
    scale, zero_point = calculate_qparams(lo, hi, args)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state = {"weight": w, "weight_scale": scale, "weight_zero_point": zero_point}
    stored = NaiveQuantizationCompressor.compress(state, scheme)
    restored = NaiveQuantizationCompressor.decompress(stored, scheme)["weight"]
    return stored["weight"], stored["weight_scale"], restored


def ct_dynamic(x: torch.Tensor, args, qdtype: torch.dtype):
    scale, zero_point = compute_dynamic_scales_and_zp(x, args, module=None)
    data = ct_quantize(x, scale, zero_point, args, dtype=qdtype)
    return data, scale, ct_fake_quantize(x, scale, zero_point, args)


def ct_static(x: torch.Tensor, scale: torch.Tensor, args, qdtype: torch.dtype):
    zero_point = torch.zeros(1, dtype=args.zp_dtype)
    data = ct_quantize(x, scale, zero_point, args, dtype=qdtype)
    return data, ct_fake_quantize(x, scale, zero_point, args)


# --- FP8 ---


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize(
    "granularity, shape",
    [("channel", (37, 96)), ("tensor", (21, 64)), ("block", (300, 200)), ("block", (256, 384))],
)
def test_fp8_weight_matches_compressed_tensors(granularity, shape, dtype):
    for seed in range(3):
        # one scale for all: rows of similar magnitude, so most values stay nonzero
        w = edge_tensor(shape, dtype, seed, (-12, 0) if granularity == "tensor" else None)
        if granularity == "block":
            w[128:256, :128] = 0.0  # an all-zero block
        ct_data, ct_scale, restored = ct_weight(w, FP8_WEIGHT_ARGS[granularity])
        data, scale = fp8.quantize_weight(w, "model.layers.0.mlp.up_proj.weight", granularity)
        assert data.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
        assert torch.equal(_bits(data), _bits(ct_data))
        assert ct_scale.dtype == dtype  # compressed-tensors keeps the scale in the weight dtype
        assert torch.equal(_bits(scale), _bits(ct_scale.float()))
        deq = fp8.dequantize(data, scale, granularity).to(dtype)
        assert torch.equal(_bits(deq), _bits(restored))


def test_fp8_block_scales_cover_partial_blocks():
    # 200 x 300 -> blocks of rows [0,128), [128,200) and columns [0,128), [128,256), [256,300)
    w = torch.full((200, 300), 1.0)
    w[199, 299] = -896.0  # the partial corner block: scale 896 / 448 = 2
    w[0, 255] = 4.0
    data, scale = fp8.quantize_weight(w, "w", "block")
    assert data.shape == (200, 300) and scale.shape == (2, 3)
    expected = torch.tensor([[1, 4, 1], [1, 1, 896]]) / 448.0
    assert torch.equal(scale, expected)
    assert data.float()[199, 299] == -448.0 and data.float()[199, 298] == 0.5
    assert torch.equal(fp8.dequantize(data, scale, "block"), w)


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("granularity", ["token", "group"])
def test_fp8_dynamic_activation_matches_compressed_tensors(granularity, dtype):
    args = FP8_ACT_ARGS[granularity]
    for seed in range(3):
        x = edge_tensor((3, 7, 256), dtype, seed)  # [batch, seq, hidden], as compressed-tensors
        ct_data, ct_scale, ct_fq = ct_dynamic(x, args, torch.float8_e4m3fn)
        data, scale = fp8.quantize_activation(x, granularity)
        assert data.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
        assert scale.shape == ((3, 7, 1) if granularity == "token" else (3, 7, 2))
        assert torch.equal(_bits(data), _bits(ct_data))
        assert torch.equal(_bits(scale), _bits(ct_scale.float()))
        assert torch.equal(_bits(fp8.fake_quantize_activation(x, granularity)), _bits(ct_fq))


def test_token_scales_are_per_row_for_2d_inputs():
    x = edge_tensor((9, 128), torch.bfloat16, seed=4)
    data, scale = fp8.quantize_activation(x, "token")
    assert scale.shape == (9, 1)
    # compressed-tensors' TOKEN strategy reduces over dims 2..: one scale for a 2-D input.
    assert compute_dynamic_scales_and_zp(x, FP8_ACT_ARGS["token"], module=None)[0].numel() == 1
    ct_data, ct_scale, _ = ct_dynamic(x.unsqueeze(0), FP8_ACT_ARGS["token"], torch.float8_e4m3fn)
    assert torch.equal(_bits(data), _bits(ct_data[0]))
    assert torch.equal(_bits(scale), _bits(ct_scale[0].float()))


@pytest.mark.parametrize("dtype", FLOATS)
def test_fp8_static_activation_matches_compressed_tensors(dtype):
    x = edge_tensor((2, 5, 96), dtype, seed=6)
    x[0, 4, :3] = torch.tensor([float("inf"), -float("inf"), float("nan")]).to(dtype)
    for s in (0.37, 1e-3, 2.0**-30):  # 2**-30: most of x lies outside +/-448 * s
        scale = torch.tensor([s], dtype=dtype)  # input_scale as stored: in the input dtype
        ct_data, ct_fq = ct_static(x, scale, FP8_ACT_ARGS["tensor"], torch.float8_e4m3fn)
        data, got_scale = fp8.quantize_activation(x, "tensor", scale)
        assert got_scale.dtype == torch.float32 and got_scale.shape == (1,)
        assert_same_bits(data, ct_data)
        assert_same_bits(fp8.fake_quantize_activation(x, "tensor", scale), ct_fq)
        # per element: +/-Inf clamps to +/-448, NaN stays NaN (0x7F)
        assert data.float()[0, 4, :2].tolist() == [448.0, -448.0]
        assert _bits(data)[0, 4, 2] == 0x7F


def test_fp16_matches_compressed_tensors():
    x = edge_tensor((2, 9, 128), torch.float16, seed=8)
    for granularity in ("token", "group"):
        ct_data, ct_scale, ct_fq = ct_dynamic(x, FP8_ACT_ARGS[granularity], torch.float8_e4m3fn)
        data, scale = fp8.quantize_activation(x, granularity)
        assert torch.equal(_bits(data), _bits(ct_data))
        assert torch.equal(_bits(scale), _bits(ct_scale.float()))
        assert torch.equal(_bits(fp8.fake_quantize_activation(x, granularity)), _bits(ct_fq))
    w = edge_tensor((40, 256), torch.float16, seed=9)
    ct_data, ct_scale, _ = ct_weight(w, FP8_WEIGHT_ARGS["block"])
    data, scale = fp8.quantize_weight(w, "w", "block")
    assert torch.equal(_bits(data), _bits(ct_data))
    assert torch.equal(_bits(scale), _bits(ct_scale.float()))


def test_bf16_quotient_is_rounded_twice():
    # compressed-tensors divides in bf16: 1.1953125 / 1.0078125 = 1.18605 rounds to bf16
    # 1.1875, the e4m3 midpoint of 1.125 and 1.25, which goes to the even 1.25. Rounded
    # once, 1.18605 gives 1.125.
    x = torch.tensor([[1.1953125, -1.1953125, 3.0]], dtype=torch.bfloat16)
    scale = torch.tensor([1.0078125])
    data = fp8.quantize_activation(x, "tensor", scale).data
    ct_data, _ = ct_static(x, scale.bfloat16(), FP8_ACT_ARGS["tensor"], torch.float8_e4m3fn)
    assert torch.equal(_bits(data), _bits(ct_data))
    assert data.float()[0, :2].tolist() == [1.25, -1.25]
    assert fp8.quantize_activation(x.float(), "tensor", scale).data.float()[0, 0] == 1.125


@pytest.mark.parametrize("granularity", ["token", "group"])
def test_fp8_nonfinite_rows_and_groups_become_nan(granularity):
    x = edge_tensor((4, 256), torch.bfloat16, seed=10)
    bad = x.clone()
    bad[0, 3] = float("nan")
    bad[2, 200] = float("inf")
    bad[3, 129] = -float("inf")
    data, scale = fp8.quantize_activation(bad, granularity)
    clean_data, clean_scale = fp8.quantize_activation(x, granularity)
    if granularity == "token":
        nan_groups = torch.tensor([[1], [0], [1], [1]], dtype=torch.bool)
        nan_elems = nan_groups.expand(4, 256)
    else:
        nan_groups = torch.tensor([[1, 0], [0, 0], [0, 1], [0, 1]], dtype=torch.bool)
        nan_elems = nan_groups.repeat_interleave(128, dim=-1)
    assert torch.equal(scale.isnan(), nan_groups)
    assert torch.equal(data.float().isnan(), nan_elems)
    assert (_bits(data)[nan_elems] == 0x7F).all()
    assert torch.equal(fp8.dequantize(data, scale, granularity).isnan(), nan_elems)
    assert torch.equal(fp8.fake_quantize_activation(bad, granularity).isnan(), nan_elems)
    assert torch.equal(_bits(data)[~nan_elems], _bits(clean_data)[~nan_elems])
    assert torch.equal(_bits(scale)[~nan_groups], _bits(clean_scale)[~nan_groups])
    # compressed-tensors: NaN scale for NaN, Inf scale for Inf; fake-quantized row all NaN
    args = FP8_ACT_ARGS[granularity]
    _, ct_scale, ct_fq = ct_dynamic(bad.unsqueeze(0), args, torch.float8_e4m3fn)
    assert torch.equal(~ct_scale[0].isfinite(), nan_groups)
    assert torch.equal(ct_fq[0].isnan(), nan_elems)


@pytest.mark.parametrize("dtype, eps", [(torch.bfloat16, 2.0**-7), (torch.float32, 2.0**-23)])
def test_zero_groups_get_eps_scales(dtype, eps):
    x = torch.zeros(3, 256, dtype=dtype)
    x[1, 130] = 1.0
    x[2, :] = 2.0**-130 if dtype == torch.bfloat16 else 2.0**-149  # amax / 448 underflows
    expected = {
        "token": [[eps], [1 / 448], [eps]],
        "group": [[eps, eps], [eps, 1 / 448], [eps, eps]],
    }
    for granularity in ("token", "group"):
        data, scale = fp8.quantize_activation(x, granularity)
        ref = torch.tensor(expected[granularity]).to(dtype).float()
        assert torch.equal(scale, ref)
        assert torch.equal(_bits(data)[0], torch.zeros(256, dtype=torch.uint8))
        _, ct_scale, _ = ct_dynamic(x.unsqueeze(0), FP8_ACT_ARGS[granularity], torch.float8_e4m3fn)
        assert torch.equal(_bits(scale), _bits(ct_scale[0].float()))
    w_data, w_scale = fp8.quantize_weight(torch.zeros(2, 128, dtype=dtype), "w", "channel")
    assert w_scale.flatten().tolist() == [eps, eps] and not _bits(w_data).any()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("granularity", ["token", "group", "tensor"])
def test_fp8_fake_quantize_is_dequantize_of_quantize(granularity, dtype):
    x = edge_tensor((5, 3, 256), dtype, seed=12)
    x[0, 0, 3], x[1, 2, 200], x[4, 1, 60] = float("nan"), float("inf"), -float("inf")
    scale = torch.tensor([0.05]) if granularity == "tensor" else None
    q = fp8.quantize_activation(x, granularity, scale)
    expected = fp8.dequantize(q.data, q.scale, granularity).to(dtype)
    assert_same_bits(fp8.fake_quantize_activation(x, granularity, scale), expected)


def test_fp8_errors_name_the_problem():
    w = torch.randn(4, 128)
    w[0, 0], w[1, 5], w[3, 7] = float("nan"), float("inf"), -float("inf")
    for g in ("channel", "tensor", "block"):
        with pytest.raises(ValueError, match=r"'lm_head.weight' has 3 non-finite values"):
            fp8.quantize_weight(w, "lm_head.weight", g)
    with pytest.raises(ValueError, match=r"'experts.w1'.*2-D"):
        fp8.quantize_weight(torch.randn(2, 4, 128), "experts.w1", "block")
    with pytest.raises(ValueError, match="static scheme needs an activation scale"):
        fp8.quantize_activation(torch.randn(2, 128), "tensor")
    with pytest.raises(ValueError, match="static scheme needs an activation scale"):
        fp8.fake_quantize_activation(torch.randn(2, 128), "tensor")
    with pytest.raises(ValueError, match="dynamic and computes its own scale"):
        fp8.quantize_activation(torch.randn(2, 128), "token", torch.tensor([1.0]))
    with pytest.raises(ValueError, match=r"K \(last dim\) = 200 is not a multiple of 128"):
        fp8.quantize_activation(torch.randn(2, 200), "group")
    with pytest.raises(ValueError, match="granularity 'row'"):
        fp8.quantize_activation(torch.randn(2, 128), "row")
    with pytest.raises(TypeError, match="float64"):
        fp8.quantize_activation(torch.randn(2, 128, dtype=torch.float64), "token")
    data, scale = fp8.quantize_weight(torch.randn(130, 128), "w", "block")
    with pytest.raises(ValueError, match="do not match granularity 'channel'"):
        fp8.dequantize(data, scale, "channel")


def test_requantize_fused_per_tensor_uses_the_max_scale():
    g = torch.Generator().manual_seed(13)
    shapes_and_mags = [((64, 96), 0.02), ((16, 96), 0.5), ((16, 96), 1e-4)]  # q, k, v
    ws = [(torch.randn(s, generator=g) * m).bfloat16() for s, m in shapes_and_mags]
    ws[2][0, :5] = 0.0
    qs = [fp8.quantize_weight(w, f"qkv.{i}", "tensor") for i, w in enumerate(ws)]
    qs[2] = fp8.QTensor(qs[2].data.clone(), qs[2].scale)
    qs[2].data[0, 5] = -0.0  # a stored -0 (0x80) survives
    fused = fp8.requantize_fused_per_tensor(qs)
    s_max = max(q.scale for q in qs)
    assert fused.data.shape == (96, 96) and torch.equal(fused.scale, s_max.reshape(1))
    parts = fused.data.split([64, 16, 16])
    assert torch.equal(_bits(parts[1]), _bits(qs[1].data))  # the max-scale shard is unchanged
    for part, q in zip(parts, qs):
        expected = (q.data.float() * q.scale / s_max).clamp(-448, 448).to(torch.float8_e4m3fn)
        assert torch.equal(_bits(part), _bits(expected))
        # requantizing with a larger scale adds at most half an e4m3 step of s_max
        err = (part.float() * s_max - q.data.float() * q.scale).abs()
        e4m3_value = q.data.float().abs() * q.scale / s_max
        step = torch.maximum(e4m3_value * 2.0**-4, torch.tensor(2.0**-10))
        assert (err <= step * s_max).all()
    assert _bits(parts[2])[0, 5] == 0x80
    with pytest.raises(ValueError, match="different K"):
        other_k = fp8.quantize_weight(torch.randn(4, 32), "o", "tensor")
        fp8.requantize_fused_per_tensor([qs[0], other_k])
    with pytest.raises(ValueError, match="per-tensor scale"):
        fp8.requantize_fused_per_tensor([qs[0], fp8.quantize_weight(ws[1], "k", "channel")])


# --- INT8 ---


@pytest.mark.parametrize("dtype", FLOATS)
@pytest.mark.parametrize("granularity, shape", [("channel", (37, 96)), ("tensor", (21, 64))])
def test_int8_weight_matches_compressed_tensors(granularity, shape, dtype):
    for seed in range(3):
        w = edge_tensor(shape, dtype, seed)
        ct_data, ct_scale, restored = ct_weight(w, INT8_WEIGHT_ARGS[granularity])
        data, scale = int8.quantize_weight(w, "model.layers.0.self_attn.o_proj.weight", granularity)
        assert data.dtype == torch.int8 and scale.dtype == torch.float32
        assert torch.equal(data, ct_data)
        assert torch.equal(_bits(scale), _bits(ct_scale.float()))
        deq = int8.dequantize(data, scale, granularity).to(dtype)
        assert torch.equal(_bits(deq), _bits(restored))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_activation_matches_compressed_tensors(dtype):
    for seed in range(3):
        x = edge_tensor((3, 7, 160), dtype, seed)
        ct_data, ct_scale, ct_fq = ct_dynamic(x, INT8_ACT_ARGS["token"], torch.int8)
        data, scale = int8.quantize_activation(x, "token")
        assert scale.shape == (3, 7, 1)
        assert torch.equal(data, ct_data)
        assert torch.equal(_bits(scale), _bits(ct_scale.float()))
        assert_same_bits_but_zero_sign(int8.fake_quantize_activation(x, "token"), ct_fq)
        static = torch.tensor([0.0123], dtype=dtype)
        ct_data, ct_fq = ct_static(x, static, INT8_ACT_ARGS["tensor"], torch.int8)
        assert torch.equal(int8.quantize_activation(x, "tensor", static).data, ct_data)
        assert_same_bits_but_zero_sign(int8.fake_quantize_activation(x, "tensor", static), ct_fq)


def test_int8_range_and_double_rounding():
    # scale = 255 / 127.5 = 2: -255 / 2 = -127.5 -> -128 (even); 255 / 2 = 127.5 -> clamped to 127
    x = torch.tensor([[255.0, -255.0, 201.0, -1.0, 3.0, 0.0]], dtype=torch.bfloat16)
    data, scale = int8.quantize_activation(x, "token")
    assert scale.item() == 2.0
    assert data.tolist() == [[127, -128, 100, 0, 2, 0]]  # 100.5 -> 100, -0.5 -> 0, 1.5 -> 2
    # compressed-tensors divides in bf16: 194 / 3 = 64.67 rounds to bf16 64.5, then to the
    # even 64; rounded once it gives 65. Likewise 196 / 3 = 65.33 -> 65.5 -> 66.
    y = torch.tensor([[194.0, 196.0, -194.0]], dtype=torch.bfloat16)
    s = torch.tensor([3.0])
    data = int8.quantize_activation(y, "tensor", s).data
    ct_data, _ = ct_static(y, s.bfloat16(), INT8_ACT_ARGS["tensor"], torch.int8)
    assert torch.equal(data, ct_data) and data.tolist() == [[64, 66, -64]]
    assert int8.quantize_activation(y.float(), "tensor", s).data.tolist() == [[65, 65, -65]]


def test_int8_nonfinite_and_zero_rows():
    x = edge_tensor((5, 64), torch.bfloat16, seed=14)
    bad = x.clone()
    bad[2, 1], bad[4, 63] = float("nan"), -float("inf")
    data, scale = int8.quantize_activation(bad, "token")
    nan_rows = torch.tensor([0, 0, 1, 0, 1], dtype=torch.bool)
    assert torch.equal(scale.isnan().flatten(), nan_rows)
    assert not data[nan_rows].any()
    assert torch.equal(int8.dequantize(data, scale, "token").isnan().all(-1), nan_rows)
    assert torch.equal(int8.fake_quantize_activation(bad, "token").isnan().all(-1), nan_rows)
    clean_data, clean_scale = int8.quantize_activation(x, "token")
    assert torch.equal(data[~nan_rows], clean_data[~nan_rows])
    assert torch.equal(scale[~nan_rows], clean_scale[~nan_rows])
    assert scale[0].item() == 2.0**-7 and not data[0].any()  # the all-zero row: bf16 eps
    # static: +/-Inf clamp to 127 / -128, NaN is stored as 0
    s = torch.tensor([0.5])
    static = int8.quantize_activation(bad, "tensor", s).data
    assert static[2, 1] == 0 and static[4, 63] == -128
    inf_row = torch.tensor([[float("inf"), -float("inf"), 1.0]])
    assert int8.quantize_activation(inf_row, "tensor", s).data.tolist() == [[127, -128, 2]]
    w = torch.randn(3, 16)
    w[1, 1] = float("nan")
    with pytest.raises(ValueError, match=r"'up_proj.weight' has 1 non-finite values"):
        int8.quantize_weight(w, "up_proj.weight", "channel")
    with pytest.raises(ValueError, match="granularity 'block'"):
        int8.quantize_weight(torch.randn(3, 16), "up_proj.weight", "block")
    with pytest.raises(ValueError, match="static scheme needs an activation scale"):
        int8.quantize_activation(x, "tensor")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_int8_fake_quantize_is_dequantize_of_quantize(dtype):
    x = edge_tensor((4, 3, 96), dtype, seed=15)
    x[0, 1, 5], x[3, 2, 0] = float("nan"), float("inf")
    for granularity, scale in (("token", None), ("tensor", torch.tensor([0.01]))):
        q = int8.quantize_activation(x, granularity, scale)
        expected = int8.dequantize(q.data, q.scale, granularity).to(dtype)
        assert_same_bits(int8.fake_quantize_activation(x, granularity, scale), expected)


# --- torch.compile (Inductor, C++ backend): bit-identical to eager ---


@pytest.mark.parametrize(
    "module, granularity",
    [(fp8, "token"), (fp8, "group"), (fp8, "tensor"), (int8, "token"), (int8, "tensor")],
)
def test_compiled_matches_eager(module, granularity):
    # Small on purpose: each Inductor compile takes a few seconds on 2 cores.
    x = edge_tensor((6, 256), torch.bfloat16, seed=16)
    x[4, 40], x[5, 200] = float("nan"), -float("inf")
    # rows whose quotients are rounded twice (to bf16, then to e4m3 / an integer): without
    # the explicit rounding to bf16, Inductor skips it and every case here fails
    x[2, :] = torch.randn(256, generator=torch.Generator().manual_seed(17)).bfloat16()
    x[3, :] = (torch.arange(256) * 0.0371 + 100.0).bfloat16()
    scale = torch.tensor([0.0123]).bfloat16().float() if granularity == "tensor" else None

    def fn(t, s):
        return module.fake_quantize_activation(t, granularity, s), module.quantize_activation(
            t, granularity, s
        )

    (fake, (data, q_scale)) = torch.compile(fn, fullgraph=True)(x, scale)
    eager_fake, (eager_data, eager_scale) = fn(x, scale)
    assert_same_bits(fake, eager_fake)
    assert torch.equal(_bits(data), _bits(eager_data))  # NaN data bytes included (0x7F)
    assert_same_bits(q_scale, eager_scale)
