"""The decoder-layer benchmark's pieces that run without a GPU: kernel classes and the layer."""

import torch

from mxpass.benchmarks import layer


def test_kernel_classes():
    assert layer.kernel_class("nvjet_sm90_qqtst_128x128_128x6_2x1_v_bz_coopA_algo2_Ablk128_Bvec128_TNN") == "gemm"
    assert layer.kernel_class("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128") == "gemm"
    assert layer.kernel_class("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7") == "attention"
    assert layer.kernel_class("pytorch_flash::flash_fwd_kernel<Flash_fwd_kernel_traits>") == "attention"
    # Inductor kernels are "other" even when their fused names mention _scaled_mm or attention
    assert layer.kernel_class("triton_red_fused___rshift____scaled_mm__to_copy_abs_add_amax") == "other"
    assert layer.kernel_class("triton_poi_fused__scaled_dot_product_cudnn_attention_add_cat") == "other"
    assert layer.kernel_class("Memset (Unknown)") == "other"
    # mxpass's own GEMM kernels count as GEMM; its activation quantization does not
    assert layer.kernel_class("_int8_mm_kernel") == "gemm"
    assert layer.kernel_class("_mxfp8_dot_kernel") == "gemm"
    assert layer.kernel_class("w8a8_gemv_kernel") == "gemm"
    assert layer.kernel_class("_act_quant_kernel") == "other"


def test_layer_runs_and_has_the_seven_linears():
    cfg = dict(layer.LLAMA_8B, hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2)
    mod, (h, cos, sin) = layer.build(cfg, tokens=5, device="cpu", dtype=torch.float32)
    linears = [m for m in mod.modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 7 and all(m.weight.std() < 0.03 for m in linears)
    with torch.no_grad():
        y = mod(h, cos, sin)
    assert y.shape == h.shape and torch.isfinite(y).all()
