// CUDA kernels for KIVI group quantization (int8/int4/int2) and fp8 e4m3.
// Spec: DESIGN.md "Quantized KV"; Python reference: python/tokops/kv/reference.py.
//
// Quantize: a thread owns one group (G in {32, 64, 128}, its values held in registers) or, for the
// other group sizes, one unit of U = max(G, 32/BITS) grouped elements (whole groups and whole int32
// words, so no word is written by two threads). Dequantize: a thread owns one int32 word.
// Index math: the thread index is split into (r, group or word, column) once per thread in 32 bits
// (the host checks that the thread count fits), the thread's base offset is computed once in 64
// bits, and per element only 32-bit strides are added: no 64-bit division per element.
// Codes are bit-identical to the spec's fp32 division without dividing per element: one reciprocal
// per group and an exact comparison at the half-integer boundary (group_code below; the proof is in
// triton_kernels/kv_quant.py, _group_codes). Dequantize uses __fmul_rn/__fadd_rn so that nvcc does
// not contract q * scale + zero into an FMA (two roundings, like the reference).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_fp16.h>
#include <cuda_fp8.h>

#include <cstdint>
#include <type_traits>

#include "../common.h"

namespace tokops {
namespace {

constexpr float kFp8Max = 448.f;

struct View3 {
  int64_t R, L, C;     // folded leading dims, grouped axis, other axis
  int64_t sr, st, sc;  // element strides
};

// Strided (R, L, C) view of a contiguous tensor of `sizes`, grouped along `axis` (-1 or -2).
View3 view3(at::IntArrayRef sizes, int64_t axis) {
  const int64_t nd = sizes.size();
  const int64_t n = sizes[nd - 2], d = sizes[nd - 1];
  int64_t lead = 1;
  for (int64_t i = 0; i < nd - 2; ++i) lead *= sizes[i];
  if (axis == -1) return View3{1, d, lead * n, 0, 1, d};
  return View3{lead, n, d, n * d, d, 1};
}

// 32-bit thread index -> (r, unit, c), one 32-bit div/mod pair each. With `unit_fastest` (grouped
// axis contiguous, axis=-1) neighbouring threads take neighbouring units of one row (a warp reads one
// contiguous stretch of memory); otherwise (axis=-2) neighbouring threads take neighbouring columns
// (coalesced strided loads).
__device__ __forceinline__ void unit_coords(uint32_t idx, uint32_t n_units, uint32_t C, bool unit_fastest,
                                            uint32_t& r, uint32_t& u, uint32_t& c) {
  if (unit_fastest) {
    u = idx % n_units;
    const uint32_t rest = idx / n_units;
    c = rest % C;
    r = rest / C;
  } else {
    c = idx % C;
    const uint32_t rest = idx / C;
    u = rest % n_units;
    r = rest / n_units;
  }
}

__device__ __forceinline__ uint32_t thread_index() { return blockIdx.x * blockDim.x + threadIdx.x; }

// max that propagates NaN (fmaxf drops it): an fp8 row holding NaN gets a NaN scale.
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }
// Codes are 0 where scale == 0 or scale/zero is not finite (NaN/inf input), like the reference.
__device__ __forceinline__ bool codes_ok(float s, float z) { return s != 0.f && isfinite(s) && isfinite(z); }

// clamp(round_half_even(fl(fl(x - z) / s)), 0, QMAX), bit-identical to the IEEE division for every
// finite x and finite fp16 s > 0 and z, with rcp = fl(1 / s) computed once per group:
//   k = floor(clamp(fl(d * rcp), 0, QMAX - 1)), p = s * (k + 1/2) (exact: 11 x 9 significant bits),
//   code = k + 1 if d > p, the even of k, k + 1 if d == p, k if d < p.
// Proof (why the half-integer boundary h = k + 1/2 is the only one in play, and why no fp32 quotient
// d / s != h ever rounds onto h, so comparing d with p gives the side of fl(d / s)): the comment
// of _group_codes in triton_kernels/kv_quant.py. No FMA is involved: contraction cannot change it.
// NaN x (only in groups whose codes are forced to 0) gives some code in [0, QMAX], never UB.
template <int BITS>
__device__ __forceinline__ uint32_t group_code(float x, float z, float s, float rcp) {
  constexpr float KMAX = float((1 << BITS) - 2);  // QMAX - 1
  const float d = __fsub_rn(x, z);
  const float kf = floorf(fminf(fmaxf(__fmul_rn(d, rcp), 0.f), KMAX));  // fmaxf(NaN, 0) = 0
  const float p = __fmul_rn(s, __fadd_rn(kf, 0.5f));
  const uint32_t k = static_cast<uint32_t>(kf);
  return k + static_cast<uint32_t>(d > p || (d == p && (k & 1u)));
}

// Per-group statistics in one pass: min/max with fminf/fmaxf (1 instruction each) and a NaN flag
// (a group holding NaN gets a NaN scale and zero, like the reference's amin/amax).
struct MinMax {
  float mn = INFINITY, mx = -INFINITY;
  bool nan = false;
  __device__ __forceinline__ void add(float v) {
    mn = fminf(mn, v);
    mx = fmaxf(mx, v);
    nan |= v != v;
  }
};

// Stores fp16 zero/scale of a group and returns them in fp32, with rcp = fl(1 / s) (0 codes: rcp 0).
__device__ __forceinline__ void store_scale_zero(__half* scale, __half* zero, int64_t off, MinMax m, float qmax,
                                                 float& z, float& s, float& rcp, bool& ok) {
  const float mn = m.nan ? NAN : m.mn, mx = m.nan ? NAN : m.mx;
  const __half zh = __float2half_rn(mn);
  const __half sh = __float2half_rn(__fdiv_rn(__fsub_rn(mx, mn), qmax));  // once per group
  zero[off] = zh;
  scale[off] = sh;
  z = __half2float(zh);
  s = __half2float(sh);
  ok = codes_ok(s, z);
  rcp = ok ? __frcp_rn(s) : 0.f;  // one correctly rounded reciprocal per group
}

// Fast path: compile-time group size G >= 32/BITS; one thread quantizes one group, its values held
// in registers (read once).
//  * axis=-1 (GROUPS_CONTIG): every group is full (G divides D) and group i sits at x + i * G, its
//    codes at codes + i * G * BITS / 32, its scale at scale + i: a 1-D problem. VEC: 16-byte loads of
//    x and 8/16-byte stores of the codes (host: 16-byte aligned x and codes).
//  * axis=-2: thread -> (column c fastest, group g, slice r); element j at stride C (coalesced across
//    the warp), the tail group of a ragged N partly valid.
template <typename T, int BITS, int G, bool GROUPS_CONTIG, bool VEC>
__global__ void quantize_group_kernel(const T* __restrict__ x, int32_t* __restrict__ codes,
                                      __half* __restrict__ scale, __half* __restrict__ zero, uint32_t n_threads,
                                      uint32_t n_groups, uint32_t C, uint32_t L) {
  constexpr int CPW = 32 / BITS;
  constexpr int WPG = G / CPW;  // words per group
  constexpr float QMAX = float((1 << BITS) - 1);
  static_assert(G % CPW == 0, "a group must hold whole words");
  const uint32_t idx = thread_index();
  if (idx >= n_threads) return;
  float v[G];
  int valid = G;
  const T* xp;
  int32_t* cp;
  int64_t so;
  uint32_t cstride;  // element / word stride along the grouped axis
  if constexpr (GROUPS_CONTIG) {
    xp = x + int64_t(idx) * G;
    cp = codes + int64_t(idx) * WPG;
    so = idx;
    cstride = 1;
  } else {
    uint32_t r, g, c;
    unit_coords(idx, n_groups, C, false, r, g, c);
    const uint32_t t0 = g * G;
    valid = L - t0 < uint32_t(G) ? int(L - t0) : G;
    const int64_t words = int64_t(n_groups) * WPG;  // words along the grouped axis
    xp = x + (int64_t(r) * L + t0) * C + c;
    cp = codes + (int64_t(r) * words + int64_t(g) * WPG) * C + c;
    so = (int64_t(r) * n_groups + g) * C + c;
    cstride = C;
  }
  if constexpr (VEC) {  // GROUPS_CONTIG, 16-byte aligned
    constexpr int PER = 16 / sizeof(T);
#pragma unroll
    for (int i = 0; i < G / PER; ++i) {
      const uint4 raw = reinterpret_cast<const uint4*>(xp)[i];
      const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int k = 0; k < PER; ++k) v[i * PER + k] = static_cast<float>(e[k]);
    }
  } else {
#pragma unroll
    for (int j = 0; j < G; ++j) v[j] = j < valid ? static_cast<float>(xp[int64_t(j) * cstride]) : 0.f;
  }
  MinMax m;
#pragma unroll
  for (int j = 0; j < G; ++j) {
    if (j < valid) m.add(v[j]);
  }
  float z, s, rcp;
  bool ok;
  store_scale_zero(scale, zero, so, m, QMAX, z, s, rcp, ok);
  uint32_t words[WPG];
#pragma unroll
  for (int w = 0; w < WPG; ++w) {
    uint32_t word = 0;
#pragma unroll
    for (int k = 0; k < CPW; ++k) {
      const int j = w * CPW + k;
      const uint32_t q = group_code<BITS>(v[j], z, s, rcp);
      word |= (j < valid && ok ? q : 0u) << (BITS * k);
    }
    words[w] = word;
  }
  if constexpr (VEC && WPG % 4 == 0) {
#pragma unroll
    for (int w = 0; w < WPG; w += 4)
      reinterpret_cast<uint4*>(cp)[w / 4] = make_uint4(words[w], words[w + 1], words[w + 2], words[w + 3]);
  } else if constexpr (VEC && WPG == 2) {
    *reinterpret_cast<uint2*>(cp) = make_uint2(words[0], words[1]);
  } else {
#pragma unroll
    for (int w = 0; w < WPG; ++w) cp[int64_t(w) * cstride] = static_cast<int32_t>(words[w]);
  }
}

