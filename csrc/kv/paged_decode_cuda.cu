// CUDA decode attention over a paged quantized KV cache (tokops.kv.PagedKVCache; flash-decoding over pages).
// Layout, residual rule and causal rule: python/tokops/kv/paged.py; Triton twin: triton_kernels/kv_paged_decode.py
// (same split scheme). Python reference: paged.py (_torch_paged).
//
// Three kernels:
//  * paged_partial_kernel, grid (B*H_kv, S_q + 1, ceil(GQ*nq / 16)) -- fixed by (B, H_kv, max_pages_per_row)
//    and the SM count, never by the lengths (a CUDA graph can replay it). Splits s < S_q cover block-table
//    columns [s*pps, (s+1)*pps) of the row, clipped on the device to the row's ceil(n_quant / P) pages
//    (n_quant from lengths[b] and the residual rule); the last split covers the full-precision residual ring.
//    Each tile of TT tokens of a page is dequantized into shared memory with 128-bit loads of the packed codes
//    (uint4: four int32 words = 4 channels x 32/bits tokens of keys, or 4*32/bits channels of one token of
//    values; 16 fp8 codes) and of the ring rows; never into a global temporary. Online softmax in fp32
//    (base 2), partial (m, l, acc) per split.
//  * paged_merge_kernel, one block per (b, h, query): LSE merge of the splits -> out, lse.
//  * paged_mass_kernel (return_mass): per-key mass by token position (B, H, T), T = max_pages*P + R + G, 0 past
//    each row's length.
// A block-table entry out of [0, num_pages) is skipped (never read through); the Python layer validates.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <string_view>

#include "../common.h"

