// CUDA forward kernel of block-sparse attention (tokops::block_sparse_attn_fwd_cuda).
// Spec: DESIGN.md "Sparse attention"; Python reference: python/tokops/attention/reference.py;
// the Triton kernels (triton_kernels/block_sparse_attn.py) implement the same walk and also the
// backward and key-mass passes.
//
// One CTA (4 warps) owns 64 query rows of one (b, h); it walks only the key blocks listed in
// kv_indices[b, h, i, :kv_num_blocks[b, h, i]] of its mask block i, in 64-key sub-tiles. Each warp
// owns 16 query rows: S = Q K^T and O += P V run on tensor cores (WMMA 16x16x16, fp16/bf16 in,
// fp32 accumulate); the online softmax (base 2) runs per row with warp shuffles. O lives in
// shared memory (fp32) so that rows can be rescaled. Ragged tails are zero-filled in shared memory
// and masked to -inf; causal (bottom-right aligned, j <= i + Nk - Nq) masks inside diagonal tiles
// and skips tiles above the diagonal. Rows without any allowed key write out = 0, lse = -inf.
// Supported: fp16/bf16, head dim 64 or 128, mask blocks that are multiples of 64; the Python
// side routes every other case to the Triton kernel.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include "../common.h"
#include "attn_common.cuh"

namespace tokops {
namespace {

using namespace attn;  // kBM, kBN, kThreads, kLog2e, conversions, warp reductions, load_tile, checks

constexpr float kLn2 = 0.6931471805599453f;

struct FwdParams {
  const void* q;
  const void* k;
  const void* v;
  const float* bias;
  void* out;
  float* lse;
  const int32_t* kvn;
  const int32_t* kvi;
  int64_t sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son;
  int64_t sbb, sbh, snb, snh, snq, sib, sih, siq;
  int H, group, nq, nk, block_q, block_k, n_kblocks, causal_off;
  float qk_scale;  // scale * log2(e)
  bool causal, has_bias;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) block_sparse_attn_fwd_kernel(FwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA needs sm_80; the host side refuses older GPUs
#else
  using namespace nvcuda;
  TOKOPS_EXTERN_SHARED(unsigned char, smem_raw);
  T* Qs = reinterpret_cast<T*>(smem_raw);            // kBM x D
  T* Ks = Qs + kBM * D;                               // kBN x D
  T* Vs = Ks + kBN * D;                               // kBN x D
  T* Ps = Vs + kBN * D;                               // kBM x kBN (probabilities, input dtype)
  float* Ss = reinterpret_cast<float*>(Ps + kBM * kBN);  // kBM x kBN (logits)
  float* Os = Ss + kBM * kBN;                         // kBM x D (unnormalised output)
  float* Ms = Os + kBM * D;                           // kBM running max (base 2)
  float* Ls = Ms + kBM;                               // kBM running sum

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int m0 = blockIdx.x * kBM;
  const int bh = blockIdx.y;
  const int64_t b = bh / p.H, h = bh % p.H, hk = h / p.group;
  const T* qp = static_cast<const T*>(p.q) + b * p.sqb + h * p.sqh + m0 * p.sqn;
  const T* kp = static_cast<const T*>(p.k) + b * p.skb + hk * p.skh;
  const T* vp = static_cast<const T*>(p.v) + b * p.svb + hk * p.svh;
  const float* bp = p.has_bias ? p.bias + b * p.sbb + h * p.sbh : nullptr;

  load_tile<T, D>(Qs, qp, p.sqn, kBM, p.nq - m0);
  for (int i = tid; i < kBM * D; i += kThreads) Os[i] = 0.f;
  for (int i = tid; i < kBM; i += kThreads) {
    Ms[i] = -INFINITY;
    Ls[i] = 0.f;
  }
  __syncthreads();

  const int qblk = m0 / p.block_q;
  // Bound checks (the mask values are not validated under torch.compile / check_mask=False):
  // the count is clamped to [0, nK] and an index outside [0, nK) is skipped, never read.
  int nblk = p.kvn[b * p.snb + h * p.snh + qblk * p.snq];
  nblk = nblk < 0 ? 0 : (nblk > p.n_kblocks ? p.n_kblocks : nblk);
  const int32_t* row_blocks = p.kvi + b * p.sib + h * p.sih + qblk * p.siq;
  const int lim_n = p.causal ? m0 + kBM - 1 + p.causal_off : p.nk - 1;  // last key any row may see
  const int wr = warp * 16;                                            // this warp's first row

  for (int t = 0; t < nblk; ++t) {
    const int kb = row_blocks[t];
    if (kb < 0 || kb >= p.n_kblocks) continue;  // uniform over the CTA
    for (int sub = 0; sub < p.block_k / kBN; ++sub) {
      const int n0 = kb * p.block_k + sub * kBN;
      if (n0 >= p.nk || n0 > lim_n) continue;  // uniform over the CTA
      load_tile<T, D>(Ks, kp + int64_t(n0) * p.skn, p.skn, kBN, p.nk - n0);
      load_tile<T, D>(Vs, vp + int64_t(n0) * p.svn, p.svn, kBN, p.nk - n0);
      __syncthreads();

      // S[wr:wr+16, :] = Q[wr:wr+16] K^T
#pragma unroll
      for (int j = 0; j < kBN / 16; ++j) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
        wmma::fill_fragment(acc, 0.f);
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::col_major> bt;
          wmma::load_matrix_sync(a, Qs + wr * D + kk * 16, D);
          wmma::load_matrix_sync(bt, Ks + j * 16 * D + kk * 16, D);
          wmma::mma_sync(acc, a, bt, acc);
        }
        wmma::store_matrix_sync(Ss + wr * kBN + j * 16, acc, kBN, wmma::mem_row_major);
      }
      __syncwarp();

      // online softmax over this tile, one row at a time (lanes cover the 64 keys, 2 each)
      for (int r = 0; r < 16; ++r) {
        const int row = wr + r, qi = m0 + row;
        float s[2];
        float mx = -INFINITY;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const int c = lane + 32 * e, kj = n0 + c;
          const bool ok = kj < p.nk && qi < p.nq && (!p.causal || kj <= qi + p.causal_off);
          float x = Ss[row * kBN + c] * p.qk_scale;
          if (p.has_bias && ok) x += bp[kj] * kLog2e;
          s[e] = ok ? x : -INFINITY;
          mx = fmaxf(mx, s[e]);
        }
        mx = warp_max(mx);
        const float m_old = Ms[row];
        const float m_new = fmaxf(m_old, mx);
        const float m_sub = m_new == -INFINITY ? 0.f : m_new;
        const float alpha = exp2f(m_old - m_sub);
        float sum = 0.f;
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const float pe = exp2f(s[e] - m_sub);
          sum += pe;
          Ps[row * kBN + lane + 32 * e] = from_float<T>(pe);
        }
        sum = warp_sum(sum);
        for (int c = lane; c < D; c += 32) Os[row * D + c] *= alpha;
        __syncwarp();
        if (lane == 0) {
          Ms[row] = m_new;
          Ls[row] = Ls[row] * alpha + sum;
        }
      }
      __syncwarp();

