// Small-M W8A8 linear on FP8 / INT8 tensor cores (sm_89+): y[M, N] = x[M, K] . w[N, K]^T, M <= 16.
//
// Decode-sized batches are bound by the weight bytes. One warp streams a 16-row tile of w
// straight from memory into the A operand of mma.sync.m16n8k32 (e4m3 x e4m3 or s8 x s8, fp32 /
// s32 accumulation): no conversion instruction touches a weight byte. x (already quantized by
// the producer kernel) is the B operand, one n8 tile per 8 rows of x.
//
// Operand order inside a k32 step. The dot product does not care which physical k a logical
// k of the mma stands for, as long as A and B agree. Thread (g = lane / 4, q = lane % 4) holds
// A elements (rows g and g + 8) at logical columns q*4 .. q*4+3 (registers a0 / a1) and
// 16 + q*4 .. 16 + q*4 + 3 (a2 / a3), and B elements (column g) at logical rows q*4 .. +3 (b0)
// and 16 + q*4 .. +3 (b1) (PTX ISA, "Matrix fragments for mma.m16n8k32"). Giving logical
// columns q*4 + i -> physical q*8 + i and 16 + q*4 + i -> physical q*8 + 4 + i, every thread
// reads 8 contiguous bytes of its rows of w and x per step. Two steps share one 16-byte load
// (physical q*16 .. q*16+15: 64 k per pair, inside one 128 block). For MX (GROUP 32) every
// mma must stay inside one 32-k block (each block has its own scales), so a thread reads two
// 8-byte pieces per 64 k instead, physical q*8 .. q*8+7 of each block: one mma per block.
//
// Scales: GROUP 0: per-row (or per-tensor, stride 0) x scale times per-row (or per-tensor)
// w scale, applied once at the end. GROUP 128 (fp8-block): x scale per (row, k/128), w scale
// per (n/128, k/128), applied per 128 k. GROUP 32 (MXFP8): E8M0 bytes per (row, k/32) for
// both, applied per step. Partial sums of a 128 / 32 group come from a zeroed accumulator.
//
// MXFP8 at M <= 4 (MXR, R = 1, 2 or 4 rows of x): with few rows of x, most of the mma's
// eight B columns would be zero. They carry (row, K block) pairs instead: a thread reads 16
// contiguous bytes per 64 k, as in the fp8 path (physical q*16 .. q*16+15), so in a 64-k
// step lanes q = 0, 1 hold block 0 of the step and q = 2, 3 block 1. With C = 4 blocks per
// chunk (R = 1, 2; 128 k) or C = 2 (R = 4; 64 k), B column j = m * C + b holds row m of x
// only in the lanes whose bytes lie in block b of the chunk (zero elsewhere), so the chained
// mmas of a chunk leave the 32-k dot of (row m, block b) in column j: one scale multiply per
// block, row of w and row of x, instead of one per mma output element per block.
//
// Split-K: the warps of a block share one 16-row tile and split K; partial tiles are summed
// through shared memory in a fixed order (deterministic), then scaled, biased and stored.
//
// Loads in flight: a warp loads U = 4 or 8 steps of 64 k (the `steps` argument, M <= 8 only)
// before it consumes them in passes of 4 steps (256 k: one 8-byte word of MX scales per row).
// 8 steps double the registers holding loads; the planner (w8a8_gemv.py) takes them where
// that does not add a wave.

#include <cuda_runtime.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <stdint.h>

#include <type_traits>

