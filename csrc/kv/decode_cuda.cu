// CUDA fused decode attention over a tokops QuantizedKVCache (flash-decoding on packed codes).
// Spec: DESIGN.md "Quantized KV"; Python reference: python/tokops/kv/decode.py (dense_decode);
// Triton twin: triton_kernels/kv_decode.py (same split scheme, same causal rule).
//
// Ragged rows: per-row lengths n_quant[b], n_res[b] (int32 device tensors, clamped to the buffers); the
// grid depends on (B, H_kv, capacities, SM count) only, so a captured CUDA graph replays across steps.
// Three kernels:
//  * decode_partial_kernel, grid (B*H_kv, S, ceil(GQ*nq / 16)): one block = one kv head, one split of
//    the capacity (the first S_q splits cover the quantized store, the rest the full-precision residual
//    window; a split past the row's tokens stores an empty partial) and up to 16 query rows (GQ query
//    heads x nq queries). Tiles of TT tokens are dequantized from the packed int32 codes + fp16
//    scale/zero (or fp8 codes + fp32 per-token scale) into shared memory with 128-bit loads, scale and
//    zero once per word, never into a global temporary; online softmax in fp32 (base 2); partial
//    (m, l, acc). D = 64/128: <= 64 registers, 8 resident blocks per SM; the grid asks for 8 x SMs blocks.
//  * decode_merge_kernel, one block per (b, h, query): LSE merge of the S splits -> out, lse.
//  * decode_mass_kernel (return_mass): per-key attention mass sum_i exp(s_ij - lse_i), (B, H, max_len)
//    fp32, 0 past each row's length.
// Causal rule among the nq new queries of row b: query i sees store indices j <= L_b - nq + i.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstring>
#include <string_view>

#include "../common.h"

namespace tokops {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kRows = 16;     // query rows per block
constexpr int kThreads = 128;

struct QuantSide {
  const void* codes;
  const void* scale;
  const void* zero;
  int64_t c_bh, s_bh;  // element strides between (b, kv head) slices
  int bits, axis, wd, ngd;
};

struct DecodeParams {
  const void* q;
  QuantSide k, v;
  const void* k_res;
  const void* v_res;
  int64_t kr_bh, kr_t, vr_bh, vr_t;
  float* m_part;
  float* l_part;
  float* acc_part;
  const int32_t* n_quant;  // (B,) per-row lengths (device): quantized tokens, then residual tokens
  const int32_t* n_res;
  int64_t cap_q, cap_r, max_len;  // buffer capacities (tokens); mass row stride
  int NQ, GQ, HKV, H, G, fp8, n_qsplits, S;
  int64_t chunk_q, chunk_r;
  float qk_scale;  // scale * log2(e)
};

__device__ __forceinline__ float load_quant(const QuantSide& s, int64_t bh, int64_t tok, int d, int D, int fp8, int G) {
  if (fp8) {
    __nv_fp8_e4m3 c;
    c.__x = static_cast<const uint8_t*>(s.codes)[bh * s.c_bh + tok * D + d];
    return static_cast<float>(c) * static_cast<const float*>(s.scale)[bh * s.s_bh + tok];
  }
  const int cpw = 32 / s.bits;
  const uint32_t qmax = (1u << s.bits) - 1u;
  int64_t widx, sidx;
  int shift;
  if (s.axis == -2) {  // groups of G tokens per channel, words along tokens
    widx = (tok / cpw) * D + d;
    shift = int(tok % cpw) * s.bits;
    sidx = (tok / G) * D + d;
  } else {  // groups of G channels per token, words along channels
    widx = tok * s.wd + d / cpw;
    shift = (d % cpw) * s.bits;
    sidx = tok * s.ngd + d / G;
  }
  const uint32_t w = static_cast<uint32_t>(static_cast<const int32_t*>(s.codes)[bh * s.c_bh + widx]);
  const float q = static_cast<float>((w >> shift) & qmax);
  const __half* sc = static_cast<const __half*>(s.scale);
  const __half* z = static_cast<const __half*>(s.zero);
  return __fadd_rn(__fmul_rn(q, __half2float(sc[bh * s.s_bh + sidx])), __half2float(z[bh * s.s_bh + sidx]));
}

// ---- vectorised tile fills (issue 12: 128-bit loads, scale/zero once per group) --------------------
// Every fill writes rows [0, TT) of dst (row stride ld): token t0 + t dequantized to fp32, 0 past end.

__device__ __forceinline__ float dq(uint32_t code, float s, float z) {
  return __fadd_rn(__fmul_rn(static_cast<float>(code), s), z);  // the spec's q * scale + zero (no FMA)
}

__device__ __forceinline__ void load_half4(const __half* src, float* out) {  // 8 bytes, 8-byte aligned
  const uint2 raw = *reinterpret_cast<const uint2*>(src);
  __half h[4];
  memcpy(h, &raw, sizeof(h));
#pragma unroll
  for (int i = 0; i < 4; ++i) out[i] = __half2float(h[i]);
}

template <int D>
__device__ void zero_tail(float* dst, int ld, int t0, int end, int TT, int tid) {
  const int n = end - t0;
  const int first = n <= 0 ? 0 : (n >= TT ? TT : n);
  for (int e = first * D + tid; e < TT * D; e += kThreads) dst[(e / D) * ld + e % D] = 0.f;
}

// fp8 e4m3 codes (one fp32 scale per token): one 128-bit load = 16 channels of one token.
template <int D>
__device__ void fill_fp8(const QuantSide& s, int64_t bh, int t0, int end, int TT, float* dst, int ld,
                         int tid) {
  constexpr int U = D / 16;
  const uint8_t* codes = static_cast<const uint8_t*>(s.codes) + bh * s.c_bh;
  const float* scale = static_cast<const float*>(s.scale) + bh * s.s_bh;
  for (int u = tid; u < TT * U; u += kThreads) {
    const int t = u / U, c = (u % U) * 16;
    const int tok = t0 + t;
    if (tok >= end) continue;
    const uint4 raw = *reinterpret_cast<const uint4*>(codes + tok * D + c);
    uint8_t b8[16];
    memcpy(b8, &raw, 16);
    const float sc = scale[tok];
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      __nv_fp8_e4m3 f;
      f.__x = b8[i];
      dst[t * ld + c + i] = static_cast<float>(f) * sc;
    }
  }
  zero_tail<D>(dst, ld, t0, end, TT, tid);
}

