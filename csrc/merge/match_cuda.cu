// CUDA kernels for the ToMe matching step (tokops::tome_match_cuda).
// Spec: DESIGN.md "Token merging" step 4; Python reference: tokops.merge.reference.tome_match_torch.
//
// For every A token (even position 2a) of one sequence: node_max = max_j cos(a, b_j) over the B
// tokens (odd positions 2j+1) and node_idx = the first j reaching it (torch.max's tie rule). The
// (N/2 x N/2) score matrix is never stored (memory O(N C)), and the input is never copied:
//
// 1. row_norm_kernel (one warp per token): inv[t] = 1 / ||m_t|| in fp32 from the input dtype, read
//    once. Rows of extreme magnitude (max |x| > 2^50 or < 2^-50, finite, non-zero: their fp32 dots
//    would overflow or flush) get a power-of-two exponent e[t] (cosine is scale invariant; the same
//    rule as tokops.merge.ops._scaled_metric) and flag their sequence; inv is then of the scaled row.
// 2. fp16/bf16: mma_match_kernel, tensor cores. A block owns BM = 128 A rows and walks over tiles
//    of BN = 128 B rows; 8 warps (2 x 4), warp tile 64 x 32, mma.sync m16n8k16 with fp32
//    accumulators in registers, fragments by ldmatrix from padded shared rows (80 B: conflict-free),
//    BK = 32 channels per stage, 3-stage cp.async pipeline (ragged C / unaligned rows: plain loads).
//    Fused epilogue: the fp32 tile is scaled by inv_a * inv_b, masked, reduced to a per-row
//    (max, first argmax) (registers -> 4-lane shuffles -> shared memory across the 4 column warps)
//    and folded into a running (max, argmax) per A row. A bf16 sequence flagged in step 1 is left
//    to the exact SIMT kernel below (uniform per block).
// 3. fp32 (and flagged bf16 sequences): simt_match_kernel, the exact fp32 FMA path (fp32 inputs
//    need IEEE fp32 dots, not TF32): 64 x 64 tiles, each of 256 threads owns 4 x 4 scores; rows
//    scaled by 2^-e on load.
// Masks: class_token -> row 0 is -inf (index 0); distill_token -> column 0 is -inf; valid (optional)
// -> padding rows are -inf (index 0) and padding columns never win. A NaN score is ignored (never
// wins), where torch.max would propagate it; a row without a finite score gets (-inf, 0).
// Ties: the lowest B index (within a tile: (value, index) order; across tiles: strictly greater).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <climits>

#include "../common.h"
#include "../ptx.cuh"

