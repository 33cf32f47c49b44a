// CUDA backward kernel of block-sparse attention (tokops::block_sparse_attn_bwd_cuda).
// Spec: DESIGN.md "Sparse attention"; Python reference: reference.bwd (float64, analytic):
//   P = exp(s - lse), delta = rowsum(dO * O) - dlse, dS = P * (dO V^T - delta),
//   dQ = scale * dS K, dK = scale * dS^T Q, dV = P^T dO, dbias[b, h, j] = sum_i dS[i, j].
// FlashAttention-2 backward (Dao 2023), split into three kernels so that nothing needs atomics:
//   1. delta kernel: one warp per query row, delta = sum_d dO*O (fp32) minus dlse when given.
//   2. dQ kernel (query-block-major, same walk as the forward over kv_indices): one CTA (4 warps)
//      owns 64 query rows of one (b, h); per 64-key sub-tile it recomputes S = Q K^T and
//      dP = dO V^T, forms dS in shared memory and accumulates dQ += dS K in registers.
//   3. dK/dV kernel (key-block-major over the transposed mask q_num_blocks / q_indices): one CTA
//      owns 64 keys of one (b, kv head) and loops over the query heads of its GQA group, so dK and
//      dV of a KV head are summed in registers without races; per 64-query sub-tile it recomputes
//      S^T = K Q^T and dP^T = V dO^T, forms P^T and dS^T, and accumulates dV += P^T dO,
//      dK += dS^T Q and dbias (per query head, fp32) = row sums of dS^T.
// Each warp owns 16 rows (queries in 2., keys in 3.). Products run on tensor cores (WMMA 16x16x16,
// fp16/bf16 in, fp32 accumulate); the 16x16 score/dP blocks are staged through a per-warp fp32
// scratch so that masking (ragged tails, causal j <= i + Nk - Nq, empty rows with lse = -inf)
// is applied per element. P and dS are rounded to the input dtype for the products, as in the
// Triton kernel and FlashAttention. Rows with no allowed key have lse = -inf and contribute
// P = dS = 0 (never NaN). Supported: fp16/bf16, head dim 64 or 128, mask blocks that are multiples
// of 64 (at most 256), sm_80+; the Python side routes every other case to the Triton kernel.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <climits>

#include "../common.h"
#include "attn_common.cuh"