      // O[wr:wr+16] += P V
#pragma unroll
      for (int j = 0; j < D / 16; ++j) {
        wmma::fragment<wmma::accumulator, 16, 16, 16, float> o;
        wmma::load_matrix_sync(o, Os + wr * D + j * 16, D, wmma::mem_row_major);
#pragma unroll
        for (int kk = 0; kk < kBN / 16; ++kk) {
          wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> a;
          wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> bv;
          wmma::load_matrix_sync(a, Ps + wr * kBN + kk * 16, kBN);
          wmma::load_matrix_sync(bv, Vs + kk * 16 * D + j * 16, D);
          wmma::mma_sync(o, a, bv, o);
        }
        wmma::store_matrix_sync(Os + wr * D + j * 16, o, D, wmma::mem_row_major);
      }
      __syncthreads();  // Ks / Vs are overwritten by the next tile
    }
  }
  __syncthreads();

  T* op = static_cast<T*>(p.out) + b * p.sob + h * p.soh;
  for (int i = tid; i < kBM * D; i += kThreads) {
    const int r = i / D, c = i % D, qi = m0 + r;
    if (qi < p.nq) {
      const float l = Ls[r];
      op[qi * p.son + c] = from_float<T>(l > 0.f ? Os[i] / l : 0.f);
    }
  }
  for (int r = tid; r < kBM; r += kThreads) {
    const int qi = m0 + r;
    if (qi < p.nq) {
      const float l = Ls[r];
      p.lse[int64_t(bh) * p.nq + qi] = l > 0.f ? (Ms[r] + log2f(l)) * kLn2 : -INFINITY;
    }
  }