// axis -2 (groups of G tokens per channel): one 128-bit load = 4 channels x 32/bits tokens; the word's
// tokens lie in one group (G * bits is a multiple of 32), so 4 scales + 4 zeros serve 4 * 32/bits codes.
template <int D>
__device__ void fill_tokens(const QuantSide& s, int64_t bh, int t0, int end, int TT, float* dst, int ld,
                            int G, int tid) {
  const int cpw = 32 / s.bits;
  const uint32_t qmax = (1u << s.bits) - 1u;
  const int stop = min(t0 + TT, end);
  const int r_lo = t0 / cpw;
  const int nrows = stop > t0 ? (stop - 1) / cpw - r_lo + 1 : 0;
  constexpr int U = D / 4;
  const int32_t* codes = static_cast<const int32_t*>(s.codes) + bh * s.c_bh;
  const __half* scale = static_cast<const __half*>(s.scale) + bh * s.s_bh;
  const __half* zero = static_cast<const __half*>(s.zero) + bh * s.s_bh;
  for (int u = tid; u < nrows * U; u += kThreads) {
    const int r = r_lo + u / U;
    const int c = (u % U) * 4;
    const uint4 w4 = *reinterpret_cast<const uint4*>(codes + r * D + c);
    const uint32_t w[4] = {w4.x, w4.y, w4.z, w4.w};
    const int tb = r * cpw, g = tb / G;
    float sc[4], z[4];
    load_half4(scale + g * D + c, sc);
    load_half4(zero + g * D + c, z);
    for (int j = 0; j < cpw; ++j) {
      const int tok = tb + j;
      if (tok < t0 || tok >= stop) continue;
      float* row = dst + (tok - t0) * ld + c;
#pragma unroll
      for (int i = 0; i < 4; ++i) row[i] = dq((w[i] >> (j * s.bits)) & qmax, sc[i], z[i]);
    }
  }
  zero_tail<D>(dst, ld, t0, end, TT, tid);
}