namespace {

constexpr int kMaxWarps = 8;

template <bool INT8>
__device__ __forceinline__ void mma_k32(float (&d)[4], int (&di)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                        uint32_t a3, uint32_t b0, uint32_t b1) {
  if constexpr (INT8) {
    asm(
        "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+r"(di[0]), "+r"(di[1]), "+r"(di[2]), "+r"(di[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
  }
}

// Streaming loads: the weight is read once; do not let it evict x or the scales from L1.
// L2::128B: each request fetches the whole 128-byte line from DRAM (measured on H200:
// 3-15% less time than without the qualifier at M = 1 and 16, docs/performance.md).
__device__ __forceinline__ uint4 ld_stream16(const uint8_t* p) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0,%1,%2,%3}, [%4];\n"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(p));
  return v;
}
__device__ __forceinline__ uint2 ld_stream8(const uint8_t* p) {
  uint2 v;
  asm("ld.global.nc.L1::no_allocate.L2::128B.v2.u32 {%0,%1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}
// Two 8-byte pieces, k = p[0..7] and p[32..39]: one per 32-k MX block, as one uint4.
__device__ __forceinline__ uint4 ld_mx_pair(const uint8_t* p) {
  const uint2 lo = ld_stream8(p), hi = ld_stream8(p + 32);
  return make_uint4(lo.x, lo.y, hi.x, hi.y);
}
__device__ __forceinline__ uint4 ld_mx_pair_x(const uint8_t* p) {
  const uint2 lo = *reinterpret_cast<const uint2*>(p), hi = *reinterpret_cast<const uint2*>(p + 32);
  return make_uint4(lo.x, lo.y, hi.x, hi.y);
}

__device__ __forceinline__ float e8m0_to_float(uint32_t e) {
  // OCP MX v1.0 E8M0: 2^(e - 127); 255 is NaN; e = 0 is 2^-127 (an fp32 subnormal).
  const float f = __int_as_float(static_cast<int>(e << 23));
  return e == 255 ? __int_as_float(0x7fc00000) : (e == 0 ? __int_as_float(0x00400000) : f);
}

__device__ __forceinline__ uint32_t byte_of(uint2 v, int b) {  // byte b (0..7) of v
  return ((b < 4 ? v.x : v.y) >> ((b & 3) * 8)) & 0xff;
}

// Byte b (0..7) of v as an E8M0 scale. FAST: exact for bytes 1..254 only (two instructions);
// taken (FE8 kernels) for the passes whose scale words has_special() finds free of 0 and 255.
template <bool FAST>
__device__ __forceinline__ float e8m0_at(uint2 v, int b) {
  if constexpr (FAST) {
    const uint32_t w = b < 4 ? v.x : v.y;
    const int s = (b & 3) * 8;
    return __uint_as_float((s <= 23 ? w << (23 - s) : w >> (s - 23)) & 0x7f800000u);
  } else {
    return e8m0_to_float(byte_of(v, b));
  }
}
// The 8 E8M0 bytes of row `row` from block `blk` on (rows of kb bytes; K % 256 == 0 and
// 8-byte aligned rows keep every word in range and aligned).
__device__ __forceinline__ uint2 e8m0_word(const uint8_t* s, int row, int kb, int blk) {
  return *reinterpret_cast<const uint2*>(s + static_cast<size_t>(row) * kb + blk);
}
__device__ __forceinline__ bool has_special(uint2 v) {  // a byte 0 (2^-127) or 255 (NaN)
  return (__vcmpeq4(v.x, 0u) | __vcmpeq4(v.y, 0u) | __vcmpeq4(v.x, 0xffffffffu) | __vcmpeq4(v.y, 0xffffffffu)) != 0;
}

template <typename T> __device__ __forceinline__ float to_float(T v);
template <> __device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) { return __bfloat162float(v); }
template <> __device__ __forceinline__ float to_float<__half>(__half v) { return __half2float(v); }
template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16(v); }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half(v); }

struct Args {
  const uint8_t* x;      // [M, K] e4m3 / int8 bytes
  const void* xs;        // x scales: GROUP 0 float [M] (stride xs_stride_m, 0 = per tensor);
                         // GROUP 128 float [M, K/128]; GROUP 32 uint8 [M, K/32]
  const uint8_t* w;      // [N, K]
  const void* ws;        // w scales: GROUP 0 float [N] (stride ws_stride_n, 0 = per tensor);
                         // GROUP 128 float [ceil(N/128), ws_stride_n]; GROUP 32 uint8 [N, K/32]
  const void* bias;      // [N] in the output dtype, or null
  void* y;               // [M, N]
  int M, N, K;
  int xs_stride_m, ws_stride_n;
  int k_per_warp;        // multiple of the step (64, or 32 for GROUP 32)
};

// What a warp of either kernel streams: rows n0 + g and n0 + g + 8 of w (clamped in range;
// masked at the store) over its share [k_begin, k_end) of K.
struct WarpTile {
  int g, q, n0, k_begin, k_end, r0, r1;
  const uint8_t* w0;
  const uint8_t* w1;
};
__device__ __forceinline__ WarpTile warp_tile(const Args& a) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  WarpTile w;
  w.g = lane >> 2;
  w.q = lane & 3;
  w.n0 = blockIdx.x * 16;
  w.k_begin = warp * a.k_per_warp;
  w.k_end = min(a.K, w.k_begin + a.k_per_warp);
  w.r0 = min(w.n0 + w.g, a.N - 1);
  w.r1 = min(w.n0 + w.g + 8, a.N - 1);
  w.w0 = a.w + static_cast<size_t>(w.r0) * a.K;
  w.w1 = a.w + static_cast<size_t>(w.r1) * a.K;
  return w;
}

// The end of every kernel here: split-K reduction in a fixed order (warp w writes its tile,
// warp 0 sums w = 0, 1, ...), then per-channel / per-tensor scales (`scaled`: x's, where
// a.xs is not null, times w's), bias, and the store of rows n0 .. n0 + 15 for this block.
template <int NT, typename OutT>
__device__ __forceinline__ void reduce_store(float (&acc)[NT][4], const Args& a, bool scaled) {
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const int g = lane >> 2, q = lane & 3;
  const int n0 = blockIdx.x * 16;
  __shared__ float part[kMaxWarps - 1][NT][4][32];
  if (nwarps > 1) {
    if (warp > 0) {
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) part[warp - 1][t][i][lane] = acc[t][i];
    }
    __syncthreads();
    if (warp > 0) return;
    for (int w = 1; w < nwarps; ++w)
#pragma unroll
      for (int t = 0; t < NT; ++t)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[t][i] += part[w - 1][t][i][lane];
  }

  const OutT* bias = static_cast<const OutT*>(a.bias);
  OutT* y = static_cast<OutT*>(a.y);
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = n0 + g + (i >= 2 ? 8 : 0);
      const int m = t * 8 + q * 2 + (i & 1);
      if (n >= a.N || m >= a.M) continue;
      float v = acc[t][i];
      if (scaled) {
        const float sx = a.xs == nullptr ? 1.f : static_cast<const float*>(a.xs)[static_cast<size_t>(m) * a.xs_stride_m];
        v *= sx * static_cast<const float*>(a.ws)[static_cast<size_t>(n) * a.ws_stride_n];
      }
      if (bias != nullptr) v += to_float(bias[n]);
      y[static_cast<size_t>(m) * a.N + n] = from_float<OutT>(v);
    }
}

