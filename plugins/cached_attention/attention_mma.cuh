// The tensor-core paths of cached attention (fp16 and bf16, sm_80 and newer): FlashAttention-2's algorithm,
// specialised for a denoising step, on mma.sync m16n8k16 (every architecture) and on Hopper's wgmma (sm_90a).
//
// Why this shape. A step has anywhere from 1 to L active rows A, and the query heads of a GQA group read the
// same K/V head. The g = H / Hkv query heads of a group are contiguous in q and o ([B, H, A, D]), so the group's
// queries are one contiguous [g * A, D] matrix: a CTA takes a tile of its rows, i.e. one K/V tile serves every
// query head of the group (7 for Dream's 28 over 4), and a one-row step still fills 7 rows of an m16 tile.
// mma.sync: 4 warps of 16 rows (Q in registers, ldmatrix from shared memory, 2 K/V stages). wgmma: 2 warpgroups
// of 64 rows (Q and K from shared memory through descriptors, the next tile's S = Q K^T issued before this
// tile's softmax, 3 K/V stages); Hopper takes it from 256 rows per group, below which its 128-row CTAs are
// mostly padding. Both keep S and O in registers and reuse P as the A operand of P V without leaving them. K
// and V tiles of BN keys are loaded by cp.async (16-byte chunks, XOR-swizzled: conflict-free for ldmatrix, the
// 128-byte swizzle of wgmma's descriptors), keys that are not valid zero-filled.
//
// Masks are never materialized: each key of a tile gets a code (INT_MAX if invalid or past L; else its block
// kpos / block for block_causal, 0 for bidirectional) and a query row may attend a key iff code <= its own
// code (qpos / block, or 0). A tile that no row of the CTA may attend is skipped before its K/V are loaded
// (block-causal tails, padding); a tile every row may attend skips the per-element test.
//
// When B * Hkv * (row tiles) CTAs would leave the GPU mostly idle (few active rows), the keys are split over
// CTAs (flash-decoding): each split writes its normalised partial output and log-sum-exp to the workspace and
// a second kernel combines them. The split count depends on the shape only, so a captured graph and a TensorRT
// engine get the same launch every time.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <math_constants.h>
#include <stdint.h>

#include <climits>
#include <cstdlib>

#include "wgmma_ops.cuh"

namespace mma_attention {

constexpr int BN = 64;             // keys per tile
constexpr int kThreads = 128;
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
};

// Rows per CTA and threads: mma.sync 4 warps of 16 rows; wgmma 2 warpgroups of 64 rows.
template <bool WG> struct Shape {
  static constexpr int rows = WG ? 128 : 64;
  static constexpr int threads = WG ? 256 : 128;
  static constexpr int stages = WG ? 3 : 2;  // K/V tiles in flight (wgmma: one CTA per SM, a deeper pipeline)
};