// General path: any power-of-two G. A thread owns one unit of U = max(G, 32/BITS) grouped elements
// (whole groups and whole words, so no word is shared) and reads its values twice (G up to 1024 does
// not fit in registers).
template <typename T, int BITS>
__global__ void quantize_kernel(const T* __restrict__ x, int32_t* __restrict__ codes, __half* __restrict__ scale,
                                __half* __restrict__ zero, View3 xv, View3 cv, View3 sv, int G, int U,
                                uint32_t n_threads, uint32_t n_units, bool unit_fastest) {
  constexpr int CPW = 32 / BITS;
  constexpr float QMAX = float((1 << BITS) - 1);
  const uint32_t idx = thread_index();
  if (idx >= n_threads) return;
  uint32_t r, u, c;
  unit_coords(idx, n_units, uint32_t(xv.C), unit_fastest, r, u, c);
  const uint32_t L = uint32_t(xv.L), t0 = u * uint32_t(U);
  const uint32_t st = uint32_t(xv.st), cst = uint32_t(cv.st);
  const T* xp = x + int64_t(r) * xv.sr + int64_t(c) * xv.sc + int64_t(t0) * st;  // 64-bit once
  int32_t* cp = codes + int64_t(r) * cv.sr + int64_t(c) * cv.sc + int64_t(t0 / CPW) * cst;
  __half* sp = scale + int64_t(r) * sv.sr + int64_t(c) * sv.sc + int64_t(t0 / uint32_t(G)) * sv.st;
  __half* zp = zero + (sp - scale);
  const uint32_t W = uint32_t(cv.L);
  uint32_t word = 0, w = t0 / CPW;
  for (int g0 = 0; g0 < U; g0 += G) {
    const uint32_t tg = t0 + g0;  // < L + U: no overflow (host: L + U < 2**31)
    float z = 0.f, s = 0.f, rcp = 0.f;
    bool ok = false;
    if (tg < L) {  // groups past the padded length never exist
      MinMax m;
      const int valid = L - tg < uint32_t(G) ? int(L - tg) : G;
      const T* gp = xp + int64_t(g0) * st;
      for (int j = 0; j < valid; ++j) m.add(static_cast<float>(gp[int64_t(j) * st]));
      const int64_t so = int64_t(g0 / G) * sv.st;
      store_scale_zero(sp + so, zp + so, 0, m, QMAX, z, s, rcp, ok);
    }
    for (int j = 0; j < G; ++j) {
      const uint32_t t = tg + j;
      const uint32_t q =
          (t < L && ok) ? group_code<BITS>(static_cast<float>(xp[int64_t(g0 + j) * st]), z, s, rcp) : 0u;
      const int k = (g0 + j) % CPW;
      word |= q << (BITS * k);
      if (k == CPW - 1) {
        if (w < W) cp[int64_t(w - t0 / CPW) * cst] = static_cast<int32_t>(word);
        word = 0;
        ++w;
      }
    }
  }
}