// NT: number of n8 tiles of x (M <= 8 * NT). MXR: 0, or R for GROUP 32 with M <= R (see the top).
template <int NT, int GROUP, bool INT8, typename OutT, int MXR = 0, int U = 4, bool FE8 = false>
__global__ void __launch_bounds__(kMaxWarps * 32) w8a8_gemv_kernel(Args a) {
  static_assert(MXR == 0 || (GROUP == 32 && NT == 1 && !INT8 && (MXR == 1 || MXR == 2 || MXR == 4)),
                "MXR is MXFP8 with 1, 2 or 4 rows of x");
  constexpr int C = MXR == 4 ? 2 : 4;  // MXR: blocks per chunk (columns per row of x)
  const int lane = threadIdx.x & 31;
  const WarpTile wt = warp_tile(a);  // locals, not a structured binding: lambdas below capture them
  const int g = wt.g, q = wt.q, n0 = wt.n0, k_begin = wt.k_begin, k_end = wt.k_end, r0 = wt.r0, r1 = wt.r1;
  const uint8_t *w0 = wt.w0, *w1 = wt.w1;
  const int K = a.K;
  const uint8_t* xr[NT];
  bool xin[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int m = t * 8 + g;
    xin[t] = m < a.M;
    xr[t] = a.x + static_cast<size_t>(xin[t] ? m : 0) * K;
  }

  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[t][i] = 0.f;

  // U * 64 k per iteration: U 16-byte loads per row of w and of x in flight per thread,
  // consumed in passes of S = 4 steps (256 k: one 8-byte word of MX scales per row).
  constexpr int S = 4;
  static_assert(U % S == 0, "U: a multiple of 4 steps");
  const float* xsf = static_cast<const float*>(a.xs);
  const float* wsf = static_cast<const float*>(a.ws);
  const uint8_t* xs8 = static_cast<const uint8_t*>(a.xs);
  const uint8_t* ws8 = static_cast<const uint8_t*>(a.ws);
  const int kb = K / 32;
  // MXR: this lane supplies B column g = (row mx_m of x, block g % C of the chunk): in the
  // 64-k steps u whose half (u % (C / 2)) holds that block in lanes q / 2 == g % 2.
  const int mx_m = g / C;
  const bool mx_lane = MXR > 0 && mx_m < MXR && mx_m < a.M && (g & 1) == (q >> 1);
  const uint8_t* mx_x = a.x + static_cast<size_t>(mx_lane ? mx_m : 0) * K;
  for (int k0 = k_begin; k0 < k_end; k0 += U * 64) {
    uint4 wa_all[U], wb_all[U], xv_all[U][NT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool in = k0 + u * 64 < k_end;
      const uint4 zero = make_uint4(0, 0, 0, 0);
      if constexpr (MXR > 0) {
        const int k = k0 + u * 64 + q * 16;
        wa_all[u] = in ? ld_stream16(w0 + k) : zero;
        wb_all[u] = in ? ld_stream16(w1 + k) : zero;
        const bool half = C == 2 || ((g % C) >> 1) == (u & 1);
        xv_all[u][0] = (in && mx_lane && half) ? *reinterpret_cast<const uint4*>(mx_x + k) : zero;
      } else if constexpr (GROUP == 32) {
        const int k = k0 + u * 64 + q * 8;
        wa_all[u] = in ? ld_mx_pair(w0 + k) : zero;
        wb_all[u] = in ? ld_mx_pair(w1 + k) : zero;
#pragma unroll
        for (int t = 0; t < NT; ++t) xv_all[u][t] = (in && xin[t]) ? ld_mx_pair_x(xr[t] + k) : zero;
      } else {
        const int k = k0 + u * 64 + q * 16;
        wa_all[u] = in ? ld_stream16(w0 + k) : zero;
        wb_all[u] = in ? ld_stream16(w1 + k) : zero;
#pragma unroll
        for (int t = 0; t < NT; ++t)
          xv_all[u][t] = (in && xin[t]) ? *reinterpret_cast<const uint4*>(xr[t] + k) : zero;
      }
    }
#pragma unroll
    for (int h = 0; h < U / S; ++h) {  // 256 k per scale word: one pass per 4 loaded steps
      const int kq = k0 + h * S * 64;
      if (kq >= k_end) break;
      const uint4(&wa)[S] = *reinterpret_cast<const uint4(*)[S]>(&wa_all[h * S]);
      const uint4(&wb)[S] = *reinterpret_cast<const uint4(*)[S]>(&wb_all[h * S]);
      const uint4(&xv)[S][NT] = *reinterpret_cast<const uint4(*)[S][NT]>(&xv_all[h * S]);
      if constexpr (MXR > 0) {
        // Chunk c (C blocks: C / 2 steps of 64 k, chained mmas): column j of d is (row j / C of
        // x, block c * C + j % C of this iteration). Lane q holds columns 2q, 2q + 1: row
        // m = 2q / C of x, blocks b0, b0 + 1, for rows g and g + 8 of w.
        const int blk0 = kq / 32;
        const int m = 2 * q / C;
        const uint2 sw0 = e8m0_word(ws8, r0, kb, blk0);
        const uint2 sw1 = e8m0_word(ws8, r1, kb, blk0);
        const uint2 sx = e8m0_word(xs8, min(m, a.M - 1), kb, blk0);
        auto pass = [&](auto fast) {
          constexpr bool F = decltype(fast)::value;
#pragma unroll
          for (int c = 0; c < S / (C / 2); ++c) {
            if (kq + c * C * 32 >= k_end) break;
            float d[4] = {0.f, 0.f, 0.f, 0.f};
            int di[4];
#pragma unroll
            for (int v = c * (C / 2); v < (c + 1) * (C / 2); ++v) {
              mma_k32<false>(d, di, wa[v].x, wb[v].x, wa[v].y, wb[v].y, xv[v][0].x, xv[v][0].y);
              mma_k32<false>(d, di, wa[v].z, wb[v].z, wa[v].w, wb[v].w, xv[v][0].z, xv[v][0].w);
            }
            if (m < MXR) {
              const int b0 = c * C + (2 * q) % C, b1 = b0 + 1;
              const float fx0 = e8m0_at<F>(sx, b0), fx1 = e8m0_at<F>(sx, b1);
              acc[0][0] = fmaf(d[0], e8m0_at<F>(sw0, b0) * fx0, acc[0][0]);
              acc[0][0] = fmaf(d[1], e8m0_at<F>(sw0, b1) * fx1, acc[0][0]);
              acc[0][2] = fmaf(d[2], e8m0_at<F>(sw1, b0) * fx0, acc[0][2]);
              acc[0][2] = fmaf(d[3], e8m0_at<F>(sw1, b1) * fx1, acc[0][2]);
            }
          }
        };
        // warp-uniform: the two versions of the pass hold mma.sync, which every lane must reach
        if (FE8 && !__any_sync(0xffffffffu, has_special(sw0) || has_special(sw1) || has_special(sx)))
          pass(std::integral_constant<bool, FE8>{});
        else
          pass(std::false_type{});
      } else if constexpr (GROUP == 32) {
        // wa[u] / wb[u] / xv[u]: .x .y hold block 2u, .z .w block 2u + 1 (ld_mx_pair): one mma
        // per block into a fresh accumulator, scaled by that block's two E8M0 scales.
        const int blk0 = kq / 32;  // 8 blocks per iteration; K % 256 == 0 keeps these words in range
        const uint2 sw0 = e8m0_word(ws8, r0, kb, blk0);
        const uint2 sw1 = e8m0_word(ws8, r1, kb, blk0);
        uint2 sx0[NT], sx1[NT];
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const int m0 = min(t * 8 + q * 2, a.M - 1), m1 = min(t * 8 + q * 2 + 1, a.M - 1);
          sx0[t] = e8m0_word(xs8, m0, kb, blk0);
          sx1[t] = e8m0_word(xs8, m1, kb, blk0);
        }
#pragma unroll
        for (int u = 0; u < S; ++u) {
          if (kq + u * 64 >= k_end) break;
#pragma unroll
          for (int h = 0; h < 2; ++h) {
            const int b = 2 * u + h;
            const float fw0 = e8m0_at<false>(sw0, b), fw1 = e8m0_at<false>(sw1, b);
#pragma unroll
            for (int t = 0; t < NT; ++t) {
              const uint4& X = xv[u][t];
              float d[4] = {0.f, 0.f, 0.f, 0.f};
              int di[4];
              if (h == 0)
                mma_k32<false>(d, di, wa[u].x, wb[u].x, wa[u].y, wb[u].y, X.x, X.y);
              else
                mma_k32<false>(d, di, wa[u].z, wb[u].z, wa[u].w, wb[u].w, X.z, X.w);
              // accumulator columns (x rows) of this thread: t*8 + q*2 + {0, 1}
              const float fx0 = e8m0_at<false>(sx0[t], b), fx1 = e8m0_at<false>(sx1[t], b);
              acc[t][0] = fmaf(d[0], fw0 * fx0, acc[t][0]);
              acc[t][1] = fmaf(d[1], fw0 * fx1, acc[t][1]);
              acc[t][2] = fmaf(d[2], fw1 * fx0, acc[t][2]);
              acc[t][3] = fmaf(d[3], fw1 * fx1, acc[t][3]);
            }
          }
        }
      } else {
        // Two 64-k steps (128 k, one fp8-block group) into a fresh accumulator, then added:
        // chaining every mma.sync into one accumulator serializes on its latency (measured
        // 25 vs 18 us at M = 1, K x N = 4096 x 12288).
#pragma unroll
        for (int u = 0; u < S; u += 2) {
          if (kq + u * 64 >= k_end) break;
          const int blk = (kq + u * 64) / 128;
          const float sw = GROUP == 128 ? wsf[static_cast<size_t>(n0 / 128) * a.ws_stride_n + blk] : 1.f;
#pragma unroll
          for (int t = 0; t < NT; ++t) {
            float d[4] = {0.f, 0.f, 0.f, 0.f};
            int di[4] = {0, 0, 0, 0};
#pragma unroll
            for (int v = u; v < u + 2; ++v) {
              mma_k32<INT8>(d, di, wa[v].x, wb[v].x, wa[v].y, wb[v].y, xv[v][t].x, xv[v][t].y);
              mma_k32<INT8>(d, di, wa[v].z, wb[v].z, wa[v].w, wb[v].w, xv[v][t].z, xv[v][t].w);
            }
            if constexpr (INT8) {
              // |sum| <= 127 * 127 * 128 < 2^24: exact in fp32
#pragma unroll
              for (int i = 0; i < 4; ++i) acc[t][i] += static_cast<float>(di[i]);
            } else if constexpr (GROUP == 0) {
#pragma unroll
              for (int i = 0; i < 4; ++i) acc[t][i] += d[i];
            } else {
              const int m0 = min(t * 8 + q * 2, a.M - 1), m1 = min(t * 8 + q * 2 + 1, a.M - 1);
              const float sx0 = xsf[static_cast<size_t>(m0) * a.xs_stride_m + blk];
              const float sx1 = xsf[static_cast<size_t>(m1) * a.xs_stride_m + blk];
              acc[t][0] = fmaf(d[0], sw * sx0, acc[t][0]);
              acc[t][1] = fmaf(d[1], sw * sx1, acc[t][1]);
              acc[t][2] = fmaf(d[2], sw * sx0, acc[t][2]);
              acc[t][3] = fmaf(d[3], sw * sx1, acc[t][3]);
            }
          }
        }
      }
    }
  }

  if constexpr (MXR > 0) {
    // acc[0][0] / acc[0][2]: rows g / g + 8 of w, row m = 2q / C of x, over this lane's
    // blocks. With C = 4 a row m of x spans lanes 2m and 2m + 1: sum them (for R = 1, lanes
    // 2 and 3 hold 0 and the sum runs over the quad). Then move the sum for row m of x to
    // the lane and register the store below reads it from: lane q, acc[0][i], m = 2q + i % 2.
    if constexpr (C == 4) {
#pragma unroll
      for (int i = 0; i < 4; i += 2) acc[0][i] += __shfl_xor_sync(0xffffffffu, acc[0][i], 1);
    }
    if constexpr (MXR == 1) {
#pragma unroll
      for (int i = 0; i < 4; i += 2) acc[0][i] += __shfl_xor_sync(0xffffffffu, acc[0][i], 2);
    }
    const float v0 = acc[0][0], v2 = acc[0][2];
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int src = (lane & ~3) | (((2 * q + (i & 1)) * C / 2) & 3);  // the lane holding row m
      acc[0][i] = __shfl_sync(0xffffffffu, i < 2 ? v0 : v2, src);
    }
  }

  reduce_store<NT, OutT>(acc, a, GROUP == 0);
}