__device__ __forceinline__ int clamp_code(long long c) {
  return c > INT_MAX - 1 ? INT_MAX - 1 : c < INT_MIN ? INT_MIN : (int)c;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DLMTRT_WGMMA 1
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((addr >> 4) & 0x3FFF) | (uint64_t)((lbo >> 4) & 0x3FFF) << 16 |
         (uint64_t)((sbo >> 4) & 0x3FFF) << 32 | 1ull << 62;  // layout 1: 128-byte swizzle
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory"); }
template <typename T> struct Tag { using type = Bf16Tag; };
template <> struct Tag<__half> { using type = F16Tag; };
#endif

template <typename T, int D, bool WG>
__global__ void __launch_bounds__(Shape<WG>::threads, WG ? 1 : 2) attention_kernel(const Args p) {
  constexpr int CH = D / 8, R = Shape<WG>::rows, NT = Shape<WG>::threads, S = Shape<WG>::stages;
#if !defined(DLMTRT_WGMMA)
  if constexpr (WG) {  // the launcher picks this kernel only on sm_90, which the library builds as sm_90a
    __trap();
    return;
  }
#endif
  extern __shared__ unsigned char smem_raw[];
  unsigned char* qs = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  unsigned char* ks = qs + R * D * 2;        // S stages
  unsigned char* vs = ks + S * BN * D * 2;   // S stages
  int* codes = reinterpret_cast<int*>(vs + S * BN * D * 2);  // [S][BN]
  __shared__ int q_hi, q_lo;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int bh = blockIdx.y, b = bh / p.Hkv, kvh = bh % p.Hkv, g = p.H / p.Hkv;
  const int m0 = blockIdx.x * R;
  const size_t qoff = ((size_t)b * p.H + (size_t)kvh * g) * p.A * D;  // the group's [M, D] rows
  const T* qg = static_cast<const T*>(p.q) + qoff;
  const T* kb = static_cast<const T*>(p.k) + (size_t)bh * p.L * D;
  const T* vb = static_cast<const T*>(p.v) + (size_t)bh * p.L * D;
  const uint8_t* vm = p.valid + (size_t)b * p.L;
  const int64_t* kp = p.kpos + (size_t)b * p.L;

  // Q tile -> shared (rows past M zero), its rows' codes -> the CTA's range
  if (tid == 0) { q_hi = INT_MIN; q_lo = INT_MAX; }
  for (int i = tid; i < R * CH; i += NT) {
    const int r = i / CH, c = i % CH, m = m0 + r;
    cp_async16(smem_addr(qs + tile_offset<D, WG>(r, c, R)), qg + (size_t)(m < p.M ? m : 0) * D + c * 8, m < p.M);
  }
  cp_async_commit();
  __syncthreads();
  auto qcode_of = [&](int m) -> int {
    return p.causal ? clamp_code(p.qpos[(size_t)b * p.A + m % p.A] / p.block) : 0;
  };
  if (tid < R && m0 + tid < p.M) {
    const int c = qcode_of(m0 + tid);
    atomicMax(&q_hi, c);
    atomicMin(&q_lo, c);
  }
  cp_async_wait<0>();
  if constexpr (WG) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
  __syncthreads();
  const int qhi = q_hi, qlo = q_lo;

  uint32_t qf[WG ? 1 : D / 16][4];  // mma.sync: Q in registers; wgmma reads it from shared memory
  if constexpr (!WG) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      const int mi = lane / 8;
      ldsm_x4(qf[kk], smem_addr(qs + tile_offset<D, WG>(warp * 16 + (lane % 8) + 8 * (mi % 2), 2 * kk + mi / 2, R)));
    }
  }
  const int r0 = warp * 16 + lane / 4;  // this thread's rows r0, r0 + 8 (within the CTA)
  const int qc0 = m0 + r0 < p.M ? qcode_of(m0 + r0) : qlo;
  const int qc1 = m0 + r0 + 8 < p.M ? qcode_of(m0 + r0 + 8) : qlo;

  // the tile after `j` that some row may attend: its key codes into codes[stage], `full` if every row may
  // attend every key of it; `jend` if none. The codes of the tile after the one found are loaded into a register
  // right away (pf), so the next call usually finds them there and the load's latency overlaps a tile's work.
  auto code_at = [&](int j) -> int {
    const int key = j * BN + tid;
    if (tid >= BN || key >= p.L || !vm[key]) return INT_MAX;
    return p.causal ? clamp_code(kp[key] / p.block) : 0;
  };
  int pf_j = -1, pf_code = INT_MAX;
  auto next_tile = [&](int j, int jend, int stage, bool& full) -> int {
    for (; j < jend; ++j) {
      const int code = j == pf_j ? pf_code : code_at(j);
      if (tid < BN) codes[stage * BN + tid] = code;
      if (__syncthreads_or(tid < BN && code <= qhi)) {
        full = __syncthreads_and(tid >= BN || code <= qlo);
        pf_j = j + 1;
        pf_code = j + 1 < jend ? code_at(j + 1) : INT_MAX;
        return j;
      }
    }
    return jend;
  };
  auto load_kv = [&](int j, int stage) {
    for (int i = tid; i < BN * CH; i += NT) {
      const int r = i / CH, c = i % CH, key = j * BN + r;
      const bool ok = codes[stage * BN + r] != INT_MAX;  // valid and inside L
      const size_t off = (size_t)(ok ? key : 0) * D + c * 8;
      const uint32_t at = tile_offset<D, WG>(r, c, BN);
      cp_async16(smem_addr(ks + stage * BN * D * 2 + at), kb + off, ok);
      cp_async16(smem_addr(vs + stage * BN * D * 2 + at), vb + off, ok);
    }
    cp_async_commit();
  };

  float acc[D / 2];  // O: n8 tile i of the head dims in acc[4i .. 4i+3] (rows r0, r0, r0+8, r0+8)
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
  float mrow[2] = {-CUDART_INF_F, -CUDART_INF_F}, lrow[2] = {0.f, 0.f};

  const int tiles = (p.L + BN - 1) / BN;
  const int jbeg = blockIdx.z * p.tiles_per_split;
  const int jend = min(tiles, jbeg + p.tiles_per_split);
  // S-stage pipeline, in order: tile[0] is computed while tile[1 .. S-1] load. One cp.async group is committed
  // per tile slot, empty or not, so waiting for all but the S-1 newest groups means tile[0] has landed.
  int tile[S], slot[S];
  bool fulls[S];
  int last = jbeg - 1;
