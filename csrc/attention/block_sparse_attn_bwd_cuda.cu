// CUDA backward kernel of block-sparse attention (tokops::block_sparse_attn_bwd_cuda).
// Spec: DESIGN.md "Sparse attention"; Python reference: reference.bwd (float64, analytic):
//   P = exp(s - lse), delta = rowsum(dO * O) - dlse, dS = P * (dO V^T - delta),
//   dQ = scale * dS K, dK = scale * dS^T Q, dV = P^T dO, dbias[b, h, j] = sum_i dS[i, j].
// FlashAttention-2 backward (Dao 2023), split into three kernels so that nothing needs atomics:
//   1. delta kernel: one warp per query row, delta = sum_d dO*O (fp32) minus dlse when given.
//   2. dQ kernel (query-block-major, same walk as the forward over kv_indices): one CTA (4 warps)
//      owns 64 query rows of one (b, h).
//   3. dK/dV kernel (key-block-major over the transposed mask q_num_blocks / q_indices): one CTA
//      owns 64 keys of one (b, kv head) and loops over the query heads of its GQA group, so dK and
//      dV of a KV head are summed in registers without races; dbias (per query head, fp32) = row
//      sums of dS^T.
// Both use the forward's design (issue 12): each warp owns 16 rows; mma.sync m16n8k16 (fp16/bf16
// in, fp32 accumulate) with ldmatrix / ldmatrix.trans fragments from XOR-swizzled shared tiles
// filled by cp.async (double-buffered over the walk, zero-filled past the ragged ends); S, dP, P and
// dS never leave registers (the C fragments of S/dP are re-packed as the A fragments of the next
// product) and the dQ / dK / dV accumulators stay in registers until the end. Masking (ragged tails,
// causal j <= i + Nk - Nq, empty rows with lse = -inf -> P = dS = 0, never NaN) is applied per
// element only in the tiles that need it. P and dS are rounded to the input dtype for the products,
// as in the Triton kernel and FlashAttention. Supported: fp16/bf16, head dim 64 or 128, mask blocks
// that are multiples of 64 (at most 256), sm_80+; the Python side routes every other case to the
// Triton kernel. All warp-level PTX goes through csrc/ptx.cuh (runs under the CPU emulator).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <climits>
#include <limits>

#include "../common.h"
#include "attn_common.cuh"

namespace tokops {
namespace {

using namespace attn;  // kBM, kBN, kThreads, kLog2e, swizzled cp.async tiles, mma wrapper, checks

struct BwdParams {
  const void* q;
  const void* k;
  const void* v;
  const void* dout;   // contiguous (B, H, Nq, D)
  const void* out;    // contiguous (B, H, Nq, D)
  const float* lse;   // contiguous (B, H, Nq)
  const float* dlse;  // contiguous (B, H, Nq) or nullptr
  const float* bias;  // (B, Nk) or (B, H, Nk) or nullptr
  float* delta;       // (B, H, Nq) scratch
  void* dq;
  void* dk;
  void* dv;
  float* dbias;  // (B, H, Nk) or nullptr
  const int32_t* kvn;
  const int32_t* kvi;
  const int32_t* qn;
  const int32_t* qi;
  int64_t sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn;
  int64_t sbb, sbh;
  int64_t snb, snh, snq, sib, sih, siq;  // kv_num_blocks / kv_indices (expanded to B, H)
  int64_t tnb, tnh, tnk, tib, tih, tik;  // q_num_blocks / q_indices (expanded to B, H)
  int H, Hkv, group, nq, nk, D, block_q, block_k, n_qblocks, n_kblocks, causal_off;
  float qk_scale;  // scale * log2(e)
  float scale;
  bool causal, has_bias, has_dlse;
};

// ---------------------------------------------------------------------------------------- delta
template <typename T>
__global__ void __launch_bounds__(kThreads) bwd_delta_kernel(BwdParams p, int64_t rows) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * (kThreads / 32) + warp;
  if (row >= rows) return;
  const T* o = static_cast<const T*>(p.out) + row * p.D;
  const T* d = static_cast<const T*>(p.dout) + row * p.D;
  float s = 0.f;
  for (int c = lane; c < p.D; c += 32) s += to_float(o[c]) * to_float(d[c]);
  s = warp_sum(s);
  if (lane == 0) p.delta[row] = s - (p.has_dlse ? p.dlse[row] : 0.f);
}

// ------------------------------------------------------------------------------------------- dQ
// One CTA (4 warps) owns 64 query rows of one (b, h); each warp owns 16 rows. Q fragments stay in
// registers, dO is read from shared memory (ldmatrix) to keep the register budget under 255 at
// D = 128; K/V tiles are double-buffered by cp.async (Q is staged in the second buffer at the start).
// Per 64-key tile: S = Q K^T and dP = dO V^T (mma.sync), P = exp2(S * scale * log2e + bias - lse),
// dS = P (dP - delta) re-packed in registers as A fragments, dQ += dS K (K fragments from
// ldmatrix.trans). dQ (16 x D fp32 per warp) is accumulated in registers and scaled at the end.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) bwd_dq_kernel(BwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync bf16 and cp.async need sm_80; the host side refuses older GPUs
#else
  constexpr int kThr = kThreads, kM = kBM, kN = kBN;
  constexpr int kTile = kN * D;
  constexpr int kNB = kN / 8, kDB = D / 8;
  TOKOPS_EXTERN_SHARED(unsigned char, smem_raw);
  T* const smem = reinterpret_cast<T*>(smem_raw);  // [K0 V0][K1 V1][dO]; Q staged in [K1 V1]
  T* const qs = smem + 2 * kTile;
  T* const dos = smem + 4 * kTile;

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, tg = lane & 3;
  const int m0 = blockIdx.x * kM;
  const int64_t b = blockIdx.z, h = blockIdx.y, hk = h / p.group;
  const int64_t bh = b * p.H + h;
  const T* q_bh = static_cast<const T*>(p.q) + b * p.sqb + h * p.sqh;
  const T* do_bh = static_cast<const T*>(p.dout) + b * p.sdb + h * p.sdh;
  const T* kp = static_cast<const T*>(p.k) + b * p.skb + hk * p.skh;
  const T* vp = static_cast<const T*>(p.v) + b * p.svb + hk * p.svh;
  const float* bp = p.has_bias ? p.bias + b * p.sbb + h * p.sbh : nullptr;
  const int wr = warp * 16;
  const int r_first = m0 + wr, r_lo = r_first + g;  // this lane's rows: r_lo, r_lo + 8