// ---------------------------------------------------------------------------------------------
// W8A16: e4m3 weight x bf16 / fp16 activation on bf16 / fp16 tensor cores (mma.sync.m16n8k16,
// fp32 accumulation), M <= 16. Same tiling as above: a warp streams a 16-row tile of w (the
// A operand, converted in registers), x is the B operand (one n8 tile per 8 rows of x), the
// warps of a block split K. Thread (g, q) holds A elements (rows g, g + 8) at logical columns
// 2q, 2q + 1 (a0 / a1) and 2q + 8, 2q + 9 (a2 / a3), B elements (column g) at logical rows
// 2q, 2q + 1 (b0) and 2q + 8, 2q + 9 (b1) (PTX ISA, "Matrix fragments for mma.m16n8k16").
// mma j of a 64-k step reads 4 physical k per thread: bytes 4j .. 4j + 3 (p0 .. p3) of its
// 16-byte piece of each row of w (physical q*16 .. q*16 + 15), and the same k of x. Which
// logical column each p stands for follows the conversion (Cvt below); x's two registers
// are put in the same order.
//
// Conversion, exact for every finite e4m3 code (the NaN code, which mxpass never writes:
// weights are finite by construction, reads as +-480):
// - bf16: a byte s eeee mmm placed at bits 15 / 10..4 of a 16-bit lane is the bf16 of its
//   value times 2^-120 (normal and subnormal codes alike); one bf16x2 multiply by 2^120
//   restores it. Lanes hold (p0, p2) and (p1, p3).
// - fp16: cvt.rn.f16x2.e4m3x2 (sm_89+). Lanes hold (p0, p1) and (p2, p3).
// Scales: per-channel / per-tensor at the end; 128 x 128 blocks per 128 k (two steps into a
// fresh accumulator); MX (GROUP 32, E8M0 per 32 k) per block: a thread reads two 8-byte
// pieces per 64 k (physical q*8 .. q*8 + 7 of each block, as the W8A8 MX path), so mmas
// 0, 1 of a step are block 0 and mmas 2, 3 block 1, each into a fresh accumulator.