#pragma unroll
  for (int i = 0; i < S - 1; ++i) {
    slot[i] = i;
    tile[i] = last + 1 < jend ? next_tile(last + 1, jend, i, fulls[i]) : jend;
    if (tile[i] < jend) load_kv(tile[i], i); else cp_async_commit();
    last = tile[i];
  }
  slot[S - 1] = S - 1;
  // warps (mma.sync) or warpgroups (wgmma) whose rows are all past M skip the arithmetic, not the barriers
  const bool live = m0 + (WG ? (warp / 4) * 64 : warp * 16) < p.M;
  float s[BN / 2];  // S of tile[0]: n8 tile n of the keys in s[4n .. 4n+3]
#if defined(DLMTRT_WGMMA)
  // wgmma: S = Q K^T of tile[1] is issued before tile[0]'s softmax, so the tensor cores work through it
  float s_next[BN / 2];
  // descriptors of the tiles' starts, once: a descriptor's low bits are the address / 16, so an offset is an add
  const uint64_t desc_q = wgmma_desc(smem_addr(qs) + (warp / 4) * 64 * 128, 16, 1024);
  const uint64_t desc_k = wgmma_desc(smem_addr(ks), 16, 1024);
  const uint64_t desc_v = wgmma_desc(smem_addr(vs), BN * 128, 1024);
  auto issue_qk = [&](float (&dst)[BN / 2], int stage) {
    const uint64_t dk = desc_k + ((stage * BN * D * 2) >> 4);
    wgmma_fence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      wgmma_ss_m64n64(dst, desc_q + (((kk / 4) * R * 128 + (kk % 4) * 32) >> 4),
                      dk + (((kk / 4) * BN * 128 + (kk % 4) * 32) >> 4), kk > 0, typename Tag<T>::type{});
    wgmma_commit();
  };
  if constexpr (WG) {
    if (tile[0] < jend) {
      cp_async_wait<S - 2>();
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
      __syncthreads();
      if (live) {
        issue_qk(s, slot[0]);
        wgmma_wait0();
      }
    }
  }