  // lse (base 2; +inf for rows without a key or past Nq: P = 0) and delta of this lane's two rows
  float lse2[2], dlt[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int qi = r_lo + 8 * r;
    lse2[r] = INFINITY;
    dlt[r] = 0.f;
    if (qi < p.nq) {
      const float l = p.lse[bh * p.nq + qi];
      if (l != -INFINITY) lse2[r] = l * kLog2e;
      dlt[r] = p.delta[bh * p.nq + qi];
    }
  }

  const int qblk = m0 / p.block_q;
  int nblk = p.kvn[b * p.snb + h * p.snh + qblk * p.snq];
  nblk = nblk < 0 ? 0 : (nblk > p.n_kblocks ? p.n_kblocks : nblk);
  const int32_t* row_blocks = p.kvi + b * p.sib + h * p.sih + qblk * p.siq;
  const int lim_n = p.causal ? m0 + kM - 1 + p.causal_off : p.nk - 1;
  const int subs = p.block_k / kN;
  int t_blk = 0, t_sub = 0;
  auto next_tile = [&]() -> int {
    while (t_blk < nblk) {
      const int kb = row_blocks[t_blk];
      if (kb >= 0 && kb < p.n_kblocks) {
        const int n0 = kb * p.block_k + t_sub * kN;
        if (n0 < p.nk && n0 <= lim_n) {
          if (++t_sub == subs) {
            t_sub = 0;
            ++t_blk;
          }
          return n0;
        }
      }
      t_sub = 0;
      ++t_blk;
    }
    return -1;
  };
  auto load_kv = [&](int buf, int n0) {
    T* ks = smem + buf * 2 * kTile;
    cp_tile<T, D, kN, kThr>(ks, kp + int64_t(n0) * p.skn, p.skn, p.nk - n0, kp);
    cp_tile<T, D, kN, kThr>(ks + kTile, vp + int64_t(n0) * p.svn, p.svn, p.nk - n0, vp);
  };

  cp_tile<T, D, kM, kThr>(qs, q_bh + int64_t(m0) * p.sqn, p.sqn, p.nq - m0, q_bh);
  cp_tile<T, D, kM, kThr>(dos, do_bh + int64_t(m0) * p.sdn, p.sdn, p.nq - m0, do_bh);
  int n_cur = next_tile();
  if (n_cur >= 0) load_kv(0, n_cur);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncthreads();
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ptx::ldmatrix_x4(qf[kk], qs + swz<D>(wr + (lane & 15), 2 * kk + (lane >> 4)));