// Dequantize: a thread owns one int32 word (CPW consecutive codes along the grouped axis).
//  * axis=-1 (WORDS_CONTIG): 1-D over the words of all rows; the word's CPW outputs are contiguous:
//    VEC writes them as 8/16-byte stores (host: the row length is a multiple of CPW and of the store
//    width, 16-byte aligned output).
//  * axis=-2: thread -> (column c fastest, word w, slice r); outputs at stride C (coalesced).
// scale/zero: loaded once per word when G >= CPW (the word lies in one group), else per code; the
// group of code t is t >> log2(G) (32-bit shift, no division).
template <typename T, int BITS, bool WORDS_CONTIG, bool VEC>
__global__ void dequantize_kernel(const int32_t* __restrict__ codes, const __half* __restrict__ scale,
                                  const __half* __restrict__ zero, T* __restrict__ out, uint32_t n_threads,
                                  uint32_t W, uint32_t C, uint32_t L, int log2_g) {
  constexpr int CPW = 32 / BITS;
  constexpr uint32_t QMAX = (1u << BITS) - 1;
  const uint32_t idx = thread_index();
  if (idx >= n_threads) return;
  uint32_t r, w, c;
  unit_coords(idx, W, WORDS_CONTIG ? 1u : C, WORDS_CONTIG, r, w, c);
  const uint32_t n_groups = ((L - 1) >> log2_g) + 1;
  const uint32_t ostride = WORDS_CONTIG ? 1u : C;
  const int64_t row = WORDS_CONTIG ? int64_t(r) : int64_t(r) * L * C + c;  // 64-bit once
  const uint32_t word = static_cast<uint32_t>(codes[WORDS_CONTIG ? int64_t(idx) : (int64_t(r) * W + w) * C + c]);
  T* op = out + (WORDS_CONTIG ? row * L : row) + int64_t(w) * CPW * ostride;
  const int64_t sbase = WORDS_CONTIG ? int64_t(r) * n_groups : int64_t(r) * n_groups * C + c;
  const uint32_t t0 = w * CPW;
  float s = 0.f, z = 0.f;
  const bool one_group = ((CPW - 1) >> log2_g) == 0;  // G >= CPW (t0 < padded length: its group exists)
  if (one_group) {
    const int64_t so = sbase + int64_t(t0 >> log2_g) * ostride;
    s = __half2float(scale[so]);
    z = __half2float(zero[so]);
  }
  alignas(16) T vals[CPW];
#pragma unroll
  for (int k = 0; k < CPW; ++k) {
    if (!one_group && t0 + k < L) {  // (codes past the padded length have no group)
      const int64_t so = sbase + int64_t((t0 + k) >> log2_g) * ostride;
      s = __half2float(scale[so]);
      z = __half2float(zero[so]);
    }
    const float q = static_cast<float>((word >> (BITS * k)) & QMAX);
    float v = __fadd_rn(__fmul_rn(q, s), z);
    if constexpr (std::is_same_v<T, at::Half>) {  // saturate like the reference (NaN stays NaN)
      v = v > 65504.f ? 65504.f : (v < -65504.f ? -65504.f : v);
    }
    vals[k] = static_cast<T>(v);
  }
  if constexpr (VEC) {  // WORDS_CONTIG, the whole word inside the row, aligned
    constexpr int BYTES = CPW * sizeof(T);
    if constexpr (BYTES % 16 == 0) {
#pragma unroll
      for (int i = 0; i < BYTES / 16; ++i) reinterpret_cast<uint4*>(op)[i] = reinterpret_cast<const uint4*>(vals)[i];
    } else {
      static_assert(BYTES == 8, "CPW * sizeof(T) is 8 or a multiple of 16");
      *reinterpret_cast<uint2*>(op) = *reinterpret_cast<const uint2*>(vals);
    }
  } else {
#pragma unroll
    for (int k = 0; k < CPW; ++k) {
      if (t0 + k < L) op[int64_t(k) * ostride] = vals[k];
    }
  }
}

