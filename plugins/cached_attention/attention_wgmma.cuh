// Hopper's path of cached attention (sm_90a; fp16 and bf16): the algorithm of attention_mma.cuh, organised as
// FlashAttention-3 organises it, because on Hopper the tensor cores only stay busy when nothing waits in lockstep.
//
// - Warp specialisation: a producer warpgroup loads K/V tiles of 128 keys (cp.async, zero-filling invalid keys,
//   so that a cache slot holding NaN can never reach P V) into rings of shared-memory stages and finds the next
//   tile some row may attend; two consumer warpgroups of 64 rows each compute. They meet on mbarriers only
//   (full: K or V of a stage landed, with its key codes; empty: every consumer warp is done with it), never on a
//   CTA-wide barrier. K and V have their own rings, as a tile's K is done with long before its V.
// - Ping-pong: a named barrier pair lets one warpgroup issue its matrix products while the other runs its
//   softmax, so the tensor cores see back-to-back work.
// - Inside a warpgroup, the products of a step are S_j = Q K_j^T and O += P_{j-1} V_{j-1}, issued together; the
//   softmax of S_j overlaps P_{j-1} V_{j-1}, and O is rescaled once that product is done.
// - Q and K are read from shared memory by descriptor (128-byte swizzle), P from registers; S, P and O never
//   leave registers. The softmax scale is folded into one FFMA per score.
#pragma once

#include "attention_common.cuh"
#include "wgmma_ops.cuh"