  float dq[kDB][4];
#pragma unroll
  for (int j = 0; j < kDB; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) dq[j][i] = 0.f;

  int buf = 0;
  while (n_cur >= 0) {
    const int n_next = next_tile();
    ptx::cp_async_wait<0>();
    __syncthreads();
    if (n_next >= 0) load_kv(buf ^ 1, n_next);
    ptx::cp_async_commit();

    if (!(p.causal && n_cur > r_first + 15 + p.causal_off)) {
      const T* ks = smem + buf * 2 * kTile;
      const T* vs = ks + kTile;
      float s[kNB][4], dp[kNB][4];
#pragma unroll
      for (int j = 0; j < kNB; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) s[j][i] = dp[j][i] = 0.f;
      // S = Q K^T, dP = dO V^T
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
        uint32_t df[4];
        ptx::ldmatrix_x4(df, dos + swz<D>(wr + (lane & 15), 2 * kk + (lane >> 4)));
#pragma unroll
        for (int np = 0; np < kNB / 2; ++np) {
          const int row = 16 * np + (lane & 7) + ((lane >> 4) << 3), chunk = 2 * kk + ((lane >> 3) & 1);
          uint32_t kf[4], vf[4];
          ptx::ldmatrix_x4(kf, ks + swz<D>(row, chunk));
          ptx::ldmatrix_x4(vf, vs + swz<D>(row, chunk));
          mma16816<T>(s[2 * np], qf[kk], kf[0], kf[1]);
          mma16816<T>(s[2 * np + 1], qf[kk], kf[2], kf[3]);
          mma16816<T>(dp[2 * np], df, vf[0], vf[1]);
          mma16816<T>(dp[2 * np + 1], df, vf[2], vf[3]);
        }
      }
      // P, dS (in place in dp)
      const bool need_mask = n_cur + kN > p.nk || (p.causal && n_cur + kN - 1 > r_first + p.causal_off);
#pragma unroll
      for (int j = 0; j < kNB; ++j) {
        float kb2[2] = {0.f, 0.f};
        if (p.has_bias)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int kj = n_cur + 8 * j + 2 * tg + e;
            kb2[e] = kj < p.nk ? bp[kj] * kLog2e : 0.f;
          }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int kj = n_cur + 8 * j + 2 * tg + (i & 1), r = i >> 1;
          float pr = exp2f(s[j][i] * p.qk_scale + kb2[i & 1] - lse2[r]);
          if (need_mask && (kj >= p.nk || (p.causal && kj > r_lo + 8 * r + p.causal_off))) pr = 0.f;
          dp[j][i] = pr * (dp[j][i] - dlt[r]);
        }
      }
      // dQ += dS K (K as the k16 x n8 operand: ldmatrix.trans)
#pragma unroll
      for (int kk = 0; kk < kNB / 2; ++kk) {
        const uint32_t da[4] = {pack2<T>(dp[2 * kk][0], dp[2 * kk][1]), pack2<T>(dp[2 * kk][2], dp[2 * kk][3]),
                                pack2<T>(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                pack2<T>(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
        for (int dd = 0; dd < D / 16; ++dd) {
          uint32_t kf[4];
          ptx::ldmatrix_x4_trans(kf, ks + swz<D>(16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * dd + (lane >> 4)));
          mma16816<T>(dq[2 * dd], da, kf[0], kf[1]);
          mma16816<T>(dq[2 * dd + 1], da, kf[2], kf[3]);
        }
      }
    }
    n_cur = n_next;
    buf ^= 1;
  }
  ptx::cp_async_wait<0>();

  T* dqp = static_cast<T*>(p.dq) + b * p.sqb + h * p.sqh;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int qi = r_lo + 8 * r;
    if (qi < p.nq) {
      T* row = dqp + int64_t(qi) * p.sqn + 2 * tg;
#pragma unroll
      for (int j = 0; j < kDB; ++j)
        *reinterpret_cast<uint32_t*>(row + 8 * j) = pack2<T>(dq[j][2 * r] * p.scale, dq[j][2 * r + 1] * p.scale);
    }
  }
#endif
}

