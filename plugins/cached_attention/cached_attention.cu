// Cached attention, exactly the ONNX node dlmtrt::CachedAttention (dlmtrt/export/attention.py):
//   o[b,h,a] = sum_l softmax_l(scale * q[b,h,a] . k[b,g(h),l] over allowed[b,a,l]) * v[b,g(h),l],  g(h) = h / (H/Hkv)
//   allowed[b,a,l] = valid[b,l] && (mask_type == 0 || kpos[b,l] / block <= qpos[b,a] / block)
// (mask_type 0 bidirectional, 1 block_causal: dlmtrt/models/attention_kinds.py) with probability 0 for keys a
// query may not attend and o = 0 for a query with none. Key validity is a vector and the block test is computed
// from positions on the fly: no [A, L] mask is ever materialized.
//
// Two paths behind one C ABI. fp16 and bf16 run on tensor cores (attention_mma.cuh: FlashAttention-2 on
// mma.sync, the query heads of a GQA group sharing each K/V tile, key splits when few rows are active). fp32
// keeps the scalar kernel below (fp32 accuracy, 1e-5, rules out bf16/tf32 tensor cores): one warp owns one
// query row and walks the keys 32 at a time with an online softmax (lane j scores key j; each lane accumulates
// D/32 output dims). A block has 8 warps; with few active rows the warps split the keys of the same rows
// instead (flash-decoding inside the block) and combine their partial softmaxes at the end.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>
#include <stdio.h>

#include "attention_mma.cuh"

namespace {

constexpr int kWarps = 8;

__device__ __forceinline__ float to_f(float x) { return x; }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ float from_f<float>(float x) { return x; }

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// grid (ceil(A / rows), H, B); block kWarps * 32. `rows` query rows per block, kWarps / rows key stripes per row.
template <typename T, int D>
__global__ void __launch_bounds__(kWarps * 32)
cached_attention_kernel(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
                        const uint8_t* __restrict__ valid, const int64_t* __restrict__ qpos,
                        const int64_t* __restrict__ kpos, T* __restrict__ o, int H, int Hkv, int A, int L,
                        float scale, int rows, int mask_type, int block, int heads_inner) {
  constexpr int P = D / 32;  // output dims per lane
  __shared__ float qs[kWarps][D];
  __shared__ float part_m[kWarps], part_l[kWarps];
  __shared__ float part_o[kWarps][D];

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int stripes = kWarps / rows;
  const int r = warp % rows, stripe = warp / rows;
  const int b = blockIdx.z, h = blockIdx.y, a = blockIdx.x * rows + r;
  const int g = h / (H / Hkv);
  const bool live = a < A;

  const size_t row = heads_inner ? ((size_t)b * A + (live ? a : 0)) * H + h : ((size_t)b * H + h) * A + (live ? a : 0);
  const T* qrow = q + row * D;
  for (int d = lane; d < D; d += 32) qs[warp][d] = live ? to_f(qrow[d]) * scale : 0.f;
  __syncwarp();

  const T* kb = k + ((size_t)b * Hkv + g) * (size_t)L * D;
  const T* vb = v + ((size_t)b * Hkv + g) * (size_t)L * D;
  const uint8_t* vm = valid + (size_t)b * L;
  const int64_t* kp = kpos + (size_t)b * L;
  const bool causal = mask_type == 1;
  const int64_t qblock = causal && live ? qpos[(size_t)b * A + a] / block : 0;

  float m = -CUDART_INF_F, l = 0.f, acc[P];
#pragma unroll
  for (int i = 0; i < P; ++i) acc[i] = 0.f;

  const int tiles = (L + 31) / 32;
  for (int t = stripe; live && t < tiles; t += stripes) {
    const int key = t * 32 + lane;
    float s = -CUDART_INF_F;
    if (key < L && vm[key] && (!causal || kp[key] / block <= qblock)) {
      const T* kr = kb + (size_t)key * D;
      float dot = 0.f;
#pragma unroll 16
      for (int d = 0; d < D; ++d) dot += qs[warp][d] * to_f(kr[d]);
      s = dot;
    }
    const float m_new = fmaxf(m, warp_max(s));
    if (m_new == -CUDART_INF_F) continue;  // nothing valid yet
    const float corr = __expf(m - m_new);  // m = -inf -> 0
    const float p = (s == -CUDART_INF_F) ? 0.f : __expf(s - m_new);
    l = l * corr + warp_sum(p);
#pragma unroll
    for (int i = 0; i < P; ++i) acc[i] *= corr;
    const int n = min(32, L - t * 32);
    for (int j = 0; j < n; ++j) {
      const float pj = __shfl_sync(0xffffffffu, p, j);
      if (pj == 0.f) continue;  // warp-uniform
      const T* vr = vb + (size_t)(t * 32 + j) * D + lane * P;
#pragma unroll
      for (int i = 0; i < P; ++i) acc[i] += pj * to_f(vr[i]);
    }
    m = m_new;
  }

  if (lane == 0) { part_m[warp] = m; part_l[warp] = l; }
#pragma unroll
  for (int i = 0; i < P; ++i) part_o[warp][lane * P + i] = acc[i];
  __syncthreads();
  if (stripe != 0 || !live) return;

  float M = -CUDART_INF_F;
  for (int s2 = 0; s2 < stripes; ++s2) M = fmaxf(M, part_m[s2 * rows + r]);
  float Lsum = 0.f, out[P];
#pragma unroll
  for (int i = 0; i < P; ++i) out[i] = 0.f;
  if (M != -CUDART_INF_F) {
    for (int s2 = 0; s2 < stripes; ++s2) {
      const int w = s2 * rows + r;
      const float f = __expf(part_m[w] - M);
      Lsum += part_l[w] * f;
#pragma unroll
      for (int i = 0; i < P; ++i) out[i] += part_o[w][lane * P + i] * f;
    }
  }
  const float inv = Lsum > 0.f ? 1.f / Lsum : 0.f;
  T* orow = o + row * D + lane * P;
#pragma unroll
  for (int i = 0; i < P; ++i) orow[i] = from_f<T>(out[i] * inv);
}

template <typename T, int D>
cudaError_t launch_scalar(const void* q, const void* k, const void* v, const uint8_t* valid, const int64_t* qpos,
                   const int64_t* kpos, void* o, int B, int H, int Hkv, int A, int L, float scale, int mask_type,
                   int block, cudaStream_t stream, int heads_inner) {
  const int rows = A >= 8 ? 8 : A >= 4 ? 4 : A >= 2 ? 2 : 1;
  dim3 grid((A + rows - 1) / rows, H, B);
  cached_attention_kernel<T, D><<<grid, kWarps * 32, 0, stream>>>(
      static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v), valid, qpos, kpos,
      static_cast<T*>(o), H, Hkv, A, L, scale, rows, mask_type, block, heads_inner);
  return cudaGetLastError();
}