namespace tokops {
namespace {

using namespace attn;  // kBM, kBN, kThreads, kLog2e, conversions, warp reductions, load_tile, checks

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
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) bwd_dq_kernel(BwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA needs sm_80; the host side refuses older GPUs
#else
  using namespace nvcuda;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  TOKOPS_EXTERN_SHARED(unsigned char, smem_raw);
  T* Qs = reinterpret_cast<T*>(smem_raw);  // kBM x D
  T* DOs = Qs + kBM * D;                   // kBM x D
  T* Ks = DOs + kBM * D;                   // kBN x D
  T* Vs = Ks + kBN * D;                    // kBN x D
  T* DSs = Vs + kBN * D;                   // kBM x kBN (dS, input dtype)
  float* Scr = reinterpret_cast<float*>(DSs + kBM * kBN);  // 4 warps x 2 x 16 x 16 (S, dP blocks)
  float* Lse2s = Scr + 4 * 2 * 256;                        // kBM: lse * log2(e), +inf for no-key rows
  float* Deltas = Lse2s + kBM;                             // kBM

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int bh = blockIdx.x;
  const int m0 = blockIdx.y * kBM;
  const int64_t b = bh / p.H, h = bh % p.H, hk = h / p.group;
  const T* qp = static_cast<const T*>(p.q) + b * p.sqb + h * p.sqh;
  const T* dop = static_cast<const T*>(p.dout) + b * p.sdb + h * p.sdh;
  const T* kp = static_cast<const T*>(p.k) + b * p.skb + hk * p.skh;
  const T* vp = static_cast<const T*>(p.v) + b * p.svb + hk * p.svh;
  const float* bp = p.has_bias ? p.bias + b * p.sbb + h * p.sbh : nullptr;

  load_tile<T, D>(Qs, qp + int64_t(m0) * p.sqn, p.sqn, kBM, p.nq - m0);
  load_tile<T, D>(DOs, dop + int64_t(m0) * p.sdn, p.sdn, kBM, p.nq - m0);
  for (int r = tid; r < kBM; r += kThreads) {
    const int qi = m0 + r;
    float l2 = INFINITY, dl = 0.f;
    if (qi < p.nq) {
      const float l = p.lse[int64_t(bh) * p.nq + qi];
      if (l != -INFINITY) l2 = l * kLog2e;
      dl = p.delta[int64_t(bh) * p.nq + qi];
    }
    Lse2s[r] = l2;
    Deltas[r] = dl;
  }
  __syncthreads();

  const int wr = warp * 16;  // this warp's first query row in the tile
  float* Ss = Scr + warp * 512;
  float* DPs = Ss + 256;
  T* DSw = DSs + wr * kBN;

  Acc dq_acc[D / 16];
#pragma unroll
  for (int j = 0; j < D / 16; ++j) wmma::fill_fragment(dq_acc[j], 0.f);

  const int qblk = m0 / p.block_q;
  int nblk = p.kvn[b * p.snb + h * p.snh + qblk * p.snq];
  nblk = nblk < 0 ? 0 : (nblk > p.n_kblocks ? p.n_kblocks : nblk);
  const int32_t* row_blocks = p.kvi + b * p.sib + h * p.sih + qblk * p.siq;
  const int lim_n = p.causal ? m0 + kBM - 1 + p.causal_off : p.nk - 1;  // last key any row may see
  // element ownership inside a 16x16 block: row er, columns ec .. ec + 7
  const int er = lane / 2, ec = (lane % 2) * 8;

  for (int t = 0; t < nblk; ++t) {
    const int kb = row_blocks[t];
    if (kb < 0 || kb >= p.n_kblocks) continue;  // uniform over the CTA
    for (int sub = 0; sub < p.block_k / kBN; ++sub) {
      const int n0 = kb * p.block_k + sub * kBN;
      if (n0 >= p.nk || n0 > lim_n) continue;  // uniform over the CTA
      load_tile<T, D>(Ks, kp + int64_t(n0) * p.skn, p.skn, kBN, p.nk - n0);
      load_tile<T, D>(Vs, vp + int64_t(n0) * p.svn, p.svn, kBN, p.nk - n0);
      __syncthreads();

#pragma unroll
      for (int j = 0; j < kBN / 16; ++j) {
        // S and dP for rows wr..wr+15, keys n0 + j*16 .. +15
        Acc s_acc, dp_acc;
        wmma::fill_fragment(s_acc, 0.f);
        wmma::fill_fragment(dp_acc, 0.f);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;
          wmma::load_matrix_sync(a, Qs + wr * D + kk * 16, D);
          wmma::load_matrix_sync(bt, Ks + j * 16 * D + kk * 16, D);
          wmma::mma_sync(s_acc, a, bt, s_acc);
          wmma::load_matrix_sync(a, DOs + wr * D + kk * 16, D);
          wmma::load_matrix_sync(bt, Vs + j * 16 * D + kk * 16, D);
          wmma::mma_sync(dp_acc, a, bt, dp_acc);
        }
        wmma::store_matrix_sync(Ss, s_acc, 16, wmma::mem_row_major);
        wmma::store_matrix_sync(DPs, dp_acc, 16, wmma::mem_row_major);
        __syncwarp();
        const int row = wr + er, qi = m0 + row;
        const float l2 = Lse2s[row], dl = Deltas[row];
#pragma unroll
        for (int e = 0; e < 8; ++e) {
          const int c = ec + e, kj = n0 + j * 16 + c;
          const bool ok = kj < p.nk && qi < p.nq && l2 != INFINITY && (!p.causal || kj <= qi + p.causal_off);
          float ds = 0.f;
          if (ok) {
            float x = Ss[er * 16 + c] * p.qk_scale;
            if (p.has_bias) x += bp[kj] * kLog2e;
            const float pr = exp2f(x - l2);
            ds = pr * (DPs[er * 16 + c] - dl);
          }
          DSw[er * kBN + j * 16 + c] = from_float<T>(ds);
        }
        __syncwarp();  // the scratch is overwritten by the next block
      }

      // dQ[wr:wr+16] += dS K
#pragma unroll
      for (int jd = 0; jd < D / 16; ++jd) {
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bk;
          wmma::load_matrix_sync(a, DSw + kk * 16, kBN);
          wmma::load_matrix_sync(bk, Ks + kk * 16 * D + jd * 16, D);
          wmma::mma_sync(dq_acc[jd], a, bk, dq_acc[jd]);
        }
      }
      __syncthreads();  // Ks / Vs are overwritten by the next tile
    }
  }

  // stage dQ (fp32) in the K/V region (2 * kBN * D * sizeof(T) == kBM * D * sizeof(float))
  float* stage = reinterpret_cast<float*>(Ks);