template <typename T> struct Cvt;
template <> struct Cvt<__nv_bfloat16> {
  // mul: bf16x2 multiplier, 2^120 (the value itself) or a folded MX scale (fold_mul)
  static __device__ __forceinline__ void weights(uint32_t v, uint32_t& lo, uint32_t& hi, uint32_t mul) {
    const uint32_t t = v << 8;
    lo = ((t & 0x7f007f00u) >> 4) | (t & 0x80008000u);  // (p0, p2) * 2^-120
    hi = ((v & 0x7f007f00u) >> 4) | (v & 0x80008000u);  // (p1, p3) * 2^-120
    const uint32_t z = 0x80008000u;                      // -0: the fma is a * mul exactly
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(lo) : "r"(lo), "r"(mul), "r"(z));
    asm("fma.rn.bf16x2 %0, %1, %2, %3;\n" : "=r"(hi) : "r"(hi), "r"(mul), "r"(z));
  }
  // x words (x[p0], x[p1]) and (x[p2], x[p3]) -> b0 = (x[p0], x[p2]), b1 = (x[p1], x[p3])
  static __device__ __forceinline__ void activations(uint32_t x01, uint32_t x23, uint32_t& b0, uint32_t& b1) {
    b0 = __byte_perm(x01, x23, 0x5410);
    b1 = __byte_perm(x01, x23, 0x7632);
  }
  static __device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};