namespace tokops {
namespace {

constexpr float kLog2eP = 1.4426950408889634f;
constexpr float kLn2P = 0.6931471805599453f;
constexpr int kRowsP = 16;  // query rows per block
constexpr int kThreadsP = 128;

struct PagedSide {
  const void* codes;
  const void* scale;
  const void* zero;
  int64_t c_page, c_h, s_page, s_h;  // element strides of the page and head dims
  int bits, wd;                      // wd: int32 words per token row (values), D (fp8)
};

struct PagedParams {
  const void* q;
  PagedSide k, v;
  const void* k_res;
  const void* v_res;
  int64_t r_b, r_h;  // ring strides (elements); a token row is D contiguous elements
  const int32_t* block_table;
  int64_t bt_b;
  const int32_t* lengths;
  float* m_part;
  float* l_part;
  float* acc_part;
  int NQ, GQ, HKV, H, G, P, R, RC, fp8, S_q, S, pps, num_pages, max_pages;
  int64_t T;
  float qk_scale;  // scale * log2(e)
};

__device__ __forceinline__ int n_quant_dev(int L, int R, int G) {
  const int x = L - R;
  return x > 0 ? (x / G) * G : 0;
}

__device__ __forceinline__ float fp8_value(uint8_t c) {
  __nv_fp8_e4m3 f;
  f.__x = c;
  return static_cast<float>(f);
}

// Keys (per channel, groups of G tokens) or fp8 keys: tokens [off, off + TT) of one page slice into
// dst[t * ld + d] (fp32); tokens at in-page index >= nvalid are written as 0 (never read).
template <int D, int TT>
__device__ void load_key_tile(const PagedSide& s, int64_t page, int64_t hk, int off, int nvalid, int G, int fp8,
                              float* dst, int ld) {
  const int tid = threadIdx.x;
  if (fp8) {
    const uint8_t* c = static_cast<const uint8_t*>(s.codes) + page * s.c_page + hk * s.c_h;
    const float* sc = static_cast<const float*>(s.scale) + page * s.s_page + hk * s.s_h;
    constexpr int C16 = D / 16;
    for (int e = tid; e < TT * C16; e += blockDim.x) {
      const int j = e / C16, c16 = e % C16, t = off + j;
      float* o = dst + j * ld + c16 * 16;
      if (t >= nvalid) {
        for (int i = 0; i < 16; ++i) o[i] = 0.f;
        continue;
      }
      const uint4 raw = *reinterpret_cast<const uint4*>(c + int64_t(t) * D + c16 * 16);
      const uint8_t* b = reinterpret_cast<const uint8_t*>(&raw);
      const float f = sc[t];
#pragma unroll
      for (int i = 0; i < 16; ++i) o[i] = fp8_value(b[i]) * f;
    }
    return;
  }
  const int bits = s.bits, cpw = 32 / bits;
  const uint32_t qmax = (1u << bits) - 1u;
  const int32_t* w = static_cast<const int32_t*>(s.codes) + page * s.c_page + hk * s.c_h;
  const __half* sc = static_cast<const __half*>(s.scale) + page * s.s_page + hk * s.s_h;
  const __half* zr = static_cast<const __half*>(s.zero) + page * s.s_page + hk * s.s_h;
  const int w0 = off / cpw, w1 = (off + TT - 1) / cpw;
  constexpr int C4 = D / 4;
  for (int e = tid; e < (w1 - w0 + 1) * C4; e += blockDim.x) {
    const int wrow = w0 + e / C4, c4 = e % C4;
    const int t_lo = max(off, wrow * cpw), t_hi = min(off + TT, (wrow + 1) * cpw);
    uint4 raw = make_uint4(0u, 0u, 0u, 0u);
    if (t_lo < nvalid) raw = *reinterpret_cast<const uint4*>(w + int64_t(wrow) * D + c4 * 4);
    const uint32_t words[4] = {raw.x, raw.y, raw.z, raw.w};
    for (int t = t_lo; t < t_hi; ++t) {
      float* o = dst + (t - off) * ld + c4 * 4;
      if (t >= nvalid) {
#pragma unroll
        for (int i = 0; i < 4; ++i) o[i] = 0.f;
        continue;
      }
      const int shift = (t % cpw) * bits;
      const int64_t srow = int64_t(t / G) * D + c4 * 4;
      const uint2 sraw = *reinterpret_cast<const uint2*>(sc + srow);  // 4 fp16 scales
      const uint2 zraw = *reinterpret_cast<const uint2*>(zr + srow);
      const __half* sh = reinterpret_cast<const __half*>(&sraw);
      const __half* zh = reinterpret_cast<const __half*>(&zraw);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float qv = static_cast<float>((words[i] >> shift) & qmax);
        o[i] = __fadd_rn(__fmul_rn(qv, __half2float(sh[i])), __half2float(zh[i]));
      }
    }
  }
}

// Values (per token, groups of G channels) or fp8 values: tokens [off, off + TT) of one page slice.
template <int D, int TT>
__device__ void load_value_tile(const PagedSide& s, int64_t page, int64_t hk, int off, int nvalid, int G, int fp8,
                                float* dst, int ld) {
  if (fp8) {
    load_key_tile<D, TT>(s, page, hk, off, nvalid, G, 1, dst, ld);  // same per-token fp8 layout
    return;
  }
  const int tid = threadIdx.x;
  const int bits = s.bits, cpw = 32 / bits, wd = s.wd, ngd = D / G;
  const uint32_t qmax = (1u << bits) - 1u;
  const int32_t* w = static_cast<const int32_t*>(s.codes) + page * s.c_page + hk * s.c_h;
  const __half* sc = static_cast<const __half*>(s.scale) + page * s.s_page + hk * s.s_h;
  const __half* zr = static_cast<const __half*>(s.zero) + page * s.s_page + hk * s.s_h;
  const bool vec = (wd % 4) == 0;  // 128-bit loads of 4 words; else one word at a time (D*bits < 128)
  const int per = vec ? 4 : 1, nchunk = wd / per;
  for (int e = tid; e < TT * nchunk; e += blockDim.x) {
    const int j = e / nchunk, ch = e % nchunk, t = off + j;
    const int d0 = ch * per * cpw;
    float* o = dst + j * ld + d0;
    if (t >= nvalid) {
      for (int i = 0; i < per * cpw; ++i) o[i] = 0.f;
      continue;
    }
    auto unpack = [&](uint32_t word, int i) {  // word i of the chunk: channels d0 + i*cpw + [0, cpw)
      for (int c = 0; c < cpw; ++c) {
        const int d = d0 + i * cpw + c;
        const int64_t sidx = int64_t(t) * ngd + d / G;
        const float qv = static_cast<float>((word >> (c * bits)) & qmax);
        o[i * cpw + c] = __fadd_rn(__fmul_rn(qv, __half2float(sc[sidx])), __half2float(zr[sidx]));
      }
    };
    if (vec) {
      const uint4 raw = *reinterpret_cast<const uint4*>(w + int64_t(t) * wd + ch * 4);
      unpack(raw.x, 0);
      unpack(raw.y, 1);
      unpack(raw.z, 2);
      unpack(raw.w, 3);
    } else {
      unpack(static_cast<uint32_t>(w[int64_t(t) * wd + ch]), 0);
    }
  }
}

// Ring rows: positions [p0, p0 + TT), valid below L, slot p % RC; 128-bit loads of each row.
template <typename T, int D, int TT>
__device__ void load_ring_tile(const T* base, int p0, int L, int RC, float* dst, int ld) {
  constexpr int E = 16 / sizeof(T);  // elements per 128-bit load
  constexpr int CH = D / E;
  for (int e = threadIdx.x; e < TT * CH; e += blockDim.x) {
    const int j = e / CH, ch = e % CH, p = p0 + j;
    float* o = dst + j * ld + ch * E;
    if (p >= L) {
      for (int i = 0; i < E; ++i) o[i] = 0.f;
      continue;
    }
    const uint4 raw = *reinterpret_cast<const uint4*>(base + int64_t(p % RC) * D + ch * E);
    const T* x = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < E; ++i) o[i] = static_cast<float>(x[i]);
  }
}