#pragma unroll
  for (int jd = 0; jd < D / 16; ++jd) {
#pragma unroll
    for (int e = 0; e < dq_acc[jd].num_elements; ++e) dq_acc[jd].x[e] *= p.scale;
    wmma::store_matrix_sync(stage + wr * D + jd * 16, dq_acc[jd], D, wmma::mem_row_major);
  }
  __syncthreads();
  T* dqp = static_cast<T*>(p.dq) + b * p.sqb + h * p.sqh;
  for (int i = tid; i < kBM * D; i += kThreads) {
    const int r = i / D, c = i % D, qi = m0 + r;
    if (qi < p.nq) dqp[int64_t(qi) * p.sqn + c] = from_float<T>(stage[i]);
  }
#endif
}

// ---------------------------------------------------------------------------------- dK, dV, dbias
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) bwd_dkdv_kernel(BwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();
#else
  using namespace nvcuda;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  TOKOPS_EXTERN_SHARED(unsigned char, smem_raw);
  T* Ks = reinterpret_cast<T*>(smem_raw);  // kBN x D
  T* Vs = Ks + kBN * D;                    // kBN x D
  T* Qs = Vs + kBN * D;                    // kBM x D
  T* DOs = Qs + kBM * D;                   // kBM x D
  T* PTs = DOs + kBM * D;                  // kBN x kBM (P^T, input dtype)
  T* DSTs = PTs + kBN * kBM;               // kBN x kBM (dS^T, input dtype)
  float* Scr = reinterpret_cast<float*>(DSTs + kBN * kBM);  // 4 warps x 2 x 16 x 16
  float* Lse2s = Scr + 4 * 2 * 256;                         // kBM
  float* Deltas = Lse2s + kBM;                              // kBM

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int bhk = blockIdx.x;
  const int n0 = blockIdx.y * kBN;
  const int64_t b = bhk / p.Hkv, hk = bhk % p.Hkv;
  const T* kp = static_cast<const T*>(p.k) + b * p.skb + hk * p.skh;
  const T* vp = static_cast<const T*>(p.v) + b * p.svb + hk * p.svh;

  load_tile<T, D>(Ks, kp + int64_t(n0) * p.skn, p.skn, kBN, p.nk - n0);
  load_tile<T, D>(Vs, vp + int64_t(n0) * p.svn, p.svn, kBN, p.nk - n0);
  // (the first __syncthreads of the loop below orders these loads before any use)

  const int wr = warp * 16;  // this warp's first key in the tile
  float* Ss = Scr + warp * 512;
  float* DPs = Ss + 256;
  T* PTw = PTs + wr * kBM;
  T* DSTw = DSTs + wr * kBM;
  const int er = lane / 2, ec = (lane % 2) * 8;  // key row er, query columns ec .. ec + 7
  const int kj = n0 + wr + er;                   // the key this lane's elements belong to

  Acc dk_acc[D / 16], dv_acc[D / 16];
#pragma unroll
  for (int j = 0; j < D / 16; ++j) {
    wmma::fill_fragment(dk_acc[j], 0.f);
    wmma::fill_fragment(dv_acc[j], 0.f);
  }

  const int kblk = n0 / p.block_k;
  // causal: a query tile starting at m0 sees a key of this tile only if m0 + kBM - 1 + off >= n0
  const int lim_m = p.causal ? n0 - (kBM - 1) - p.causal_off : INT_MIN;

  for (int g = 0; g < p.group; ++g) {
    const int64_t h = hk * p.group + g;
    const int64_t bh = b * p.H + h;
    const float bias2 = (p.has_bias && kj < p.nk) ? p.bias[b * p.sbb + h * p.sbh + kj] * kLog2e : 0.f;
    float dbias_part = 0.f;
    int nblk = p.qn[b * p.tnb + h * p.tnh + kblk * p.tnk];
    nblk = nblk < 0 ? 0 : (nblk > p.n_qblocks ? p.n_qblocks : nblk);
    const int32_t* col_blocks = p.qi + b * p.tib + h * p.tih + kblk * p.tik;
    for (int t = 0; t < nblk; ++t) {
      const int qb = col_blocks[t];
      if (qb < 0 || qb >= p.n_qblocks) continue;  // uniform over the CTA
      for (int sub = 0; sub < p.block_q / kBM; ++sub) {
        const int m0 = qb * p.block_q + sub * kBM;
        if (m0 >= p.nq || m0 < lim_m) continue;  // uniform over the CTA
        __syncthreads();  // previous tile's Qs / DOs / Lse2s / Deltas are no longer read
        const T* qp = static_cast<const T*>(p.q) + b * p.sqb + h * p.sqh + int64_t(m0) * p.sqn;
        const T* dop = static_cast<const T*>(p.dout) + b * p.sdb + h * p.sdh + int64_t(m0) * p.sdn;
        load_tile<T, D>(Qs, qp, p.sqn, kBM, p.nq - m0);
        load_tile<T, D>(DOs, dop, p.sdn, kBM, p.nq - m0);
        for (int r = tid; r < kBM; r += kThreads) {
          const int qi = m0 + r;
          float l2 = INFINITY, dl = 0.f;
          if (qi < p.nq) {
            const float l = p.lse[bh * p.nq + qi];
            if (l != -INFINITY) l2 = l * kLog2e;
            dl = p.delta[bh * p.nq + qi];
          }
          Lse2s[r] = l2;
          Deltas[r] = dl;
        }
        __syncthreads();

#pragma unroll 1  // (unrolling only adds register pressure next to the dK/dV accumulators)
        for (int j = 0; j < kBM / 16; ++j) {
          // S^T and dP^T for keys wr..wr+15, queries m0 + j*16 .. +15
          Acc s_acc, dp_acc;
          wmma::fill_fragment(s_acc, 0.f);
          wmma::fill_fragment(dp_acc, 0.f);
#pragma unroll
          for (int kk = 0; kk < D / 16; ++kk) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;
            wmma::load_matrix_sync(a, Ks + wr * D + kk * 16, D);
            wmma::load_matrix_sync(bt, Qs + j * 16 * D + kk * 16, D);
            wmma::mma_sync(s_acc, a, bt, s_acc);
            wmma::load_matrix_sync(a, Vs + wr * D + kk * 16, D);
            wmma::load_matrix_sync(bt, DOs + j * 16 * D + kk * 16, D);
            wmma::mma_sync(dp_acc, a, bt, dp_acc);
          }
          wmma::store_matrix_sync(Ss, s_acc, 16, wmma::mem_row_major);
          wmma::store_matrix_sync(DPs, dp_acc, 16, wmma::mem_row_major);
          __syncwarp();
#pragma unroll
          for (int e = 0; e < 8; ++e) {
            const int c = ec + e, col = j * 16 + c, qi = m0 + col;
            const float l2 = Lse2s[col];
            const bool ok = kj < p.nk && qi < p.nq && l2 != INFINITY && (!p.causal || kj <= qi + p.causal_off);
            float pr = 0.f, ds = 0.f;
            if (ok) {
              pr = exp2f(Ss[er * 16 + c] * p.qk_scale + bias2 - l2);
              ds = pr * (DPs[er * 16 + c] - Deltas[col]);
            }
            dbias_part += ds;
            PTw[er * kBM + col] = from_float<T>(pr);
            DSTw[er * kBM + col] = from_float<T>(ds);
          }
          __syncwarp();
        }

        // dV[wr:wr+16] += P^T dO ; dK[wr:wr+16] += dS^T Q
#pragma unroll
        for (int jd = 0; jd < D / 16; ++jd) {
#pragma unroll
          for (int kk = 0; kk < kBM / 16; ++kk) {
            wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
            wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bm;
            wmma::load_matrix_sync(a, PTw + kk * 16, kBM);
            wmma::load_matrix_sync(bm, DOs + kk * 16 * D + jd * 16, D);
            wmma::mma_sync(dv_acc[jd], a, bm, dv_acc[jd]);
            wmma::load_matrix_sync(a, DSTw + kk * 16, kBM);
            wmma::load_matrix_sync(bm, Qs + kk * 16 * D + jd * 16, D);
            wmma::mma_sync(dk_acc[jd], a, bm, dk_acc[jd]);
          }
        }
      }
    }
    if (p.has_bias) {
      const float total = dbias_part + __shfl_xor_sync(0xffffffffu, dbias_part, 1);
      if (ec == 0 && kj < p.nk) p.dbias[bh * p.nk + kj] = total;
    }
  }
  __syncthreads();

  // stage dK, then dV (fp32) in the Q/dO region (2 * kBM * D * sizeof(T) == kBN * D * sizeof(float))
  float* stage = reinterpret_cast<float*>(Qs);
