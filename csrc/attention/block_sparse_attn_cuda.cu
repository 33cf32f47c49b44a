// CUDA forward kernel of block-sparse attention (tokops::block_sparse_attn_fwd_cuda).
// Spec: DESIGN.md "Sparse attention"; Python reference: python/tokops/attention/reference.py;
// the Triton kernels (triton_kernels/block_sparse_attn.py) implement the same walk and also the
// backward and key-mass passes.
//
// Design (FlashAttention-2, Dao 2023; written from the paper and the PTX ISA, not from its code):
//  * one CTA of kWarps warps owns kM = 16 * kWarps query rows of one (b, h): 8 warps / 128 rows when
//    the mask's query block is a multiple of 128 (the default BQ = 128; twice the K/V reuse per
//    global load), else 4 warps / 64 rows. It walks only the key blocks listed in
//    kv_indices[b, h, i, :kv_num_blocks[b, h, i]] of its mask block i, in 64-key tiles;
//  * each warp owns 16 query rows; its Q fragments (16 x D) stay in registers for the whole walk
//    (loaded once with ldmatrix), and so do the O accumulator (16 x D fp32), the running row max and
//    the running (per-thread partial) row sum: nothing round-trips through shared memory;
//  * K and V tiles (64 x D) are staged in shared memory by cp.async (16 bytes per copy, zero-fill
//    past the ragged end: never a read out of bounds), double-buffered: the copy of the next listed
//    tile is in flight while the tensor cores work on the current one (one __syncthreads per tile);
//  * shared tiles are XOR-swizzled (16-byte chunk c of row r stored at chunk c ^ (r % 8)), so the 8
//    row addresses of every ldmatrix phase and the 8 16-byte writes of every cp.async phase hit 8
//    distinct bank groups: no bank conflicts, no padding;
//  * S = Q K^T and O += P V run as mma.sync m16n8k16 (fp16 or bf16 in, fp32 accumulate); K fragments
//    come from ldmatrix.x4, V fragments from ldmatrix.x4.trans (V is stored key-major as in global
//    memory); P is re-packed from the S accumulators into A fragments in registers (the C layout of
//    two n8 tiles is the A layout of one k16 step);
//  * online softmax in base 2 (scale * log2(e) folded into one multiply, key bias * log2(e) added):
//    the row max over the 4 lanes that share a row is two __shfl_xor_sync; the row sum is kept per
//    lane and reduced once at the end;
//  * masking only where needed: the ragged tail tile and, when causal (bottom-right aligned,
//    j <= i + Nk - Nq), the tiles that cross a warp's diagonal; tiles above the CTA's diagonal are
//    never loaded and a warp skips the tensor-core work of a tile above its own 16 rows.
// Rows without any allowed key write out = 0, lse = -inf (never NaN). Out-of-range block counts are
// clamped to [0, nK] and block indices outside [0, nK) are skipped, never read (the mask values are
// not validated under torch.compile / check_mask=False).
// All warp-level PTX (mma.sync, ldmatrix, cp.async) goes through csrc/ptx.cuh, so the kernel runs
// exactly under the CPU emulator (tests/emu).
// Supported: fp16/bf16, head dim 64 or 128, mask blocks that are multiples of 64 (at most 256), sm_80+.
// fp32 inputs are not taken (no tf32 rounding behind the user's back): the Python side routes them,
// and every other case, to the Triton kernel (ops.cuda_kernel_unsupported says why).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "../common.h"
#include "attn_common.cuh"

