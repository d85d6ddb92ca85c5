// The tensor-core paths of cached attention (fp16 and bf16, sm_80 and newer): FlashAttention-2's algorithm,
// specialised for a denoising step, on mma.sync m16n8k16 (every architecture, this file) and on Hopper's wgmma
// (sm_90a, attention_wgmma.cuh), and the launcher that picks one.
//
// Why this shape. A step has anywhere from 1 to L active rows A, and the query heads of a GQA group read the
// same K/V head. The g = H / Hkv query heads of a group are contiguous in q and o ([B, H, A, D]), so the group's
// queries are one contiguous [g * A, D] matrix: a CTA takes a tile of its rows, i.e. one K/V tile serves every
// query head of the group (7 for Dream's 28 over 4), and a one-row step still fills 7 rows of an m16 tile.
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

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 2) attention_kernel(const Args p) {
  constexpr int CH = D / 8, R = kRows, NT = kThreads, S = kStages;
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
    cp_async16(smem_addr(qs + tile_offset<D, false>(r, c, R)), qg + (size_t)(m < p.M ? m : 0) * D + c * 8, m < p.M);
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
    ldsm_x4(qf[kk], smem_addr(qs + tile_offset<D, false>(warp * 16 + (lane % 8) + 8 * (mi % 2), 2 * kk + mi / 2, R)));
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
  const bool live = m0 + warp * 16 < p.M;  // warps whose rows are all past M skip the arithmetic, not the barriers
  float s[BN / 2];  // S of tile[0]: n8 tile n of the keys in s[4n .. 4n+3]
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
      for (int i = 0; i < BN / 2; ++i) s[i] = 0.f;
#pragma unroll
      for (int j2 = 0; j2 < BN / 16; ++j2) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t bf[4];
          const int mi = lane / 8;
          ldsm_x4(bf, smem_addr(kt + tile_offset<D, false>(16 * j2 + (lane % 8) + 8 * (mi / 2), 2 * kk + mi % 2, BN)));
          Mma<T>::run(s + 8 * j2, qf[kk], bf[0], bf[1]);
          Mma<T>::run(s + 8 * j2 + 4, qf[kk], bf[2], bf[3]);
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
#pragma unroll
      for (int kk = 0; kk < BN / 16; ++kk) {
        uint32_t pa[4] = {Mma<T>::pack(s[8 * kk + 0], s[8 * kk + 1]), Mma<T>::pack(s[8 * kk + 2], s[8 * kk + 3]),
                          Mma<T>::pack(s[8 * kk + 4], s[8 * kk + 5]), Mma<T>::pack(s[8 * kk + 6], s[8 * kk + 7])};
#pragma unroll
        for (int c2 = 0; c2 < D / 16; ++c2) {
          uint32_t bf[4];
          const int mi = lane / 8;
          ldsm_x4_t(bf, smem_addr(vt + tile_offset<D, false>(16 * kk + (lane % 8) + 8 * (mi % 2), 2 * c2 + mi / 2, BN)));
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
  write_rows<T, D>(p, acc, mrow, lrow, m0 + r0, qoff, bh, lane);
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

// A kernel's geometry, for the launcher: rows per CTA, keys per tile, threads, shared memory.
template <bool WG> struct Geometry;
template <> struct Geometry<false> {
  static constexpr int rows = kRows, keys = BN, threads = kThreads;
  static size_t smem(int D) { return 1024 + (size_t)(kRows + 2 * kStages * BN) * D * 2 + kStages * BN * sizeof(int); }
};
template <> struct Geometry<true> {
  static constexpr int rows = hopper::R, keys = hopper::BN, threads = hopper::kThreads;
  static size_t smem(int D) { return D == 64 ? hopper::smem_bytes<64>() : hopper::smem_bytes<128>(); }
};

struct Plan {
  int m_tiles, splits, tiles_per_split;
};

// The launch for a shape: row tiles x groups CTAs, and key splits only when that is far below kTargetCtas.
inline Plan plan(int B, int H, int Hkv, int A, int L, int rows_per_cta, int keys_per_tile) {
  Plan pl;
  const long long M = (long long)(H / Hkv) * A;
  pl.m_tiles = (int)((M + rows_per_cta - 1) / rows_per_cta);
  const long long base = (long long)pl.m_tiles * B * Hkv;
  const int tiles = (L + keys_per_tile - 1) / keys_per_tile;
  long long want = base >= kTargetCtas ? 1 : (kTargetCtas + base - 1) / base;
  if (want > tiles) want = tiles;
  if (want < 1) want = 1;
  pl.tiles_per_split = tiles > 0 ? (int)((tiles + want - 1) / want) : 1;
  pl.splits = tiles > 0 ? (tiles + pl.tiles_per_split - 1) / pl.tiles_per_split : 1;
  return pl;
}
template <bool WG> inline Plan plan_for(int B, int H, int Hkv, int A, int L) {
  return plan(B, H, Hkv, A, L, Geometry<WG>::rows, Geometry<WG>::keys);
}

// Workspace of `splits` key splits: lse [splits][B*Hkv*M] then part [splits][B*Hkv*M][D] fp32 (16-byte aligned).
inline size_t split_bytes(int splits, int B, int H, int Hkv, int A, int D) {
  if (splits <= 1) return 0;
  const size_t rows = (size_t)splits * B * Hkv * (size_t)(H / Hkv) * A;
  return ((rows * sizeof(float) + 15) / 16) * 16 + rows * D * sizeof(float);
}

// What a shape uses on whichever path runs it (the larger of the two plans: the result does not depend on the GPU).
inline size_t workspace_bytes(int B, int H, int Hkv, int A, int L, int D) {
  const size_t a = split_bytes(plan_for<false>(B, H, Hkv, A, L).splits, B, H, Hkv, A, D);
  const size_t b = split_bytes(plan_for<true>(B, H, Hkv, A, L).splits, B, H, Hkv, A, D);
  return a > b ? a : b;
}

// The most any launch with head_dim D can use: splits happen only below kTargetCtas CTAs, so splits x CTAs <
// 2 kTargetCtas, each of at most 128 rows.
inline size_t workspace_bound(int D) {
  static_assert(hopper::R >= kRows, "the bound counts the larger CTA");
  const size_t rows = (size_t)2 * kTargetCtas * hopper::R;
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

template <bool WG, typename T, int D> constexpr auto kernel_of() {
  if constexpr (WG) return hopper::attention_kernel<T, D>;
  else return attention_kernel<T, D>;
}

template <typename T, int D, bool WG>
cudaError_t launch_path(const void* q, const void* k, const void* v, const uint8_t* valid, const int64_t* qpos,
                        const int64_t* kpos, void* o, int B, int H, int Hkv, int A, int L, float scale,
                        int mask_type, int block, void* workspace, size_t ws_bytes, cudaStream_t stream, int dev) {
  using G = Geometry<WG>;
  Plan pl = plan_for<WG>(B, H, Hkv, A, L);
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
  const size_t rows = (size_t)pl.splits * B * Hkv * a.M;
  a.lse = pl.splits > 1 ? static_cast<float*>(workspace) : nullptr;
  a.part = pl.splits > 1 ? reinterpret_cast<float*>(static_cast<char*>(workspace) +
                                                    ((rows * sizeof(float) + 15) / 16) * 16)
                         : nullptr;
  const size_t sm = G::smem(D);
  constexpr auto kernel = kernel_of<WG, T, D>();
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