template <int D>
struct PTile {
  static constexpr int TT = D > 128 ? 8 : 16;  // tokens per tile (divides every page size: P % 16 == 0)
  static constexpr int DP = D + 1;             // padded key row (no bank conflicts in the dot loop)
  static constexpr int smem_floats = kRowsP * DP + TT * DP + TT * D + kRowsP * TT + 3 * kRowsP;
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreadsP) paged_partial_kernel(PagedParams p) {
  using TL = PTile<D>;
  constexpr int TT = TL::TT, DP = TL::DP;
  constexpr int COLS = D >= kThreadsP ? D / kThreadsP : 1;
  constexpr int RG = D >= kThreadsP ? 1 : kThreadsP / D;
  constexpr int ROWS = kRowsP / RG;
  TOKOPS_EXTERN_SHARED(float, smem);
  float* qs = smem;
  float* ks = qs + kRowsP * DP;
  float* vs = ks + TT * DP;
  float* ps = vs + TT * D;
  float* ms = ps + kRowsP * TT;
  float* ls = ms + kRowsP;
  float* as = ls + kRowsP;

  const int64_t bh = blockIdx.x;
  const int split = blockIdx.y;
  const int r0 = blockIdx.z * kRowsP;
  const int64_t b = bh / p.HKV, hk = bh % p.HKV;
  const int rows = p.GQ * p.NQ;
  const int tid = threadIdx.x;
  const T* q = static_cast<const T*>(p.q);
  const int L = p.lengths[b];
  const int nqt = n_quant_dev(L, p.R, p.G);

  for (int e = tid; e < kRowsP * D; e += kThreadsP) {
    const int r = e / D, d = e % D, rr = r0 + r;
    float val = 0.f;
    if (rr < rows) {
      const int64_t qrow = (b * p.H + hk * p.GQ + rr / p.NQ) * p.NQ + rr % p.NQ;
      val = static_cast<float>(q[qrow * D + d]);
    }
    qs[r * DP + d] = val;
  }
  if (tid < kRowsP) {
    ms[tid] = -INFINITY;
    ls[tid] = 0.f;
  }
  const int dcol = D >= kThreadsP ? tid : tid % D;
  const int rg = D >= kThreadsP ? 0 : tid / D;
  float acc[ROWS][COLS];
#pragma unroll
  for (int i = 0; i < ROWS; ++i)
#pragma unroll
    for (int c = 0; c < COLS; ++c) acc[i][c] = 0.f;

  const bool quant = split < p.S_q;
  const int npages = min((nqt + p.P - 1) / p.P, p.max_pages);  // never past the block table
  const int c0 = split * p.pps;
  const int c1 = min(c0 + p.pps, npages);
  // iterations: tiles of the split's pages (quantized split) or of the ring positions [nqt, L)
  const int tpp = p.P / TT;
  const int n_it = quant ? max(c1 - c0, 0) * tpp : (L - nqt + TT - 1) / TT;
  const T* kr = static_cast<const T*>(p.k_res) + b * p.r_b + hk * p.r_h;
  const T* vr = static_cast<const T*>(p.v_res) + b * p.r_b + hk * p.r_h;
  __syncthreads();

  for (int it = 0; it < n_it; ++it) {
    int pos0, end;
    if (quant) {
      const int col = c0 + it / tpp, off = (it % tpp) * TT;
      pos0 = col * p.P + off;
      end = nqt;
      const int page = p.block_table[b * p.bt_b + col];
      if (page < 0 || page >= p.num_pages) continue;  // invalid entry: skipped (uniform across the block)
      const int nvalid = nqt - col * p.P;  // in-page tokens below n_quant
      load_key_tile<D, TT>(p.k, page, hk, off, nvalid, p.G, p.fp8, ks, DP);
      load_value_tile<D, TT>(p.v, page, hk, off, nvalid, p.G, p.fp8, vs, D);
    } else {
      pos0 = nqt + it * TT;
      end = L;
      load_ring_tile<T, D, TT>(kr, pos0, L, p.RC, ks, DP);
      load_ring_tile<T, D, TT>(vr, pos0, L, p.RC, vs, D);
    }
    __syncthreads();
    for (int e = tid; e < kRowsP * TT; e += kThreadsP) {
      const int r = e / TT, t = e % TT, rr = r0 + r;
      const int pos = pos0 + t;
      float s = -INFINITY;
      if (rr < rows && pos < end && pos <= L - p.NQ + rr % p.NQ) {
        float a = 0.f;
#pragma unroll 8
        for (int d = 0; d < D; ++d) a += qs[r * DP + d] * ks[t * DP + d];
        s = a * p.qk_scale;
      }
      ps[r * TT + t] = s;
    }
    __syncthreads();
    if (tid < kRowsP) {
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
        const int d = dcol + c * kThreadsP;
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
    for (int c = 0; c < COLS; ++c) p.acc_part[off * D + dcol + c * kThreadsP] = acc[i][c];
  }
  if (tid < kRowsP && r0 + tid < rows) {
    const int rr = r0 + tid;
    const int64_t qrow = (b * p.H + hk * p.GQ + rr / p.NQ) * p.NQ + rr % p.NQ;
    p.m_part[qrow * p.S + split] = ms[tid];
    p.l_part[qrow * p.S + split] = ls[tid];
  }
}

template <typename T>
__global__ void paged_merge_kernel(const float* __restrict__ m, const float* __restrict__ l,
                                   const float* __restrict__ acc, T* __restrict__ out, float* __restrict__ lse, int S,
                                   int D) {
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
  if (threadIdx.x == 0) lse[row] = ltot == 0.f ? -INFINITY : (msafe + log2f(ltot)) * kLn2P;
}

// One key element at token position pos of row b (scalar loads; the optional mass pass).
template <typename T>
__device__ float paged_key(const PagedParams& p, int64_t b, int64_t hk, int pos, int nqt, int L, int d, int D,
                           const T* kr) {
  if (pos < nqt) {
    if (pos / p.P >= p.max_pages) return 0.f;
    const int page = p.block_table[b * p.bt_b + pos / p.P];
    if (page < 0 || page >= p.num_pages) return 0.f;
    const int t = pos % p.P;
    const PagedSide& s = p.k;
    if (p.fp8) {
      const uint8_t* c = static_cast<const uint8_t*>(s.codes) + page * s.c_page + hk * s.c_h;
      return fp8_value(c[int64_t(t) * D + d]) *
             static_cast<const float*>(s.scale)[page * s.s_page + hk * s.s_h + t];
    }
    const int cpw = 32 / s.bits;
    const uint32_t w = static_cast<uint32_t>(
        static_cast<const int32_t*>(s.codes)[page * s.c_page + hk * s.c_h + int64_t(t / cpw) * D + d]);
    const float qv = static_cast<float>((w >> ((t % cpw) * s.bits)) & ((1u << s.bits) - 1u));
    const int64_t si = page * s.s_page + hk * s.s_h + int64_t(t / p.G) * D + d;
    return __fadd_rn(__fmul_rn(qv, __half2float(static_cast<const __half*>(s.scale)[si])),
                     __half2float(static_cast<const __half*>(s.zero)[si]));
  }
  if (pos < L) return static_cast<float>(kr[int64_t(pos % p.RC) * D + d]);
  return 0.f;
}

template <int D>
struct PMassTile {
  static constexpr int TM = (4096 / D) > 64 ? 64 : ((4096 / D) < 8 ? 8 : 4096 / D);
};

template <typename T, int D>
__global__ void __launch_bounds__(kThreadsP) paged_mass_kernel(PagedParams p, const float* __restrict__ lse,
                                                               float* __restrict__ mass) {
  constexpr int TM = PMassTile<D>::TM;
  constexpr int DP = D + 1;
  __shared__ float ks[TM * DP];
  __shared__ float qs[8 * DP];
  __shared__ float ps[8 * TM];
  const int64_t bh = blockIdx.x;
  const int64_t b = bh / p.HKV, hk = bh % p.HKV;
  const int p0 = blockIdx.y * TM;
  const int tid = threadIdx.x;
  const int L = p.lengths[b];
  const int nqt = n_quant_dev(L, p.R, p.G);
  const T* q = static_cast<const T*>(p.q);
  const T* kr = static_cast<const T*>(p.k_res) + b * p.r_b + hk * p.r_h;
  for (int e = tid; e < TM * D; e += kThreadsP) {
    const int t = e / D, d = e % D;
    ks[t * DP + d] = paged_key<T>(p, b, hk, p0 + t, nqt, L, d, D, kr);
  }
  for (int hh = 0; hh < p.GQ; ++hh) {
    const int64_t h = hk * p.GQ + hh;
    __syncthreads();
    for (int e = tid; e < p.NQ * D; e += kThreadsP) {
      const int qi = e / D, d = e % D;
      qs[qi * DP + d] = static_cast<float>(q[((b * p.H + h) * p.NQ + qi) * D + d]);
    }
    __syncthreads();
    for (int e = tid; e < p.NQ * TM; e += kThreadsP) {
      const int qi = e / TM, t = e % TM, pos = p0 + t;
      float pr = 0.f;
      if (pos < L && pos <= L - p.NQ + qi) {
        float a = 0.f;
#pragma unroll 8
        for (int d = 0; d < D; ++d) a += qs[qi * DP + d] * ks[t * DP + d];
        pr = exp2f(a * p.qk_scale - lse[(b * p.H + h) * p.NQ + qi] * kLog2eP);
      }
      ps[qi * TM + t] = pr;
    }
    __syncthreads();
    for (int t = tid; t < TM; t += kThreadsP) {
      const int64_t pos = p0 + t;
      if (pos >= p.T) continue;
      float sum = 0.f;
      for (int qi = 0; qi < p.NQ; ++qi) sum += ps[qi * TM + t];
      mass[(b * p.H + h) * p.T + pos] = sum;
    }
  }
}

int64_t cdiv_p(int64_t a, int64_t b) { return (a + b - 1) / b; }

template <typename T, int D>
void launch_paged(const PagedParams& p, int64_t B, int64_t H, int64_t rchunks, const at::Tensor& lse,
                  at::Tensor& mass, bool return_mass, at::Tensor& out, cudaStream_t stream) {
  const size_t smem = PTile<D>::smem_floats * sizeof(float);
  TOKOPS_LAUNCH(dim3(B * p.HKV, p.S, rchunks), kThreadsP, smem, stream, paged_partial_kernel<T, D>)(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TOKOPS_LAUNCH(B * H * p.NQ, D < 256 ? D : 256, 0, stream, paged_merge_kernel<T>)(
      p.m_part, p.l_part, p.acc_part, out.data_ptr<T>(), lse.data_ptr<float>(), p.S, D);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (return_mass) {
    constexpr int TM = PMassTile<D>::TM;
    TOKOPS_LAUNCH(dim3(B * p.HKV, cdiv_p(p.T, TM)), kThreadsP, 0, stream, paged_mass_kernel<T, D>)(
        p, lse.data_ptr<float>(), mass.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

void check_aligned16(const at::Tensor& t, const char* name) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, name, " must be 16-byte aligned (128-bit loads)");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_paged_decode_attention_cuda(
    const at::Tensor& q, const at::Tensor& k_codes, const at::Tensor& k_scale, const at::Tensor& k_zero,
    const at::Tensor& v_codes, const at::Tensor& v_scale, const at::Tensor& v_zero, const at::Tensor& k_res,
    const at::Tensor& v_res, const at::Tensor& block_table, const at::Tensor& lengths, int64_t residual,
    c10::string_view mode, int64_t bits_k, int64_t bits_v, int64_t group_size, double scale, bool return_mass) {
  for (const at::Tensor* t : {&q, &k_codes, &k_scale, &v_codes, &v_scale, &k_res, &v_res, &block_table, &lengths}) {
    TOKOPS_CHECK_CUDA((*t));
    TORCH_CHECK(t->is_contiguous(), "kv_paged_decode_attention_cuda: every tensor must be contiguous");
  }
  TORCH_CHECK(q.dim() == 4, "q must have 4 dims (B, H, nq, D), got ", q.sizes());
  const int64_t B = q.size(0), H = q.size(1), NQ = q.size(2), D = q.size(3);
  TORCH_CHECK(NQ >= 1 && NQ <= 8, "q must have 1 <= nq <= 8, got ", NQ);
  TORCH_CHECK(D == 32 || D == 64 || D == 128 || D == 256, "the CUDA paged decode kernel supports head dims 32, 64, "
              "128, 256; got D=", D);
  TORCH_CHECK(mode == "int" || mode == "fp8", "mode must be 'int' or 'fp8'");
  const bool fp8 = mode == "fp8";
  const int64_t G = group_size;
  TORCH_CHECK(G >= 4 && G <= 1024 && (G & (G - 1)) == 0, "group_size must be a power of two in [4, 1024], got ", G);
  TORCH_CHECK(residual >= 0 && residual % G == 0, "residual must be a multiple of group_size, got ", residual);
  TOKOPS_CHECK_DTYPE(block_table, at::kInt);
  TOKOPS_CHECK_DTYPE(lengths, at::kInt);
  TORCH_CHECK(block_table.dim() == 2 && block_table.size(0) == B, "block_table must have shape (B, max_pages), got ",
              block_table.sizes());
  TORCH_CHECK(lengths.dim() == 1 && lengths.size(0) == B, "lengths must have shape (B,), got ", lengths.sizes());
  TORCH_CHECK(k_res.scalar_type() == q.scalar_type() && v_res.scalar_type() == q.scalar_type(),
              "k_res / v_res must have q's dtype ", q.scalar_type());
  TORCH_CHECK(k_res.dim() == 4 && k_res.sizes() == v_res.sizes() && k_res.size(0) == B && k_res.size(3) == D &&
                  k_res.size(2) == residual + G,
              "k_res / v_res must have shape (B, H_kv, residual + group_size, D), got ", k_res.sizes());
  const int64_t HKV = k_res.size(1);
  TORCH_CHECK(HKV > 0 && H % HKV == 0, "q heads (", H, ") must be a multiple of the kv heads (", HKV, ")");
  TORCH_CHECK(v_codes.dim() == 4 && v_codes.size(1) == HKV, "v_codes must have shape (pages, H_kv, P, .), got ",
              v_codes.sizes());
  const int64_t NP = v_codes.size(0), P = v_codes.size(2);
  TORCH_CHECK(P % G == 0 && P % 16 == 0, "page size (", P, ") must be a multiple of group_size and of 16");
  if (fp8) {
    TOKOPS_CHECK_DTYPE(k_codes, at::kByte);
    TOKOPS_CHECK_DTYPE(v_codes, at::kByte);
    TOKOPS_CHECK_DTYPE(k_scale, at::kFloat);
    TOKOPS_CHECK_DTYPE(v_scale, at::kFloat);
    TORCH_CHECK(k_codes.sizes() == v_codes.sizes() && v_codes.size(3) == D, "k_codes / v_codes must have shape "
                "(pages, H_kv, P, D), got ", k_codes.sizes(), " / ", v_codes.sizes());
    TORCH_CHECK(k_scale.dim() == 3 && k_scale.size(0) == NP && k_scale.size(1) == HKV && k_scale.size(2) == P &&
                    v_scale.sizes() == k_scale.sizes(), "k_scale / v_scale must have shape (pages, H_kv, P)");
  } else {
    TORCH_CHECK(bits_k == 8 || bits_k == 4 || bits_k == 2, "bits_k must be 8, 4 or 2, got ", bits_k);
    TORCH_CHECK(bits_v == 8 || bits_v == 4 || bits_v == 2, "bits_v must be 8, 4 or 2, got ", bits_v);
    TOKOPS_CHECK_DTYPE(k_codes, at::kInt);
    TOKOPS_CHECK_DTYPE(v_codes, at::kInt);
    for (const at::Tensor* t : {&k_scale, &k_zero, &v_scale, &v_zero}) TOKOPS_CHECK_DTYPE((*t), at::kHalf);
    TOKOPS_CHECK_CUDA(k_zero);
    TOKOPS_CHECK_CUDA(v_zero);
    TORCH_CHECK(k_zero.is_contiguous() && v_zero.is_contiguous(), "k_zero / v_zero must be contiguous");
    TORCH_CHECK((G * bits_k) % 32 == 0 && D % G == 0 && (D * bits_v) % 32 == 0,
                "group_size * bits_k and D * bits_v must be multiples of 32 and group_size must divide D");
    TORCH_CHECK(k_codes.dim() == 4 && k_codes.size(0) == NP && k_codes.size(1) == HKV &&
                    k_codes.size(2) == P * bits_k / 32 && k_codes.size(3) == D,
                "k_codes must have shape (pages, H_kv, P*bits_k/32, D), got ", k_codes.sizes());
    TORCH_CHECK(k_scale.dim() == 4 && k_scale.size(0) == NP && k_scale.size(1) == HKV && k_scale.size(2) == P / G &&
                    k_scale.size(3) == D && k_zero.sizes() == k_scale.sizes(),
                "k_scale / k_zero must have shape (pages, H_kv, P/G, D), got ", k_scale.sizes());
    TORCH_CHECK(v_codes.size(3) == D * bits_v / 32, "v_codes must have shape (pages, H_kv, P, D*bits_v/32), got ",
                v_codes.sizes());
    TORCH_CHECK(v_scale.dim() == 4 && v_scale.size(0) == NP && v_scale.size(1) == HKV && v_scale.size(2) == P &&
                    v_scale.size(3) == D / G && v_zero.sizes() == v_scale.sizes(),
                "v_scale / v_zero must have shape (pages, H_kv, P, D/G), got ", v_scale.sizes());
    check_aligned16(k_scale, "k_scale");  // 64-bit loads of 4 key scales
    check_aligned16(k_zero, "k_zero");
  }
  for (const at::Tensor* t : {&k_codes, &v_codes, &k_res, &v_res}) check_aligned16(*t, "k_codes / v_codes / k_res / v_res");
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t MP = block_table.size(1);
  const int64_t T = MP * P + residual + G;
  auto out = new_output(q.sizes(), q.options());
  auto lse = new_output({B, H, NQ}, q.options().dtype(at::kFloat));
  auto mass = new_output({B, H, return_mass ? T : 0}, q.options().dtype(at::kFloat));
  const int64_t GQ = H / HKV;
  const int64_t rchunks = cdiv_p(GQ * NQ, kRowsP);
  const int sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  const int64_t want = std::max<int64_t>(1, cdiv_p(2 * sms, B * HKV * rchunks));
  const int64_t pps = cdiv_p(MP, std::min(MP, want));
  const int64_t S_q = cdiv_p(MP, pps);
  const int64_t S = S_q + 1;
  TORCH_CHECK(S < 65536, "too many splits (", S, ")");
  auto fopt = q.options().dtype(at::kFloat);
  auto m_part = at::empty({B * H * NQ * S}, fopt);
  auto l_part = at::empty({B * H * NQ * S}, fopt);
  auto acc_part = at::empty({B * H * NQ * S * D}, fopt);

  PagedParams p{};
  p.q = q.data_ptr();
  auto side = [&](const at::Tensor& c, const at::Tensor& s, const at::Tensor& z, int64_t bits) {
    PagedSide ps{};
    ps.codes = c.data_ptr();
    ps.scale = s.data_ptr();
    ps.zero = fp8 ? s.data_ptr() : z.data_ptr();
    ps.c_page = c.stride(0);
    ps.c_h = c.stride(1);
    ps.s_page = s.stride(0);
    ps.s_h = s.stride(1);
    ps.bits = fp8 ? 8 : int(bits);
    ps.wd = fp8 ? int(D) : int(D * bits / 32);
    return ps;
  };
  p.k = side(k_codes, k_scale, k_zero, bits_k);
  p.v = side(v_codes, v_scale, v_zero, bits_v);
  p.k_res = k_res.data_ptr();
  p.v_res = v_res.data_ptr();
  p.r_b = k_res.stride(0);
  p.r_h = k_res.stride(1);
  p.block_table = block_table.data_ptr<int32_t>();
  p.bt_b = block_table.stride(0);
  p.lengths = lengths.data_ptr<int32_t>();
  p.m_part = m_part.data_ptr<float>();
  p.l_part = l_part.data_ptr<float>();
  p.acc_part = acc_part.data_ptr<float>();
  p.NQ = int(NQ);
  p.GQ = int(GQ);
  p.HKV = int(HKV);
  p.H = int(H);
  p.G = int(G);
  p.P = int(P);
  p.R = int(residual);
  p.RC = int(residual + G);
  p.fp8 = fp8 ? 1 : 0;
  p.S_q = int(S_q);
  p.S = int(S);
  p.pps = int(pps);
  p.num_pages = int(NP);
  p.max_pages = int(MP);
  p.T = T;
  p.qk_scale = float(scale) * kLog2eP;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "kv_paged_decode_attention_cuda", [&] {
    switch (D) {
      case 32: launch_paged<scalar_t, 32>(p, B, H, rchunks, lse, mass, return_mass, out, stream); break;
      case 64: launch_paged<scalar_t, 64>(p, B, H, rchunks, lse, mass, return_mass, out, stream); break;
      case 128: launch_paged<scalar_t, 128>(p, B, H, rchunks, lse, mass, return_mass, out, stream); break;
      default: launch_paged<scalar_t, 256>(p, B, H, rchunks, lse, mass, return_mass, out, stream); break;
    }
  });
  return {out, lse, mass};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokops, m) {
  m.def("kv_paged_decode_attention_cuda(Tensor q, Tensor k_codes, Tensor k_scale, Tensor k_zero, Tensor v_codes, "
        "Tensor v_scale, Tensor v_zero, Tensor k_res, Tensor v_res, Tensor block_table, Tensor lengths, int residual, "
        "str mode, int bits_k, int bits_v, int group_size, float scale, bool return_mass) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(tokops, CUDA, m) { m.impl("kv_paged_decode_attention_cuda", &kv_paged_decode_attention_cuda); }

}  // namespace tokops