// ---------------------------------------------------------------------------------- dK, dV, dbias
// One CTA (4 warps) owns 64 keys of one (b, kv head); each warp owns 16 keys. K and V (64 x D) stay
// in shared memory for the whole walk (A fragments by ldmatrix); the CTA loops over the query heads
// of its GQA group and, per head, over the listed query blocks (q_num_blocks / q_indices) in 64-query
// tiles: Q and dO tiles (and their lse / delta) double-buffered by cp.async. Per tile:
// S^T = K Q^T, P^T = exp2(S^T * scale * log2e + bias - lse), dV += P^T dO (dO by ldmatrix.trans),
// dP^T = V dO^T, dS^T = P^T (dP^T - delta), dK += dS^T Q (Q by ldmatrix.trans), dbias += row sums
// of dS^T. dK and dV (16 x D fp32 each per warp) are accumulated in registers.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) bwd_dkdv_kernel(BwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  constexpr int kThr = kThreads, kM = kBM, kN = kBN;
  constexpr int kQTile = kM * D;
  constexpr int kNB = kM / 8, kDB = D / 8;  // n8 blocks of S^T (queries), of dK / dV (D)
  TOKOPS_EXTERN_SHARED(unsigned char, smem_raw);
  T* const ks = reinterpret_cast<T*>(smem_raw);  // kN x D
  T* const vs = ks + kN * D;                     // kN x D
  T* const qbuf = vs + kN * D;                   // 2 buffers x [Q, dO] (kM x D each)
  float* const lbuf = reinterpret_cast<float*>(qbuf + 4 * kQTile);  // 2 buffers x [lse2, delta] (kM each)

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, tg = lane & 3;
  const int n0 = blockIdx.x * kN;
  const int64_t b = blockIdx.z, hk = blockIdx.y;
  const T* kp = static_cast<const T*>(p.k) + b * p.skb + hk * p.skh;
  const T* vp = static_cast<const T*>(p.v) + b * p.svb + hk * p.svh;
  const int wr = warp * 16;
  const int k_first = n0 + wr, k_lo = k_first + g;  // this lane's keys: k_lo, k_lo + 8

  cp_tile<T, D, kN, kThr>(ks, kp + int64_t(n0) * p.skn, p.skn, p.nk - n0, kp);
  cp_tile<T, D, kN, kThr>(vs, vp + int64_t(n0) * p.svn, p.svn, p.nk - n0, vp);
  ptx::cp_async_commit();  // waited for with the first query tile

  float dk[kDB][4], dv[kDB][4];