#endif
}

template <typename T, int D>
void launch(const FwdParams& prm, int B, cudaStream_t stream) {
  const size_t smem = size_t(kBM + 2 * kBN) * D * sizeof(T) + size_t(kBM) * kBN * sizeof(T) +
                      size_t(kBM) * kBN * sizeof(float) + size_t(kBM) * D * sizeof(float) + 2 * kBM * sizeof(float);
  auto kernel = block_sparse_attn_fwd_kernel<T, D>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  dim3 grid((prm.nq + kBM - 1) / kBM, B * prm.H);
  TOKOPS_LAUNCH(grid, kThreads, smem, stream, kernel)(prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> block_sparse_attn_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& kv_num_blocks,
                                                              const at::Tensor& kv_indices, int64_t block_q,
                                                              int64_t block_k, bool causal, double scale,
                                                              const std::optional<at::Tensor>& key_bias) {
  const QKVShape s = check_qkv(q, k, v);
  const int64_t B = s.B, H = s.H, Nq = s.Nq, D = s.D, Hkv = s.Hkv, Nk = s.Nk;
  check_blocks(block_q, block_k);
  const int64_t nQ = (Nq + block_q - 1) / block_q, nK = (Nk + block_k - 1) / block_k;
  check_csr(kv_num_blocks, kv_indices, "kv_num_blocks", "kv_indices", B, H, nQ, nK);
  const bool has_bias = key_bias.has_value();
  at::Tensor bias;
  if (has_bias) {
    bias = *key_bias;
    check_key_bias(bias, B, H, Nk);
  }
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, "q, k, v must be 16-byte aligned");
  const c10::cuda::CUDAGuard guard(q.device());
  check_sm80();
  at::Tensor out = new_output(q.sizes(), q.options());
  at::Tensor lse = new_output({B, H, Nq}, q.options().dtype(at::kFloat));
  at::Tensor num = kv_num_blocks.expand({B, H, nQ});
  at::Tensor idx = kv_indices.expand({B, H, nQ, nK});

  FwdParams prm{};
  prm.q = q.data_ptr();
  prm.k = k.data_ptr();
  prm.v = v.data_ptr();
  prm.bias = has_bias ? bias.data_ptr<float>() : nullptr;
  prm.out = out.data_ptr();
  prm.lse = lse.data_ptr<float>();
  prm.kvn = num.data_ptr<int32_t>();
  prm.kvi = idx.data_ptr<int32_t>();
  prm.sqb = q.stride(0), prm.sqh = q.stride(1), prm.sqn = q.stride(2);
  prm.skb = k.stride(0), prm.skh = k.stride(1), prm.skn = k.stride(2);
  prm.svb = v.stride(0), prm.svh = v.stride(1), prm.svn = v.stride(2);
  prm.sob = out.stride(0), prm.soh = out.stride(1), prm.son = out.stride(2);
  prm.sbb = has_bias ? bias.stride(0) : 0;
  prm.sbh = has_bias && bias.dim() == 3 ? bias.stride(1) : 0;
  prm.snb = num.stride(0), prm.snh = num.stride(1), prm.snq = num.stride(2);
  prm.sib = idx.stride(0), prm.sih = idx.stride(1), prm.siq = idx.stride(2);
  prm.H = int(H);
  prm.group = int(H / Hkv);
  prm.nq = int(Nq);
  prm.nk = int(Nk);
  prm.block_q = int(block_q);
  prm.block_k = int(block_k);
  prm.n_kblocks = int(nK);
  prm.causal_off = int(Nk - Nq);
  prm.qk_scale = float(scale) * kLog2e;
  prm.causal = causal;
  prm.has_bias = has_bias;

  cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  if (q.scalar_type() == at::kHalf) {
    if (D == 64) launch<__half, 64>(prm, int(B), stream);
    else launch<__half, 128>(prm, int(B), stream);
  } else {
    if (D == 64) launch<__nv_bfloat16, 64>(prm, int(B), stream);
    else launch<__nv_bfloat16, 128>(prm, int(B), stream);
  }
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokops, m) {
  m.def("block_sparse_attn_fwd_cuda(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, Tensor kv_indices, "
        "int block_q, int block_k, bool causal, float scale, Tensor? key_bias) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tokops, CUDA, m) { m.impl("block_sparse_attn_fwd_cuda", &block_sparse_attn_fwd_cuda); }

}  // namespace tokops
