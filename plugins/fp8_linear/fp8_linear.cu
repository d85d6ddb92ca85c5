// FP8 linear for few rows, exactly the product of a calibrated fp8 layer (dlmtrt/models/quantized.py):
//   xq[m,k] = e4m3_satfinite(x[m,k] / sx)                       (static per-tensor activation scale)
//   y[m,n]  = (sum_k xq[m,k] * wq[n,k]) * sx * sw[n] + bias[n]   (fp32 accumulation, one rounding to T)
//
// Why our own kernel: a denoising step at batch 1 with a K/V cache computes a handful of rows, so every linear is
// a matrix-vector product bound by reading the weights. cuBLAS's FP8 GEMMs (torch._scaled_mm) are tiled for
// large M and at one row are no faster than the bf16 GEMV (bench/fp8_gemm.py), so FP8's halved weight bytes did
// not become time. Here a block streams a few weight rows with 16-byte loads and keeps all M rows' partial sums
// in registers, so the weights are read once for the M rows and nothing is padded to a tile.
//
// Two launches: the activations are quantised once into a scratch buffer (M*K bytes), then every warp reads
// them from L1/L2 as it streams its weight rows. A compiled step passes activations it already quantised (the
// quantisation fuses into the kernel that produced them), and only the second launch runs.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <stdio.h>

namespace {

constexpr int kMaxRows = 4;
char g_error[256];

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

template <typename T>
__global__ void quantize_kernel(const T* __restrict__ x, const float* __restrict__ sx, __nv_fp8_storage_t* __restrict__ xq,
                                int64_t n) {
  const float s = *sx;
  for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n; i += (int64_t)gridDim.x * blockDim.x)
    xq[i] = __nv_cvt_float_to_fp8(to_f(x[i]) / s, __NV_SATFINITE, __NV_E4M3);
}

// 16 e4m3 values (one uint4) to floats; e4m3 -> half is exact.
__device__ __forceinline__ void unpack16(const uint4& v, float* f) {
  const __nv_fp8x2_storage_t* p = reinterpret_cast<const __nv_fp8x2_storage_t*>(&v);
#pragma unroll
  for (int i = 0; i < 8; ++i) {
    __half2_raw h = __nv_cvt_fp8x2_to_halfraw2(p[i], __NV_E4M3);
    float2 f2 = __half22float2(*reinterpret_cast<__half2*>(&h));
    f[2 * i] = f2.x;
    f[2 * i + 1] = f2.y;
  }
}

// grid ceil(N / (WARPS / SPLIT * R)); block WARPS * 32. The block's warps form WARPS / SPLIT groups of SPLIT warps;
// a group owns output columns n0 .. n0 + R - 1, and its 32 * SPLIT threads read 16 bytes each of every
// 512 * SPLIT-byte stripe of those weight rows, U stripes per round trip to memory. SPLIT > 1 divides long rows
// among warps (more blocks for few, long rows: the SMs share the work evenly) and sums the parts in shared memory.
template <typename T, int M, int R, int U, int WARPS, int SPLIT>
__global__ void __launch_bounds__(WARPS * 32)
gemv_kernel(const __nv_fp8_storage_t* __restrict__ xq, const __nv_fp8_storage_t* __restrict__ w,
            const float* __restrict__ sw, const float* __restrict__ sx, const T* __restrict__ bias,
            T* __restrict__ y, int N, int K) {
  constexpr int GROUPS = WARPS / SPLIT;
  constexpr int STRIDE = 32 * SPLIT;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int part = warp % SPLIT;
  const int n0 = (blockIdx.x * GROUPS + warp / SPLIT) * R;
  if (SPLIT == 1 && n0 >= N) return;
  float acc[M][R];
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) acc[m][r] = 0.f;
  const uint4* wrow[R];
#pragma unroll
  for (int r = 0; r < R; ++r) wrow[r] = reinterpret_cast<const uint4*>(w + (int64_t)min(n0 + r, N - 1) * K);
  const uint4* xrow = reinterpret_cast<const uint4*>(xq);
  const int chunks = n0 < N ? K / 16 : 0;
  for (int c0 = part * 32 + lane; c0 < chunks; c0 += STRIDE * U) {
    uint4 wv[U][R];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int r = 0; r < R; ++r)
        wv[u][r] = c0 + STRIDE * u < chunks ? __ldcs(wrow[r] + c0 + STRIDE * u) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int c = c0 + STRIDE * u;
      if (c >= chunks) break;
      float wf[R][16];
#pragma unroll
      for (int r = 0; r < R; ++r) unpack16(wv[u][r], wf[r]);