template <> struct Cvt<__half> {
  static __device__ __forceinline__ void weights(uint32_t v, uint32_t& lo, uint32_t& hi, uint32_t) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(lo) : "h"(static_cast<unsigned short>(v & 0xffffu)));
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;\n" : "=r"(hi) : "h"(static_cast<unsigned short>(v >> 16)));
#endif
  }
  static __device__ __forceinline__ void activations(uint32_t x01, uint32_t x23, uint32_t& b0, uint32_t& b1) {
    b0 = x01;
    b1 = x23;
  }
  static __device__ __forceinline__ void mma(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
};

__device__ __forceinline__ uint32_t word_of(const uint4& v, int j) {
  return j == 0 ? v.x : j == 1 ? v.y : j == 2 ? v.z : v.w;
}

// MX scales folded into the bf16 conversion: the multiplier of a block with E8M0 byte e is
// 2^(e - 7) (2^-120 from the conversion, 2^(e - 127) from the scale), exact in bf16x2 for
// e in 3 .. 134: above, 448 * 2^(e - 127) or the multiplier leaves bf16's range; below, the
// smallest e4m3 steps fall under bf16's. Passes holding another byte (255 = NaN included)
// take the per-block fp32 path.
__device__ __forceinline__ uint32_t fold_mul(uint2 v, int b) {
  return byte_of(v, b) * 0x00800080u + 120u * 0x00800080u;  // bf16x2 of 2^(e - 7), both halves
}
__device__ __forceinline__ bool outside_fold_range(uint2 v) {
  return (__vcmpltu4(v.x, 0x03030303u) | __vcmpltu4(v.y, 0x03030303u) | __vcmpgtu4(v.x, 0x86868686u) |
          __vcmpgtu4(v.y, 0x86868686u)) != 0;
}