namespace mma_attention {
namespace hopper {

constexpr int BN = 128;                  // keys per tile
constexpr int R = 128;                   // rows per CTA: two warpgroups of 64
constexpr int kThreads = 3 * 128;        // consumers, then the producer warpgroup
constexpr int kProducerWarp = 8;
// Registers per thread after the split (setmaxnreg): all 384 threads start with 168 (a sub-partition holds 3
// of the 12 warps); the producer gives back what the consumers' S, P and O need. 128 x 88 + 256 x 208 = 64512, the split at which neither side spills.
constexpr int kProducerRegs = 88, kConsumerRegs = 208;
template <int D> struct Stages { static constexpr int value = D == 64 ? 4 : 3; };  // D 128: 226.6 of 227 KB
template <int D> constexpr size_t smem_bytes() {
  // 1024 for the alignment of the swizzle atoms; Q, the K and V rings, codes [S][BN], meta [S][2], 4S mbarriers
  return 1024 + (size_t)(R + 2 * Stages<D>::value * BN) * D * 2 + Stages<D>::value * (BN + 2) * sizeof(int) +
         4 * Stages<D>::value * sizeof(uint64_t);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define DLMTRT_WGMMA 1
__device__ __forceinline__ uint64_t wgmma_desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return (uint64_t)((addr >> 4) & 0x3FFF) | (uint64_t)((lbo >> 4) & 0x3FFF) << 16 |
         (uint64_t)((sbo >> 4) & 0x3FFF) << 32 | 1ull << 62;  // layout 1: 128-byte swizzle
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N> __device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Pins registers at this point of the program: the compiler may not move their reads or writes across it (an
// asynchronous product's accumulators are only settled after its wait).
template <int N> __device__ __forceinline__ void pin(float (&r)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}
template <int N> __device__ __forceinline__ void pin(uint32_t (&r)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i)
    asm volatile("" : "+r"(r[i][0]), "+r"(r[i][1]), "+r"(r[i][2]), "+r"(r[i][3])::"memory");
}
__device__ __forceinline__ void fence_async_smem() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }
__device__ __forceinline__ void mbar_init(uint64_t* b, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(b)), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(uint64_t* b) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(smem_addr(b)) : "memory");
}
// arrives once this thread's earlier cp.async copies have landed (counted in the barrier's expected arrivals)
__device__ __forceinline__ void mbar_arrive_copies(uint64_t* b) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(smem_addr(b)) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint64_t* b, int parity) {
  asm volatile(
      "{\n.reg .pred p;\n"
      "WAIT:\n"
      "mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT;\n}\n" ::"r"(smem_addr(b)),
      "r"(parity)
      : "memory");
}
__device__ __forceinline__ void named_sync(int id) { asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory"); }
__device__ __forceinline__ void named_arrive(int id) { asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory"); }
template <typename T> struct Tag { using type = Bf16Tag; };
template <> struct Tag<__half> { using type = F16Tag; };
#endif

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 1) attention_kernel(const Args p) {
#if !defined(DLMTRT_WGMMA)
  __trap();  // the launcher picks this kernel only on sm_90, which the library builds as sm_90a
#else
  constexpr int CH = D / 8, S = Stages<D>::value, KV = BN * D * 2;
  extern __shared__ unsigned char smem_raw[];
  unsigned char* qs = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  unsigned char* ks = qs + R * D * 2;
  unsigned char* vs = ks + S * KV;
  int* codes = reinterpret_cast<int*>(vs + S * KV);  // [S][BN], with the K ring
  int* meta = codes + S * BN;                         // [S][2]: the tile in K stage s (-1: no more), all-attend flag
  uint64_t* full_k = reinterpret_cast<uint64_t*>(meta + 2 * S);
  uint64_t* full_v = full_k + S;
  uint64_t* empty_k = full_v + S;
  uint64_t* empty_v = empty_k + S;
  __shared__ int q_hi, q_lo;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int bh = blockIdx.y, b = bh / p.Hkv, kvh = bh % p.Hkv;
  const int m0 = (p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * R;  // block-causal: longest rows first

  if (tid == 0) {
    q_hi = INT_MIN;
    q_lo = INT_MAX;
    for (int s = 0; s < S; ++s) {
      mbar_init(full_k + s, 128 + 32);  // the producers' copy arrivals, and warp 8's after writing the codes
      mbar_init(full_v + s, 128);
      mbar_init(empty_k + s, 8);  // one per consumer warp
      mbar_init(empty_v + s, 8);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  for (int i = tid; i < R * CH; i += kThreads) {
    const int r = i / CH, c = i % CH, m = m0 + r;
    cp_async16(smem_addr(qs + tile_offset<D, true>(r, c, R)), static_cast<const T*>(p.q) + row_at(p, b, kvh, m < p.M ? m : 0) * D + c * 8, m < p.M);
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
  fence_async_smem();
  __syncthreads();
  const int qhi = q_hi, qlo = q_lo;
  const int tiles = (p.L + BN - 1) / BN;
  const int jbeg = blockIdx.z * p.tiles_per_split;
  const int jend = min(tiles, jbeg + p.tiles_per_split);

  if (warp >= kProducerWarp) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegs));
    // Tile i of this CTA's stream goes to K stage and V stage i % S. Each of the 4 producer warps codes the same
    // keys (lane l: keys 4l .. 4l+3 of a tile) and so takes the same decisions, copies a quarter of each tile,
    // and knows which of its rows are invalid from 4 ballots; warp 8 publishes the codes. The codes of the
    // tile after the one found are read at once, so their latency hides behind the copies.
    const int pw = warp - kProducerWarp;
    const T* kb = static_cast<const T*>(p.k) + (size_t)bh * p.L * D;
    const T* vb = static_cast<const T*>(p.v) + (size_t)bh * p.L * D;
    const uint8_t* vm = p.valid + (size_t)b * p.L;
    const int64_t* kp = p.kpos + (size_t)b * p.L;
    auto read_codes = [&](int j, int (&c4)[4]) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = j * BN + 4 * lane + e;
        c4[e] = key >= p.L || !vm[key] ? INT_MAX : p.causal ? clamp_code(kp[key] / p.block) : 0;
      }
    };
    // this lane's chunks: column c of rows r_base + t * 128 / CH, all with the same r % 4 (whose ballot says which
    // keys are valid), so no register array is indexed at run time
    const int r_base = (pw * 32 + lane) / CH, c = lane % CH;
    static_assert((128 / CH) % 4 == 0, "rows per step keep r % 4");
    auto copy_tile = [&](const T* src, unsigned char* dst, int j, const uint32_t (&ok)[4]) {
      const int e = r_base % 4;
      const uint32_t okr = e == 0 ? ok[0] : e == 1 ? ok[1] : e == 2 ? ok[2] : ok[3];
#pragma unroll
      for (int t = 0; t < BN * CH / 128; ++t) {
        const int r = r_base + t * (128 / CH);
        const bool in = (okr >> (r / 4)) & 1u;
        cp_async16(smem_addr(dst + tile_offset<D, true>(r, c, BN)), src + (size_t)(in ? j * BN + r : 0) * D + c * 8, in);
      }
    };
    int pf_j = jbeg, pf[4];
    if (pf_j < jend) read_codes(pf_j, pf);
    int j = jbeg;
    for (int i = 0;; ++i, ++j) {
      const int s = i % S, use = i / S;
      int c4[4];
      bool found = false, full = false;
      // past the prefetched tile, tiles are looked at kLook at a time (their code loads in flight together):
      // block-causal rows skip the keys after their block, and one dependent load per skipped tile would keep
      // the consumers of a short CTA waiting for the end of the stream
      constexpr int kLook = 4;
      auto attendable = [&](const int (&c)[4]) {
        bool any = false;
#pragma unroll
        for (int e = 0; e < 4; ++e) any |= c[e] <= qhi;
        return __any_sync(0xffffffffu, any);
      };
      while (j < jend) {
        if (j == pf_j) {
#pragma unroll
          for (int e = 0; e < 4; ++e) c4[e] = pf[e];
          if (attendable(c4)) { found = true; break; }
          ++j;
          continue;
        }
        int cc[kLook][4];
#pragma unroll
        for (int t = 0; t < kLook; ++t) {
          if (j + t < jend) read_codes(j + t, cc[t]);
          else for (int e = 0; e < 4; ++e) cc[t][e] = INT_MAX;
        }
        int hit = kLook;
#pragma unroll
        for (int t = kLook - 1; t >= 0; --t)
          if (attendable(cc[t])) hit = t;
#pragma unroll
        for (int t = 0; t < kLook; ++t)
          if (t == hit) {
#pragma unroll
            for (int e = 0; e < 4; ++e) c4[e] = cc[t][e];
          }
        if (hit < kLook) { j += hit; found = true; break; }
        j += kLook;
      }
      if (found) {
        bool all = true;
#pragma unroll
        for (int e = 0; e < 4; ++e) all &= c4[e] <= qlo;
        full = __all_sync(0xffffffffu, all);
        pf_j = j + 1;
        if (pf_j < jend) read_codes(pf_j, pf);
      }
      uint32_t ok[4];
#pragma unroll
      for (int e = 0; e < 4; ++e) ok[e] = __ballot_sync(0xffffffffu, c4[e] != INT_MAX);
      if (use > 0) mbar_wait(empty_k + s, (use - 1) & 1);
      if (found) copy_tile(kb, ks + s * KV, j, ok);
      mbar_arrive_copies(full_k + s);
      if (pw == 0) {
        int* cd = codes + s * BN;
        if (found) {
#pragma unroll
          for (int e = 0; e < 4; ++e) cd[4 * lane + e] = c4[e];
        }
        if (lane == 0) { meta[2 * s] = found ? j : -1; meta[2 * s + 1] = full; }
        mbar_arrive(full_k + s);
      }
      if (!found) break;
      if (use > 0) mbar_wait(empty_v + s, (use - 1) & 1);
      copy_tile(vb, vs + s * KV, j, ok);
      mbar_arrive_copies(full_v + s);
    }
    asm volatile("cp.async.wait_all;\n" ::: "memory");
  } else {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kConsumerRegs));
  // consumers: warpgroup wg owns rows wg*64 .. wg*64+63 of the CTA; this thread rows r0 and r0 + 8
  const int wg = warp / 4;
  const int r0 = warp * 16 + lane / 4;
  const int qc0 = m0 + r0 < p.M ? qcode_of(m0 + r0) : qlo;
  const int qc1 = m0 + r0 + 8 < p.M ? qcode_of(m0 + r0 + 8) : qlo;
  const uint64_t desc_q = wgmma_desc(smem_addr(qs) + wg * 64 * 128, 16, 1024);
  const uint64_t desc_k = wgmma_desc(smem_addr(ks), 16, 1024);
  const uint64_t desc_v = wgmma_desc(smem_addr(vs), BN * 128, 1024);
  using Tg = typename Tag<T>::type;

  float acc[D / 2];