#pragma unroll
      for (int m = 0; m < M; ++m) {
        float xf[16];
        unpack16(__ldg(xrow + (int64_t)m * chunks + c), xf);
#pragma unroll
        for (int r = 0; r < R; ++r)
#pragma unroll
          for (int i = 0; i < 16; ++i) acc[m][r] = fmaf(xf[i], wf[r][i], acc[m][r]);
      }
    }
  }
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc[m][r] += __shfl_xor_sync(0xffffffffu, acc[m][r], o);
  if constexpr (SPLIT > 1) {
    __shared__ float parts[WARPS][M * R];
    if (lane < M * R) {
#pragma unroll
      for (int m = 0; m < M; ++m)
#pragma unroll
        for (int r = 0; r < R; ++r)
          if (lane == m * R + r) parts[warp][lane] = acc[m][r];
    }
    __syncthreads();
    if (part != 0 || n0 >= N) return;
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        float a = 0.f;
#pragma unroll
        for (int p = 0; p < SPLIT; ++p) a += parts[warp + p][m * R + r];
        acc[m][r] = a;
      }
  }
  const float s = *sx;
#pragma unroll
  for (int m = 0; m < M; ++m)
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int n = n0 + r;
      if (lane == (m * R + r) % 32 && n < N) {
        float v = acc[m][r] * s * sw[n];
        if (bias != nullptr) v += to_f(bias[n]);
        y[(int64_t)m * N + n] = from_f<T>(v);
      }
    }
}

template <typename T, int M, int R, int U, int WARPS, int SPLIT>
cudaError_t launch_cfg(const __nv_fp8_storage_t* xq, const __nv_fp8_storage_t* w, const float* sw, const float* sx,
                       const T* bias, T* y, int N, int K, cudaStream_t s) {
  constexpr int cols = WARPS / SPLIT * R;
  gemv_kernel<T, M, R, U, WARPS, SPLIT><<<(N + cols - 1) / cols, WARPS * 32, 0, s>>>(xq, w, sw, sx, bias, y, N, K);
  return cudaGetLastError();
}

// One configuration per row count (warps per block, warps per group, weight rows per group, loads per round),
// for every shape: of the 156 that bench/fp8_kernel_sweep.py times on an H200 over every Dream-7B projection at
// 1-4 rows (bench/results/fp8-sweep-h200.json), the one whose slowest projection is nearest its best (one row:
// within 3% on each; 2-4 rows: within 8-15%, against 14-52% for one row's choice). One row wants small blocks
// of four warps sharing four weight rows, which spread the work evenly over the SMs; more rows make the
// kernel compute-bound, and then fewer warps per row and more loads in flight win.
template <typename T, int M>
cudaError_t launch_m(const __nv_fp8_storage_t* xq, const __nv_fp8_storage_t* w, const float* sw, const float* sx,
                     const T* bias, T* y, int N, int K, cudaStream_t s) {
  if constexpr (M == 1) return launch_cfg<T, M, 4, 1, 4, 4>(xq, w, sw, sx, bias, y, N, K, s);
  if constexpr (M == 2) return launch_cfg<T, M, 2, 1, 4, 2>(xq, w, sw, sx, bias, y, N, K, s);
  if constexpr (M == 3) return launch_cfg<T, M, 4, 4, 4, 2>(xq, w, sw, sx, bias, y, N, K, s);
  return launch_cfg<T, M, 4, 4, 2, 1>(xq, w, sw, sx, bias, y, N, K, s);
}

// x null: xq already holds the quantised activations (a compiled step quantises them in the kernel before).
template <typename T>
cudaError_t launch(const void* x, const void* w, const float* sw, const float* sx, const void* bias, void* xq,
                   void* y, int M, int N, int K, cudaStream_t s) {
  auto* q = static_cast<__nv_fp8_storage_t*>(xq);
  if (x != nullptr) {
    const int64_t n = (int64_t)M * K;
    const int qblocks = (int)((n + 255) / 256 < 1024 ? (n + 255) / 256 : 1024);
    quantize_kernel<T><<<qblocks, 256, 0, s>>>(static_cast<const T*>(x), sx, q, n);
    cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) return e;
  }
  auto* wq = static_cast<const __nv_fp8_storage_t*>(w);
  auto* b = static_cast<const T*>(bias);
  auto* out = static_cast<T*>(y);
  switch (M) {
    case 1: return launch_m<T, 1>(q, wq, sw, sx, b, out, N, K, s);
    case 2: return launch_m<T, 2>(q, wq, sw, sx, b, out, N, K, s);
    case 3: return launch_m<T, 3>(q, wq, sw, sx, b, out, N, K, s);
    default: return launch_m<T, 4>(q, wq, sw, sx, b, out, N, K, s);
  }
}

}  // namespace

