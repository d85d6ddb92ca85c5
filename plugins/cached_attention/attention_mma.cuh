// The tensor-core paths of cached attention (fp16 and bf16, sm_80 and newer): FlashAttention-2's algorithm,
// specialised for a denoising step, on mma.sync m16n8k16 (every architecture, this file) and on Hopper's wgmma
// (sm_90a, attention_wgmma.cuh), and the launcher that picks one.
//
// Why this shape. A step has anywhere from 1 to L active rows A, and the query heads of a GQA group read the
// same K/V head. The g = H / Hkv query heads of a group make one [g * A, D] matrix of rows (row m: head m / A,
// position m % A; in q and o laid out [B, H, A, D] or, as a model's projections leave them, [B, A, H, D]): a CTA
// takes a tile of its rows, i.e. one K/V tile serves every query head of the group (7 for Dream's 28 over 4),
// and a one-row step still fills 7 rows of an m16 tile.
// mma.sync: 4 warps of 16 rows (Q in registers, ldmatrix from shared memory, 2 K/V stages of 64 keys). S and O
// stay in registers and P is reused as the A operand of P V without leaving them. K and V tiles are loaded by
// cp.async (16-byte chunks, XOR-swizzled: conflict-free for ldmatrix), keys that are not valid zero-filled.
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

#include "attention_common.cuh"
#include "attention_wgmma.cuh"