#pragma unroll
  for (int jd = 0; jd < D / 16; ++jd) {
#pragma unroll
    for (int e = 0; e < dk_acc[jd].num_elements; ++e) dk_acc[jd].x[e] *= p.scale;
    wmma::store_matrix_sync(stage + wr * D + jd * 16, dk_acc[jd], D, wmma::mem_row_major);
  }
  __syncthreads();
  T* dkp = static_cast<T*>(p.dk) + b * p.skb + hk * p.skh;
  for (int i = tid; i < kBN * D; i += kThreads) {
    const int r = i / D, c = i % D, n = n0 + r;
    if (n < p.nk) dkp[int64_t(n) * p.skn + c] = from_float<T>(stage[i]);
  }
  __syncthreads();
#pragma unroll
  for (int jd = 0; jd < D / 16; ++jd)
    wmma::store_matrix_sync(stage + wr * D + jd * 16, dv_acc[jd], D, wmma::mem_row_major);
  __syncthreads();
  T* dvp = static_cast<T*>(p.dv) + b * p.svb + hk * p.svh;
  for (int i = tid; i < kBN * D; i += kThreads) {
    const int r = i / D, c = i % D, n = n0 + r;
    if (n < p.nk) dvp[int64_t(n) * p.svn + c] = from_float<T>(stage[i]);
  }