#pragma unroll
  for (int i = 0; i < D / 2; ++i) acc[i] = 0.f;
  float mrow[2] = {-CUDART_INF_F, -CUDART_INF_F}, lrow[2] = {0.f, 0.f}, corr[2];
  float s[BN / 2];         // S of the current tile: n8 tile n of the keys in s[4n .. 4n+3]
  uint32_t pa[BN / 16][4];  // P of the previous tile, the A operand of its P V

  auto issue_qk = [&](int st) {
    const uint64_t dk = desc_k + ((st * KV) >> 4);
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      wgmma_ss_m64n128(s, desc_q + (((kk / 4) * R * 128 + (kk % 4) * 32) >> 4),
                       dk + (((kk / 4) * BN * 128 + (kk % 4) * 32) >> 4), kk > 0, Tg{});
    wgmma_commit();
  };
  auto issue_pv = [&](int st) {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      const uint64_t db = desc_v + ((st * KV + kk * 16 * 128) >> 4);
      if constexpr (D == 128) wgmma_rs_m64n128(acc, pa[kk], db, Tg{});
      else wgmma_rs_m64n64(acc, pa[kk], db, Tg{});
    }
    wgmma_commit();
  };
  // masks S of stage st, updates the running max and sum, leaves 2^(S - max) in s and the rescale in corr
  auto softmax = [&](int st, bool full) {
    if (!full) {
      const int* cd = codes + st * BN;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
        const int2 kc = *reinterpret_cast<const int2*>(cd + 8 * n + 2 * (lane % 4));
        if (kc.x > qc0) s[4 * n] = -CUDART_INF_F;
        if (kc.y > qc0) s[4 * n + 1] = -CUDART_INF_F;
        if (kc.x > qc1) s[4 * n + 2] = -CUDART_INF_F;
        if (kc.y > qc1) s[4 * n + 3] = -CUDART_INF_F;
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float mx = -CUDART_INF_F;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * r], s[4 * n + 2 * r + 1]));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float m_new = fmaxf(mrow[r], mx * p.scale_log2);
      const float m_use = m_new == -CUDART_INF_F ? 0.f : m_new;
      corr[r] = fast_exp2(mrow[r] - m_use);
      float sum = 0.f;