namespace mma_attention {

constexpr int BN = 64;  // keys per tile
constexpr int kRows = 64, kThreads = 128, kStages = 2;
// At most this many rows per group (a one- or two-row step under GQA 7), the 4 warps share one m16 tile of rows
// and split each key tile instead (16 keys each), then merge their softmaxes: 4x the arithmetic per loaded key
// of a CTA whose warps would otherwise idle but one.
constexpr int kKeysOverWarpsRows = 16;

template <typename T, int D, bool KW>
__global__ void __launch_bounds__(kThreads, 2) attention_kernel(const Args p) {
  constexpr int CH = D / 8, R = KW ? 16 : kRows, NT = kThreads, S = kStages;
  constexpr int NK = KW ? 16 : BN;  // keys of a tile per warp
  const int koff = KW ? 16 * (threadIdx.x / 32) : 0, wrow = KW ? 0 : 16 * (threadIdx.x / 32);
  extern __shared__ unsigned char smem_raw[];
  unsigned char* qs = reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  unsigned char* ks = qs + R * D * 2;        // S stages
  unsigned char* vs = ks + S * BN * D * 2;   // S stages
  int* codes = reinterpret_cast<int*>(vs + S * BN * D * 2);  // [S][BN]
  __shared__ int q_hi, q_lo;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int bh = blockIdx.y, b = bh / p.Hkv, kvh = bh % p.Hkv;
  const int m0 = (p.causal ? gridDim.x - 1 - blockIdx.x : blockIdx.x) * R;  // block-causal: longest rows first
  const T* kb = static_cast<const T*>(p.k) + (size_t)bh * p.L * D;
  const T* vb = static_cast<const T*>(p.v) + (size_t)bh * p.L * D;
  const uint8_t* vm = p.valid + (size_t)b * p.L;
  const int64_t* kp = p.kpos + (size_t)b * p.L;

  // Q tile -> shared (rows past M zero), its rows' codes -> the CTA's range
  if (tid == 0) { q_hi = INT_MIN; q_lo = INT_MAX; }
  for (int i = tid; i < R * CH; i += NT) {
    const int r = i / CH, c = i % CH, m = m0 + r;
    cp_async16(smem_addr(qs + tile_offset<D, false>(r, c, R)), static_cast<const T*>(p.q) + row_at(p, b, kvh, m < p.M ? m : 0) * D + c * 8, m < p.M);
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
  __syncthreads();
  const int qhi = q_hi, qlo = q_lo;

  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    const int mi = lane / 8;
    ldsm_x4(qf[kk], smem_addr(qs + tile_offset<D, false>(wrow + (lane % 8) + 8 * (mi % 2), 2 * kk + mi / 2, R)));
  }
  const int r0 = wrow + lane / 4;  // this thread's rows r0, r0 + 8 (within the CTA)
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
      const uint32_t at = tile_offset<D, false>(r, c, BN);
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
  const bool live = m0 + wrow < p.M;  // warps whose rows are all past M skip the arithmetic, not the barriers
  float s[NK / 2];  // S of tile[0] (this warp's keys): n8 tile n of them in s[4n .. 4n+3]
  while (tile[0] < jend) {
    tile[S - 1] = last + 1 < jend ? next_tile(last + 1, jend, slot[S - 1], fulls[S - 1]) : jend;
    if (tile[S - 1] < jend) load_kv(tile[S - 1], slot[S - 1]); else cp_async_commit();
    last = tile[S - 1];
    cp_async_wait<S - 1>();
    __syncthreads();
    const int stage = slot[0];
    const bool full = fulls[0];
    if (live) {
      const unsigned char* kt = ks + stage * BN * D * 2;
      const unsigned char* vt = vs + stage * BN * D * 2;
#pragma unroll
      for (int i = 0; i < NK / 2; ++i) s[i] = 0.f;
#pragma unroll
      for (int j2 = 0; j2 < NK / 16; ++j2) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t bf[4];
          const int mi = lane / 8;
          ldsm_x4(bf, smem_addr(kt + tile_offset<D, false>(koff + 16 * j2 + (lane % 8) + 8 * (mi / 2), 2 * kk + mi % 2, BN)));
          Mma<T>::run(s + 8 * j2, qf[kk], bf[0], bf[1]);
          Mma<T>::run(s + 8 * j2 + 4, qf[kk], bf[2], bf[3]);
        }
      }
#pragma unroll
      for (int i = 0; i < NK / 2; ++i) s[i] *= p.scale_log2;
      if (!full) {  // some key of the tile is masked for some row
        const int* cd = codes + stage * BN + koff;
#pragma unroll
        for (int n = 0; n < NK / 8; ++n) {
#pragma unroll
          for (int e = 0; e < 4; ++e)
            if (cd[8 * n + 2 * (lane % 4) + (e & 1)] > (e < 2 ? qc0 : qc1)) s[4 * n + e] = -CUDART_INF_F;
        }
      }
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = -CUDART_INF_F;
#pragma unroll
        for (int n = 0; n < NK / 8; ++n) mx = fmaxf(mx, fmaxf(s[4 * n + 2 * r], s[4 * n + 2 * r + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(mrow[r], mx);
        const float m_use = m_new == -CUDART_INF_F ? 0.f : m_new;
        const float corr = fast_exp2(mrow[r] - m_use);
        float sum = 0.f;
#pragma unroll
        for (int n = 0; n < NK / 8; ++n) {
          s[4 * n + 2 * r] = fast_exp2(s[4 * n + 2 * r] - m_use);
          s[4 * n + 2 * r + 1] = fast_exp2(s[4 * n + 2 * r + 1] - m_use);
          sum += s[4 * n + 2 * r] + s[4 * n + 2 * r + 1];
        }
        lrow[r] = lrow[r] * corr + sum;
        mrow[r] = m_new;
#pragma unroll
        for (int i = 0; i < D / 8; ++i) { acc[4 * i + 2 * r] *= corr; acc[4 * i + 2 * r + 1] *= corr; }
      }
#pragma unroll
      for (int kk = 0; kk < NK / 16; ++kk) {
        uint32_t pa[4] = {Mma<T>::pack(s[8 * kk + 0], s[8 * kk + 1]), Mma<T>::pack(s[8 * kk + 2], s[8 * kk + 3]),
                          Mma<T>::pack(s[8 * kk + 4], s[8 * kk + 5]), Mma<T>::pack(s[8 * kk + 6], s[8 * kk + 7])};
#pragma unroll
        for (int c2 = 0; c2 < D / 16; ++c2) {
          uint32_t bf[4];
          const int mi = lane / 8;
          ldsm_x4_t(bf, smem_addr(vt + tile_offset<D, false>(koff + 16 * kk + (lane % 8) + 8 * (mi % 2), 2 * c2 + mi / 2, BN)));
          Mma<T>::run(acc + 8 * c2, pa, bf[0], bf[1]);
          Mma<T>::run(acc + 8 * c2 + 4, pa, bf[2], bf[3]);
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
  if constexpr (KW) {
    // warps 1-3 hand their running max, partial sums and O (same fragment layout as warp 0's) over through the
    // K/V stages, now free; warp 0 rescales all four to the common max and writes the rows
    constexpr int E = D / 2 + 4;
    float* x = reinterpret_cast<float*>(ks);  // [warp - 1][E][32]
    __syncthreads();
    if (warp > 0) {
      float* mine = x + (size_t)(warp - 1) * E * 32 + lane;
#pragma unroll
      for (int i = 0; i < D / 2; ++i) mine[i * 32] = acc[i];
      mine[(D / 2) * 32] = mrow[0]; mine[(D / 2 + 1) * 32] = mrow[1];
      mine[(D / 2 + 2) * 32] = lrow[0]; mine[(D / 2 + 3) * 32] = lrow[1];
    }
    __syncthreads();
    if (warp > 0) return;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float big = mrow[r];
      for (int w = 0; w < 3; ++w) big = fmaxf(big, x[((size_t)w * E + D / 2 + r) * 32 + lane]);
      const float use = big == -CUDART_INF_F ? 0.f : big;
      const float c0 = fast_exp2(mrow[r] - use);
      lrow[r] *= c0;
#pragma unroll
      for (int i = 0; i < D / 8; ++i) { acc[4 * i + 2 * r] *= c0; acc[4 * i + 2 * r + 1] *= c0; }
      for (int w = 0; w < 3; ++w) {
        const float* th = x + (size_t)w * E * 32 + lane;
        const float c = fast_exp2(th[(D / 2 + r) * 32] - use);
        lrow[r] += c * th[(D / 2 + 2 + r) * 32];
#pragma unroll
        for (int i = 0; i < D / 8; ++i) {
          acc[4 * i + 2 * r] += c * th[(4 * i + 2 * r) * 32];
          acc[4 * i + 2 * r + 1] += c * th[(4 * i + 2 * r + 1) * 32];
        }
      }
      mrow[r] = big;
    }
  }
  write_rows<T, D>(p, acc, mrow, lrow, m0 + r0, bh, lane);
}

// o[group rows] = sum over splits of 2^(lse_s - lse) * part_s; one warp per row.
template <typename T, int D>
__global__ void __launch_bounds__(128) combine_kernel(const Args p, int rows_total) {
  const int row = blockIdx.x * 4 + threadIdx.x / 32, lane = threadIdx.x % 32;
  if (row >= rows_total) return;
  const int bh = row / p.M, m = row % p.M;
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
  T* orow = static_cast<T*>(p.o) + row_at(p, bh / p.Hkv, bh % p.Hkv, m) * D + lane * P;
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

// The three kernels: mma.sync over rows, mma.sync with keys over warps (few rows), Hopper's warp-specialised one.
enum Path { kRowsPath = 0, kKeysPath = 1, kHopperPath = 2 };

// A kernel's geometry, for the launcher: rows per CTA, keys per tile, threads, shared memory.
// `ctas`: what one wave of the kernel holds on an H100/H200 (132 SMs; two mma.sync CTAs or one Hopper CTA each),
// which key splits fill but never pass (a second, mostly empty wave would cost as much as the first).
template <int P> struct Geometry {
  static constexpr int rows = P == kKeysPath ? 16 : kRows, keys = BN, threads = kThreads, ctas = kTargetCtas;
  static size_t smem(int D) { return 1024 + (size_t)(rows + 2 * kStages * BN) * D * 2 + kStages * BN * sizeof(int); }
};
template <> struct Geometry<kHopperPath> {
  static constexpr int rows = hopper::R, keys = hopper::BN, threads = hopper::kThreads, ctas = kTargetCtas / 2;
  static size_t smem(int D) { return D == 64 ? hopper::smem_bytes<64>() : hopper::smem_bytes<128>(); }
};

struct Plan {
  int m_tiles, splits, tiles_per_split;
};

// The launch for a shape: row tiles x groups CTAs, and as many key splits as keep that within one wave.
inline Plan plan(int B, int H, int Hkv, int A, int L, int rows_per_cta, int keys_per_tile, int wave) {
  Plan pl;
  const long long M = (long long)(H / Hkv) * A;
  pl.m_tiles = (int)((M + rows_per_cta - 1) / rows_per_cta);
  const long long base = (long long)pl.m_tiles * B * Hkv;
  const int tiles = (L + keys_per_tile - 1) / keys_per_tile;
  long long want = base >= wave ? 1 : wave / base;
  if (want > tiles) want = tiles;
  if (want < 1) want = 1;
  pl.tiles_per_split = tiles > 0 ? (int)((tiles + want - 1) / want) : 1;
  pl.splits = tiles > 0 ? (tiles + pl.tiles_per_split - 1) / pl.tiles_per_split : 1;
  return pl;
}
template <int P> inline Plan plan_for(int B, int H, int Hkv, int A, int L) {
  return plan(B, H, Hkv, A, L, Geometry<P>::rows, Geometry<P>::keys, Geometry<P>::ctas);
}

// Workspace of `splits` key splits: lse [splits][B*Hkv*M] then part [splits][B*Hkv*M][D] fp32 (16-byte aligned).
inline size_t split_bytes(int splits, int B, int H, int Hkv, int A, int D) {
  if (splits <= 1) return 0;
  const size_t rows = (size_t)splits * B * Hkv * (size_t)(H / Hkv) * A;
  return ((rows * sizeof(float) + 15) / 16) * 16 + rows * D * sizeof(float);
}

// The mma.sync kernel for a shape: keys over warps for at most kKeysOverWarpsRows rows per group.
inline int mma_sync_path(int H, int Hkv, int A) {
  return (long long)(H / Hkv) * A <= kKeysOverWarpsRows ? kKeysPath : kRowsPath;
}

// What a shape uses on whichever path runs it (the larger of the mma.sync and Hopper plans: the result does not
// depend on the GPU).
inline size_t workspace_bytes(int B, int H, int Hkv, int A, int L, int D) {
  const Plan mine = mma_sync_path(H, Hkv, A) == kKeysPath ? plan_for<kKeysPath>(B, H, Hkv, A, L)
                                                          : plan_for<kRowsPath>(B, H, Hkv, A, L);
  const size_t a = split_bytes(mine.splits, B, H, Hkv, A, D);
  const size_t b = split_bytes(plan_for<kHopperPath>(B, H, Hkv, A, L).splits, B, H, Hkv, A, D);
  return a > b ? a : b;
}

// The most any launch with head_dim D can use: with key splits a launch has at most kTargetCtas CTAs, each of
// at most 128 rows.
inline size_t workspace_bound(int D) {
  static_assert(hopper::R >= kRows && Geometry<kHopperPath>::ctas <= kTargetCtas, "the bound counts the largest");
  const size_t rows = (size_t)kTargetCtas * hopper::R;
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

template <int P, typename T, int D> constexpr auto kernel_of() {
  if constexpr (P == kHopperPath) return hopper::attention_kernel<T, D>;
  else return attention_kernel<T, D, P == kKeysPath>;
}

template <typename T, int D, int P>
cudaError_t launch_path(const void* q, const void* k, const void* v, const uint8_t* valid, const int64_t* qpos,
                        const int64_t* kpos, void* o, int B, int H, int Hkv, int A, int L, float scale,
                        int mask_type, int block, void* workspace, size_t ws_bytes, cudaStream_t stream, int dev,
                        int heads_inner) {
  using G = Geometry<P>;
  Plan pl = plan_for<P>(B, H, Hkv, A, L);
  if (split_bytes(pl.splits, B, H, Hkv, A, D) > ws_bytes) {  // less workspace: fewer splits, same answer
    const int tiles = (L + G::keys - 1) / G::keys;
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
  a.heads_inner = heads_inner;
  const size_t rows = (size_t)pl.splits * B * Hkv * a.M;
  a.lse = pl.splits > 1 ? static_cast<float*>(workspace) : nullptr;
  a.part = pl.splits > 1 ? reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                                    ((rows * sizeof(float) + 15) / 16) * 16)
                         : nullptr;
  const size_t sm = G::smem(D);
  constexpr auto kernel = kernel_of<P, T, D>();
  static unsigned long long raised = 0;  // devices whose shared-memory limit this instantiation raised
  if (dev < 64 && !(raised >> dev & 1ull)) {
    cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)sm);
    if (e != cudaSuccess) return e;
    raised |= 1ull << dev;
  }
  dim3 grid(pl.m_tiles, B * Hkv, pl.splits);
  kernel<<<grid, G::threads, sm, stream>>>(a);
  cudaError_t e = cudaGetLastError();
  if (e != cudaSuccess || pl.splits == 1) return e;
  const int rows_total = B * Hkv * a.M;
  combine_kernel<T, D><<<(rows_total + 3) / 4, 128, 0, stream>>>(a, rows_total);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch(const void* q, const void* k, const void* v, const uint8_t* valid, const int64_t* qpos,
                   const int64_t* kpos, void* o, int B, int H, int Hkv, int A, int L, float scale, int mask_type,
                   int block, void* workspace, size_t ws_bytes, cudaStream_t stream, int heads_inner) {
  int dev = 0;
  cudaError_t e = cudaGetDevice(&dev);
  if (e != cudaSuccess) return e;
  const int pin = path_override();
#define DLMTRT_LAUNCH(P) launch_path<T, D, P>(q, k, v, valid, qpos, kpos, o, B, H, Hkv, A, L, scale, mask_type, \
                                              block, workspace, ws_bytes, stream, dev, heads_inner)
  if (use_wgmma(dev) && (pin == 2 || (pin == 0 && (long long)(H / Hkv) * A >= kWgmmaMinRows)))
    return DLMTRT_LAUNCH(kHopperPath);
  if (mma_sync_path(H, Hkv, A) == kKeysPath) return DLMTRT_LAUNCH(kKeysPath);
  return DLMTRT_LAUNCH(kRowsPath);
#undef DLMTRT_LAUNCH
}

}  // namespace mma_attention