#pragma unroll
  for (int j = 0; j < kDB; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) dk[j][i] = dv[j][i] = 0.f;

  const int kblk = n0 / p.block_k;
  // causal: a query tile starting at m0 sees a key of this CTA only if m0 + kM - 1 + off >= n0
  const int lim_m = p.causal ? n0 - (kM - 1) - p.causal_off : INT_MIN;
  const int subs = p.block_q / kM;

  for (int gi = 0; gi < p.group; ++gi) {
    const int64_t h = hk * p.group + gi;
    const int64_t bh = b * p.H + h;
    const T* q_bh = static_cast<const T*>(p.q) + b * p.sqb + h * p.sqh;
    const T* do_bh = static_cast<const T*>(p.dout) + b * p.sdb + h * p.sdh;
    float kb2[2];  // key bias * log2(e) of this lane's two keys
#pragma unroll
    for (int r = 0; r < 2; ++r)
      kb2[r] = (p.has_bias && k_lo + 8 * r < p.nk) ? p.bias[b * p.sbb + h * p.sbh + k_lo + 8 * r] * kLog2e : 0.f;
    float dbias[2] = {0.f, 0.f};
    int nblk = p.qn[b * p.tnb + h * p.tnh + kblk * p.tnk];
    nblk = nblk < 0 ? 0 : (nblk > p.n_qblocks ? p.n_qblocks : nblk);
    const int32_t* col_blocks = p.qi + b * p.tib + h * p.tih + kblk * p.tik;
    int t_blk = 0, t_sub = 0;
    auto next_tile = [&]() -> int {  // first query of the next tile, -1 when done
      while (t_blk < nblk) {
        const int qb = col_blocks[t_blk];
        if (qb >= 0 && qb < p.n_qblocks) {
          const int m0 = qb * p.block_q + t_sub * kM;
          if (m0 < p.nq) {
            if (++t_sub == subs) {
              t_sub = 0;
              ++t_blk;
            }
            if (m0 >= lim_m) return m0;
            continue;
          }
        }
        t_sub = 0;
        ++t_blk;
      }
      return -1;
    };
    auto load_q = [&](int buf, int m0) {
      T* qs = qbuf + buf * 2 * kQTile;
      cp_tile<T, D, kM, kThr>(qs, q_bh + int64_t(m0) * p.sqn, p.sqn, p.nq - m0, q_bh);
      cp_tile<T, D, kM, kThr>(qs + kQTile, do_bh + int64_t(m0) * p.sdn, p.sdn, p.nq - m0, do_bh);
      float* ls = lbuf + buf * 2 * kM;
      for (int i = tid; i < kM; i += kThr) {  // plain loads: visible after the next __syncthreads
        const int qi = m0 + i;
        float l2 = INFINITY, dl = 0.f;
        if (qi < p.nq) {
          const float l = p.lse[bh * p.nq + qi];
          if (l != -INFINITY) l2 = l * kLog2e;
          dl = p.delta[bh * p.nq + qi];
        }
        ls[i] = l2;
        ls[kM + i] = dl;
      }
    };

    __syncthreads();  // the previous head's last tile is no longer read
    int m_cur = next_tile();
    if (m_cur >= 0) load_q(0, m_cur);
    ptx::cp_async_commit();
    int buf = 0;
    while (m_cur >= 0) {
      const int m_next = next_tile();
      ptx::cp_async_wait<0>();
      __syncthreads();
      if (m_next >= 0) load_q(buf ^ 1, m_next);
      ptx::cp_async_commit();

      // a warp whose 16 keys no query of this tile sees (causal) skips the work
      if (!(p.causal && k_first > m_cur + kM - 1 + p.causal_off)) {
        const T* qs = qbuf + buf * 2 * kQTile;
        const T* dos = qs + kQTile;
        const float* l2s = lbuf + buf * 2 * kM;
        const float* dls = l2s + kM;
        // S^T = K Q^T (16 keys x 64 queries per warp)
        float st[kNB][4];
#pragma unroll
        for (int j = 0; j < kNB; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) st[j][i] = 0.f;
#pragma unroll 1  // (a rolled k loop keeps ptxas from hoisting every fragment: no spills at D = 128)
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t af[4];
          ptx::ldmatrix_x4(af, ks + swz<D>(wr + (lane & 15), 2 * kk + (lane >> 4)));
#pragma unroll
          for (int np = 0; np < kNB / 2; ++np) {
            uint32_t bf[4];
            ptx::ldmatrix_x4(bf, qs + swz<D>(16 * np + (lane & 7) + ((lane >> 4) << 3), 2 * kk + ((lane >> 3) & 1)));
            mma16816<T>(st[2 * np], af, bf[0], bf[1]);
            mma16816<T>(st[2 * np + 1], af, bf[2], bf[3]);
          }
        }
        // P^T, rounded to T and packed as the A fragments of dV += P^T dO (16 registers instead of
        // 32: with the dK and dV accumulators, D = 128 fits in 255 registers without spilling)
        const bool need_mask = k_first + 16 > p.nk || m_cur + kM > p.nq ||
                               (p.causal && k_first + 15 > m_cur + p.causal_off);
#pragma unroll
        for (int j = 0; j < kNB; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            const int col = 8 * j + 2 * tg + (i & 1), qi = m_cur + col, kj = k_lo + 8 * (i >> 1);
            float pr = exp2f(st[j][i] * p.qk_scale + kb2[i >> 1] - l2s[col]);
            if (need_mask && (kj >= p.nk || (p.causal && kj > qi + p.causal_off))) pr = 0.f;
            st[j][i] = pr;
          }
        uint32_t pa[kNB / 2][4];
#pragma unroll
        for (int kk = 0; kk < kNB / 2; ++kk) {
          pa[kk][0] = pack2<T>(st[2 * kk][0], st[2 * kk][1]);
          pa[kk][1] = pack2<T>(st[2 * kk][2], st[2 * kk][3]);
          pa[kk][2] = pack2<T>(st[2 * kk + 1][0], st[2 * kk + 1][1]);
          pa[kk][3] = pack2<T>(st[2 * kk + 1][2], st[2 * kk + 1][3]);
        }
        // dV += P^T dO (dO as the k16 x n8 operand: ldmatrix.trans)
#pragma unroll
        for (int kk = 0; kk < kNB / 2; ++kk) {
#pragma unroll
          for (int dd = 0; dd < D / 16; ++dd) {
            uint32_t bf[4];
            ptx::ldmatrix_x4_trans(bf, dos + swz<D>(16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * dd + (lane >> 4)));
            mma16816<T>(dv[2 * dd], pa[kk], bf[0], bf[1]);
            mma16816<T>(dv[2 * dd + 1], pa[kk], bf[2], bf[3]);
          }
        }
        // dP^T = V dO^T, then dS^T = P^T (dP^T - delta) (in place)
        float dpt[kNB][4];
#pragma unroll
        for (int j = 0; j < kNB; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) dpt[j][i] = 0.f;
#pragma unroll 1
        for (int kk = 0; kk < D / 16; ++kk) {
          uint32_t af[4];
          ptx::ldmatrix_x4(af, vs + swz<D>(wr + (lane & 15), 2 * kk + (lane >> 4)));
#pragma unroll
          for (int np = 0; np < kNB / 2; ++np) {
            uint32_t bf[4];
            ptx::ldmatrix_x4(bf, dos + swz<D>(16 * np + (lane & 7) + ((lane >> 4) << 3), 2 * kk + ((lane >> 3) & 1)));
            mma16816<T>(dpt[2 * np], af, bf[0], bf[1]);
            mma16816<T>(dpt[2 * np + 1], af, bf[2], bf[3]);
          }
        }
#pragma unroll
        for (int j = 0; j < kNB; ++j)
#pragma unroll
          for (int i = 0; i < 4; ++i) {
            // dS^T from P^T as rounded to T for dV (one more rounding of P, relative 2^-9 fp16 /
            // 2^-8 bf16, the order of dS's own rounding to T for the dK product)
            const float pr = unpack_half<T>(pa[j / 2][2 * (j % 2) + (i >> 1)], i & 1);
            const float ds = pr * (dpt[j][i] - dls[8 * j + 2 * tg + (i & 1)]);
            dbias[i >> 1] += ds;
            dpt[j][i] = ds;
          }
        // dK += dS^T Q (Q as the k16 x n8 operand: ldmatrix.trans)
#pragma unroll
        for (int kk = 0; kk < kNB / 2; ++kk) {
          const uint32_t da[4] = {pack2<T>(dpt[2 * kk][0], dpt[2 * kk][1]), pack2<T>(dpt[2 * kk][2], dpt[2 * kk][3]),
                                  pack2<T>(dpt[2 * kk + 1][0], dpt[2 * kk + 1][1]),
                                  pack2<T>(dpt[2 * kk + 1][2], dpt[2 * kk + 1][3])};
#pragma unroll
          for (int dd = 0; dd < D / 16; ++dd) {
            uint32_t bf[4];
            ptx::ldmatrix_x4_trans(bf, qs + swz<D>(16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * dd + (lane >> 4)));
            mma16816<T>(dk[2 * dd], da, bf[0], bf[1]);
            mma16816<T>(dk[2 * dd + 1], da, bf[2], bf[3]);
          }
        }
      }
      m_cur = m_next;
      buf ^= 1;
    }
    ptx::cp_async_wait<0>();  // the last (empty) group; with no tile at all, also K and V
    if (p.has_bias) {
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float tot = dbias[r];
        tot += __shfl_xor_sync(0xffffffffu, tot, 1);
        tot += __shfl_xor_sync(0xffffffffu, tot, 2);
        const int kj = k_lo + 8 * r;
        if (tg == 0 && kj < p.nk) p.dbias[bh * p.nk + kj] = tot;
      }
    }
  }

  T* dkp = static_cast<T*>(p.dk) + b * p.skb + hk * p.skh;
  T* dvp = static_cast<T*>(p.dv) + b * p.svb + hk * p.svh;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int kj = k_lo + 8 * r;
    if (kj < p.nk) {
      T* krow = dkp + int64_t(kj) * p.skn + 2 * tg;
      T* vrow = dvp + int64_t(kj) * p.svn + 2 * tg;
#pragma unroll
      for (int j = 0; j < kDB; ++j) {
        *reinterpret_cast<uint32_t*>(krow + 8 * j) = pack2<T>(dk[j][2 * r] * p.scale, dk[j][2 * r + 1] * p.scale);
        *reinterpret_cast<uint32_t*>(vrow + 8 * j) = pack2<T>(dv[j][2 * r], dv[j][2 * r + 1]);
      }
    }
  }