#pragma unroll
      for (int n = 0; n < BN / 8; ++n) {
        s[4 * n + 2 * r] = fast_exp2(fmaf(s[4 * n + 2 * r], p.scale_log2, -m_use));
        s[4 * n + 2 * r + 1] = fast_exp2(fmaf(s[4 * n + 2 * r + 1], p.scale_log2, -m_use));
        sum += s[4 * n + 2 * r] + s[4 * n + 2 * r + 1];
      }
      lrow[r] = lrow[r] * corr[r] + sum;
      mrow[r] = m_new;
    }
  };
  auto pack_p = [&]() {
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      pa[kk][0] = Mma<T>::pack(s[8 * kk + 0], s[8 * kk + 1]);
      pa[kk][1] = Mma<T>::pack(s[8 * kk + 2], s[8 * kk + 3]);
      pa[kk][2] = Mma<T>::pack(s[8 * kk + 4], s[8 * kk + 5]);
      pa[kk][3] = Mma<T>::pack(s[8 * kk + 6], s[8 * kk + 7]);
    }
  };
  auto release = [&](uint64_t* bar) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
  };

  const int my_turn = 1 + wg, their_turn = 2 - wg;  // named barriers 1 and 2; warpgroup 0 goes first
  if (wg == 1) named_arrive(1);
  mbar_wait(full_k, 0);
  if (meta[0] >= 0) {
    fence_async_smem();
    named_sync(my_turn);
    wgmma_fence();
    issue_qk(0);
    named_arrive(their_turn);
    wgmma_wait<0>();
    pin(s);
    softmax(0, meta[1]);
    release(empty_k);
    pack_p();
    int i = 1;
    for (;; ++i) {
      const int st = i % S, prev = (i - 1) % S;
      mbar_wait(full_k + st, (i / S) & 1);
      if (meta[2 * st] < 0) break;
      const bool full = meta[2 * st + 1];
      mbar_wait(full_v + prev, ((i - 1) / S) & 1);
      fence_async_smem();
      named_sync(my_turn);
      wgmma_fence();
      issue_qk(st);
      issue_pv(prev);
      named_arrive(their_turn);
      wgmma_wait<1>();
      pin(s);
      softmax(st, full);
      release(empty_k + st);
      wgmma_wait<0>();
      pin(acc);
      pin(pa);
      release(empty_v + prev);
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        acc[4 * n] *= corr[0]; acc[4 * n + 1] *= corr[0];
        acc[4 * n + 2] *= corr[1]; acc[4 * n + 3] *= corr[1];
      }
      pack_p();
    }
    const int prev = (i - 1) % S;
    mbar_wait(full_v + prev, ((i - 1) / S) & 1);
    fence_async_smem();
    wgmma_fence();
    issue_pv(prev);
    wgmma_wait<0>();
    pin(acc);
  }
  write_rows<T, D>(p, acc, mrow, lrow, m0 + r0, bh, lane);
  }
#endif
}

}  // namespace hopper
}  // namespace mma_attention