// axis -1 (groups of G channels per token): 128-bit loads of 4 words (4 * 32/bits channels of one
// token) where the row of words allows it (else one word); scale and zero once per word (a word's
// channels lie in one group).
template <int D>
__device__ void fill_channels(const QuantSide& s, int64_t bh, int t0, int end, int TT, float* dst, int ld,
                              int G, int tid) {
  const int cpw = 32 / s.bits;
  const uint32_t qmax = (1u << s.bits) - 1u;
  const int wd = s.wd;
  const int vw = (wd % 4 == 0) ? 4 : 1;  // words per load
  const int U = wd / vw;
  const int32_t* codes = static_cast<const int32_t*>(s.codes) + bh * s.c_bh;
  const __half* scale = static_cast<const __half*>(s.scale) + bh * s.s_bh;
  const __half* zero = static_cast<const __half*>(s.zero) + bh * s.s_bh;
  for (int u = tid; u < TT * U; u += kThreads) {
    const int t = u / U, w0 = (u % U) * vw;
    const int tok = t0 + t;
    if (tok >= end) continue;
    uint32_t w[4] = {0u, 0u, 0u, 0u};
    if (vw == 4) {
      const uint4 w4 = *reinterpret_cast<const uint4*>(codes + tok * wd + w0);
      w[0] = w4.x; w[1] = w4.y; w[2] = w4.z; w[3] = w4.w;
    } else {
      w[0] = static_cast<uint32_t>(codes[tok * wd + w0]);
    }
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      if (k >= vw) break;
      const int ch = (w0 + k) * cpw;
      const int sidx = tok * s.ngd + ch / G;
      const float sc = __half2float(scale[sidx]), z = __half2float(zero[sidx]);
      float* row = dst + t * ld + ch;
      for (int j = 0; j < cpw; ++j) row[j] = dq((w[k] >> (j * s.bits)) & qmax, sc, z);
    }
  }
  zero_tail<D>(dst, ld, t0, end, TT, tid);
}

template <int D>
__device__ void fill_quant(const QuantSide& s, int64_t bh, int t0, int end, int TT, float* dst, int ld, int fp8,
                           int G, int tid) {
  if (fp8) fill_fp8<D>(s, bh, t0, end, TT, dst, ld, tid);
  else if (s.axis == -2) fill_tokens<D>(s, bh, t0, end, TT, dst, ld, G, tid);
  else fill_channels<D>(s, bh, t0, end, TT, dst, ld, G, tid);
}

// full-precision residual tokens: one 128-bit load = 16 bytes of one token's row.
template <typename T, int D>
__device__ void fill_res(const T* base, int r_t, int t0, int end, int TT,
                         float* dst, int ld, int tid) {
  constexpr int E = 16 / sizeof(T) < 1 ? 1 : 16 / sizeof(T);
  constexpr int U = D / E;
  for (int u = tid; u < TT * U; u += kThreads) {
    const int t = u / U, c = (u % U) * E;
    const int tok = t0 + t;
    if (tok >= end) continue;
    const uint4 raw = *reinterpret_cast<const uint4*>(base + tok * r_t + c);
    T x[E];
    memcpy(x, &raw, sizeof(x));
#pragma unroll
    for (int i = 0; i < E; ++i) dst[t * ld + c + i] = static_cast<float>(x[i]);
  }
  zero_tail<D>(dst, ld, t0, end, TT, tid);
}

template <int D>
struct Tile {
  static constexpr int TT = (2048 / D) < 4 ? 4 : 2048 / D;  // tokens per tile
  static constexpr int DP = D + 1;                          // padded row (no bank conflicts)
  static constexpr int smem_floats = kRows * DP + TT * DP + TT * D + kRows * TT + 3 * kRows;
};

