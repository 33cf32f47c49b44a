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

namespace tokops {
namespace {

constexpr int kBM = 64;
constexpr int kBN = 64;
constexpr int kThreads = 128;  // 4 warps x 16 query rows
constexpr float kLog2e = 1.4426950408889634f;
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
  int H, group, nq, nk, block_q, block_k, causal_off;
  float qk_scale;  // scale * log2(e)
  bool causal, has_bias;
};

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// Copy `rows` x D elements (row stride `ld` in global memory) into a dense smem tile, zero-filling
// rows past `valid`. 16-byte vector copies (D is a multiple of 8 and rows are 16-byte aligned).
template <typename T, int D>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t ld, int rows, int valid) {
  constexpr int kVec = 8;  // 8 x 16-bit = 16 bytes
  constexpr int kPerRow = D / kVec;
  for (int i = threadIdx.x; i < rows * kPerRow; i += kThreads) {
    const int r = i / kPerRow, c = (i % kPerRow) * kVec;
    uint4 val = make_uint4(0u, 0u, 0u, 0u);
    if (r < valid) val = *reinterpret_cast<const uint4*>(src + r * ld + c);
    *reinterpret_cast<uint4*>(dst + r * D + c) = val;
  }
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) block_sparse_attn_fwd_kernel(FwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // bf16 WMMA needs sm_80; the host side refuses older GPUs
#else
  using namespace nvcuda;
  extern __shared__ __align__(128) unsigned char smem_raw[];
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
  const int nblk = p.kvn[b * p.snb + h * p.snh + qblk * p.snq];
  const int32_t* row_blocks = p.kvi + b * p.sib + h * p.sih + qblk * p.siq;
  const int lim_n = p.causal ? m0 + kBM - 1 + p.causal_off : p.nk - 1;  // last key any row may see
  const int wr = warp * 16;                                            // this warp's first row

  for (int t = 0; t < nblk; ++t) {
    const int kb = row_blocks[t];
    for (int sub = 0; sub < p.block_k / kBN; ++sub) {
      const int n0 = kb * p.block_k + sub * kBN;
      if (n0 >= p.nk || n0 > lim_n) continue;  // uniform over the CTA
      load_tile<T, D>(Ks, kp + n0 * p.skn, p.skn, kBN, p.nk - n0);
      load_tile<T, D>(Vs, vp + n0 * p.svn, p.svn, kBN, p.nk - n0);
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
  kernel<<<grid, kThreads, smem, stream>>>(prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

std::tuple<at::Tensor, at::Tensor> block_sparse_attn_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                              const at::Tensor& v, const at::Tensor& kv_num_blocks,
                                                              const at::Tensor& kv_indices, int64_t block_q,
                                                              int64_t block_k, bool causal, double scale,
                                                              const std::optional<at::Tensor>& key_bias) {
  for (const at::Tensor* t : {&q, &k, &v, &kv_num_blocks, &kv_indices}) TOKOPS_CHECK_CUDA(*t);
  TOKOPS_CHECK_CONTIG(q);
  TOKOPS_CHECK_CONTIG(k);
  TOKOPS_CHECK_CONTIG(v);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "q must be float16 or bfloat16 for the CUDA kernel, got ", q.scalar_type());
  TOKOPS_CHECK_DTYPE(k, q.scalar_type());
  TOKOPS_CHECK_DTYPE(v, q.scalar_type());
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (B, H, N, D)");
  const int64_t B = q.size(0), H = q.size(1), Nq = q.size(2), D = q.size(3);
  const int64_t Hkv = k.size(1), Nk = k.size(2);
  TORCH_CHECK(k.size(0) == B && k.size(3) == D && Hkv > 0 && H % Hkv == 0, "k has shape ", k.sizes(),
              " which does not match q ", q.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(D == 64 || D == 128, "head dim must be 64 or 128 for the CUDA kernel, got ", D);
  TORCH_CHECK(block_q % kBM == 0 && block_k % kBN == 0 && block_q <= 256 && block_k <= 256,
              "block_q and block_k must be multiples of 64 (at most 256) for the CUDA kernel, got ", block_q, ", ",
              block_k);
  const int64_t nQ = (Nq + block_q - 1) / block_q, nK = (Nk + block_k - 1) / block_k;
  TOKOPS_CHECK_DTYPE(kv_num_blocks, at::kInt);
  TOKOPS_CHECK_DTYPE(kv_indices, at::kInt);
  TORCH_CHECK(kv_num_blocks.dim() == 3 && kv_indices.dim() == 4, "kv_num_blocks must be 3-D and kv_indices 4-D");
  TORCH_CHECK((kv_indices.size(0) == B || kv_indices.size(0) == 1) && (kv_indices.size(1) == H || kv_indices.size(1) == 1) &&
                  kv_indices.size(2) == nQ && kv_indices.size(3) == nK,
              "kv_indices has shape ", kv_indices.sizes(), ", expected (B|1, H|1, ", nQ, ", ", nK, ")");
  TORCH_CHECK(kv_num_blocks.size(0) == kv_indices.size(0) && kv_num_blocks.size(1) == kv_indices.size(1) &&
                  kv_num_blocks.size(2) == nQ,
              "kv_num_blocks has shape ", kv_num_blocks.sizes(), " which does not match kv_indices");
  TORCH_CHECK(kv_indices.stride(3) == 1, "kv_indices must be contiguous in its last dim");
  const bool has_bias = key_bias.has_value();
  at::Tensor bias;
  if (has_bias) {
    bias = *key_bias;
    TOKOPS_CHECK_CUDA(bias);
    TOKOPS_CHECK_CONTIG(bias);
    TOKOPS_CHECK_DTYPE(bias, at::kFloat);
    TORCH_CHECK((bias.dim() == 2 && bias.size(0) == B && bias.size(1) == Nk) ||
                    (bias.dim() == 3 && bias.size(0) == B && bias.size(1) == H && bias.size(2) == Nk),
                "key_bias must be (B, Nk) or (B, H, Nk), got ", bias.sizes());
  }
  for (const at::Tensor* t : {&q, &k, &v})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, "q, k, v must be 16-byte aligned");
  const c10::cuda::CUDAGuard guard(q.device());
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, "the block-sparse attention CUDA kernel needs sm_80 or newer, got sm_", prop->major,
              prop->minor);
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