namespace tokops {
namespace {

using namespace attn;  // kLog2e, swizzled cp.async tiles, mma wrapper, host-side checks

constexpr float kLn2 = 0.6931471805599453f;
constexpr int kTileN = 64;  // keys per tile

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

template <typename T, int D, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) block_sparse_attn_fwd_kernel(FwdParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
  __trap();  // mma.sync bf16 and cp.async need sm_80; the host side refuses older GPUs
#else
  constexpr int kM = 16 * kWarps, kThr = 32 * kWarps;
  constexpr int kTile = kTileN * D;  // elements of one K (or V) tile
  constexpr int kNB = kTileN / 8;    // n8 blocks of S per tile
  constexpr int kDB = D / 8;         // n8 blocks of O
  static_assert(kM * D <= 2 * kTile, "the Q tile is staged in the second K/V buffer");
  TOKOPS_EXTERN_SHARED(unsigned char, smem_raw);
  T* const smem = reinterpret_cast<T*>(smem_raw);  // buffer s: K at smem + 2 s kTile, V right after

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32;
  const int g = lane >> 2, tg = lane & 3;  // mma fragment: row group, thread in group
  const int m0 = blockIdx.x * kM;
  const int64_t b = blockIdx.z, h = blockIdx.y, hk = h / p.group;
  const int64_t bh = b * p.H + h;
  const T* q_bh = static_cast<const T*>(p.q) + b * p.sqb + h * p.sqh;
  const T* kp = static_cast<const T*>(p.k) + b * p.skb + hk * p.skh;
  const T* vp = static_cast<const T*>(p.v) + b * p.svb + hk * p.svh;
  const float* bp = p.has_bias ? p.bias + b * p.sbb + h * p.sbh : nullptr;

  // ---- the CTA's walk over its listed 64-key tiles (uniform over the CTA)
  const int qblk = m0 / p.block_q;
  int nblk = p.kvn[b * p.snb + h * p.snh + qblk * p.snq];
  nblk = nblk < 0 ? 0 : (nblk > p.n_kblocks ? p.n_kblocks : nblk);
  const int32_t* row_blocks = p.kvi + b * p.sib + h * p.sih + qblk * p.siq;
  const int lim_n = p.causal ? m0 + kM - 1 + p.causal_off : p.nk - 1;  // last key any row may see
  const int subs = p.block_k / kTileN;
  int t_blk = 0, t_sub = 0;
  auto next_tile = [&]() -> int {  // first key of the next tile to process, -1 when done
    while (t_blk < nblk) {
      const int kb = row_blocks[t_blk];
      if (kb >= 0 && kb < p.n_kblocks) {
        const int n0 = kb * p.block_k + t_sub * kTileN;
        if (n0 < p.nk && n0 <= lim_n) {
          if (++t_sub == subs) {
            t_sub = 0;
            ++t_blk;
          }
          return n0;
        }
      }
      t_sub = 0;  // invalid index, or the rest of this block is past the end / above the diagonal
      ++t_blk;
    }
    return -1;
  };
  auto load_kv = [&](int buf, int n0) {
    T* ks = smem + buf * 2 * kTile;
    cp_tile<T, D, kTileN, kThr>(ks, kp + int64_t(n0) * p.skn, p.skn, p.nk - n0, kp);
    cp_tile<T, D, kTileN, kThr>(ks + kTile, vp + int64_t(n0) * p.svn, p.svn, p.nk - n0, vp);
  };

  // ---- prologue: Q into buffer 1, the first K/V tile into buffer 0; Q fragments to registers
  T* const qs = smem + 2 * kTile;
  cp_tile<T, D, kM, kThr>(qs, q_bh + int64_t(m0) * p.sqn, p.sqn, p.nq - m0, q_bh);
  int n_cur = next_tile();
  if (n_cur >= 0) load_kv(0, n_cur);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncthreads();
  const int wr = warp * 16;  // this warp's first row in the CTA tile
  uint32_t qf[D / 16][4];
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) ptx::ldmatrix_x4(qf[kk], qs + swz<D>(wr + (lane & 15), 2 * kk + (lane >> 4)));

  float o[kDB][4];
#pragma unroll
  for (int j = 0; j < kDB; ++j)
#pragma unroll
    for (int i = 0; i < 4; ++i) o[j][i] = 0.f;
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g + 8 of the warp (base 2, scaled)
  float row_sum[2] = {0.f, 0.f};              // this lane's partial sums
  const int r_first = m0 + wr;                // the warp's first query row
  const int r_lo = r_first + g;               // this lane's rows: r_lo and r_lo + 8