namespace tokops {
namespace {

constexpr float kHuge = 1125899906842624.0f;       // 2^50
constexpr float kTiny = 8.8817841970012523e-16f;   // 2^-50

// Better (value, index) pair: larger value; on equal values the smaller index.
template <typename I>
__device__ __forceinline__ void better(float& v, I& i, float ov, I oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

template <typename T>
__device__ __forceinline__ float to_f32(T x) {
  return static_cast<float>(x);  // c10::Half / c10::BFloat16 convert exactly
}

// ------------------------------------------------------------------------------ 1. row norms
constexpr int kNormThreads = 256;  // 8 warps = 8 tokens per block

template <typename T>
__global__ void __launch_bounds__(kNormThreads) row_norm_kernel(const T* __restrict__ m, float* __restrict__ inv,
                                                                 int* __restrict__ expo, int* __restrict__ flag,
                                                                 int64_t rows, int64_t N, int64_t C) {
  const int lane = threadIdx.x % 32;
  const int64_t row = int64_t(blockIdx.x) * (kNormThreads / 32) + threadIdx.x / 32;
  if (row >= rows) return;  // whole warps leave together
  const T* x = m + row * C;
  float amax = 0.f;
  bool finite = true;
  for (int64_t k = lane; k < C; k += 32) {
    const float v = fabsf(to_f32(x[k]));
    finite = finite && v <= 3.402823466e38f;  // false for inf and NaN
    amax = fmaxf(amax, v);
  }
  for (int off = 16; off >= 1; off /= 2) {
    amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    finite = __shfl_xor_sync(0xffffffffu, int(finite), off) && finite;
  }
  int e = 0;
  if (expo != nullptr && finite && amax > 0.f && (amax > kHuge || amax < kTiny)) frexpf(amax, &e);
  float ss = 0.f;
  for (int64_t k = lane; k < C; k += 32) {
    const float v = e == 0 ? to_f32(x[k]) : ldexpf(to_f32(x[k]), -e);
    ss = fmaf(v, v, ss);
  }
  for (int off = 16; off >= 1; off /= 2) ss += __shfl_xor_sync(0xffffffffu, ss, off);
  if (lane == 0) {
    inv[row] = 1.f / sqrtf(ss);
    if (expo != nullptr) {
      expo[row] = e;
      if (e != 0) atomicOr(flag + row / N, 1);
    }
  }
}

// ------------------------------------------------------------------------------ 2. tensor-core match
constexpr int kTM = 128, kTN = 128, kTK = 32, kStages = 3, kMmaThreads = 256;
constexpr int kLd = kTK + 8;  // shared row stride (elements): 80 B, 16-B aligned, ldmatrix conflict-free
constexpr int kStageElems = (kTM + kTN) * kLd;
constexpr size_t kMmaSmem = size_t(kStages) * kStageElems * 2 + size_t(4) * kTM * 8;

// Stage one BK-wide slice of the A tile (rows a0.., tokens 2a) and the B tile (rows j0.., tokens
// 2j+1) into shared memory. VEC: 16-byte cp.async chunks (C % 8 == 0, 16-B aligned base), with
// zero fill past C and past the last row; else plain element loads.
template <bool VEC>
__device__ __forceinline__ void stage_tiles(uint16_t* s, const uint16_t* mb, int64_t C, int64_t a0, int64_t nA,
                                            int64_t j0, int64_t nB, int64_t k0) {
  if constexpr (VEC) {
    constexpr int kChunks = kTK / 8;  // 16-byte chunks per row
    for (int e = threadIdx.x; e < (kTM + kTN) * kChunks; e += kMmaThreads) {
      const int r = e / kChunks, ch = e % kChunks;
      const bool is_a = r < kTM;
      const int64_t idx = is_a ? a0 + r : j0 + (r - kTM);
      const int64_t tok = is_a ? 2 * idx : 2 * idx + 1;
      const int64_t k = k0 + 8 * ch;
      const bool ok = idx < (is_a ? nA : nB) && k < C;
      const uint16_t* src = ok ? mb + tok * C + k : mb;  // a valid address even when nothing is read
      const int bytes = ok ? int(min(int64_t(8), C - k)) * 2 : 0;
      ptx::cp_async_16_zfill(s + r * kLd + 8 * ch, src, bytes);
    }
  } else {
    for (int e = threadIdx.x; e < (kTM + kTN) * kTK; e += kMmaThreads) {
      const int r = e / kTK, kk = e % kTK;
      const bool is_a = r < kTM;
      const int64_t idx = is_a ? a0 + r : j0 + (r - kTM);
      const int64_t tok = is_a ? 2 * idx : 2 * idx + 1;
      const int64_t k = k0 + kk;
      s[r * kLd + kk] = (idx < (is_a ? nA : nB) && k < C) ? mb[tok * C + k] : uint16_t(0);
    }
  }
}

template <bool BF16, bool VEC>
__global__ void __launch_bounds__(kMmaThreads, VEC ? 2 : 1)  // plain loads need more registers
    mma_match_kernel(const uint16_t* __restrict__ m, const float* __restrict__ inv, const int* __restrict__ flag,
                     const bool* __restrict__ valid, float* __restrict__ node_max, int64_t* __restrict__ node_idx,
                     int64_t N, int64_t C, int64_t nA, int64_t nB, bool cls, bool dist) {
  const int64_t b = blockIdx.y;
  if (flag != nullptr && flag[b] != 0) return;  // extreme magnitudes: the SIMT kernel takes this sequence
  TOKOPS_EXTERN_SHARED(uint16_t, smem);
  float* red_v = reinterpret_cast<float*>(smem + kStages * kStageElems);  // [4 column warps][kTM]
  int* red_i = reinterpret_cast<int*>(red_v + 4 * kTM);

  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  const int wm = warp / 4, wn = warp % 4;  // warp tile: rows 64 * wm.., columns 32 * wn..
  const int g = lane / 4, t = lane % 4;
  const int64_t a0 = int64_t(blockIdx.x) * kTM;
  const uint16_t* mb = m + b * N * C;
  const float* invb = inv + b * N;
  const bool* vb = valid == nullptr ? nullptr : valid + b * N;

  // this thread's 8 rows of the warp tile: (mi, h) -> 64 * wm + 16 * mi + g + 8 * h
  float inv_a[4][2];
#pragma unroll
  for (int mi = 0; mi < 4; ++mi)
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t a = a0 + 64 * wm + 16 * mi + g + 8 * h;
      inv_a[mi][h] = a < nA ? invb[2 * a] : 0.f;
    }
  // running (max, argmax) of row `tid` of the block tile (threads 0..127)
  float best = -INFINITY;
  int best_idx = 0;

  const int64_t KT = (C + kTK - 1) / kTK;
  for (int64_t j0 = 0; j0 < nB; j0 += kTN) {
    float acc[4][4][4];
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int ni = 0; ni < 4; ++ni)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[mi][ni][i] = 0.f;

#pragma unroll
    for (int st = 0; st < kStages - 1; ++st) {
      if (st < KT) stage_tiles<VEC>(smem + st * kStageElems, mb, C, a0, nA, j0, nB, int64_t(st) * kTK);
      ptx::cp_async_commit();
    }
    for (int64_t kt = 0; kt < KT; ++kt) {
      ptx::cp_async_wait<kStages - 2>();
      __syncthreads();  // stage kt landed for every thread; stage kt - 1 is no longer read
      const int64_t nxt = kt + kStages - 1;
      if (nxt < KT) stage_tiles<VEC>(smem + (nxt % kStages) * kStageElems, mb, C, a0, nA, j0, nB, nxt * kTK);
      ptx::cp_async_commit();
      const uint16_t* As = smem + (kt % kStages) * kStageElems;
      const uint16_t* Bs = As + kTM * kLd;
#pragma unroll
      for (int ks = 0; ks < kTK / 16; ++ks) {
        uint32_t fa[4][4], fb[4][2];
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
          ptx::ldmatrix_x4(fa[mi], As + (64 * wm + 16 * mi + lane % 16) * kLd + 16 * ks + 8 * (lane / 16));
#pragma unroll
        for (int np = 0; np < 2; ++np) {  // two n8 tiles per ldmatrix.x4
          uint32_t r[4];
          ptx::ldmatrix_x4(r, Bs + (32 * wn + 16 * np + lane % 8 + 8 * (lane / 16)) * kLd + 16 * ks +
                                  8 * ((lane / 8) % 2));
          fb[2 * np][0] = r[0];
          fb[2 * np][1] = r[1];
          fb[2 * np + 1][0] = r[2];
          fb[2 * np + 1][1] = r[3];
        }
#pragma unroll
        for (int mi = 0; mi < 4; ++mi)
#pragma unroll
          for (int ni = 0; ni < 4; ++ni) {
            if constexpr (BF16) ptx::mma_m16n8k16_bf16(acc[mi][ni], fa[mi], fb[ni], acc[mi][ni]);
            else ptx::mma_m16n8k16_f16(acc[mi][ni], fa[mi], fb[ni], acc[mi][ni]);
          }
      }
    }
    ptx::cp_async_wait<0>();

    // epilogue: this thread's columns (ni, c) -> 32 * wn + 8 * ni + 2 * t + c
    float inv_b[4][2];
    bool col_ok[4][2];
#pragma unroll
    for (int ni = 0; ni < 4; ++ni)
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int64_t j = j0 + 32 * wn + 8 * ni + 2 * t + c;
        const bool in = j < nB;
        inv_b[ni][c] = in ? invb[2 * j + 1] : 0.f;
        col_ok[ni][c] = in && !(dist && j == 0) && (vb == nullptr || vb[2 * j + 1]);
      }
#pragma unroll
    for (int mi = 0; mi < 4; ++mi)
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        float v = -INFINITY;
        int vi = INT_MAX;
#pragma unroll
        for (int ni = 0; ni < 4; ++ni)
#pragma unroll
          for (int c = 0; c < 2; ++c) {
            const float raw = acc[mi][ni][2 * h + c] * inv_a[mi][h] * inv_b[ni][c];
            const float s = (col_ok[ni][c] && raw == raw) ? raw : -INFINITY;  // a NaN score never wins
            better(v, vi, s, int(j0) + 32 * wn + 8 * ni + 2 * t + c);
          }
        // the 4 lanes (t) of a group share the row
#pragma unroll
        for (int off = 1; off <= 2; off *= 2) {
          const float ov = __shfl_xor_sync(0xffffffffu, v, off);
          const int oi = __shfl_xor_sync(0xffffffffu, vi, off);
          better(v, vi, ov, oi);
        }
        if (t == 0) {
          const int row = 64 * wm + 16 * mi + g + 8 * h;
          red_v[wn * kTM + row] = v;
          red_i[wn * kTM + row] = vi;
        }
      }
    __syncthreads();  // red_* written; every warp is past its last read of the stages
    if (tid < kTM) {
      float v = red_v[tid];
      int vi = red_i[tid];
#pragma unroll
      for (int w = 1; w < 4; ++w) better(v, vi, red_v[w * kTM + tid], red_i[w * kTM + tid]);
      if (v > best) {  // strict: an equal value in a later tile keeps the earlier index
        best = v;
        best_idx = vi;
      }
    }
    __syncthreads();  // red_* read before the next tile rewrites it
  }

  if (tid < kTM) {
    const int64_t a = a0 + tid;
    if (a < nA) {
      const bool row_ok = !(cls && a == 0) && (vb == nullptr || vb[2 * a]);
      node_max[b * nA + a] = row_ok ? best : -INFINITY;
      node_idx[b * nA + a] = row_ok ? int64_t(best_idx) : 0;
    }
  }
}