#endif
  while (tile[0] < jend) {
    tile[S - 1] = last + 1 < jend ? next_tile(last + 1, jend, slot[S - 1], fulls[S - 1]) : jend;
    if (tile[S - 1] < jend) load_kv(tile[S - 1], slot[S - 1]); else cp_async_commit();
    last = tile[S - 1];
    if constexpr (WG) cp_async_wait<S - 2>();  // tile[1] too: its S = Q K^T starts now
    else cp_async_wait<S - 1>();
    if constexpr (WG) asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    __syncthreads();
    const int stage = slot[0];
    const bool full = fulls[0];
    const bool more = tile[1] < jend;
    if (live) {
    const unsigned char* kt = ks + stage * BN * D * 2;
    const unsigned char* vt = vs + stage * BN * D * 2;
    if constexpr (WG) {
#if defined(DLMTRT_WGMMA)
      if (more) issue_qk(s_next, slot[1]);
#endif
    } else {
#pragma unroll
      for (int i = 0; i < BN / 2; ++i) s[i] = 0.f;
#pragma unroll
      for (int j2 = 0; j2 < BN / 16; ++j2) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t bf[4];
          const int mi = lane / 8;
          ldsm_x4(bf, smem_addr(kt + tile_offset<D, WG>(16 * j2 + (lane % 8) + 8 * (mi / 2), 2 * kk + mi % 2, BN)));
          Mma<T>::run(s + 8 * j2, qf[kk], bf[0], bf[1]);
          Mma<T>::run(s + 8 * j2 + 4, qf[kk], bf[2], bf[3]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < BN / 2; ++i) s[i] *= p.scale_log2;
    if (!full) {  // some key of the tile is masked for some row
      const int* cd = codes + stage * BN;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
#pragma unroll
        for (int e = 0; e < 4; ++e)
          if (cd[8 * n + 2 * (lane % 4) + (e & 1)] > (e < 2 ? qc0 : qc1)) s[4 * n + e] = -CUDART_INF_F;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -CUDART_INF_F;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * r], s[4 * n + 2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(mrow[r], mx);
      const float m_use = m_new == -CUDART_INF_F ? 0.f : m_new;
      const float corr = fast_exp2(mrow[r] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
        s[4 * n + 2 * r] = fast_exp2(s[4 * n + 2 * r] - m_use);
        s[4 * n + 2 * r + 1] = fast_exp2(s[4 * n + 2 * r + 1] - m_use);
        sum += s[4 * n + 2 * r] + s[4 * n + 2 * r + 1];
      }
      lrow[r] = lrow[r] * corr + sum;
      mrow[r] = m_new;
#pragma unroll
      for (int i = 0; i < D / 8; ++i) { acc[4 * i + 2 * r] *= corr; acc[4 * i + 2 * r + 1] *= corr; }
    }
    if constexpr (WG) {
#if defined(DLMTRT_WGMMA)
      uint32_t pa[BN / 16][4];
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        pa[kk][0] = Mma<T>::pack(s[8 * kk + 0], s[8 * kk + 1]);
        pa[kk][1] = Mma<T>::pack(s[8 * kk + 2], s[8 * kk + 3]);
        pa[kk][2] = Mma<T>::pack(s[8 * kk + 4], s[8 * kk + 5]);
        pa[kk][3] = Mma<T>::pack(s[8 * kk + 6], s[8 * kk + 7]);
      }
      wgmma_fence();
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        const uint64_t db = desc_v + ((stage * BN * D * 2 + kk * 16 * 128) >> 4);
        if constexpr (D == 128) wgmma_rs_m64n128(acc, pa[kk], db, typename Tag<T>::type{});
        else wgmma_rs_m64n64(acc, pa[kk], db, typename Tag<T>::type{});
      }
      wgmma_commit();
      wgmma_wait0();  // this tile's P V and the next tile's Q K^T
      if (more) {
#pragma unroll
        for (int i = 0; i < BN / 2; ++i) s[i] = s_next[i];
      }
#endif
    } else {
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t pa[4] = {Mma<T>::pack(s[8 * kk + 0], s[8 * kk + 1]), Mma<T>::pack(s[8 * kk + 2], s[8 * kk + 3]),
                          Mma<T>::pack(s[8 * kk + 4], s[8 * kk + 5]), Mma<T>::pack(s[8 * kk + 6], s[8 * kk + 7])};
#pragma unroll
        for (int c2 = 0; c2 < D / 16; ++c2) {
          uint32_t bf[4];
          const int mi = lane / 8;
          ldsm_x4_t(bf, smem_addr(vt + tile_offset<D, WG>(16 * kk + (lane % 8) + 8 * (mi % 2), 2 * c2 + mi / 2, BN)));
          Mma<T>::run(acc + 8 * c2, pa, bf[0], bf[1]);
          Mma<T>::run(acc + 8 * c2 + 4, pa, bf[2], bf[3]);
        }
      }
    }
    }
    __syncthreads();  // every warp is done with this stage before it is loaded again
    const int freed = slot[0];
#pragma unroll
    for (int i = 0; i < S - 1; ++i) { tile[i] = tile[i + 1]; slot[i] = slot[i + 1]; fulls[i] = fulls[i + 1]; }
    slot[S - 1] = freed;
  }
  cp_async_wait<0>();

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 1);
    lrow[r] += __shfl_xor_sync(0xffffffffu, lrow[r], 2);
  }
  const int col = 2 * (lane % 4);
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int m = m0 + r0 + 8 * r;
    if (m >= p.M) continue;
    const float inv = lrow[r] > 0.f ? 1.f / lrow[r] : 0.f;
    if (p.splits == 1) {
      T* orow = static_cast<T*>(p.o) + qoff + (size_t)m * D;
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        const uint32_t v = Mma<T>::pack(acc[4 * i + 2 * r] * inv, acc[4 * i + 2 * r + 1] * inv);
        *reinterpret_cast<uint32_t*>(orow + 8 * i + col) = v;
      }
    } else {
      const size_t row = ((size_t)blockIdx.z * gridDim.y + bh) * p.M + m;
      float* prow = p.part + row * D;
#pragma unroll
      for (int i = 0; i < D / 8; ++i)
        *reinterpret_cast<float2*>(prow + 8 * i + col) =
            make_float2(acc[4 * i + 2 * r] * inv, acc[4 * i + 2 * r + 1] * inv);
      if (lane % 4 == 0) p.lse[row] = lrow[r] > 0.f ? mrow[r] + log2f(lrow[r]) : -CUDART_INF_F;
    }
  }
}