// Blocks per SM that the register cap (launch bounds) aims at.  16-bit q at D = 64 / 128: 8 (registers
// capped at 64, 1,024 resident threads per SM; shared memory allows 8 too: 26 KB per block at D = 128),
// except D = 64 before Hopper, which spilled 12 local stores per thread at 64 registers (nvcc 13,
// sm_80): 6 there (85 registers).  fp32/fp64 q (wider tiles in registers; 4-9 spill stores at 64 on
// sm_80) and D = 32 / 256: 4.
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 900
#define TOKOPS_DECODE_BLOCKS_D64 6
#else
#define TOKOPS_DECODE_BLOCKS_D64 8
#endif
template <typename T, int D>
constexpr int decode_min_blocks() {
  return sizeof(T) != 2 ? 4 : D == 64 ? TOKOPS_DECODE_BLOCKS_D64 : D == 128 ? 8 : 4;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, decode_min_blocks<T, D>()) decode_partial_kernel(DecodeParams p) {
  using TL = Tile<D>;
  constexpr int TT = TL::TT, DP = TL::DP;
  constexpr int COLS = D >= kThreads ? D / kThreads : 1;
  constexpr int RG = D >= kThreads ? 1 : kThreads / D;
  constexpr int ROWS = kRows / RG;
  static_assert(RG <= kRows, "head dim too small");
  TOKOPS_EXTERN_SHARED(float, smem);
  float* qs = smem;
  float* ks = qs + kRows * DP;
  float* vs = ks + TT * DP;
  float* ps = vs + TT * D;
  float* ms = ps + kRows * TT;
  float* ls = ms + kRows;
  float* as = ls + kRows;

  const int64_t bh = blockIdx.x;
  const int split = blockIdx.y;
  const int r0 = blockIdx.z * kRows;
  const int64_t b = bh / p.HKV, hk = bh % p.HKV;
  // token indices are 32-bit (capacities < 2^31 tokens are checked on the host); offsets stay 64-bit
  const int n_quant = static_cast<int>(min(static_cast<int64_t>(max(p.n_quant[b], 0)), p.cap_q));  // clamped
  const int n_res = static_cast<int>(min(static_cast<int64_t>(max(p.n_res[b], 0)), p.cap_r));
  const int L = n_quant + n_res;
  const int rows = p.GQ * p.NQ;
  const int tid = threadIdx.x;
  const T* q = static_cast<const T*>(p.q);

  for (int e = tid; e < kRows * D; e += kThreads) {
    const int r = e / D, d = e % D, rr = r0 + r;
    float val = 0.f;
    if (rr < rows) {
      const int64_t qrow = (b * p.H + hk * p.GQ + rr / p.NQ) * p.NQ + rr % p.NQ;
      val = static_cast<float>(q[qrow * D + d]);
    }
    qs[r * DP + d] = val;
  }
  if (tid < kRows) {
    ms[tid] = -INFINITY;
    ls[tid] = 0.f;
  }
  const int dcol = D >= kThreads ? tid : tid % D;
  const int rg = D >= kThreads ? 0 : tid / D;
  float acc[ROWS][COLS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i)
#pragma unroll
    for (int c = 0; c < COLS; ++c) acc[i][c] = 0.f;

  const bool quant = split < p.n_qsplits;
  const int start = static_cast<int>(quant ? split * p.chunk_q : (split - p.n_qsplits) * p.chunk_r);
  const int end = quant ? min(start + static_cast<int>(p.chunk_q), n_quant)
                        : min(start + static_cast<int>(p.chunk_r), n_res);
  const int pos0 = quant ? 0 : n_quant;
  const T* kr = static_cast<const T*>(p.k_res) + bh * p.kr_bh;
  const T* vr = static_cast<const T*>(p.v_res) + bh * p.vr_bh;
  __syncthreads();

  for (int t0 = start; t0 < end; t0 += TT) {
    if (quant) {
      fill_quant<D>(p.k, bh, t0, end, TT, ks, DP, p.fp8, p.G, tid);
      fill_quant<D>(p.v, bh, t0, end, TT, vs, D, p.fp8, p.G, tid);
    } else {
      fill_res<T, D>(kr, static_cast<int>(p.kr_t), t0, end, TT, ks, DP, tid);
      fill_res<T, D>(vr, static_cast<int>(p.vr_t), t0, end, TT, vs, D, tid);
    }
    __syncthreads();
    for (int e = tid; e < kRows * TT; e += kThreads) {
      const int r = e / TT, t = e % TT, rr = r0 + r;
      const int tok = t0 + t;
      float s = -INFINITY;
      if (rr < rows && tok < end && pos0 + tok <= L - p.NQ + rr % p.NQ) {
        float a = 0.f;
#pragma unroll 8
        for (int d = 0; d < D; ++d) a += qs[r * DP + d] * ks[t * DP + d];
        s = a * p.qk_scale;
      }
      ps[r * TT + t] = s;
    }
    __syncthreads();
    if (tid < kRows) {
      const float m_old = ms[tid];
      float mx = m_old;
      for (int t = 0; t < TT; ++t) mx = fmaxf(mx, ps[tid * TT + t]);
      const float msafe = mx == -INFINITY ? 0.f : mx;
      const float alpha = exp2f(m_old - msafe);
      float sum = 0.f;
      for (int t = 0; t < TT; ++t) {
        const float e = exp2f(ps[tid * TT + t] - msafe);
        ps[tid * TT + t] = e;
        sum += e;
      }
      ls[tid] = ls[tid] * alpha + sum;
      ms[tid] = mx;
      as[tid] = alpha;
    }
    __syncthreads();
#pragma unroll
    for (int i = 0; i < ROWS; ++i) {
      const int r = rg + i * RG;
      if (r0 + r >= rows) continue;
      const float alpha = as[r];
#pragma unroll
      for (int c = 0; c < COLS; ++c) {
        const int d = dcol + c * kThreads;
        float a = acc[i][c] * alpha;
#pragma unroll 4
        for (int t = 0; t < TT; ++t) a += ps[r * TT + t] * vs[t * D + d];
        acc[i][c] = a;
      }
    }
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < ROWS; ++i) {
    const int r = rg + i * RG, rr = r0 + r;
    if (rr >= rows) continue;
    const int64_t qrow = (b * p.H + hk * p.GQ + rr / p.NQ) * p.NQ + rr % p.NQ;
    const int64_t off = qrow * p.S + split;
#pragma unroll
    for (int c = 0; c < COLS; ++c) p.acc_part[off * D + dcol + c * kThreads] = acc[i][c];
  }
  if (tid < kRows && r0 + tid < rows) {
    const int rr = r0 + tid;
    const int64_t qrow = (b * p.H + hk * p.GQ + rr / p.NQ) * p.NQ + rr % p.NQ;
    p.m_part[qrow * p.S + split] = ms[tid];
    p.l_part[qrow * p.S + split] = ls[tid];
  }
}