// ------------------------------------------------------------------------------ 3. exact fp32 SIMT match
constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;

// only_flagged: run only the sequences flagged by row_norm_kernel (bf16: the others go to the
// tensor cores); else every sequence. Rows of a flagged sequence are scaled by 2^-expo on load.
template <typename T>
__global__ void __launch_bounds__(kThreads)
    simt_match_kernel(const T* __restrict__ m, const float* __restrict__ inv, const int* __restrict__ expo,
                      const int* __restrict__ flag, bool only_flagged, const bool* __restrict__ valid,
                      float* __restrict__ node_max, int64_t* __restrict__ node_idx, int64_t N, int64_t C, int64_t nA,
                      int64_t nB, bool cls, bool dist) {
  const int64_t b = blockIdx.y;
  const bool scaled = flag != nullptr && flag[b] != 0;
  if (only_flagged && !scaled) return;
  __shared__ float As[kBK][kBM + 1];  // As[k][row]: A tile, transposed
  __shared__ float Bs[kBK][kBN + 1];  // Bs[k][col]: B tile, transposed
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t a0 = int64_t(blockIdx.x) * kBM;
  const T* mb = m + b * N * C;
  const float* invb = inv + b * N;
  const int* eb = expo == nullptr ? nullptr : expo + b * N;
  const bool* vb = valid == nullptr ? nullptr : valid + b * N;

  float inv_a[4], best[4];
  int64_t best_idx[4];
  bool row_ok[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const int64_t a = a0 + ty + 16 * i;
    const bool in = a < nA;
    inv_a[i] = in ? invb[2 * a] : 0.f;
    row_ok[i] = in && !(cls && a == 0) && (vb == nullptr || vb[2 * a]);
    best[i] = -INFINITY;
    best_idx[i] = 0;
  }

  for (int64_t j0 = 0; j0 < nB; j0 += kBN) {
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[i][c] = 0.f;

    for (int64_t k0 = 0; k0 < C; k0 += kBK) {
      // 64 x 16 elements per tile, 4 per thread; consecutive threads read consecutive channels.
      for (int e = threadIdx.x; e < kBM * kBK; e += kThreads) {
        const int r = e / kBK, k = e % kBK;
        const int64_t kk = k0 + k;
        const int64_t a = a0 + r, j = j0 + r;
        float av = (a < nA && kk < C) ? to_f32(mb[(2 * a) * C + kk]) : 0.f;
        float bv = (j < nB && kk < C) ? to_f32(mb[(2 * j + 1) * C + kk]) : 0.f;
        if (scaled) {
          if (a < nA) av = ldexpf(av, -eb[2 * a]);
          if (j < nB) bv = ldexpf(bv, -eb[2 * j + 1]);
        }
        As[k][r] = av;
        Bs[k][r] = bv;
      }
      __syncthreads();
#pragma unroll
      for (int k = 0; k < kBK; ++k) {
        float av[4], bv[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) av[i] = As[k][ty + 16 * i];
#pragma unroll
        for (int c = 0; c < 4; ++c) bv[c] = Bs[k][tx + 16 * c];
#pragma unroll
        for (int i = 0; i < 4; ++i)
#pragma unroll
          for (int c = 0; c < 4; ++c) acc[i][c] = fmaf(av[i], bv[c], acc[i][c]);
      }
      __syncthreads();
    }

    // scale, mask, and fold the tile into the running (max, argmax) of each row
    float inv_b[4];
    bool col_ok[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) {
      const int64_t j = j0 + tx + 16 * c;
      const bool in = j < nB;
      inv_b[c] = in ? invb[2 * j + 1] : 0.f;
      col_ok[c] = in && !(dist && j == 0) && (vb == nullptr || vb[2 * j + 1]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      float v = -INFINITY;
      int64_t vi = INT64_MAX;
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const float raw = acc[i][c] * inv_a[i] * inv_b[c];
        const float s = (col_ok[c] && raw == raw) ? raw : -INFINITY;  // a NaN score never wins
        better(v, vi, s, j0 + tx + 16 * c);
      }
      // reduce over the 16 threads (tx) that share this row: lanes of one half-warp
#pragma unroll
      for (int off = 8; off >= 1; off /= 2) {
        const float ov = __shfl_xor_sync(0xffffffffu, v, off, 16);
        const int64_t oi = __shfl_xor_sync(0xffffffffu, vi, off, 16);
        better(v, vi, ov, oi);
      }
      if (v > best[i]) {  // strict: an equal value in a later tile keeps the earlier index
        best[i] = v;
        best_idx[i] = vi;
      }
    }
  }

  if (tx == 0) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int64_t a = a0 + ty + 16 * i;
      if (a < nA) {
        node_max[b * nA + a] = row_ok[i] ? best[i] : -INFINITY;
        node_idx[b * nA + a] = row_ok[i] ? best_idx[i] : 0;
      }
    }
  }
}