#endif
}

template <int D, typename T>
constexpr size_t smem_bytes() {
  // 4 (q/k tiles) x 64 x D in T, 2 x 64 x 64 in T (the dkdv kernel's P^T and dS^T; the dq kernel
  // uses one), per-warp fp32 scratch, lse2 and delta
  return size_t(4) * 64 * D * sizeof(T) + size_t(2) * 64 * 64 * sizeof(T) + size_t(4 * 2 * 256) * sizeof(float) +
         2 * 64 * sizeof(float);
}

template <typename T, int D>
void launch(const BwdParams& prm, int B, cudaStream_t stream) {
  const int64_t rows = int64_t(B) * prm.H * prm.nq;
  const int64_t delta_blocks = (rows + kThreads / 32 - 1) / (kThreads / 32);
  TORCH_CHECK(delta_blocks <= std::numeric_limits<int32_t>::max(), "too many query rows for the CUDA kernel");
  TOKOPS_LAUNCH(unsigned(delta_blocks), kThreads, 0, stream, bwd_delta_kernel<T>)(prm, rows);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  const size_t smem = smem_bytes<D, T>();
  auto dq_kernel = bwd_dq_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(dq_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  dim3 grid_q(B * prm.H, (prm.nq + kBM - 1) / kBM);
  TOKOPS_LAUNCH(grid_q, kThreads, smem, stream, dq_kernel)(prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  auto dkdv_kernel = bwd_dkdv_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(dkdv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  dim3 grid_k(B * prm.Hkv, (prm.nk + kBN - 1) / kBN);
  TOKOPS_LAUNCH(grid_k, kThreads, smem, stream, dkdv_kernel)(prm);
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
  TORCH_CHECK(B * H <= std::numeric_limits<int32_t>::max() && nQ * block_q / kBM <= 65535 &&
                  nK * block_k / kBN <= 65535,
              "the CUDA kernel takes at most 65535 64-row tiles per sequence");
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