  int buf = 0;
  while (n_cur >= 0) {
    const int n_next = next_tile();
    ptx::cp_async_wait<0>();  // the current tile has landed (this thread's copies) ...
    __syncthreads();          // ... for every thread; and everyone is done with the other buffer (or Q)
    if (n_next >= 0) load_kv(buf ^ 1, n_next);
    ptx::cp_async_commit();

    // a warp whose 16 rows see no key of this tile (causal) skips the work
    if (!(p.causal && n_cur > r_first + 15 + p.causal_off)) {
      const T* ks = smem + buf * 2 * kTile;
      const T* vs = ks + kTile;

      // ---- S = Q K^T (16 x 64 per warp)
      float s[kNB][4];
#pragma unroll
      for (int j = 0; j < kNB; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) s[j][i] = 0.f;
#pragma unroll
      for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
        for (int np = 0; np < kNB / 2; ++np) {
          // matrices: keys 16np+0..7 x d 16kk+0..7, +8 d, keys +8, keys +8 and d +8
          uint32_t kf[4];
          ptx::ldmatrix_x4(kf, ks + swz<D>(16 * np + (lane & 7) + ((lane >> 4) << 3), 2 * kk + ((lane >> 3) & 1)));
          mma16816<T>(s[2 * np], qf[kk], kf[0], kf[1]);
          mma16816<T>(s[2 * np + 1], qf[kk], kf[2], kf[3]);
        }
      }

      // ---- logits (base 2), masks, online softmax
      const bool need_mask =
          n_cur + kTileN > p.nk || (p.causal && n_cur + kTileN - 1 > r_first + p.causal_off);
      float tile_max[2] = {-INFINITY, -INFINITY};
#pragma unroll
      for (int j = 0; j < kNB; ++j) {
        float kb2[2] = {0.f, 0.f};  // key bias * log2(e) of this lane's two keys in block j
        if (p.has_bias)
#pragma unroll
          for (int e = 0; e < 2; ++e) {
            const int kj = n_cur + 8 * j + 2 * tg + e;
            kb2[e] = kj < p.nk ? bp[kj] * kLog2e : 0.f;
          }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int kj = n_cur + 8 * j + 2 * tg + (i & 1);
          float x = s[j][i] * p.qk_scale + kb2[i & 1];
          if (need_mask) {
            const int qi = r_lo + 8 * (i >> 1);
            if (kj >= p.nk || (p.causal && kj > qi + p.causal_off)) x = -INFINITY;
          }
          s[j][i] = x;
          tile_max[i >> 1] = fmaxf(tile_max[i >> 1], x);
        }
      }
      float alpha[2], m_sub[2];
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        float mx = tile_max[r];
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        const float m_new = fmaxf(row_max[r], mx);
        m_sub[r] = m_new == -INFINITY ? 0.f : m_new;  // a row with nothing allowed yet: p = 0, not NaN
        alpha[r] = exp2f(row_max[r] - m_sub[r]);
        row_max[r] = m_new;
        row_sum[r] *= alpha[r];
      }
#pragma unroll
      for (int j = 0; j < kDB; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) o[j][i] *= alpha[i >> 1];
#pragma unroll
      for (int j = 0; j < kNB; ++j)
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const float pe = exp2f(s[j][i] - m_sub[i >> 1]);
          row_sum[i >> 1] += pe;
          s[j][i] = pe;
        }

      // ---- O += P V: P (16 x 64) from the S accumulators, rounded to T, as 4 k16 A fragments
