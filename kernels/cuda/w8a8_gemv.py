"""Small-M linear on tensor cores: the CUDA kernels of ``w8a8_gemv.cu`` as the custom ops
``mxpass::w8a8_gemv`` (FP8 / INT8 weights and activations) and ``mxpass::w8a16_gemv``
(e4m3 weights, bf16 / fp16 activations).

    y = mxpass.ops w8a8_gemv(xq [M, K], xs, qweight [N, K], wscale, bias, group, out_dtype)
    y = mxpass.ops w8a16_gemv(x [M, K], qweight [N, K], wscale, bias, group)

M <= 16 (decode batches). ``xq`` is the activation already quantized (e4m3 or int8) with
its scale ``xs``; ``x`` is the activation as the model computes it (its dtype is the
output's). The weight is mxpass's stored layout. ``group``: 0 (per-token or per-tensor
activation scale x per-channel or per-tensor weight scale), 128 (fp8-block: 1x128
activation groups, 128x128 weight blocks), 32 (MXFP8: E8M0 scales per 32 along K).

The kernel is compiled on first use with the nvcc of the CUDA toolkit that torch finds
(``torch.utils.cpp_extension.CUDA_HOME``) for this GPU's architecture, into a small shared
library with a C entry point (no torch headers: ~5 s instead of a minute), cached under
``$MXPASS_CACHE`` (default ``~/.cache/mxpass``) by source hash, and loaded with ctypes.
It launches on the current CUDA stream, so it is captured by CUDA graphs.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import subprocess
import tempfile
import threading

import torch

MAX_M = 16
_SOURCE = os.path.join(os.path.dirname(__file__), "w8a8_gemv.cu")
_LOCK = threading.Lock()
_LIBS: dict[tuple[int, int], ctypes.CDLL] = {}


class BuildError(RuntimeError):
    pass


def nvcc_path() -> str | None:
    """The nvcc that builds the kernel, or None when there is no CUDA toolkit."""
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME:
        path = os.path.join(CUDA_HOME, "bin", "nvcc")
        if os.path.exists(path):
            return path
    return None


def _build(capability: tuple[int, int]) -> str:
    nvcc = nvcc_path()
    if nvcc is None:
        raise BuildError("mxpass: the CUDA W8A8 GEMV needs nvcc (a CUDA toolkit; set CUDA_HOME)")
    with open(_SOURCE, "rb") as f:
        source = f.read()
    arch = f"sm_{capability[0]}{capability[1]}"
    key = hashlib.sha256(source + arch.encode() + nvcc.encode()).hexdigest()[:16]
    root = os.environ.get("MXPASS_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "mxpass"))
    out_dir = os.path.join(root, "cuda", key)
    lib = os.path.join(out_dir, "libmxpass_w8a8_gemv.so")
    if os.path.exists(lib):
        return lib
    os.makedirs(out_dir, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=out_dir)
    os.close(fd)
    cmd = [nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC", f"-arch={arch}", "-o", tmp, _SOURCE]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        os.unlink(tmp)
        raise BuildError(f"mxpass: building the CUDA W8A8 GEMV failed ({' '.join(cmd)}):\n{proc.stderr}")
    os.replace(tmp, lib)  # atomic: a concurrent build writes the same bytes
    return lib


def library(device: torch.device) -> ctypes.CDLL:
    cap = torch.cuda.get_device_capability(device)
    with _LOCK:
        if cap not in _LIBS:
            lib = ctypes.CDLL(_build(cap))
            fn = lib.mxpass_w8a8_gemv
            fn.restype = ctypes.c_int
            ptr, i32 = ctypes.c_void_p, ctypes.c_int
            # x, xs, xs_stride_m, w, ws, ws_stride_n, bias, y, then M N K group int8 out_bf16
            # warps k_per_warp steps fe8 smem, then the stream
            fn.argtypes = [ptr, ptr, i32, ptr, ptr, i32, ptr, ptr] + [i32] * 11 + [ptr]
            fn = lib.mxpass_w8a16_gemv
            fn.restype = ctypes.c_int
            # x, w, ws, ws_stride_n, bias, y, then M N K group x_bf16 warps k_per_warp steps smem, the stream
            fn.argtypes = [ptr, ptr, ptr, i32, ptr, ptr] + [i32] * 9 + [ptr]
            _LIBS[cap] = lib
        return _LIBS[cap]


def group_of(fmt) -> int:
    """The kernel's ``group`` for a format: the K extent of one weight scale (32 for MX, 128
    for fp8-block), 0 where a scale spans all of K (per-channel, per-tensor)."""
    return fmt.block if fmt.block > 1 else 0


def _step(group: int) -> int:
    return {0: 128, 128: 128, 32: 256}[group]


def shape_problem(k: int, group: int) -> str | None:
    """Why the kernel cannot take in-features ``k`` with scale groups ``group`` (None: it can)."""
    if k % _step(group):
        return f"K={k} must be a multiple of {_step(group)}"
    return None


def plan(n: int, k: int, group: int, num_sms: int = 132, m: int = 1) -> tuple[int, int, int, bool]:
    """(warps per block, K per warp, 64-k steps loaded per iteration, fast E8M0 decode) for
    M = ``m``. A block owns 16 output rows; its warps split K.

    Measured on H200 (docs/performance.md): 4 warps per block when the grid then holds at
    least ~20 warps per SM (N = 12288: 18.0 us with 4, 20.8 with 8; N = 28672: 36.7 / 35.9),
    8 when N is small (N = 4096, K = 14336: 21.3 us with 8, 28.5 with 4); each warp keeps
    at least 256 k. Steps: 8 (512 k, twice the registers) for per-channel / per-tensor scales
    when the grid takes more than one wave anyway (N = 28672: fp8-dynamic 32.3 -> 29.5 us at
    M = 1) or a warp walks a long K (K = 14336, N = 4096: 18.2 -> 17.3; int8 18.8 -> 16.4) or
    the grid has at most one block per SM and a warp at least 512 k (N = 2048: 6.0 -> 5.4);
    else 4, where the larger register file would add a wave (N = 12288: 14.7 with 4, 16.3
    with 8). MXFP8 and fp8-block keep 4 (mixed or worse with 8). The wave test counts the
    warps launched: K = 2560 / 3584, N = 9216 launch 7 per block, within 32 warps per SM (the
    8 planned were past it), and 4 steps took 8.6 / 10.6 us there, 8 steps 11.0 / 13.0
    (fp8-dynamic, M = 1).

    Fast E8M0 decode (MXFP8 at M <= 4; two instructions per scale where a 256-k pass holds no
    0 / 255 byte, at 80-92 registers instead of 58-74): at M = 3, 4 always (4096 x 12288
    15.9 -> 15.4 us, 4096 x 28672 35.0 -> 32.5, 14336 x 4096 19.7 -> 17.6); at M = 1, 2
    only where the grid fits 16 warps per SM (14336 x 4096: 19.2 -> 17.5), since at 92
    registers a larger grid takes another wave (4096 x 12288: 15.5 -> 17.5).

    fp8-block (128 x 128 scales) at M <= 8 takes 8 warps wherever each keeps >= 512 k, also
    on grids past ~20 warps per SM (M = 1, 4 -> 8 warps, us: 4096 x 12288 15.4 -> 14.9,
    4096 x 28672 31.6 -> 29.6, 5120 x 13824 23.8 -> 21.1, 8192 x 28672 61.7 -> 57.2; M = 8
    16.3 -> 15.5 and 32.8 -> 30.8), but not at M = 9..16 (two n8 tiles of x; M = 16: 19.1 ->
    19.2, 35.0 -> 38.9, 24.1 -> 26.7, 66.3 -> 73.0)."""
    step = _step(group)
    tiles = -(-n // 16)
    warps = 1
    while warps < 4 and k // (warps * 2) >= 256:
        warps *= 2
    while warps < 8 and tiles * warps < num_sms * 20 and k // (warps * 2) >= 256:
        warps *= 2
    if group == 128 and m <= 8 and k // 8 >= 512:
        warps = 8  # fp8-block with one n8 tile of x: 8 warps of >= 512 k also on large grids
    warps, per = _split_k(k, warps, step)
    steps = 8 if group == 0 and (tiles * warps > num_sms * 32 or per >= 1536 or (tiles <= num_sms and per >= 512)) else 4
    fe8 = group == 32 and (3 <= m <= 4 or (m <= 2 and tiles * warps <= num_sms * 16))
    return warps, per, steps, fe8


def _split_k(k: int, warps: int, step: int) -> tuple[int, int]:
    """(warps launched, K per warp) for ``warps`` warps splitting ``k`` in multiples of ``step``."""
    per = -(-k // warps)
    per = -(-per // step) * step
    return -(-k // per), per  # rounding per up can leave the last warp empty


def plan_a16(n: int, k: int, group: int, num_sms: int = 132, m: int = 1) -> tuple[int, int, int]:
    """(warps per block, K per warp, 64-k steps loaded per iteration) of the W8A16 kernel for
    M = ``m``. Sweep on H100 (docs/performance.md, fp8-w / fp8-w-block / mxfp8-w, K x N in
    4096 x {1024, 4096, 12288, 28672}, 14336 x 4096):

    - M <= 8: 8 warps wherever each keeps >= 512 k: best or within 4% of the best of
      1 / 2 / 4 / 8 warps x 4 / 8 steps in 14 of 15 cells (fp8-w 4096 x 28672: 43.9 us
      against 42.0 with 4 warps and 8 steps); 8 steps where the grid has at most one block
      per SM (N = 1024: 5.0 / 5.2 / 5.4 us against 6.0 / 5.6 / 5.9 with 4).
    - M = 9..16 (two n8 tiles of x, 125-128 registers): the fewest warps that give the grid
      ~12 warps per SM (4096 x 12288: 2 warps 21.4 us, 4 warps 22.9; 4096 x 28672: 1, 2 and
      4 warps within 2%; 256 tiles or fewer: 8 warps, 13-19% ahead of 4). MX (148 registers)
      between 2 and 4 where the grid has a block per SM (4096 x 28672: 1 warp 71.6 us, 2
      58.5, 4 55.3; 256 tiles: 4 warps 11.7 / 30.5 us, 8 warps 15.1 / 35.7)."""
    step = _step(group)
    tiles = -(-n // 16)
    if m <= 8 and k // 8 >= 512:
        warps = 8
    elif m > 8:
        warps = 1
        while warps < 8 and tiles * warps < num_sms * 11.6 and k // (warps * 2) >= 256:
            warps *= 2
        if group == 32 and tiles >= num_sms:  # MX: 2 to 4 warps (148 registers)
            warps = min(max(warps, 2), 4)
    else:
        warps = 1
        while warps < 8 and k // (warps * 2) >= 256:
            warps *= 2
    warps, per = _split_k(k, warps, step)
    return warps, per, 8 if m <= 8 and tiles <= num_sms else 4


def _check_shapes(op: str, x, w, group: int) -> None:
    m, k = x.shape
    if m > MAX_M:
        raise ValueError(f"mxpass::{op}: M={m} rows; the kernel takes at most {MAX_M}")
    if w.shape[1] != k:
        raise ValueError(f"mxpass::{op}: x has K={k}, weight {tuple(w.shape)}")
    why = shape_problem(k, group)
    if why:
        raise ValueError(f"mxpass::{op}: {why}")


def _check_bias(op: str, bias, n: int, dtype) -> None:
    if bias is not None and (bias.dtype != dtype or bias.numel() != n):
        raise ValueError(f"mxpass::{op}: bias must be [{n}] {dtype}, got {tuple(bias.shape)} {bias.dtype}")


def _check(xq, xs, w, ws, bias, group: int, out_dtype) -> None:
    _check_shapes("w8a8_gemv", xq, w, group)
    int8 = xq.dtype == torch.int8
    if xq.dtype not in (torch.float8_e4m3fn, torch.int8) or w.dtype != xq.dtype:
        raise TypeError(f"mxpass::w8a8_gemv: x and weight must both be float8_e4m3fn or int8, got "
                        f"{xq.dtype} and {w.dtype}")
    if int8 and group != 0:
        raise ValueError("mxpass::w8a8_gemv: int8 takes per-token/per-tensor scales only (group 0)")
    if out_dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"mxpass::w8a8_gemv: output must be bf16 or fp16, got {out_dtype}")
    _check_bias("w8a8_gemv", bias, w.shape[0], out_dtype)


def _weight_scale_args(op: str, ws, n: int, k: int, group: int):
    """(ws, its row stride) as the kernels read the weight's scales (``op`` names the caller in errors)."""
    if group == 32:
        # the kernels read 8 E8M0 bytes at a time: rows are 8-byte multiples (K % 256 == 0),
        # and a view starting off an 8-byte boundary is copied
        ws8 = ws.reshape(n, k // 32).view(torch.uint8).contiguous()
        return (ws8 if ws8.data_ptr() % 8 == 0 else ws8.clone()), 0
    if group == 128:
        return ws.float().contiguous(), ws.shape[-1]
    wsf = ws.reshape(-1).float().contiguous()
    if wsf.numel() not in (1, n):
        raise ValueError(f"mxpass::{op}: weight scales {tuple(ws.shape)} are neither per-channel nor "
                         f"per-tensor for N={n}")
    return wsf, int(wsf.numel() != 1)


def _scale_args(xs, ws, m: int, n: int, k: int, group: int):
    """(xs, xs row stride, ws, ws row stride) as the kernel reads them."""
    ws_, ws_stride = _weight_scale_args("w8a8_gemv", ws, n, k, group)
    if group == 32:
        xs8 = xs.reshape(m, k // 32).view(torch.uint8).contiguous()
        return (xs8 if xs8.data_ptr() % 8 == 0 else xs8.clone()), 0, ws_, ws_stride
    if group == 128:
        kb = -(-k // 128)
        return xs.reshape(m, kb).float().contiguous(), kb, ws_, ws_stride
    xsf = xs.reshape(-1).float().contiguous()
    if xsf.numel() not in (1, m):
        raise ValueError(f"mxpass::w8a8_gemv: activation scales {tuple(xs.shape)} are neither per-token nor "
                         f"per-tensor for M={m}")
    return xsf, int(xsf.numel() != 1), ws_, ws_stride


def w8a8_gemv_into(y, xq, xs, w, ws, bias, group: int, warps: int | None = None, k_per_warp: int | None = None,
                   smem: int = 0, steps: int = 4, fast_e8m0: bool = False) -> None:
    """Launch the kernel into ``y`` [M, N] (benchmarks pass their own ``warps`` / ``k_per_warp`` /
    ``smem`` / ``steps`` / ``fast_e8m0``: see ``plan``)."""
    m, k = xq.shape
    n = w.shape[0]
    if m == 0:
        return
    xq, w = xq.contiguous(), w.contiguous()
    for t, what in ((xq, "x"), (w, "weight")):
        if t.data_ptr() % 16:
            raise ValueError(f"mxpass::w8a8_gemv: {what} must be 16-byte aligned")
    xs_, xs_stride, ws_, ws_stride = _scale_args(xs, ws, m, n, k, group)
    if warps is None:
        warps, k_per_warp, steps, fast_e8m0 = plan(n, k, group, torch.cuda.get_device_properties(xq.device).multi_processor_count, m)
    stream = torch.cuda.current_stream(xq.device).cuda_stream
    err = library(xq.device).mxpass_w8a8_gemv(
        xq.data_ptr(), xs_.data_ptr(), xs_stride, w.data_ptr(), ws_.data_ptr(), ws_stride,
        None if bias is None else bias.contiguous().data_ptr(), y.data_ptr(), m, n, k, group,
        int(xq.dtype == torch.int8), int(y.dtype == torch.bfloat16), warps, k_per_warp, steps, int(fast_e8m0), smem, stream)
    if err:
        raise RuntimeError(f"mxpass::w8a8_gemv: CUDA launch failed (cudaError {err})")


@torch.library.custom_op("mxpass::w8a8_gemv", mutates_args=())
def w8a8_gemv(xq: torch.Tensor, xs: torch.Tensor, w: torch.Tensor, ws: torch.Tensor,
              bias: torch.Tensor | None, group: int, out_dtype: torch.dtype) -> torch.Tensor:
    """y [M, N] in ``out_dtype`` = (xq * xs) @ (w * ws)^T + bias, fp32 accumulation (module docstring)."""
    _check(xq, xs, w, ws, bias, group, out_dtype)
    if xq.device.type != "cuda":
        raise ValueError(f"mxpass::w8a8_gemv: needs CUDA tensors, got {xq.device}")
    y = torch.empty(xq.shape[0], w.shape[0], device=xq.device, dtype=out_dtype)
    w8a8_gemv_into(y, xq, xs, w, ws, bias, group)
    return y


@w8a8_gemv.register_fake
def _w8a8_gemv_fake(xq, xs, w, ws, bias, group, out_dtype):
    _check(xq, xs, w, ws, bias, group, out_dtype)
    return xq.new_empty((xq.shape[0], w.shape[0]), dtype=out_dtype)


def _check_a16(x, w, ws, bias, group: int) -> None:
    _check_shapes("w8a16_gemv", x, w, group)
    if x.dtype not in (torch.bfloat16, torch.float16):
        raise TypeError(f"mxpass::w8a16_gemv: x must be bf16 or fp16, got {x.dtype}")
    if w.dtype != torch.float8_e4m3fn:
        raise TypeError(f"mxpass::w8a16_gemv: weight must be float8_e4m3fn, got {w.dtype}")
    _check_bias("w8a16_gemv", bias, w.shape[0], x.dtype)


def w8a16_gemv_into(y, x, w, ws, bias, group: int, warps: int | None = None, k_per_warp: int | None = None,
                    smem: int = 0, steps: int = 4) -> None:
    """Launch the W8A16 kernel into ``y`` [M, N] (x's dtype; benchmarks pass their own
    ``warps`` / ``k_per_warp`` / ``smem`` / ``steps``: see ``plan_a16``)."""
    m, k = x.shape
    n = w.shape[0]
    if m == 0:
        return
    x, w = x.contiguous(), w.contiguous()
    for t, what in ((x, "x"), (w, "weight")):
        if t.data_ptr() % 16:
            raise ValueError(f"mxpass::w8a16_gemv: {what} must be 16-byte aligned")
    ws_, ws_stride = _weight_scale_args("w8a16_gemv", ws, n, k, group)
    if warps is None:
        warps, k_per_warp, steps = plan_a16(n, k, group, torch.cuda.get_device_properties(x.device).multi_processor_count, m)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    err = library(x.device).mxpass_w8a16_gemv(
        x.data_ptr(), w.data_ptr(), ws_.data_ptr(), ws_stride, None if bias is None else bias.contiguous().data_ptr(),
        y.data_ptr(), m, n, k, group, int(x.dtype == torch.bfloat16), warps, k_per_warp, steps, smem, stream)
    if err:
        raise RuntimeError(f"mxpass::w8a16_gemv: CUDA launch failed (cudaError {err})")


@torch.library.custom_op("mxpass::w8a16_gemv", mutates_args=())
def w8a16_gemv(x: torch.Tensor, w: torch.Tensor, ws: torch.Tensor, bias: torch.Tensor | None,
               group: int) -> torch.Tensor:
    """y [M, N] in x's dtype = x @ (w * ws)^T + bias, bf16 / fp16 tensor cores with fp32
    accumulation (the weight converted exactly in registers; module docstring)."""
    _check_a16(x, w, ws, bias, group)
    if x.device.type != "cuda":
        raise ValueError(f"mxpass::w8a16_gemv: needs CUDA tensors, got {x.device}")
    y = torch.empty(x.shape[0], w.shape[0], device=x.device, dtype=x.dtype)
    w8a16_gemv_into(y, x, w, ws, bias, group)
    return y


@w8a16_gemv.register_fake
def _w8a16_gemv_fake(x, w, ws, bias, group):
    _check_a16(x, w, ws, bias, group)
    return x.new_empty((x.shape[0], w.shape[0]))
