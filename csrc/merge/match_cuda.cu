// CUDA kernel for the ToMe matching step (tokops::tome_match_cuda).
// Spec: DESIGN.md "Token merging" step 4; Python reference: tokops.merge.reference.tome_match_torch.
//
// For every A token (even position 2a) of one sequence: node_max = max_j cos(a, b_j) over the B
// tokens (odd positions 2j+1) and node_idx = the first j reaching it (torch.max's tie rule). The
// (N/2 x N/2) score matrix is never stored: a block owns BM = 64 A rows and walks over tiles of
// BN = 64 B rows, computing each 64x64 tile of dot products in fp32 from shared memory (BK = 16
// channels at a time), scaling it by the fp32 inverse norms, and folding it into a running
// (max, argmax) per row. Each of the 256 threads owns a 4x4 sub-tile: rows ty + 16*i, columns
// tx + 16*c. Masks: class_token -> row 0 is -inf (index 0); distill_token -> column 0 is -inf;
// valid (optional) -> padding rows are -inf (index 0) and padding columns never win.
// Plain fp32 FMAs (no tensor cores): simple by design. NaN scores are ignored (never win), where
// torch.max would propagate them.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include "../common.h"

namespace tokops {
namespace {

constexpr int kBM = 64, kBN = 64, kBK = 16, kThreads = 256;

// Better (value, index) pair: larger value; on equal values the smaller index.
__device__ __forceinline__ void better(float& v, int64_t& i, float ov, int64_t oi) {
  if (ov > v || (ov == v && oi < i)) {
    v = ov;
    i = oi;
  }
}

template <typename T>
__global__ void __launch_bounds__(kThreads) tome_match_kernel(const T* __restrict__ m, const float* __restrict__ inv,
                                                              const bool* __restrict__ valid,
                                                              float* __restrict__ node_max,
                                                              int64_t* __restrict__ node_idx, int64_t N, int64_t C,
                                                              int64_t nA, int64_t nB, bool cls, bool dist) {
  __shared__ float As[kBK][kBM + 1];  // As[k][row]: A tile, transposed
  __shared__ float Bs[kBK][kBN + 1];  // Bs[k][col]: B tile, transposed
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  const int64_t b = blockIdx.y;
  const int64_t a0 = int64_t(blockIdx.x) * kBM;
  const T* mb = m + b * N * C;
  const float* invb = inv + b * N;
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
        As[k][r] = (a < nA && kk < C) ? static_cast<float>(mb[(2 * a) * C + kk]) : 0.f;
        Bs[k][r] = (j < nB && kk < C) ? static_cast<float>(mb[(2 * j + 1) * C + kk]) : 0.f;
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
  // 1 / ||m|| in fp32, computed exactly like the torch and Triton backends
  const at::Tensor inv = metric.to(at::kFloat).norm(2, {-1}, false).reciprocal().contiguous();
  const dim3 grid(static_cast<unsigned>((nA + kBM - 1) / kBM), static_cast<unsigned>(B));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, st, "tome_match_cuda", [&] {
    TOKOPS_LAUNCH(grid, kThreads, 0, stream, tome_match_kernel<scalar_t>)(metric.data_ptr<scalar_t>(), inv.data_ptr<float>(),
                                                               vptr, node_max.data_ptr<float>(),
                                                               node_idx.data_ptr<int64_t>(), N, C, nA, nB,
                                                               class_token, distill_token);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {node_max, node_idx};
}

TORCH_LIBRARY_FRAGMENT(tokops, m) {
  m.def("tome_match_cuda(Tensor metric, Tensor? valid, bool class_token, bool distill_token) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tokops, CUDA, m) { m.impl("tome_match_cuda", &tome_match_cuda); }

}  // namespace tokops