// o[group rows] = sum over splits of 2^(lse_s - lse) * part_s; one warp per row.
template <typename T, int D>
__global__ void __launch_bounds__(128) combine_kernel(const Args p, int rows_total) {
  const int row = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows_total) return;
  const int bh = row / p.M, m = row % p.M, b = bh / p.Hkv, kvh = bh % p.Hkv, g = p.H / p.Hkv;
  float big = -CUDART_INF_F;
  for (int s = 0; s < p.splits; ++s) big = fmaxf(big, p.lse[(size_t)s * rows_total + row]);
  constexpr int P = D / 32;
  float out[P];
#pragma unroll
  for (int i = 0; i < P; ++i) out[i] = 0.f;
  float wsum = 0.f;
  if (big != -CUDART_INF_F) {
    for (int s = 0; s < p.splits; ++s) {
      const float w = fast_exp2(p.lse[(size_t)s * rows_total + row] - big);
      wsum += w;
      const float* pr = p.part + ((size_t)s * rows_total + row) * D + lane * P;
#pragma unroll
      for (int i = 0; i < P; ++i) out[i] += w * pr[i];
    }
  }
  const float inv = wsum > 0.f ? 1.f / wsum : 0.f;
  T* orow = static_cast<T*>(p.o) + (((size_t)b * p.H + (size_t)kvh * g) * p.A + m) * D + lane * P;
#pragma unroll
  for (int i = 0; i < P; ++i) store(orow + i, out[i] * inv);
}

// DLMTRT_ATTENTION_PATH=mma_sync or =wgmma pins Hopper to one kernel (to measure each; read once): 0 auto.
inline int path_override() {
  static const int v = [] {
    const char* e = std::getenv("DLMTRT_ATTENTION_PATH");
    return !e ? 0 : e[0] == 'm' ? 1 : e[0] == 'w' ? 2 : 0;
  }();
  return v;
}
// Rows per GQA group from which Hopper takes the wgmma kernel (below, its 128-row CTAs are mostly padding).
constexpr long long kWgmmaMinRows = 256;

template <bool WG> inline size_t smem_bytes(int D) {
  return 1024 + (size_t)(Shape<WG>::rows + 2 * Shape<WG>::stages * BN) * D * 2 +
         Shape<WG>::stages * BN * sizeof(int);  // + the 1024-byte alignment
}

struct Plan {
  int m_tiles, splits, tiles_per_split;
};

// The launch for a shape: row tiles x groups CTAs, and key splits only when that is far below kTargetCtas.
inline Plan plan(int B, int H, int Hkv, int A, int L, int rows_per_cta) {
  Plan pl;
  const long long M = (long long)(H / Hkv) * A;
  pl.m_tiles = (int)((M + rows_per_cta - 1) / rows_per_cta);
  const long long base = (long long)pl.m_tiles * B * Hkv;
  const int tiles = (L + BN - 1) / BN;
  long long want = base >= kTargetCtas ? 1 : (kTargetCtas + base - 1) / base;
  if (want > tiles) want = tiles;
  if (want < 1) want = 1;
  pl.tiles_per_split = tiles > 0 ? (int)((tiles + want - 1) / want) : 1;
  pl.splits = tiles > 0 ? (tiles + pl.tiles_per_split - 1) / pl.tiles_per_split : 1;
  return pl;
}

// Workspace of `splits` key splits: lse [splits][B*Hkv*M] then part [splits][B*Hkv*M][D] fp32 (16-byte aligned).
inline size_t split_bytes(int splits, int B, int H, int Hkv, int A, int D) {
  if (splits <= 1) return 0;
  const size_t rows = (size_t)splits * B * Hkv * (size_t)(H / Hkv) * A;
  return ((rows * sizeof(float) + 15) / 16) * 16 + rows * D * sizeof(float);
}

// What a shape uses on whichever path runs it (the larger of the two plans: the result does not depend on the GPU).
inline size_t workspace_bytes(int B, int H, int Hkv, int A, int L, int D) {
  const size_t a = split_bytes(plan(B, H, Hkv, A, L, Shape<false>::rows).splits, B, H, Hkv, A, D);
  const size_t b = split_bytes(plan(B, H, Hkv, A, L, Shape<true>::rows).splits, B, H, Hkv, A, D);
  return a > b ? a : b;
}