extern "C" {

// The C ABI (dlmtrt/plugins/fp8_linear.py calls it through ctypes). Contiguous layouts, device pointers:
// x [M, K] and y [M, N] in `dtype` (1 fp16, 2 bf16); w [N, K] e4m3; w_scale [N] fp32; x_scale one fp32;
// bias [N] in `dtype` or null; xq_scratch M*K bytes (16-byte aligned), or, with x null, the activations already
// quantised (e4m3 of x / x_scale). 1 <= M <= 4, K a multiple of 16.
// Returns 0, or a nonzero code with dlmtrt_fp8_linear_error() saying why.
int dlmtrt_fp8_linear(const void* x, const void* w, const void* w_scale, const void* x_scale, const void* bias,
                      void* xq_scratch, void* y, int M, int N, int K, int dtype, void* stream) {
  if (M < 0 || M > kMaxRows || N <= 0 || K <= 0 || K % 16 != 0) {
    snprintf(g_error, sizeof g_error, "bad shape: M=%d N=%d K=%d (1 <= M <= %d, K a multiple of 16)", M, N, K,
             kMaxRows);
    return 1;
  }
  if (M == 0) return 0;
  if ((reinterpret_cast<uintptr_t>(w) | reinterpret_cast<uintptr_t>(xq_scratch)) % 16 != 0) {
    snprintf(g_error, sizeof g_error, "w and xq_scratch must be 16-byte aligned");
    return 2;
  }
  const float* sw = static_cast<const float*>(w_scale);
  const float* sx = static_cast<const float*>(x_scale);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t e;
  switch (dtype) {
    case 1: e = launch<__half>(x, w, sw, sx, bias, xq_scratch, y, M, N, K, s); break;
    case 2: e = launch<__nv_bfloat16>(x, w, sw, sx, bias, xq_scratch, y, M, N, K, s); break;
    default:
      snprintf(g_error, sizeof g_error, "dtype code %d is not supported (1 fp16, 2 bf16)", dtype);
      return 3;
  }
  if (e != cudaSuccess) {
    snprintf(g_error, sizeof g_error, "kernel launch failed: %s", cudaGetErrorString(e));
    return 4;
  }
  return 0;
}

const char* dlmtrt_fp8_linear_error(void) { return g_error; }

#ifdef DLMTRT_FP8_SWEEP
}  // extern "C"

namespace {
template <int M>
int sweep_m(const __nv_fp8_storage_t* q, const __nv_fp8_storage_t* wq, const float* sw, const float* sx,
            __nv_bfloat16* out, int N, int K, int warps, int split, int rows, int unroll, cudaStream_t s) {
#define DLMTRT_CFG(W, S, R, U)                                                                              \
  if (warps == W && split == S && rows == R && unroll == U)                                                  \
    return launch_cfg<__nv_bfloat16, M, R, U, W, S>(q, wq, sw, sx, nullptr, out, N, K, s) == cudaSuccess ? 0 : 4;
#define DLMTRT_CFG_U(W, S, R) DLMTRT_CFG(W, S, R, 1) DLMTRT_CFG(W, S, R, 2) DLMTRT_CFG(W, S, R, 4) DLMTRT_CFG(W, S, R, 8)
#define DLMTRT_CFG_R(W, S) DLMTRT_CFG_U(W, S, 1) DLMTRT_CFG_U(W, S, 2) DLMTRT_CFG_U(W, S, 4)
  DLMTRT_CFG_R(1, 1)
  DLMTRT_CFG_R(2, 1) DLMTRT_CFG_R(2, 2)
  DLMTRT_CFG_R(4, 1) DLMTRT_CFG_R(4, 2) DLMTRT_CFG_R(4, 4)
  DLMTRT_CFG_R(8, 1) DLMTRT_CFG_R(8, 2) DLMTRT_CFG_R(8, 4) DLMTRT_CFG_R(8, 8)
  DLMTRT_CFG_R(16, 4) DLMTRT_CFG_R(16, 8) DLMTRT_CFG_R(16, 16)
#undef DLMTRT_CFG_R
#undef DLMTRT_CFG_U
#undef DLMTRT_CFG
  return -1;
}
}  // namespace

extern "C" {
// Benchmark-only entry (bench/fp8_kernel_sweep.py, built by `make fp8-sweep`): bf16 output, pre-quantised
// activations [M, K], an explicit launch configuration. Returns -1 for a configuration not instantiated.
int dlmtrt_fp8_linear_sweep(const void* xq, const void* w, const void* w_scale, const void* x_scale, void* y, int M,
                            int N, int K, int warps, int split, int rows, int unroll, void* stream) {
  auto* q = static_cast<const __nv_fp8_storage_t*>(xq);
  auto* wq = static_cast<const __nv_fp8_storage_t*>(w);
  auto* sw = static_cast<const float*>(w_scale);
  auto* sx = static_cast<const float*>(x_scale);
  auto* out = static_cast<__nv_bfloat16*>(y);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  switch (M) {
    case 1: return sweep_m<1>(q, wq, sw, sx, out, N, K, warps, split, rows, unroll, s);
    case 2: return sweep_m<2>(q, wq, sw, sx, out, N, K, warps, split, rows, unroll, s);
    case 3: return sweep_m<3>(q, wq, sw, sx, out, N, K, warps, split, rows, unroll, s);
    case 4: return sweep_m<4>(q, wq, sw, sx, out, N, K, warps, split, rows, unroll, s);
    default: return -1;
  }
}
#endif

int dlmtrt_fp8_linear_abi_version(void) { return 1; }

int dlmtrt_fp8_linear_max_rows(void) { return kMaxRows; }

}  // extern "C"