thread_local char g_error[256] = "";

}  // namespace

extern "C" {

// The C ABI every caller uses (the torch op through ctypes, the TensorRT plugin's enqueue). Contiguous layouts:
// q, o [B, H, A, D], or with qo_layout 1 the same tensors in [B, A, H, D] memory order (what a model's
// projections give, so the torch backends pass them without a copy either way); k, v [B, Hkv, L, D]; valid [B, L] one byte per key; qpos [B, A], kpos [B, L] int64
// sequence positions (read only for block_causal). dtype: 0 fp32, 1 fp16, 2 bf16. mask_type: 0 bidirectional,
// 1 block_causal with block >= 1. q, k, v and o 16-byte aligned. `workspace` (device memory, may be null with
// workspace_bytes 0) holds the key splits of few-row launches: dlmtrt_cached_attention_workspace_size says how
// much a shape uses; with less, the launch splits less (same result, slower at few rows). Returns 0, or a
// nonzero code with dlmtrt_cached_attention_error() saying why.
int dlmtrt_cached_attention(const void* q, const void* k, const void* v, const void* valid, const void* qpos,
                            const void* kpos, void* o, int B, int H, int Hkv, int A, int L, int D, float scale,
                            int dtype, int mask_type, int block, void* workspace, size_t workspace_bytes,
                            void* stream, int qo_layout) {
  if (B < 0 || H <= 0 || Hkv <= 0 || A < 0 || L < 0 || H % Hkv != 0) {
    snprintf(g_error, sizeof g_error, "bad shape: B=%d H=%d Hkv=%d A=%d L=%d (H must be a multiple of Hkv)", B, H,
             Hkv, A, L);
    return 1;
  }
  if (mask_type != 0 && mask_type != 1) {
    snprintf(g_error, sizeof g_error, "mask_type %d is not supported (0 bidirectional, 1 block_causal)", mask_type);
    return 5;
  }
  if (mask_type == 1 && (block < 1 || qpos == nullptr || kpos == nullptr)) {
    snprintf(g_error, sizeof g_error, "block_causal needs block >= 1 (got %d) and query and key positions", block);
    return 5;
  }
  if (qo_layout != 0 && qo_layout != 1) {
    snprintf(g_error, sizeof g_error, "qo_layout %d is not supported (0 [B, H, A, D], 1 [B, A, H, D])", qo_layout);
    return 7;
  }
  if (B == 0 || A == 0) return 0;
  if (D != 64 && D != 128) {
    snprintf(g_error, sizeof g_error, "head_dim %d is not supported (64 or 128)", D);
    return 2;
  }
  if (dtype < 0 || dtype > 2) {
    snprintf(g_error, sizeof g_error, "dtype code %d is not supported (0 fp32, 1 fp16, 2 bf16)", dtype);
    return 3;
  }
  const uintptr_t align = (uintptr_t)q | (uintptr_t)k | (uintptr_t)v | (uintptr_t)o;
  if (align % 16) {
    snprintf(g_error, sizeof g_error, "misaligned pointers: q, k, v and o must be 16-byte aligned (got q=%p k=%p "
             "v=%p o=%p)", q, k, v, o);
    return 6;
  }
  if (workspace_bytes && ((uintptr_t)workspace % 16 || workspace == nullptr)) {
    snprintf(g_error, sizeof g_error, "the workspace must be 16-byte aligned device memory (got %p, %zu bytes)",
             workspace, workspace_bytes);
    return 6;
  }
  const uint8_t* m = static_cast<const uint8_t*>(valid);
  const int64_t* qp = static_cast<const int64_t*>(qpos);
  const int64_t* kp = static_cast<const int64_t*>(kpos);
  cudaStream_t s = static_cast<cudaStream_t>(stream);
  cudaError_t e;
#define DLMTRT_MMA(T)                                                                                          \
  e = D == 64 ? mma_attention::launch<T, 64>(q, k, v, m, qp, kp, o, B, H, Hkv, A, L, scale, mask_type, block,  \
                                              workspace, workspace_bytes, s, qo_layout)                       \
              : mma_attention::launch<T, 128>(q, k, v, m, qp, kp, o, B, H, Hkv, A, L, scale, mask_type, block, \
                                               workspace, workspace_bytes, s, qo_layout)
  switch (dtype) {
    case 0:
      e = D == 64 ? launch_scalar<float, 64>(q, k, v, m, qp, kp, o, B, H, Hkv, A, L, scale, mask_type, block, s,
                                             qo_layout)
                  : launch_scalar<float, 128>(q, k, v, m, qp, kp, o, B, H, Hkv, A, L, scale, mask_type, block, s,
                                              qo_layout);
      break;
    case 1: DLMTRT_MMA(__half); break;
    default: DLMTRT_MMA(__nv_bfloat16); break;
  }
#undef DLMTRT_MMA
  if (e != cudaSuccess) {
    snprintf(g_error, sizeof g_error, "kernel launch failed: %s", cudaGetErrorString(e));
    return 4;
  }
  return 0;
}

// Bytes of workspace the launch of this shape uses (0 for fp32 and for launches that need no key splits); with
// A = 0, the most any launch of head_dim D may use (what a TensorRT plugin reserves once).
size_t dlmtrt_cached_attention_workspace_size(int B, int H, int Hkv, int A, int L, int D, int dtype) {
  if (dtype == 0 || (D != 64 && D != 128) || H <= 0 || Hkv <= 0 || H % Hkv || B < 0 || L < 0) return 0;
  if (A == 0) return mma_attention::workspace_bound(D);
  if (A < 0 || B == 0) return 0;
  return mma_attention::workspace_bytes(B, H, Hkv, A, L, D);
}

const char* dlmtrt_cached_attention_error(void) { return g_error; }

int dlmtrt_cached_attention_abi_version(void) { return 4; }

}  // extern "C"
