// Shared pieces of the block-sparse attention CUDA kernels (forward: block_sparse_attn_cuda.cu,
// backward: block_sparse_attn_bwd_cuda.cu): tile geometry, dtype conversions, warp reductions,
// the mma.sync building blocks (swizzled shared tiles filled by cp.async, the m16n8k16 wrapper,
// fp32 -> fp16x2/bf16x2 packing), and the host-side argument checks both ops make.
// Everything is in an anonymous namespace: each translation unit gets its own copy, as it had
// before these were shared.
#pragma once

#include <ATen/cuda/CUDAContext.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../common.h"
#include "../ptx.cuh"

namespace tokops {
namespace attn {
namespace {

constexpr int kBM = 64;        // query rows per tile
constexpr int kBN = 64;        // keys per tile
constexpr int kThreads = 128;  // 4 warps x 16 rows
constexpr float kLog2e = 1.4426950408889634f;

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }

// Two floats rounded to T and packed into one 32-bit register (low half = `lo`): an mma.sync operand.
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 h = __floats2half2_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  uint32_t u;
  memcpy(&u, &h, 4);
  return u;
}

// Half `hi` (0: low, 1: high) of a packed pair, as float.
template <typename T>
__device__ __forceinline__ float unpack_half(uint32_t u, int hi) {
  T x[2];
  memcpy(x, &u, 4);
  return to_float(x[hi]);
}

__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, o));
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

// ------------------------------------------------------------------------------ mma.sync building blocks
// (FlashAttention-2-style kernels; all warp-level PTX through ptx.cuh, so they run under the emulator)
// Element offset of 16-byte chunk `c` (8 elements) of row `r` in a swizzled tile with D columns.
template <int D>
__device__ __forceinline__ int swz(int r, int c) {
  return r * D + ((c ^ (r & 7)) << 3);
}

// cp.async `rows` x D elements (row stride `ld`) into a swizzled tile; rows >= `valid` are zero-filled
// without reading global memory (their source address is `safe`, 0 bytes copied).
template <typename T, int D, int kRows, int kThr>
__device__ __forceinline__ void cp_tile(T* dst, const T* src, int64_t ld, int valid, const T* safe) {
  constexpr int kChunks = D / 8;
  static_assert(kRows * kChunks % kThr == 0, "whole copies per thread");
#pragma unroll
  for (int it = 0; it < kRows * kChunks / kThr; ++it) {
    const int i = it * kThr + int(threadIdx.x);
    const int r = i / kChunks, c = i % kChunks;
    const bool ok = r < valid;
    ptx::cp_async_16_zfill(dst + swz<D>(r, c), ok ? src + int64_t(r) * ld + c * 8 : safe, ok ? 16 : 0);
  }
}

template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const uint32_t b[2] = {b0, b1};
  if constexpr (std::is_same_v<T, __half>) ptx::mma_m16n8k16_f16(d, a, b, d);
  else ptx::mma_m16n8k16_bf16(d, a, b, d);
}

// ------------------------------------------------------------------------------ host-side checks
struct QKVShape {
  int64_t B, H, Nq, D, Hkv, Nk;
};

// q (B, H, Nq, D), k/v (B, H_kv, Nk, D): CUDA, contiguous, fp16/bf16, GQA-compatible, D 64/128.
inline QKVShape check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  for (const at::Tensor* t : {&q, &k, &v}) TOKOPS_CHECK_CUDA(*t);
  TOKOPS_CHECK_CONTIG(q);
  TOKOPS_CHECK_CONTIG(k);
  TOKOPS_CHECK_CONTIG(v);
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "q must be float16 or bfloat16 for the CUDA kernel, got ", q.scalar_type());
  TOKOPS_CHECK_DTYPE(k, q.scalar_type());
  TOKOPS_CHECK_DTYPE(v, q.scalar_type());
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "q, k, v must be (B, H, N, D)");
  const QKVShape s{q.size(0), q.size(1), q.size(2), q.size(3), k.size(1), k.size(2)};
  TORCH_CHECK(k.size(0) == s.B && k.size(3) == s.D && s.Hkv > 0 && s.H % s.Hkv == 0, "k has shape ", k.sizes(),
              " which does not match q ", q.sizes());
  TORCH_CHECK(v.sizes() == k.sizes(), "v must have the shape of k ", k.sizes(), ", got ", v.sizes());
  TORCH_CHECK(s.D == 64 || s.D == 128, "head dim must be 64 or 128 for the CUDA kernel, got ", s.D);
  return s;
}

inline void check_blocks(int64_t block_q, int64_t block_k) {
  TORCH_CHECK(block_q % kBM == 0 && block_k % kBN == 0 && block_q > 0 && block_k > 0 && block_q <= 256 &&
                  block_k <= 256,
              "block_q and block_k must be multiples of 64 (at most 256) for the CUDA kernel, got ", block_q, ", ",
              block_k);
}

// A CSR block mask: num (B|1, H|1, rows) int32, idx (B|1, H|1, rows, cols) int32.
inline void check_csr(const at::Tensor& num, const at::Tensor& idx, const char* num_name, const char* idx_name,
                      int64_t B, int64_t H, int64_t rows, int64_t cols) {
  TOKOPS_CHECK_CUDA(num);
  TOKOPS_CHECK_CUDA(idx);
  TORCH_CHECK(num.scalar_type() == at::kInt, num_name, " must have dtype int32, got ", num.scalar_type());
  TORCH_CHECK(idx.scalar_type() == at::kInt, idx_name, " must have dtype int32, got ", idx.scalar_type());
  TORCH_CHECK(num.dim() == 3 && idx.dim() == 4, num_name, " must be 3-D and ", idx_name, " 4-D, got ", num.sizes(),
              " and ", idx.sizes());
  TORCH_CHECK((idx.size(0) == B || idx.size(0) == 1) && (idx.size(1) == H || idx.size(1) == 1) &&
                  idx.size(2) == rows && idx.size(3) == cols,
              idx_name, " has shape ", idx.sizes(), ", expected (B|1, H|1, ", rows, ", ", cols, ")");
  TORCH_CHECK(num.size(0) == idx.size(0) && num.size(1) == idx.size(1) && num.size(2) == rows, num_name,
              " has shape ", num.sizes(), " which does not match ", idx_name, " ", idx.sizes());
  TORCH_CHECK(idx.stride(3) == 1, idx_name, " must be contiguous in its last dim");
}

// key_bias: (B, Nk) or (B, H, Nk) fp32, contiguous, on CUDA.
inline void check_key_bias(const at::Tensor& bias, int64_t B, int64_t H, int64_t Nk) {
  TOKOPS_CHECK_CUDA(bias);
  TOKOPS_CHECK_CONTIG(bias);
  TOKOPS_CHECK_DTYPE(bias, at::kFloat);
  TORCH_CHECK((bias.dim() == 2 && bias.size(0) == B && bias.size(1) == Nk) ||
                  (bias.dim() == 3 && bias.size(0) == B && bias.size(1) == H && bias.size(2) == Nk),
              "key_bias must be (B, Nk) or (B, H, Nk), got ", bias.sizes());
}

// The kernels use bf16 mma.sync and cp.async: sm_80 or newer (call under the device guard).
inline void check_sm80() {
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  TORCH_CHECK(prop->major >= 8, "the block-sparse attention CUDA kernel needs sm_80 or newer, got sm_", prop->major,
              prop->minor);
}

}  // namespace
}  // namespace attn
}  // namespace tokops