// One warp per row of the last dim: amax by warp shuffle, then codes. (The fp8 codes keep their
// per-element division: the fp32 scale has 24 significant bits, so the exact comparison of
// group_code does not apply.)
template <typename T>
__global__ void quantize_fp8_kernel(const T* __restrict__ x, __nv_fp8_e4m3* __restrict__ codes,
                                    float* __restrict__ scale, int64_t M, int64_t D) {
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= M) return;
  const T* xp = x + row * D;
  float amax = 0.f;
  for (int64_t j = lane; j < D; j += 32) amax = max_nan(amax, fabsf(static_cast<float>(xp[j])));
#pragma unroll
  for (int off = 16; off > 0; off /= 2) amax = max_nan(amax, __shfl_xor_sync(0xffffffffu, amax, off));
  const float s = amax / kFp8Max;
  for (int64_t j = lane; j < D; j += 32) {
    // NaN/inf scale (a row holding NaN/inf): codes 0, the row dequantizes to NaN, like the reference
    float y = (s == 0.f || !isfinite(s)) ? 0.f : fminf(fmaxf(static_cast<float>(xp[j]) / s, -kFp8Max), kFp8Max);
    codes[row * D + j] = __nv_fp8_e4m3(y);
  }
  if (lane == 0) scale[row] = s;
}