template <bool BF16>
void launch_mma(const at::Tensor& metric, const float* inv, const int* flag, const bool* vptr, at::Tensor& node_max,
                at::Tensor& node_idx, int64_t B, int64_t N, int64_t C, int64_t nA, int64_t nB, bool cls, bool dist,
                cudaStream_t stream) {
  const auto* mp = reinterpret_cast<const uint16_t*>(metric.data_ptr());
  const bool vec = C % 8 == 0 && reinterpret_cast<uintptr_t>(mp) % 16 == 0;
  const dim3 grid(static_cast<unsigned>((nA + kTM - 1) / kTM), static_cast<unsigned>(B));
  auto* mx = node_max.data_ptr<float>();
  auto* ix = node_idx.data_ptr<int64_t>();
  if (vec) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(mma_match_kernel<BF16, true>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(kMmaSmem)));
    TOKOPS_LAUNCH(grid, kMmaThreads, kMmaSmem, stream, mma_match_kernel<BF16, true>)(
        mp, inv, flag, vptr, mx, ix, N, C, nA, nB, cls, dist);
  } else {
    C10_CUDA_CHECK(cudaFuncSetAttribute(mma_match_kernel<BF16, false>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        int(kMmaSmem)));
    TOKOPS_LAUNCH(grid, kMmaThreads, kMmaSmem, stream, mma_match_kernel<BF16, false>)(
        mp, inv, flag, vptr, mx, ix, N, C, nA, nB, cls, dist);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> tome_match_cuda(const at::Tensor& metric, const c10::optional<at::Tensor>& valid,
                                                   bool class_token, bool distill_token) {
  TOKOPS_CHECK_CUDA(metric);
  TOKOPS_CHECK_CONTIG(metric);
  TORCH_CHECK(metric.dim() == 3, "metric must have 3 dims (B, N, C), got shape ", metric.sizes());
  const auto st = metric.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kHalf || st == at::kBFloat16,
              "metric must have dtype float32, float16 or bfloat16, got ", st);
  const int64_t B = metric.size(0), N = metric.size(1), C = metric.size(2);
  TORCH_CHECK(B <= 65535, "tome_match_cuda supports at most 65535 sequences, got B = ", B);
  TORCH_CHECK(N / 2 < int64_t(INT32_MAX), "tome_match_cuda supports at most 2^32 tokens, got N = ", N);
  const int64_t nA = (N + 1) / 2, nB = N / 2;
  const bool* vptr = nullptr;
  at::Tensor v;
  if (valid.has_value()) {
    v = *valid;
    TOKOPS_CHECK_CUDA(v);
    TOKOPS_CHECK_CONTIG(v);
    TOKOPS_CHECK_DTYPE(v, at::kBool);
    TORCH_CHECK(v.dim() == 2 && v.size(0) == B && v.size(1) == N, "valid must have shape (", B, ", ", N, "), got ",
                v.sizes());
    TORCH_CHECK(v.device() == metric.device(), "valid must be on the device of metric");
    vptr = v.data_ptr<bool>();
  }
  const c10::cuda::CUDAGuard guard(metric.device());
  auto node_max = new_output({B, nA}, metric.options().dtype(at::kFloat));
  auto node_idx = new_output({B, nA}, metric.options().dtype(at::kLong));
  if (B * nA == 0) return {node_max, node_idx};
  const auto stream = at::cuda::getCurrentCUDAStream();

  // 1. inverse norms (fp32, (B, N)) and, except for fp16 (never out of range), the per-row
  //    power-of-two exponents and the per-sequence flags: O(B N) extra memory, no copy of metric.
  const bool half = st == at::kHalf;
  auto inv = at::empty({B, N}, metric.options().dtype(at::kFloat));
  at::Tensor expo, flag;
  if (!half) {
    expo = at::empty({B, N}, metric.options().dtype(at::kInt));
    flag = at::zeros({B}, metric.options().dtype(at::kInt));
  }
  int* ep = half ? nullptr : expo.data_ptr<int>();
  int* fp = half ? nullptr : flag.data_ptr<int>();
  {
    const int64_t rows = B * N;
    const int per_block = kNormThreads / 32;
    const dim3 grid(static_cast<unsigned>((rows + per_block - 1) / per_block));
    auto norm = [&](auto tag) {
      using T = decltype(tag);
      TOKOPS_LAUNCH(grid, kNormThreads, 0, stream, row_norm_kernel<T>)(metric.data_ptr<T>(), inv.data_ptr<float>(),
                                                                        ep, fp, rows, N, C);
    };
    if (st == at::kHalf) norm(at::Half{});
    else if (st == at::kBFloat16) norm(at::BFloat16{});
    else norm(float{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  const float* ip = inv.data_ptr<float>();

  // 2. tensor cores for fp16 / bf16 (bf16: the unflagged sequences)
  if (st == at::kHalf)
    launch_mma<false>(metric, ip, nullptr, vptr, node_max, node_idx, B, N, C, nA, nB, class_token, distill_token,
                      stream);
  else if (st == at::kBFloat16)
    launch_mma<true>(metric, ip, fp, vptr, node_max, node_idx, B, N, C, nA, nB, class_token, distill_token, stream);

  // 3. exact fp32 SIMT: every fp32 sequence, the flagged bf16 ones (a block per 64 A rows exits at
  //    once for an unflagged bf16 sequence)
  if (st != at::kHalf) {
    const dim3 grid(static_cast<unsigned>((nA + kBM - 1) / kBM), static_cast<unsigned>(B));
    auto simt = [&](auto tag) {
      using T = decltype(tag);
      TOKOPS_LAUNCH(grid, kThreads, 0, stream, simt_match_kernel<T>)(
          metric.data_ptr<T>(), ip, ep, fp, st == at::kBFloat16, vptr, node_max.data_ptr<float>(),
          node_idx.data_ptr<int64_t>(), N, C, nA, nB, class_token, distill_token);
    };
    if (st == at::kBFloat16) simt(at::BFloat16{});
    else simt(float{});
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return {node_max, node_idx};
}

TORCH_LIBRARY_FRAGMENT(tokops, m) {
  m.def("tome_match_cuda(Tensor metric, Tensor? valid, bool class_token, bool distill_token) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tokops, CUDA, m) { m.impl("tome_match_cuda", &tome_match_cuda); }

}  // namespace tokops