template <typename T>
__global__ void decode_merge_kernel(const float* __restrict__ m, const float* __restrict__ l,
                                    const float* __restrict__ acc, T* __restrict__ out, float* __restrict__ lse,
                                    int S, int D) {
  const int64_t row = blockIdx.x;
  float mx = -INFINITY;
  for (int s = 0; s < S; ++s) mx = fmaxf(mx, m[row * S + s]);
  const float msafe = mx == -INFINITY ? 0.f : mx;
  float ltot = 0.f;
  for (int s = 0; s < S; ++s) ltot += exp2f(m[row * S + s] - msafe) * l[row * S + s];
  const float inv = ltot == 0.f ? 0.f : 1.f / ltot;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float o = 0.f;
    for (int s = 0; s < S; ++s) o += exp2f(m[row * S + s] - msafe) * acc[(row * S + s) * D + d];
    out[row * D + d] = static_cast<T>(o * inv);
  }
  if (threadIdx.x == 0) lse[row] = ltot == 0.f ? -INFINITY : (msafe + log2f(ltot)) * kLn2;
}

template <int D>
struct MassTile {
  static constexpr int TM = (4096 / D) > 64 ? 64 : ((4096 / D) < 8 ? 8 : 4096 / D);
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreads, 4) decode_mass_kernel(DecodeParams p, const float* __restrict__ lse,
                                                                float* __restrict__ mass, int64_t n_qblocks) {
  constexpr int TM = MassTile<D>::TM;
  constexpr int DP = D + 1;
  __shared__ float ks[TM * DP];
  __shared__ float qs[8 * DP];
  __shared__ float ps[8 * TM];
  const int64_t bh = blockIdx.x, blk = blockIdx.y;
  const int64_t b = bh / p.HKV, hk = bh % p.HKV;
  const int64_t n_quant = min(static_cast<int64_t>(p.n_quant[b]), p.cap_q);
  const int64_t n_res = min(static_cast<int64_t>(p.n_res[b]), p.cap_r);
  const int64_t L = n_quant + n_res;
  const bool quant = blk < n_qblocks;
  const int64_t t0 = quant ? blk * TM : (blk - n_qblocks) * TM;
  const int64_t end = min(quant ? n_quant : n_res, p.max_len - (quant ? 0 : n_quant));
  const int64_t pos0 = quant ? 0 : n_quant;
  if (t0 >= end) return;  // a block past this row's tokens (the grid is sized by the capacity)
  const QuantSide kside = p.k;  // a register copy (a reference into the parameter space costs a stack frame)
  const int tid = threadIdx.x;
  const T* q = static_cast<const T*>(p.q);
  const T* kr = static_cast<const T*>(p.k_res);
  for (int e = tid; e < TM * D; e += kThreads) {
    const int t = e / D, d = e % D;
    const int64_t tok = t0 + t;
    float kv = 0.f;
    if (tok < end) kv = quant ? load_quant(kside, bh, tok, d, D, p.fp8, p.G)
                              : static_cast<float>(kr[bh * p.kr_bh + tok * p.kr_t + d]);
    ks[t * DP + d] = kv;
  }
  for (int hh = 0; hh < p.GQ; ++hh) {
    const int64_t h = hk * p.GQ + hh;
    __syncthreads();
    for (int e = tid; e < p.NQ * D; e += kThreads) {
      const int qi = e / D, d = e % D;
      qs[qi * DP + d] = static_cast<float>(q[((b * p.H + h) * p.NQ + qi) * D + d]);
    }
    __syncthreads();
    for (int e = tid; e < p.NQ * TM; e += kThreads) {
      const int qi = e / TM, t = e % TM;
      const int64_t tok = t0 + t;
      float pr = 0.f;
      if (tok < end && pos0 + tok <= L - p.NQ + qi) {
        float a = 0.f;
#pragma unroll 8
        for (int d = 0; d < D; ++d) a += qs[qi * DP + d] * ks[t * DP + d];
        pr = exp2f(a * p.qk_scale - lse[(b * p.H + h) * p.NQ + qi] * kLog2e);
      }
      ps[qi * TM + t] = pr;
    }
    __syncthreads();
    for (int t = tid; t < TM; t += kThreads) {
      const int64_t tok = t0 + t;
      if (tok >= end) continue;
      float sum = 0.f;
      for (int qi = 0; qi < p.NQ; ++qi) sum += ps[qi * TM + t];
      mass[(b * p.H + h) * p.max_len + pos0 + tok] = sum;
    }
  }
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Checks one quantized store and returns its capacity in tokens (from the shapes: the per-row lengths
// live on the device and are clamped to this capacity in the kernels; no host read of them).
int64_t check_store(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, const char* side,
                    bool fp8, int64_t bits, int64_t G, int64_t axis, int64_t B, int64_t HKV, int64_t D) {
  TOKOPS_CHECK_CUDA(codes);
  TOKOPS_CHECK_CUDA(scale);
  TORCH_CHECK(codes.is_contiguous() && scale.is_contiguous(), side, "_codes / ", side, "_scale must be contiguous");
  TORCH_CHECK(codes.dim() == 4 && codes.size(0) == B && codes.size(1) == HKV, side, "_codes must have shape (", B,
              ", ", HKV, ", ...), got ", codes.sizes());
  if (fp8) {
    TOKOPS_CHECK_DTYPE(codes, at::kByte);
    TOKOPS_CHECK_DTYPE(scale, at::kFloat);
    TORCH_CHECK(codes.size(3) == D, side, "_codes has shape ", codes.sizes(), ", not fp8 tokens of head dim ", D);
    TORCH_CHECK(scale.dim() == 3 && scale.size(0) == B && scale.size(1) == HKV, side, "_scale has shape ",
                scale.sizes());
    return std::min(codes.size(2), scale.size(2));
  }
  TOKOPS_CHECK_DTYPE(codes, at::kInt);
  TOKOPS_CHECK_DTYPE(scale, at::kHalf);
  TOKOPS_CHECK_DTYPE(zero, at::kHalf);
  TOKOPS_CHECK_CUDA(zero);
  TORCH_CHECK(zero.is_contiguous() && zero.sizes() == scale.sizes(), side, "_zero must be contiguous with the shape of ",
              side, "_scale");
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, "bits_", side, " must be 8, 4 or 2, got ", bits);
  TORCH_CHECK(axis == -1 || axis == -2, side, " axis must be -1 or -2, got ", axis);
  TORCH_CHECK(scale.dim() == 4 && scale.size(0) == B && scale.size(1) == HKV, side, "_scale has shape ", scale.sizes());
  if (axis == -2) {
    TORCH_CHECK((G * bits) % 32 == 0, "group_size * bits must be a multiple of 32 for axis=-2");
    TORCH_CHECK(codes.size(3) == D, side, "_codes has shape ", codes.sizes(), ", expected head dim ", D);
    TORCH_CHECK(scale.size(3) == D, side, "_scale has shape ", scale.sizes(), ", expected head dim ", D);
    return std::min(codes.size(2) * (32 / bits), scale.size(2) * G) / G * G;
  }
  TORCH_CHECK(D % G == 0 && (D * bits) % 32 == 0, "group_size must divide D for axis=-1");
  TORCH_CHECK(codes.size(3) == D * bits / 32, side, "_codes has shape ", codes.sizes(), ", expected ", D * bits / 32,
              " words per token");
  TORCH_CHECK(scale.size(3) == D / G, side, "_scale has shape ", scale.sizes(), ", expected ", D / G,
              " groups per token");
  return std::min(codes.size(2), scale.size(2));
}

template <typename T, int D>
void launch(const DecodeParams& p, int64_t B, int64_t H, int64_t rchunks, const at::Tensor& lse, at::Tensor& mass,
            bool return_mass, at::Tensor& out, cudaStream_t stream) {
  const size_t smem = Tile<D>::smem_floats * sizeof(float);
  TOKOPS_LAUNCH(dim3(B * p.HKV, p.S, rchunks), kThreads, smem, stream, decode_partial_kernel<T, D>)(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TOKOPS_LAUNCH(B * H * p.NQ, D < 256 ? D : 256, 0, stream, decode_merge_kernel<T>)(
      p.m_part, p.l_part, p.acc_part, out.data_ptr<T>(), lse.data_ptr<float>(), p.S, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (return_mass && p.max_len > 0 && p.cap_q + p.cap_r > 0) {
    constexpr int TM = MassTile<D>::TM;
    const int64_t nqb = cdiv(p.cap_q, TM), nrb = cdiv(p.cap_r, TM);
    TOKOPS_LAUNCH(dim3(B * p.HKV, nqb + nrb), kThreads, 0, stream, decode_mass_kernel<T, D>)(p, lse.data_ptr<float>(),
                                                                                    mass.data_ptr<float>(), nqb);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_decode_attention_cuda(
    const at::Tensor& q, const at::Tensor& k_codes, const at::Tensor& k_scale, const at::Tensor& k_zero,
    const at::Tensor& v_codes, const at::Tensor& v_scale, const at::Tensor& v_zero, const at::Tensor& k_res,
    const at::Tensor& v_res, const at::Tensor& n_quant, const at::Tensor& n_res, int64_t max_len,
    c10::string_view mode, int64_t bits_k, int64_t bits_v, int64_t group_size, int64_t key_axis, int64_t value_axis,
    double scale, bool return_mass) {
  TOKOPS_CHECK_CUDA(q);
  TOKOPS_CHECK_CONTIG(q);
  TORCH_CHECK(q.dim() == 4, "q must have 4 dims (B, H, nq, D), got ", q.sizes());
  const int64_t B = q.size(0), H = q.size(1), NQ = q.size(2), D = q.size(3);
  TORCH_CHECK(NQ >= 1 && NQ <= 8, "q must have 1 <= nq <= 8, got ", NQ);
  TORCH_CHECK(D == 32 || D == 64 || D == 128 || D == 256, "the CUDA decode kernel supports head dims 32, 64, 128, "
              "256; got D=", D);
  TORCH_CHECK(mode == "int" || mode == "fp8", "mode must be 'int' or 'fp8'");
  const bool fp8 = mode == "fp8";
  for (const at::Tensor* n : {&n_quant, &n_res}) {
    TOKOPS_CHECK_CUDA((*n));
    TORCH_CHECK(n->scalar_type() == at::kInt && n->dim() == 1 && n->size(0) == B && n->is_contiguous(),
                "n_quant / n_res must be contiguous int32 tensors of shape (B,) = (", B, ",), got ", n->sizes(), " ",
                n->scalar_type());
  }
  TORCH_CHECK(max_len >= 0, "max_len must be >= 0, got ", max_len);
  TOKOPS_CHECK_CUDA(k_res);
  TOKOPS_CHECK_CUDA(v_res);
  TOKOPS_CHECK_CONTIG(k_res);
  TOKOPS_CHECK_CONTIG(v_res);
  TORCH_CHECK(k_res.scalar_type() == q.scalar_type() && v_res.scalar_type() == q.scalar_type(),
              "k_res / v_res must have q's dtype ", q.scalar_type());
  TORCH_CHECK(k_res.dim() == 4 && k_res.sizes() == v_res.sizes() && k_res.size(0) == B && k_res.size(3) == D,
              "k_res / v_res must have shape (B, H_kv, R, D), got ", k_res.sizes());
  const int64_t HKV = k_res.size(1);
  TORCH_CHECK(HKV > 0 && H % HKV == 0, "q heads (", H, ") must be a multiple of the kv heads (", HKV, ")");
  TORCH_CHECK(group_size >= 4 && group_size <= 1024 && (group_size & (group_size - 1)) == 0,
              "group_size must be a power of two in [4, 1024], got ", group_size);
  const int64_t cap_q = std::min(check_store(k_codes, k_scale, k_zero, "k", fp8, bits_k, group_size, key_axis, B, HKV, D),
                                 check_store(v_codes, v_scale, v_zero, "v", fp8, bits_v, group_size, value_axis, B, HKV, D));
  const int64_t cap_r = k_res.size(2);
  // the tile fills use 128-bit loads of codes / residual rows and 64-bit loads of 4 fp16 scales
  auto aligned = [](const at::Tensor& t, int bytes) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % bytes == 0; };
  TORCH_CHECK(aligned(k_codes, 16) && aligned(v_codes, 16) && aligned(k_res, 16) && aligned(v_res, 16),
              "k_codes / v_codes / k_res / v_res must be 16-byte aligned (a tensor's own storage, not an offset view)");
  TORCH_CHECK(fp8 || (aligned(k_scale, 8) && aligned(k_zero, 8) && aligned(v_scale, 8) && aligned(v_zero, 8)),
              "k_scale / k_zero / v_scale / v_zero must be 8-byte aligned");
  const c10::cuda::CUDAGuard guard(q.device());
  auto out = new_output(q.sizes(), q.options());
  auto lse = new_output({B, H, NQ}, q.options().dtype(at::kFloat));
  auto mass = new_output({B, H, return_mass ? max_len : 0}, q.options().dtype(at::kFloat));
  if (return_mass) mass.zero_();  // entries past a row's length stay 0
  const int64_t GQ = H / HKV;
  const int64_t rchunks = cdiv(GQ * NQ, kRows);
  // the grid depends on (B, H_kv, capacities) only, never on the current lengths (CUDA graph replay)
  const int TT = int(2048 / D);
  const int64_t n_tiles = cdiv(cap_q, TT);
  int64_t qsplits = 0, chunk_q = TT;
  if (cap_q) {
    const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    // >= 8 blocks per SM in the grid (issue 12; the kernel's resources let 8 be resident at D <= 128)
    const int64_t want = std::max<int64_t>(1, cdiv(8 * sms, B * HKV * rchunks));
    const int64_t per = cdiv(n_tiles, std::min(n_tiles, want));
    chunk_q = per * TT;
    qsplits = cdiv(cap_q, chunk_q);
  }
  const int64_t chunk_r = 256;
  const int64_t rsplits = cdiv(cap_r, chunk_r);
  const int64_t S = std::max<int64_t>(1, qsplits + rsplits);
  TORCH_CHECK(S < 65536, "too many splits (", S, ")");
  TORCH_CHECK(cap_q < (int64_t(1) << 30) && cap_r < (int64_t(1) << 30) && cap_q * D < (int64_t(1) << 31),
              "the CUDA decode kernel indexes tokens in 32 bits: capacity too large (", cap_q, ", ", cap_r, ")");
  auto fopt = q.options().dtype(at::kFloat);
  auto m_part = at::empty({B * H * NQ * S}, fopt);
  auto l_part = at::empty({B * H * NQ * S}, fopt);
  auto acc_part = at::empty({B * H * NQ * S * D}, fopt);

  DecodeParams p{};
  p.q = q.data_ptr();
  auto side = [&](const at::Tensor& c, const at::Tensor& s, const at::Tensor& z, int64_t bits, int64_t axis) {
    QuantSide qs{};
    qs.codes = c.data_ptr();
    qs.scale = s.data_ptr();
    qs.zero = fp8 ? s.data_ptr() : z.data_ptr();
    qs.c_bh = c.stride(1);
    qs.s_bh = s.stride(1);
    qs.bits = fp8 ? 8 : int(bits);
    qs.axis = fp8 ? -1 : int(axis);
    qs.wd = fp8 ? int(D) : int(D * bits / 32);
    qs.ngd = int(D / group_size);
    return qs;
  };
  p.k = side(k_codes, k_scale, k_zero, bits_k, key_axis);
  p.v = side(v_codes, v_scale, v_zero, bits_v, value_axis);
  p.k_res = k_res.data_ptr();
  p.v_res = v_res.data_ptr();
  p.kr_bh = k_res.stride(1);
  p.kr_t = k_res.stride(2);
  p.vr_bh = v_res.stride(1);
  p.vr_t = v_res.stride(2);
  p.m_part = m_part.data_ptr<float>();
  p.l_part = l_part.data_ptr<float>();
  p.acc_part = acc_part.data_ptr<float>();
  p.n_quant = n_quant.data_ptr<int32_t>();
  p.n_res = n_res.data_ptr<int32_t>();
  p.cap_q = cap_q;
  p.cap_r = cap_r;
  p.max_len = max_len;
  p.NQ = int(NQ);
  p.GQ = int(GQ);
  p.HKV = int(HKV);
  p.H = int(H);
  p.G = int(group_size);
  p.fp8 = fp8 ? 1 : 0;
  p.n_qsplits = int(qsplits);
  p.S = int(S);
  p.chunk_q = chunk_q;
  p.chunk_r = chunk_r;
  p.qk_scale = float(scale) * kLog2e;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kv_decode_attention_cuda", [&] {
    switch (D) {
      case 32: launch<scalar_t, 32>(p, B, H, rchunks, lse, mass, return_mass, out, stream); break;
      case 64: launch<scalar_t, 64>(p, B, H, rchunks, lse, mass, return_mass, out, stream); break;
      case 128: launch<scalar_t, 128>(p, B, H, rchunks, lse, mass, return_mass, out, stream); break;
      default: launch<scalar_t, 256>(p, B, H, rchunks, lse, mass, return_mass, out, stream); break;
    }
  });
  return {out, lse, mass};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokops, m) {
  m.def("kv_decode_attention_cuda(Tensor q, Tensor k_codes, Tensor k_scale, Tensor k_zero, Tensor v_codes, "
        "Tensor v_scale, Tensor v_zero, Tensor k_res, Tensor v_res, Tensor n_quant, Tensor n_res, int max_len, "
        "str mode, int bits_k, "
        "int bits_v, int group_size, int key_axis, int value_axis, float scale, bool return_mass) "
        "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tokops, CUDA, m) { m.impl("kv_decode_attention_cuda", &kv_decode_attention_cuda); }

}  // namespace tokops