#pragma unroll
      for (int kk = 0; kk < kNB / 2; ++kk) {
        const uint32_t pa[4] = {pack2<T>(s[2 * kk][0], s[2 * kk][1]), pack2<T>(s[2 * kk][2], s[2 * kk][3]),
                                pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
        for (int dp = 0; dp < D / 16; ++dp) {
          // matrices (transposed): keys 16kk+0..7 x d 16dp+0..7, keys +8, d +8, keys +8 and d +8
          uint32_t vf[4];
          ptx::ldmatrix_x4_trans(vf, vs + swz<D>(16 * kk + (lane & 7) + (((lane >> 3) & 1) << 3), 2 * dp + (lane >> 4)));
          mma16816<T>(o[2 * dp], pa, vf[0], vf[1]);
          mma16816<T>(o[2 * dp + 1], pa, vf[2], vf[3]);
        }
      }
    }
    n_cur = n_next;
    buf ^= 1;
  }
  ptx::cp_async_wait<0>();  // (the last, empty, group)

  // ---- epilogue: full row sums over the 4 lanes of a row, O / l, lse
  T* op = static_cast<T*>(p.out) + b * p.sob + h * p.soh;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float l = row_sum[r];
    l += __shfl_xor_sync(0xffffffffu, l, 1);
    l += __shfl_xor_sync(0xffffffffu, l, 2);
    const int qi = r_lo + 8 * r;
    if (qi < p.nq) {
      const float inv = l > 0.f ? 1.f / l : 0.f;
      T* orow = op + int64_t(qi) * p.son + 2 * tg;
#pragma unroll
      for (int j = 0; j < kDB; ++j)
        *reinterpret_cast<uint32_t*>(orow + 8 * j) = pack2<T>(o[j][2 * r] * inv, o[j][2 * r + 1] * inv);
      if (tg == 0) p.lse[bh * p.nq + qi] = l > 0.f ? (row_max[r] + log2f(l)) * kLn2 : -INFINITY;
    }
  }
#endif
}

template <typename T, int D, int kWarps>
void launch(const FwdParams& prm, int B, cudaStream_t stream) {
  constexpr int kM = 16 * kWarps;
  const size_t smem = size_t(2) * 2 * kTileN * D * sizeof(T);  // K and V, double-buffered (Q aliases buffer 1)
  auto kernel = block_sparse_attn_fwd_kernel<T, D, kWarps>;
  C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  dim3 grid((prm.nq + kM - 1) / kM, prm.H, B);  // query tiles of one (b, h) run side by side (K/V in L2)
  TOKOPS_LAUNCH(grid, kWarps * 32, smem, stream, kernel)(prm);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_d(const FwdParams& prm, int B, int64_t D, cudaStream_t stream) {
  // 128-row CTAs (8 warps) where the mask's query blocks allow it and there is more than one 64-row tile
  const bool wide = prm.block_q % 128 == 0 && prm.nq > 64;
  if (D == 64) {
    if (wide) launch<T, 64, 8>(prm, B, stream);
    else launch<T, 64, 4>(prm, B, stream);
  } else {
    if (wide) launch<T, 128, 8>(prm, B, stream);
    else launch<T, 128, 4>(prm, B, stream);
  }
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
  TORCH_CHECK(B <= 65535 && H <= 65535, "the CUDA kernel takes at most 65535 batches and heads, got ", B, ", ", H);
  const c10::cuda::CUDAGuard guard(q.device());
  check_sm80();
  at::Tensor out = new_output(q.sizes(), q.options());
  at::Tensor lse = new_output({B, H, Nq}, q.options().dtype(at::kFloat));
  if (B == 0 || H == 0 || Nq == 0) return {out, lse};  // nothing to launch
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
  if (q.scalar_type() == at::kHalf) launch_d<__half>(prm, int(B), D, stream);
  else launch_d<__nv_bfloat16>(prm, int(B), D, stream);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokops, m) {
  m.def("block_sparse_attn_fwd_cuda(Tensor q, Tensor k, Tensor v, Tensor kv_num_blocks, Tensor kv_indices, "
        "int block_q, int block_k, bool causal, float scale, Tensor? key_bias) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tokops, CUDA, m) { m.impl("block_sparse_attn_fwd_cuda", &block_sparse_attn_fwd_cuda); }

}  // namespace tokops