#endif
}

template <typename T, int D>
void launch(const BwdParams& prm, int B, cudaStream_t stream) {
  const int64_t rows = int64_t(B) * prm.H * prm.nq;
  const int64_t delta_blocks = (rows + kThreads / 32 - 1) / (kThreads / 32);
  TORCH_CHECK(delta_blocks <= std::numeric_limits<int32_t>::max(), "too many query rows for the CUDA kernel");
  TOKOPS_LAUNCH(unsigned(delta_blocks), kThreads, 0, stream, bwd_delta_kernel<T>)(prm, rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // dQ: K/V double buffer (Q staged in the second) + the dO tile
  const size_t smem_dq = size_t(5) * kBN * D * sizeof(T);
  auto dq_kernel = bwd_dq_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_dq)));
  dim3 grid_q((prm.nq + kBM - 1) / kBM, prm.H, B);
  TOKOPS_LAUNCH(grid_q, kThreads, smem_dq, stream, dq_kernel)(prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  // dK/dV: K, V + double-buffered [Q, dO] + double-buffered [lse2, delta]
  const size_t smem_kv = size_t(2) * kBN * D * sizeof(T) + size_t(4) * kBM * D * sizeof(T) + 4 * kBM * sizeof(float);
  auto dkdv_kernel = bwd_dkdv_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(dkdv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem_kv)));
  dim3 grid_k((prm.nk + kBN - 1) / kBN, prm.Hkv, B);
  TOKOPS_LAUNCH(grid_k, kThreads, smem_kv, stream, dkdv_kernel)(prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> block_sparse_attn_bwd_cuda(
    const at::Tensor& dout_in, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out_in,
    const at::Tensor& lse_in, const std::optional<at::Tensor>& dlse_in, const at::Tensor& kv_num_blocks,
    const at::Tensor& kv_indices, const at::Tensor& q_num_blocks, const at::Tensor& q_indices, int64_t block_q,
    int64_t block_k, bool causal, double scale, const std::optional<at::Tensor>& key_bias) {
  for (const at::Tensor* t : {&dout_in, &out_in, &lse_in}) TOKOPS_CHECK_CUDA(*t);
  const QKVShape s = check_qkv(q, k, v);
  const int64_t B = s.B, H = s.H, Nq = s.Nq, D = s.D, Hkv = s.Hkv, Nk = s.Nk;
  TORCH_CHECK(dout_in.sizes() == q.sizes(), "dout must have the shape of q ", q.sizes(), ", got ", dout_in.sizes());
  TORCH_CHECK(out_in.sizes() == q.sizes(), "out must have the shape of q ", q.sizes(), ", got ", out_in.sizes());
  TOKOPS_CHECK_DTYPE(dout_in, q.scalar_type());
  TOKOPS_CHECK_DTYPE(out_in, q.scalar_type());
  TOKOPS_CHECK_DTYPE(lse_in, at::kFloat);
  TORCH_CHECK(lse_in.dim() == 3 && lse_in.size(0) == B && lse_in.size(1) == H && lse_in.size(2) == Nq,
              "lse must have shape (B, H, Nq) = (", B, ", ", H, ", ", Nq, "), got ", lse_in.sizes());
  check_blocks(block_q, block_k);
  const int64_t nQ = (Nq + block_q - 1) / block_q, nK = (Nk + block_k - 1) / block_k;
  check_csr(kv_num_blocks, kv_indices, "kv_num_blocks", "kv_indices", B, H, nQ, nK);
  check_csr(q_num_blocks, q_indices, "q_num_blocks", "q_indices", B, H, nK, nQ);
  const bool has_dlse = dlse_in.has_value();
  at::Tensor dlse;
  if (has_dlse) {
    TOKOPS_CHECK_CUDA(*dlse_in);
    TOKOPS_CHECK_DTYPE(*dlse_in, at::kFloat);
    TORCH_CHECK(dlse_in->sizes() == lse_in.sizes(), "dlse must have the shape of lse ", lse_in.sizes(), ", got ",
                dlse_in->sizes());
    dlse = dlse_in->contiguous();
  }
  const bool has_bias = key_bias.has_value();
  at::Tensor bias;
  if (has_bias) {
    bias = *key_bias;
    check_key_bias(bias, B, H, Nk);
  }
  TORCH_CHECK(B <= 65535 && H <= 65535, "the CUDA kernel takes at most 65535 batches and heads, got ", B, ", ", H);
  const at::Tensor dout = dout_in.contiguous();
  const at::Tensor out = out_in.contiguous();
  const at::Tensor lse = lse_in.contiguous();
  for (const at::Tensor* t : {&q, &k, &v, &dout, &out})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, "q, k, v, dout, out must be 16-byte aligned");
  const c10::cuda::CUDAGuard guard(q.device());
  check_sm80();
  for (const at::Tensor* t : {&k, &v, &dout, &out, &lse, &kv_num_blocks, &kv_indices, &q_num_blocks, &q_indices})
    TORCH_CHECK(t->device() == q.device(), "all tensors must be on the device of q (", q.device(), "), got ",
                t->device());
  if (has_dlse) TORCH_CHECK(dlse.device() == q.device(), "dlse must be on the device of q");
  if (has_bias) TORCH_CHECK(bias.device() == q.device(), "key_bias must be on the device of q");

  at::Tensor dq = new_output(q.sizes(), q.options());
  at::Tensor dk = new_output(k.sizes(), k.options());
  at::Tensor dv = new_output(v.sizes(), v.options());
  at::Tensor dbias = has_bias ? new_output({B, H, Nk}, q.options().dtype(at::kFloat))
                              : new_output({0}, q.options().dtype(at::kFloat));
  if (B == 0 || H == 0 || Nq == 0 || Nk == 0) {  // nothing to launch: every gradient is zero
    dq.zero_();
    dk.zero_();
    dv.zero_();
    dbias.zero_();
    return {dq, dk, dv, dbias};
  }
  at::Tensor delta = at::empty({B, H, Nq}, q.options().dtype(at::kFloat));
  at::Tensor num = kv_num_blocks.expand({B, H, nQ});
  at::Tensor idx = kv_indices.expand({B, H, nQ, nK});
  at::Tensor tnum = q_num_blocks.expand({B, H, nK});
  at::Tensor tidx = q_indices.expand({B, H, nK, nQ});

  BwdParams prm{};
  prm.q = q.data_ptr();
  prm.k = k.data_ptr();
  prm.v = v.data_ptr();
  prm.dout = dout.data_ptr();
  prm.out = out.data_ptr();
  prm.lse = lse.data_ptr<float>();
  prm.dlse = has_dlse ? dlse.data_ptr<float>() : nullptr;
  prm.bias = has_bias ? bias.data_ptr<float>() : nullptr;
  prm.delta = delta.data_ptr<float>();
  prm.dq = dq.data_ptr();
  prm.dk = dk.data_ptr();
  prm.dv = dv.data_ptr();
  prm.dbias = has_bias ? dbias.data_ptr<float>() : nullptr;
  prm.kvn = num.data_ptr<int32_t>();
  prm.kvi = idx.data_ptr<int32_t>();
  prm.qn = tnum.data_ptr<int32_t>();
  prm.qi = tidx.data_ptr<int32_t>();
  // q / dq, k / dk, v / dv share strides: all contiguous with the same shapes (a size-1 dim's stride
  // is never multiplied by a nonzero index)
  prm.sqb = q.stride(0), prm.sqh = q.stride(1), prm.sqn = q.stride(2);
  prm.skb = k.stride(0), prm.skh = k.stride(1), prm.skn = k.stride(2);
  prm.svb = v.stride(0), prm.svh = v.stride(1), prm.svn = v.stride(2);
  prm.sdb = dout.stride(0), prm.sdh = dout.stride(1), prm.sdn = dout.stride(2);
  prm.sbb = has_bias ? bias.stride(0) : 0;
  prm.sbh = has_bias && bias.dim() == 3 ? bias.stride(1) : 0;
  prm.snb = num.stride(0), prm.snh = num.stride(1), prm.snq = num.stride(2);
  prm.sib = idx.stride(0), prm.sih = idx.stride(1), prm.siq = idx.stride(2);
  prm.tnb = tnum.stride(0), prm.tnh = tnum.stride(1), prm.tnk = tnum.stride(2);
  prm.tib = tidx.stride(0), prm.tih = tidx.stride(1), prm.tik = tidx.stride(2);
  prm.H = int(H);
  prm.Hkv = int(Hkv);
  prm.group = int(H / Hkv);
  prm.nq = int(Nq);
  prm.nk = int(Nk);
  prm.D = int(D);
  prm.block_q = int(block_q);
  prm.block_k = int(block_k);
  prm.n_qblocks = int(nQ);
  prm.n_kblocks = int(nK);
  prm.causal_off = int(Nk - Nq);
  prm.qk_scale = float(scale) * kLog2e;
  prm.scale = float(scale);
  prm.causal = causal;
  prm.has_bias = has_bias;
  prm.has_dlse = has_dlse;

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (q.scalar_type() == at::kHalf) {
    if (D == 64) launch<__half, 64>(prm, int(B), stream);
    else launch<__half, 128>(prm, int(B), stream);
  } else {
    if (D == 64) launch<__nv_bfloat16, 64>(prm, int(B), stream);
    else launch<__nv_bfloat16, 128>(prm, int(B), stream);
  }
  return {dq, dk, dv, dbias};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokops, m) {
  m.def("block_sparse_attn_bwd_cuda(Tensor dout, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor? dlse, Tensor kv_num_blocks, Tensor kv_indices, Tensor q_num_blocks, Tensor q_indices, "
        "int block_q, int block_k, bool causal, float scale, Tensor? key_bias) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tokops, CUDA, m) { m.impl("block_sparse_attn_bwd_cuda", &block_sparse_attn_bwd_cuda); }

}  // namespace tokops
