// What both tensor-core paths of cached attention share (attention_mma.cuh: mma.sync, every architecture;
// attention_wgmma.cuh: Hopper): the arguments, the fp16/bf16 packing, the cp.async and ldmatrix wrappers, the
// swizzled shared-memory layouts and the key codes that stand in for masks.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>

#include <climits>
#include <cstdlib>

namespace mma_attention {

constexpr int kTargetCtas = 264;   // about two CTAs on each of an H100/H200's 132 SMs
constexpr float kLog2e = 1.4426950408889634f;

template <typename T> struct Mma;
template <> struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};
template <> struct Mma<__half> {
  static __device__ __forceinline__ void run(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
    asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                 "{%0,%1,%2,%3};\n"
                 : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                 : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

__device__ __forceinline__ float fast_exp2(float x) {  // 2^x; 2^-inf = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
  return y;
}
__device__ __forceinline__ void store(__nv_bfloat16* p, float x) { *p = __float2bfloat16_rn(x); }
__device__ __forceinline__ void store(__half* p, float x) { *p = __float2half_rn(x); }

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, bool fill) {
  const int n = fill ? 16 : 0;  // 0: zero-fill the 16 bytes
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N> __device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}
__device__ __forceinline__ void ldsm_x4(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_t(uint32_t* r, uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// Shared-memory layouts of a tile of `rows` rows of D halves in 16-byte chunks, XOR-swizzled so that neither
// ldmatrix nor the tensor cores meet bank conflicts. mma.sync: rows of 2D bytes, chunk ^ (row % 8). wgmma: the
// 128-byte swizzle of its descriptors, i.e. D/64 column atoms of [rows][128 B] each, same XOR within an atom
// (atoms start at multiples of 1024 bytes, as the hardware's swizzle reads the address bits).
template <int D, bool WG> __device__ __forceinline__ uint32_t tile_offset(int row, int chunk, int rows) {
  if constexpr (WG) return (chunk / 8) * rows * 128 + row * 128 + (((chunk % 8) ^ (row & 7)) << 4);
  else return row * (D * 2) + ((chunk ^ (row & 7)) << 4);
}

struct Args {
  const void* q; const void* k; const void* v;
  const uint8_t* valid; const int64_t* qpos; const int64_t* kpos;
  void* o; float* lse; float* part;  // lse/part: split workspace (null when splits == 1)
  int H, Hkv, A, L, M;               // M = (H / Hkv) * A rows per group
  float scale_log2;
  int causal, block, splits, tiles_per_split;
  int heads_inner;                   // q and o in [B, A, H, D] memory order (else [B, H, A, D])
};

// Element offset / D of row m of GQA group (b, kvh) in q and o: query head kvh * g + m / A at position m % A.
__device__ __forceinline__ size_t row_at(const Args& p, int b, int kvh, int m) {
  const int h = kvh * (p.H / p.Hkv) + m / p.A, a = m % p.A;
  return p.heads_inner ? ((size_t)b * p.A + a) * p.H + h : ((size_t)b * p.H + h) * p.A + a;
}

__device__ __forceinline__ int clamp_code(long long c) {
  return c > INT_MAX - 1 ? INT_MAX - 1 : c < INT_MIN ? INT_MIN : (int)c;
}

// The end of both kernels: this thread's rows (m and m + 8 of the group; its quad holds the row's D/8 pairs of
// head dims in acc[4i + 2r], acc[4i + 2r + 1]) normalised into o, or with their log-sum-exp into the split
// workspace when the keys were split over CTAs.
template <typename T, int D>
__device__ __forceinline__ void write_rows(const Args& p, const float (&acc)[D / 2], const float (&mrow)[2],
                                           float (&lrow)[2], int m, int bh, int lane) {
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 1);
    lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 2);
  }
  const int col = 2 * (lane % 4);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = m + 8 * r;
    if (row >= p.M) continue;
    const float inv = lrow[r] > 0.f ? 1.f / lrow[r] : 0.f;
    if (p.splits == 1) {
      T* orow = static_cast<T*>(p.o) + row_at(p, bh / p.Hkv, bh % p.Hkv, row) * D;
#pragma unroll
      for (int i = 0; i < D / 8; ++i)
        *reinterpret_cast<uint32_t*>(orow + 8 * i + col) = Mma<T>::pack(acc[4 * i + 2 * r] * inv, acc[4 * i + 2 * r + 1] * inv);
    } else {
      const size_t at = ((size_t)blockIdx.z * gridDim.y + bh) * p.M + row;
      float* prow = p.part + at * D;
#pragma unroll
      for (int i = 0; i < D / 8; ++i)
        *reinterpret_cast<float2*>(prow + 8 * i + col) =
            make_float2(acc[4 * i + 2 * r] * inv, acc[4 * i + 2 * r + 1] * inv);
      if (lane % 4 == 0) p.lse[at] = lrow[r] > 0.f ? mrow[r] + log2f(lrow[r]) : -CUDART_INF_F;
    }
  }
}

}  // namespace mma_attention
