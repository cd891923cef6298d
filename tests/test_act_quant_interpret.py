"""Activation quantization in one pass (kernels/triton/act_quant.py) on the CPU, through
Triton's interpreter (TRITON_INTERPRET=1, in a child process).

Rows of x, or of silu(x) * up, quantized per token (e4m3, int8), in 1 x 128 e4m3 groups or as
MXFP8 (e4m3 with E8M0 bytes per 32),
for bf16 and fp16, with an all-zero row, a row holding NaN, one holding Inf, a row of small
values, rows strided inside a wider tensor, and M = 0; compared with
``mxpass.quant.quantize_activation`` of the same values. The interpreter converts float32 to
e4m3 wrongly (124.3 -> 64), so e4m3 data are checked as the float32 values the kernel would
convert (``store_f32``), and those values, converted by torch, must equal the reference's
bytes; int8 data are checked as stored. The GPU test checks the hardware conversion.
"""

import textwrap

from tests.conftest import run_under_triton_interpreter

_CHILD = textwrap.dedent(
    """
    import torch
    import torch.nn.functional as F
    from mxpass import quant
    from mxpass.formats import get_format
    from mxpass.kernels.triton import act_quant
    from mxpass.schemes._common import round_to

    torch.manual_seed(0)
    nanfill = lambda t: torch.nan_to_num(t, nan=7.0)
    # grouped formats: one program per row (the default chunk holds these rows), and rows in
    # chunks of 128 elements (fp8-block: one group per program; MXFP8: 4, the last chunk of
    # K = 96 partly outside the row)
    for chunk, scheme in [(1024, s) for s in ("fp8-dynamic", "fp8-block", "int8", "mxfp8")] + [
            (128, "fp8-block"), (128, "mxfp8")]:
        act_quant.CHUNK = chunk
        fmt = get_format(scheme)
        for dtype in (torch.bfloat16, torch.float16):
            for silu, M in ((False, 7), (True, 7)) + (((False, 20),) if fmt.activation == "group" else ()):
                K = 384
                wide = (torch.randn(M, K + 128) * 3).to(dtype)
                x = wide[:, 64:64 + K]  # rows strided inside a wider tensor
                x[1] = 0
                x[2, 5] = float("nan")
                x[3, 7] = float("inf")
                x[4] *= 1e-3
                up = torch.randn(M, K).to(dtype) if silu else None
                y = F.silu(x) * up if silu else x
                ref_data, ref_scale = quant.quantize_activation(fmt, y, None)
                data, scale = act_quant.launch(x, up, scheme, store_f32=fmt.family != "int8")
                where = (scheme, dtype, silu, M, chunk)
                cast = torch.where(data.isnan(), float("nan"), data).to(torch.float8_e4m3fn)
                if fmt.family == "mxfp8":  # E8M0 bytes, 255 = NaN
                    assert scale.dtype == torch.uint8 and scale.shape == (M, K // 32), where
                    assert torch.equal(scale, ref_scale.view(torch.uint8)), where
                    assert (scale[2:4] == 255).any(1).all() and not (scale[[0, 1, 4, 5, 6]] == 255).any(), where
                    assert not torch.signbit(data[data == 0]).any(), where
                    assert torch.equal(cast.view(torch.uint8), ref_data.view(torch.uint8)), where
                    continue
                if fmt.activation == "group":  # cuBLAS block scaling's layout beyond decode sizes
                    assert scale.stride() == ((1, M) if M > 16 else (K // 128, 1)), (where, scale.stride())
                assert torch.equal(nanfill(scale), nanfill(ref_scale.reshape(scale.shape))), where
                assert torch.isnan(scale[2:4]).any(1).all() and not torch.isnan(scale[[0, 1, 4, 5, 6]]).any(), where
                if fmt.family == "int8":
                    assert data.dtype == torch.int8 and torch.equal(data, ref_data), where
                    continue
                s = ref_scale.reshape(M, -1).repeat_interleave(K // ref_scale.reshape(M, -1).shape[1], dim=1)
                pre = round_to(y.float() / s, dtype).clamp(-448, 448)
                pre = torch.where(pre == 0, 0.0, pre)
                assert torch.equal(nanfill(data), nanfill(pre)), where
                assert not torch.signbit(data[data == 0]).any(), where  # -0 stored as +0
                assert torch.equal(cast.view(torch.uint8), ref_data.view(torch.uint8)), where
    # MXFP8 quantize-dequantize (fake=True), of x or of silu(x) * up: mxfp8.fake_quantize's
    # values bit for bit, with the same NaN / Inf / zero / small rows, strided rows, and K = 96
    # (3 blocks, not a power of two)
    from mxpass.schemes import mxfp8
    for chunk, dtype in ((1024, torch.bfloat16), (1024, torch.float16), (128, torch.bfloat16)):
        act_quant.CHUNK = chunk
        for K, silu in ((384, False), (96, False), (384, True)):
            wide = (torch.randn(7, K + 64) * 3).to(dtype)
            x = wide[:, 32:32 + K]
            x[1] = 0
            x[2, 5] = float("nan")
            x[3, 7] = float("inf")
            x[4] *= 1e-3
            up = torch.randn(7, K).to(dtype) if silu else None
            y = torch.ops.mxpass.mx_fake_quant_triton(x, up)
            ref = mxfp8.fake_quantize(F.silu(x) * up if silu else x)
            where = (dtype, K, silu, chunk)
            assert y.dtype == dtype and y.shape == x.shape, where
            assert torch.equal(y.isnan(), ref.isnan()) and y.isnan()[2:4].any(1).all(), where
            assert torch.equal(torch.nan_to_num(y).view(torch.int16), torch.nan_to_num(ref).view(torch.int16)), where
    try:
        act_quant.launch(torch.zeros(2, 256, dtype=torch.bfloat16), None, "fp8-dynamic", fake=True)
        raise AssertionError("fake quantization of fp8-dynamic accepted")
    except ValueError as e:
        assert "mxfp8 only" in str(e)
    data, scale = act_quant.launch(torch.zeros(0, 256, dtype=torch.bfloat16), None, "fp8-dynamic")
    assert data.shape == (0, 256) and scale.shape == (0, 1)
    print("ok")
    """
)


def test_act_quant_kernel_matches_the_reference_under_the_interpreter():
    run_under_triton_interpreter(_CHILD, timeout=600)