// a.x: [M, K] of T; output and bias T; a.xs unused (null).
template <int NT, int GROUP, typename T, int U = 4>
__global__ void __launch_bounds__(kMaxWarps * 32) w8a16_gemv_kernel(Args a) {
  using C = Cvt<T>;
  const WarpTile wt = warp_tile(a);  // locals, not a structured binding: lambdas below capture them
  const int g = wt.g, q = wt.q, n0 = wt.n0, k_begin = wt.k_begin, k_end = wt.k_end, r0 = wt.r0, r1 = wt.r1;
  const uint8_t *w0 = wt.w0, *w1 = wt.w1;
  const int K = a.K;
  const T* x = reinterpret_cast<const T*>(a.x);
  const T* xr[NT];
  bool xin[NT];
#pragma unroll
  for (int t = 0; t < NT; ++t) {
    const int m = t * 8 + g;
    xin[t] = m < a.M;
    xr[t] = x + static_cast<size_t>(xin[t] ? m : 0) * K;
  }

  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[t][i] = 0.f;

  constexpr int S = 4;  // steps per pass (256 k: one 8-byte word of MX scales per row)
  static_assert(U % S == 0, "U: a multiple of 4 steps");
  constexpr uint32_t kPow120 = 0x7b807b80u;  // bf16x2 2^120 (ignored by the fp16 conversion)
  const float* wsf = static_cast<const float*>(a.ws);
  const uint8_t* ws8 = static_cast<const uint8_t*>(a.ws);
  const int kb = K / 32;
  // x piece of a step: elements [k, k + 8) and [k + XHI, k + XHI + 8): 16 k contiguous, or
  // two 8-k pieces 32 apart for MX (the k of the weight bytes this thread holds)
  constexpr int XHI = GROUP == 32 ? 32 : 8;
  for (int k0 = k_begin; k0 < k_end; k0 += U * 64) {
    uint4 wa_all[U], wb_all[U], xa_all[U][NT], xb_all[U][NT];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const bool in = k0 + u * 64 < k_end;
      const uint4 zero = make_uint4(0, 0, 0, 0);
      const int k = k0 + u * 64 + q * (GROUP == 32 ? 8 : 16);
      if constexpr (GROUP == 32) {
        wa_all[u] = in ? ld_mx_pair(w0 + k) : zero;
        wb_all[u] = in ? ld_mx_pair(w1 + k) : zero;
      } else {
        wa_all[u] = in ? ld_stream16(w0 + k) : zero;
        wb_all[u] = in ? ld_stream16(w1 + k) : zero;
      }
#pragma unroll
      for (int t = 0; t < NT; ++t) {
        xa_all[u][t] = (in && xin[t]) ? *reinterpret_cast<const uint4*>(xr[t] + k) : zero;
        xb_all[u][t] = (in && xin[t]) ? *reinterpret_cast<const uint4*>(xr[t] + k + XHI) : zero;
      }
    }
#pragma unroll
    for (int h = 0; h < U / S; ++h) {
      const int kq = k0 + h * S * 64;
      if (kq >= k_end) break;
      uint2 sw0 = make_uint2(0, 0), sw1 = make_uint2(0, 0);
      if constexpr (GROUP == 32) {
        sw0 = e8m0_word(ws8, r0, kb, kq / 32);
        sw1 = e8m0_word(ws8, r1, kb, kq / 32);
      }
      // FOLD: MX scales in the conversion's multiplier, sums per 128 k as for channel scales;
      // else MX blocks each into a fresh accumulator, scaled in fp32
      auto pass = [&](auto fold) {
        constexpr bool FOLD = decltype(fold)::value;
        constexpr bool PER_BLOCK = GROUP == 32 && !FOLD;
        float d[NT][4];
        auto zero_d = [&] {
#pragma unroll
          for (int t = 0; t < NT; ++t)
#pragma unroll
            for (int i = 0; i < 4; ++i) d[t][i] = 0.f;
        };
#pragma unroll
        for (int u = 0; u < S; ++u) {
          if (kq + u * 64 >= k_end) break;
          const int v = h * S + u;
          if (!PER_BLOCK && u % 2 == 0) zero_d();
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            uint32_t a0, a1, a2, a3;  // rows g / g + 8, logical columns 2q.. / 2q + 8..
            C::weights(word_of(wa_all[v], j), a0, a2, FOLD ? fold_mul(sw0, 2 * u + j / 2) : kPow120);
            C::weights(word_of(wb_all[v], j), a1, a3, FOLD ? fold_mul(sw1, 2 * u + j / 2) : kPow120);
            if (PER_BLOCK && j % 2 == 0) zero_d();
#pragma unroll
            for (int t = 0; t < NT; ++t) {
              const uint4& X = j < 2 ? xa_all[v][t] : xb_all[v][t];
              uint32_t b0, b1;
              C::activations(j % 2 == 0 ? X.x : X.z, j % 2 == 0 ? X.y : X.w, b0, b1);
              C::mma(d[t], a0, a1, a2, a3, b0, b1);
            }
            if (PER_BLOCK && j % 2 == 1) {  // block 2u + j / 2 done: scale it by its E8M0 bytes
              const int b = 2 * u + j / 2;
              const float fw0 = e8m0_at<false>(sw0, b), fw1 = e8m0_at<false>(sw1, b);
#pragma unroll
              for (int t = 0; t < NT; ++t) {
                acc[t][0] = fmaf(d[t][0], fw0, acc[t][0]);
                acc[t][1] = fmaf(d[t][1], fw0, acc[t][1]);
                acc[t][2] = fmaf(d[t][2], fw1, acc[t][2]);
                acc[t][3] = fmaf(d[t][3], fw1, acc[t][3]);
              }
            }
          }
          const bool group_end = u % 2 == 1 || kq + (u + 1) * 64 >= k_end;
          if (!PER_BLOCK && group_end) {  // 128 k (or K's end) into acc, with its block scale
            const float sw =
                GROUP == 128 ? wsf[static_cast<size_t>(n0 / 128) * a.ws_stride_n + (kq + u * 64) / 128] : 1.f;
#pragma unroll
            for (int t = 0; t < NT; ++t)
#pragma unroll
              for (int i = 0; i < 4; ++i) acc[t][i] = fmaf(d[t][i], sw, acc[t][i]);
          }
        }
      };
      // warp-uniform: both versions of the pass hold mma.sync, which every lane must reach
      if constexpr (GROUP == 32 && std::is_same<T, __nv_bfloat16>::value) {
        if (!__any_sync(0xffffffffu, outside_fold_range(sw0) || outside_fold_range(sw1)))
          pass(std::true_type{});
        else
          pass(std::false_type{});
      } else {
        pass(std::false_type{});
      }
    }
  }
  reduce_store<NT, T>(acc, a, GROUP == 0);
}

// One block per 16 rows of w, `warps` warps splitting K; smem: see launch_typed.
template <typename Kernel>
cudaError_t launch_grid(Kernel kernel, const Args& a, int warps, int smem, cudaStream_t stream) {
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  kernel<<<dim3((a.N + 15) / 16), dim3(warps * 32), smem, stream>>>(a);
  return cudaGetLastError();
}

template <int NT, int GROUP, typename T, int U>
cudaError_t launch_a16_nt(const Args& a, int warps, int smem, cudaStream_t stream) {
  return launch_grid(w8a16_gemv_kernel<NT, GROUP, T, U>, a, warps, smem, stream);
}

// One n8 tile of x (M <= 8) with 4 or 8 steps per iteration; two (M <= 16) with 4.
template <int GROUP, typename T>
cudaError_t launch_a16(const Args& a, int warps, int steps, int smem, cudaStream_t stream) {
  if (a.M > 8) return launch_a16_nt<2, GROUP, T, 4>(a, warps, smem, stream);
  return steps == 8 ? launch_a16_nt<1, GROUP, T, 8>(a, warps, smem, stream)
                    : launch_a16_nt<1, GROUP, T, 4>(a, warps, smem, stream);
}

template <int NT, int GROUP, bool INT8, typename OutT, int MXR = 0, int U = 4, bool FE8 = false>
cudaError_t launch_nt(const Args& a, int warps, int smem, cudaStream_t stream) {
  return launch_grid(w8a8_gemv_kernel<NT, GROUP, INT8, OutT, MXR, U, FE8>, a, warps, smem, stream);
}

// One n8 tile of x (M <= 8): 4 or 8 steps of 64 k loaded per iteration.
template <int GROUP, bool INT8, typename OutT, int MXR = 0, bool FE8 = false>
cudaError_t launch_steps(const Args& a, int warps, int steps, int smem, cudaStream_t stream) {
  return steps == 8 ? launch_nt<1, GROUP, INT8, OutT, MXR, 8, FE8>(a, warps, smem, stream)
                    : launch_nt<1, GROUP, INT8, OutT, MXR, 4, FE8>(a, warps, smem, stream);
}