// One warp per row: the scale loaded once per row, no division per element.
template <typename T>
__global__ void dequantize_fp8_kernel(const __nv_fp8_e4m3* __restrict__ codes, const float* __restrict__ scale,
                                      T* __restrict__ out, int64_t M, int64_t D) {
  const int64_t row = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (row >= M) return;
  const float s = scale[row];
  const __nv_fp8_e4m3* cp = codes + row * D;
  T* op = out + row * D;
  for (int64_t j = lane; j < D; j += 32) op[j] = static_cast<T>(__fmul_rn(static_cast<float>(cp[j]), s));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

constexpr int64_t kI32Max = 2147483647;

// The kernels index their threads in 32 bits: refuse (clearly) a launch that would need more.
void check_32bit(int64_t n_threads, const char* name, const char* what) {
  TORCH_CHECK(n_threads < kI32Max, name, ": too large for one launch (", n_threads, " ", what,
              ", the CUDA kernels index at most 2**31 - 1)");
}

void check_layout(const at::Tensor& t, const char* name, int64_t bits, int64_t group_size, int64_t axis) {
  TOKOPS_CHECK_CUDA(t);
  TORCH_CHECK(t.is_contiguous(), name, " must be contiguous");
  TORCH_CHECK(t.dim() >= 2, name, " must have at least 2 dims");
  TORCH_CHECK(bits == 8 || bits == 4 || bits == 2, "bits must be 8, 4 or 2, got ", bits);
  TORCH_CHECK(group_size >= 4 && group_size <= 1024 && (group_size & (group_size - 1)) == 0,
              "group_size must be a power of two in [4, 1024], got ", group_size);
  TORCH_CHECK(axis == -1 || axis == -2, "axis must be -1 or -2, got ", axis);
}

constexpr int kThreads = 256;

#define TOKOPS_DISPATCH_BITS(bits, ...)             \
  [&] {                                             \
    if ((bits) == 8) {                              \
      constexpr int BITS = 8;                       \
      return __VA_ARGS__();                         \
    } else if ((bits) == 4) {                       \
      constexpr int BITS = 4;                       \
      return __VA_ARGS__();                         \
    } else {                                        \
      constexpr int BITS = 2;                       \
      return __VA_ARGS__();                         \
    }                                               \
  }()

std::tuple<at::Tensor, at::Tensor, at::Tensor> kv_quantize_cuda(const at::Tensor& x, int64_t bits,
                                                                 int64_t group_size, int64_t axis) {
  check_layout(x, "x", bits, group_size, axis);
  TORCH_CHECK(x.numel() > 0, "x must be non-empty");
  TORCH_CHECK(axis == -2 || x.size(-1) % group_size == 0, "group_size must divide x.shape[-1] for axis=-1");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t nd = x.dim();
  const int64_t length = x.size(axis);
  const int64_t n_groups = ceil_div(length, group_size);
  const int64_t words = ceil_div(n_groups * group_size * bits, 32);
  std::vector<int64_t> cshape(x.sizes().begin(), x.sizes().end()), sshape = cshape;
  cshape[nd + axis] = words;
  sshape[nd + axis] = n_groups;
  auto codes = new_output(cshape, x.options().dtype(at::kInt));
  auto scale = new_output(sshape, x.options().dtype(at::kHalf));
  auto zero = new_output(sshape, x.options().dtype(at::kHalf));
  const View3 xv = view3(x.sizes(), axis), cv = view3(codes.sizes(), axis), sv = view3(scale.sizes(), axis);
  const int unit = std::max<int>(group_size, 32 / bits);
  const int64_t n_units = ceil_div(n_groups * group_size, unit);
  const bool contiguous_groups = axis == -1;
  // 32-bit thread indices and grouped-axis positions (64-bit base offsets per thread).
  check_32bit(xv.R * n_units * xv.C, "x", "quantization units");
  TORCH_CHECK(xv.L + unit < kI32Max && xv.C < kI32Max && unit * std::max(xv.st, cv.st) < kI32Max,
              "x: a dimension is too large for the 32-bit index math of the CUDA kernel (shape ", x.sizes(), ")");
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto* sp = reinterpret_cast<__half*>(scale.data_ptr<at::Half>());
  auto* zp = reinterpret_cast<__half*>(zero.data_ptr<at::Half>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kv_quantize_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    int32_t* cp = codes.data_ptr<int32_t>();
    // 16-byte loads of x and 8/16-byte stores of codes when both are 16-byte aligned (axis=-1: every
    // group is a contiguous run of G elements at a multiple of G).
    const bool vec = contiguous_groups && reinterpret_cast<uintptr_t>(xp) % 16 == 0 &&
                     reinterpret_cast<uintptr_t>(cp) % 16 == 0;
    const int64_t groups_total = xv.R * n_groups * xv.C;
    const uint32_t nt = uint32_t(groups_total);
    const int64_t blocks = ceil_div(groups_total, kThreads);
    TOKOPS_DISPATCH_BITS(bits, [&] {
      auto fast = [&](auto g_const) {
        constexpr int G = decltype(g_const)::value;
        if (!contiguous_groups) {
          TOKOPS_LAUNCH(blocks, kThreads, 0, stream, quantize_group_kernel<scalar_t, BITS, G, false, false>)(
              xp, cp, sp, zp, nt, uint32_t(n_groups), uint32_t(xv.C), uint32_t(xv.L));
        } else if (vec) {
          TOKOPS_LAUNCH(blocks, kThreads, 0, stream, quantize_group_kernel<scalar_t, BITS, G, true, true>)(
              xp, cp, sp, zp, nt, uint32_t(n_groups), uint32_t(xv.C), uint32_t(xv.L));
        } else {
          TOKOPS_LAUNCH(blocks, kThreads, 0, stream, quantize_group_kernel<scalar_t, BITS, G, true, false>)(
              xp, cp, sp, zp, nt, uint32_t(n_groups), uint32_t(xv.C), uint32_t(xv.L));
        }
      };
      if (group_size == 32) {
        fast(std::integral_constant<int, 32>{});
      } else if (group_size == 64) {
        fast(std::integral_constant<int, 64>{});
      } else if (group_size == 128) {
        fast(std::integral_constant<int, 128>{});
      } else {
        const int64_t total = xv.R * n_units * xv.C;
        TOKOPS_LAUNCH(ceil_div(total, kThreads), kThreads, 0, stream, quantize_kernel<scalar_t, BITS>)(
            xp, cp, sp, zp, xv, cv, sv, int(group_size), unit, uint32_t(total), uint32_t(n_units),
            contiguous_groups);
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, scale, zero};
}

at::Tensor kv_dequantize_cuda(const at::Tensor& codes, const at::Tensor& scale, const at::Tensor& zero, int64_t bits,
                              int64_t group_size, int64_t axis, int64_t length, at::ScalarType dtype) {
  check_layout(codes, "codes", bits, group_size, axis);
  TOKOPS_CHECK_DTYPE(codes, at::kInt);
  TOKOPS_CHECK_DTYPE(scale, at::kHalf);
  TOKOPS_CHECK_DTYPE(zero, at::kHalf);
  TOKOPS_CHECK_CUDA(scale);
  TOKOPS_CHECK_CUDA(zero);
  TOKOPS_CHECK_CONTIG(scale);
  TOKOPS_CHECK_CONTIG(zero);
  const int64_t nd = codes.dim();
  const int64_t n_groups = ceil_div(length, group_size);
  TORCH_CHECK(length > 0, "length must be positive");
  std::vector<int64_t> oshape(codes.sizes().begin(), codes.sizes().end()), sshape = oshape, cshape = oshape;
  oshape[nd + axis] = length;
  sshape[nd + axis] = n_groups;
  cshape[nd + axis] = ceil_div(n_groups * group_size * bits, 32);
  TORCH_CHECK(codes.sizes().vec() == cshape, "codes has shape ", codes.sizes(), ", expected ", at::IntArrayRef(cshape));
  TORCH_CHECK(scale.sizes().vec() == sshape && zero.sizes().vec() == sshape, "scale/zero must have shape ",
              at::IntArrayRef(sshape));
  const c10::cuda::CUDAGuard guard(codes.device());
  auto out = new_output(oshape, codes.options().dtype(dtype));
  const View3 ov = view3(out.sizes(), axis), cv = view3(codes.sizes(), axis);
  const int64_t total = ov.R * cv.L * ov.C;  // one thread per word
  check_32bit(total, "codes", "words");
  TORCH_CHECK(ov.L + 32 < kI32Max && ov.C < kI32Max, "length/columns too large for the 32-bit index math (shape ",
              codes.sizes(), ")");
  const int log2_g = __builtin_ctzll(uint64_t(group_size));
  const int cpw = 32 / int(bits);
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kv_dequantize_cuda", [&] {
    scalar_t* op = out.data_ptr<scalar_t>();
    // axis=-1: 8/16-byte stores of a word's CPW outputs when every word lies inside its row and the
    // rows keep the store alignment.
    const int64_t bytes = std::min<int64_t>(16, cpw * int64_t(sizeof(scalar_t)));
    const bool vec = axis == -1 && ov.L % cpw == 0 && (ov.L * int64_t(sizeof(scalar_t))) % bytes == 0 &&
                     reinterpret_cast<uintptr_t>(op) % 16 == 0;
    TOKOPS_DISPATCH_BITS(bits, [&] {
      auto launch = [&](auto contig, auto vec_c) {
        constexpr bool CONTIG = decltype(contig)::value, VEC = decltype(vec_c)::value;
        TOKOPS_LAUNCH(ceil_div(total, kThreads), kThreads, 0, stream, dequantize_kernel<scalar_t, BITS, CONTIG, VEC>)(
            codes.data_ptr<int32_t>(), reinterpret_cast<const __half*>(scale.data_ptr<at::Half>()),
            reinterpret_cast<const __half*>(zero.data_ptr<at::Half>()), op, uint32_t(total), uint32_t(cv.L),
            uint32_t(ov.C), uint32_t(ov.L), log2_g);
      };
      if (axis == -2) {
        launch(std::false_type{}, std::false_type{});
      } else if (vec) {
        launch(std::true_type{}, std::true_type{});
      } else {
        launch(std::true_type{}, std::false_type{});
      }
    });
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

std::tuple<at::Tensor, at::Tensor> kv_quantize_fp8_cuda(const at::Tensor& x) {
  TOKOPS_CHECK_CUDA(x);
  TOKOPS_CHECK_CONTIG(x);
  TORCH_CHECK(x.dim() >= 1 && x.numel() > 0, "x must be a non-empty tensor");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t D = x.size(-1), M = x.numel() / D;
  auto codes = new_output(x.sizes(), x.options().dtype(at::kFloat8_e4m3fn));
  auto scale = new_output(x.sizes().slice(0, x.dim() - 1), x.options().dtype(at::kFloat));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kv_quantize_fp8_cuda", [&] {
    TOKOPS_LAUNCH(ceil_div(M * 32, kThreads), kThreads, 0, stream, quantize_fp8_kernel<scalar_t>)(
        x.data_ptr<scalar_t>(), reinterpret_cast<__nv_fp8_e4m3*>(codes.data_ptr()), scale.data_ptr<float>(), M, D);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {codes, scale};
}

at::Tensor kv_dequantize_fp8_cuda(const at::Tensor& codes, const at::Tensor& scale, at::ScalarType dtype) {
  TOKOPS_CHECK_CUDA(codes);
  TOKOPS_CHECK_CUDA(scale);
  TOKOPS_CHECK_CONTIG(codes);
  TOKOPS_CHECK_CONTIG(scale);
  TOKOPS_CHECK_DTYPE(codes, at::kFloat8_e4m3fn);
  TOKOPS_CHECK_DTYPE(scale, at::kFloat);
  TORCH_CHECK(codes.dim() >= 1 && codes.numel() > 0, "codes must be a non-empty tensor");
  TORCH_CHECK(scale.sizes() == codes.sizes().slice(0, codes.dim() - 1), "scale must have shape codes.shape[:-1]");
  const c10::cuda::CUDAGuard guard(codes.device());
  const int64_t D = codes.size(-1), M = codes.numel() / D;
  auto out = new_output(codes.sizes(), codes.options().dtype(dtype));
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kv_dequantize_fp8_cuda", [&] {
    TOKOPS_LAUNCH(ceil_div(M * 32, kThreads), kThreads, 0, stream, dequantize_fp8_kernel<scalar_t>)(
        reinterpret_cast<const __nv_fp8_e4m3*>(codes.data_ptr()), scale.data_ptr<float>(), out.data_ptr<scalar_t>(),
        M, D);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokops, m) {
  m.def("kv_quantize_cuda(Tensor x, int bits, int group_size, int axis) -> (Tensor, Tensor, Tensor)");
  m.def("kv_dequantize_cuda(Tensor codes, Tensor scale, Tensor zero, int bits, int group_size, int axis, "
        "int length, ScalarType dtype) -> Tensor");
  m.def("kv_quantize_fp8_cuda(Tensor x) -> (Tensor, Tensor)");
  m.def("kv_dequantize_fp8_cuda(Tensor codes, Tensor scale, ScalarType dtype) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokops, CUDA, m) {
  m.impl("kv_quantize_cuda", &kv_quantize_cuda);
  m.impl("kv_dequantize_cuda", &kv_dequantize_cuda);
  m.impl("kv_quantize_fp8_cuda", &kv_quantize_fp8_cuda);
  m.impl("kv_dequantize_fp8_cuda", &kv_dequantize_fp8_cuda);
}

}  // namespace tokops