// The most any launch with head_dim D can use: splits happen only below kTargetCtas CTAs, so splits x CTAs <
// 2 kTargetCtas, each of at most 128 rows.
inline size_t workspace_bound(int D) {
  const size_t rows = (size_t)2 * kTargetCtas * Shape<true>::rows;
  return ((rows * sizeof(float) + 15) / 16) * 16 + rows * D * sizeof(float);
}

// Hopper (sm_90, built as sm_90a) runs the wgmma kernel; every other GPU the mma.sync one.
inline bool use_wgmma(int dev) {
  static int major[64] = {0};
  if (dev < 0 || dev >= 64) return false;
  if (!major[dev]) {
    int v = 0;
    cudaDeviceGetAttribute(&v, cudaDevAttrComputeCapabilityMajor, dev);
    major[dev] = v ? v : -1;
  }
  return major[dev] == 9;
}

template <typename T, int D, bool WG>
cudaError_t launch_path(const void* q, const void* k, const void* v, const uint8_t* valid, const int64_t* qpos,
                        const int64_t* kpos, void* o, int B, int H, int Hkv, int A, int L, float scale,
                        int mask_type, int block, void* workspace, size_t ws_bytes, cudaStream_t stream, int dev) {
  Plan pl = plan(B, H, Hkv, A, L, Shape<WG>::rows);
  if (split_bytes(pl.splits, B, H, Hkv, A, D) > ws_bytes) {  // less workspace: fewer splits, same answer
    const int tiles = (L + BN - 1) / BN;
    int most = pl.splits;
    while (most > 1 && split_bytes(most, B, H, Hkv, A, D) > ws_bytes) --most;
    pl.tiles_per_split = (tiles + most - 1) / most;
    pl.splits = (tiles + pl.tiles_per_split - 1) / pl.tiles_per_split;
  }
  Args a;
  a.q = q; a.k = k; a.v = v; a.valid = valid; a.qpos = qpos; a.kpos = kpos; a.o = o;
  a.H = H; a.Hkv = Hkv; a.A = A; a.L = L; a.M = (H / Hkv) * A;
  a.scale_log2 = scale * kLog2e;
  a.causal = mask_type == 1; a.block = block > 0 ? block : 1;
  a.splits = pl.splits; a.tiles_per_split = pl.tiles_per_split;
  const size_t rows = (size_t)pl.splits * B * Hkv * a.M;
  a.lse = pl.splits > 1 ? static_cast<float*>(workspace) : nullptr;
  a.part = pl.splits > 1 ? reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                                    ((rows * sizeof(float) + 15) / 16) * 16)
                         : nullptr;
  const size_t sm = smem_bytes<WG>(D);
  static unsigned long long raised = 0;  // devices whose shared-memory limit this instantiation raised
  if (dev < 64 && !(raised >> dev & 1ull)) {
    cudaError_t e = cudaFuncSetAttribute(attention_kernel<T, D, WG>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         (int)sm);
    if (e != cudaSuccess) return e;
    raised |= 1ull << dev;
  }
  dim3 grid(pl.m_tiles, B * Hkv, pl.splits);
  attention_kernel<T, D, WG><<<grid, Shape<WG>::threads, sm, stream>>>(a);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || pl.splits == 1) return e;
  const int rows_total = B * Hkv * a.M;
  combine_kernel<T, D><<<(rows_total + 3) / 4, 128, 0, stream>>>(a, rows_total);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch(const void* q, const void* k, const void* v, const uint8_t* valid, const int64_t* qpos,
                   const int64_t* kpos, void* o, int B, int H, int Hkv, int A, int L, float scale, int mask_type,
                   int block, void* workspace, size_t ws_bytes, cudaStream_t stream) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  const int pin = path_override();
  if (use_wgmma(dev) && (pin == 2 || (pin == 0 && (long long)(H / Hkv) * A >= kWgmmaMinRows)))
    return launch_path<T, D, true>(q, k, v, valid, qpos, kpos, o, B, H, Hkv, A, L, scale, mask_type, block,
                                   workspace, ws_bytes, stream, dev);
  return launch_path<T, D, false>(q, k, v, valid, qpos, kpos, o, B, H, Hkv, A, L, scale, mask_type, block,
                                  workspace, ws_bytes, stream, dev);
}

}  // namespace mma_attention