// MXFP8 at M <= 4 (MXR), with or without the two-instruction E8M0 decode.
template <typename OutT, int MXR>
cudaError_t launch_mxr(const Args& a, int warps, int steps, bool fe8, int smem, cudaStream_t stream) {
  return fe8 ? launch_steps<32, false, OutT, MXR, true>(a, warps, steps, smem, stream)
             : launch_steps<32, false, OutT, MXR, false>(a, warps, steps, smem, stream);
}

// smem: dynamic shared memory per block that the kernel does not use; it caps the blocks per
// SM (fewer, longer weight streams per SM read DRAM faster here; see the notes).
template <int GROUP, bool INT8, typename OutT>
cudaError_t launch_typed(const Args& a, int warps, int steps, bool fe8, int smem, cudaStream_t stream) {
  if constexpr (GROUP == 32) {
    if (a.M == 1) return launch_mxr<OutT, 1>(a, warps, steps, fe8, smem, stream);
    if (a.M == 2) return launch_mxr<OutT, 2>(a, warps, steps, fe8, smem, stream);
    if (a.M <= 4) return launch_mxr<OutT, 4>(a, warps, steps, fe8, smem, stream);
  }
  return a.M <= 8 ? launch_steps<GROUP, INT8, OutT>(a, warps, steps, smem, stream)
                  : launch_nt<2, GROUP, INT8, OutT>(a, warps, smem, stream);
}

}  // namespace

// group: 0 (per-row / per-tensor scales), 32 (MXFP8, E8M0 byte scales), 128 (fp8-block).
// int8: operands are int8 (group must be 0). out_bf16: output (and bias) bf16, else fp16.
// warps: 1..8, splitting K; k_per_warp: a multiple of 128 (256 for group 32); steps: 64-k steps
// loaded per iteration at M <= 8 (4 or 8; M > 8 always 4); fe8: MXFP8 at M <= 4 decodes its
// E8M0 scales with two instructions where a pass's scale words hold no 0 / 255 byte (more
// registers); smem: see launch_typed.
extern "C" int mxpass_w8a8_gemv(const void* x, const void* xs, int xs_stride_m, const void* w,
                                const void* ws, int ws_stride_n, const void* bias, void* y, int M,
                                int N, int K, int group, int int8, int out_bf16, int warps,
                                int k_per_warp, int steps, int fe8, int smem, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return 0;
  Args a{static_cast<const uint8_t*>(x), xs, static_cast<const uint8_t*>(w), ws, bias, y,
         M, N, K, xs_stride_m, ws_stride_n, k_per_warp};
  cudaError_t err;
  if (int8) {
    err = out_bf16 ? launch_typed<0, true, __nv_bfloat16>(a, warps, steps, fe8 != 0, smem, stream)
                   : launch_typed<0, true, __half>(a, warps, steps, fe8 != 0, smem, stream);
  } else if (group == 32) {
    err = out_bf16 ? launch_typed<32, false, __nv_bfloat16>(a, warps, steps, fe8 != 0, smem, stream)
                   : launch_typed<32, false, __half>(a, warps, steps, fe8 != 0, smem, stream);
  } else if (group == 128) {
    err = out_bf16 ? launch_typed<128, false, __nv_bfloat16>(a, warps, steps, fe8 != 0, smem, stream)
                   : launch_typed<128, false, __half>(a, warps, steps, fe8 != 0, smem, stream);
  } else {
    err = out_bf16 ? launch_typed<0, false, __nv_bfloat16>(a, warps, steps, fe8 != 0, smem, stream)
                   : launch_typed<0, false, __half>(a, warps, steps, fe8 != 0, smem, stream);
  }
  return static_cast<int>(err);
}

// W8A16: x [M, K] bf16 (x_bf16) or fp16, output and bias the same dtype; w e4m3 [N, K] with
// scales as mxpass_w8a8_gemv's (group 0, 32 or 128); warps, k_per_warp, steps (M <= 8 only),
// smem: as there.
extern "C" int mxpass_w8a16_gemv(const void* x, const void* w, const void* ws, int ws_stride_n, const void* bias,
                                 void* y, int M, int N, int K, int group, int x_bf16, int warps, int k_per_warp,
                                 int steps, int smem, cudaStream_t stream) {
  if (M <= 0 || N <= 0) return 0;
  Args a{static_cast<const uint8_t*>(x), nullptr, static_cast<const uint8_t*>(w), ws, bias, y,
         M, N, K, 0, ws_stride_n, k_per_warp};
  cudaError_t err;
  if (group == 32) {
    err = x_bf16 ? launch_a16<32, __nv_bfloat16>(a, warps, steps, smem, stream)
                 : launch_a16<32, __half>(a, warps, steps, smem, stream);
  } else if (group == 128) {
    err = x_bf16 ? launch_a16<128, __nv_bfloat16>(a, warps, steps, smem, stream)
                 : launch_a16<128, __half>(a, warps, steps, smem, stream);
  } else {
    err = x_bf16 ? launch_a16<0, __nv_bfloat16>(a, warps, steps, smem, stream)
                 : launch_a16<0, __half>(a, warps, steps, smem, stream);
  }
  return static_cast<int>(err);
}
