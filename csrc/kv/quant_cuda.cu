// CUDA kernels for KIVI group quantization (int8/int4/int2) and fp8 e4m3.
// Spec: DESIGN.md "Quantized KV"; Python reference: python/tokops/kv/reference.py.
//
// Both layouts share one kernel over a strided 3-D view (R, L, C) of the
// tensor: L is the grouped axis, C the other one (see view3 below). A thread
// owns one unit of U = max(G, 32/BITS) grouped elements of one column: whole
// groups and whole int32 words, so no word is written by two threads.
// Arithmetic matches the reference bit for bit: fp32, IEEE division (no fast
// math), rintf (round half to even), and __fmul_rn/__fadd_rn in dequantize
// so that nvcc does not contract q * scale + zero into an FMA.
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

// Thread index -> (r, unit, c). With `unit_fastest` (grouped axis contiguous, axis=-1) neighbouring
// threads take neighbouring units of one row, so a warp reads one contiguous stretch of memory;
// otherwise (axis=-2) neighbouring threads take neighbouring columns (coalesced strided loads).
__device__ __forceinline__ void unit_coords(int64_t idx, int64_t n_units, int64_t C, bool unit_fastest,
                                            int64_t& r, int64_t& u, int64_t& c) {
  if (unit_fastest) {
    u = idx % n_units;
    const int64_t rest = idx / n_units;
    c = rest % C;
    r = rest / C;
  } else {
    c = idx % C;
    const int64_t rest = idx / C;
    u = rest % n_units;
    r = rest / n_units;
  }
}

// min / max that propagate NaN (fminf/fmaxf drop it): a group holding NaN gets a NaN scale and zero.
__device__ __forceinline__ float min_nan(float a, float b) { return (a < b || a != a) ? a : b; }
__device__ __forceinline__ float max_nan(float a, float b) { return (a > b || a != a) ? a : b; }
// Codes are 0 where scale == 0 or scale/zero is not finite (NaN/inf input), like the reference.
__device__ __forceinline__ bool codes_ok(float s, float z) { return s != 0.f && isfinite(s) && isfinite(z); }

template <int BITS>
__device__ __forceinline__ uint32_t quantize_code(float v, float z, float s) {
  constexpr float QMAX = float((1 << BITS) - 1);
  // IEEE division and round-half-even, exactly as the reference (no fast math in this build).
  return static_cast<uint32_t>(fminf(fmaxf(rintf((v - z) / s), 0.f), QMAX));
}

__device__ __forceinline__ void store_scale_zero(__half* scale, __half* zero, int64_t off, float mn, float mx,
                                                 float qmax, float& z, float& s) {
  const __half zh = __float2half_rn(mn);
  const __half sh = __float2half_rn((mx - mn) / qmax);
  zero[off] = zh;
  scale[off] = sh;
  z = __half2float(zh);
  s = __half2float(sh);
}

// Fast path: compile-time group size G >= 32/BITS; one thread quantizes one group, its values held
// in registers (read once). VEC: the group is contiguous and 16-byte aligned -> 16-byte loads.
template <typename T, int BITS, int G, bool VEC>
__global__ void quantize_group_kernel(const T* __restrict__ x, int32_t* __restrict__ codes,
                                      __half* __restrict__ scale, __half* __restrict__ zero, View3 xv, View3 cv,
                                      View3 sv, int64_t n_groups, bool group_fastest) {
  constexpr int CPW = 32 / BITS;
  static_assert(G % CPW == 0, "a group must hold whole words");
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= xv.R * n_groups * xv.C) return;
  int64_t r, g, c;
  unit_coords(idx, n_groups, xv.C, group_fastest, r, g, c);
  const int64_t t0 = g * G;
  const int64_t valid = xv.L - t0 < G ? xv.L - t0 : G;
  const T* xp = x + r * xv.sr + c * xv.sc + t0 * xv.st;
  float v[G];
  if constexpr (VEC) {  // host guarantees: st == 1, valid == G, 16-byte alignment
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
    for (int j = 0; j < G; ++j) v[j] = j < valid ? static_cast<float>(xp[j * xv.st]) : 0.f;
  }
  float mn = INFINITY, mx = -INFINITY;
#pragma unroll
  for (int j = 0; j < G; ++j) {
    if (j < valid) {
      mn = min_nan(mn, v[j]);
      mx = max_nan(mx, v[j]);
    }
  }
  float z, s;
  store_scale_zero(scale, zero, r * sv.sr + g * sv.st + c * sv.sc, mn, mx, float((1 << BITS) - 1), z, s);
  int32_t* cp = codes + r * cv.sr + c * cv.sc + (t0 / CPW) * cv.st;
#pragma unroll
  for (int w = 0; w < G / CPW; ++w) {
    uint32_t word = 0;
#pragma unroll
    for (int k = 0; k < CPW; ++k) {
      const int j = w * CPW + k;
      const uint32_t q = (j < valid && codes_ok(s, z)) ? quantize_code<BITS>(v[j], z, s) : 0u;
      word |= q << (BITS * k);
    }
    cp[w * cv.st] = static_cast<int32_t>(word);
  }
}

// General path: any power-of-two G. A thread owns one unit of U = max(G, 32/BITS) grouped elements
// (whole groups and whole words, so no word is shared) and reads its values twice.
template <typename T, int BITS>
__global__ void quantize_kernel(const T* __restrict__ x, int32_t* __restrict__ codes, __half* __restrict__ scale,
                                __half* __restrict__ zero, View3 xv, View3 cv, View3 sv, int G, int U,
                                int64_t n_units, bool unit_fastest) {
  constexpr int CPW = 32 / BITS;
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= xv.R * n_units * xv.C) return;
  int64_t r, u, c;
  unit_coords(idx, n_units, xv.C, unit_fastest, r, u, c);
  const T* xp = x + r * xv.sr + c * xv.sc;
  int32_t* cp = codes + r * cv.sr + c * cv.sc;
  const int64_t t0 = u * U;
  uint32_t word = 0;
  for (int g0 = 0; g0 < U; g0 += G) {
    const int64_t tg = t0 + g0;
    float z = 0.f, s = 0.f;
    if (tg < xv.L) {  // groups past the padded length never exist
      float mn = INFINITY, mx = -INFINITY;
      for (int j = 0; j < G; ++j) {
        const int64_t t = tg + j;
        if (t < xv.L) {
          const float v = static_cast<float>(xp[t * xv.st]);
          mn = min_nan(mn, v);
          mx = max_nan(mx, v);
        }
      }
      store_scale_zero(scale, zero, r * sv.sr + (tg / G) * sv.st + c * sv.sc, mn, mx, float((1 << BITS) - 1),
                          z, s);
    }
    for (int j = 0; j < G; ++j) {
      const int64_t t = tg + j;
      const uint32_t q =
          (t < xv.L && codes_ok(s, z)) ? quantize_code<BITS>(static_cast<float>(xp[t * xv.st]), z, s) : 0u;
      const int k = (g0 + j) % CPW;
      word |= q << (BITS * k);
      if (k == CPW - 1) {
        const int64_t w = (t0 + g0 + j) / CPW;
        if (w < cv.L) cp[w * cv.st] = static_cast<int32_t>(word);
        word = 0;
      }
    }
  }
}

template <typename T, int BITS>
__global__ void dequantize_kernel(const int32_t* __restrict__ codes, const __half* __restrict__ scale,
                                  const __half* __restrict__ zero, T* __restrict__ out, View3 ov, View3 cv,
                                  View3 sv, int G, bool word_fastest) {
  constexpr int CPW = 32 / BITS;
  constexpr uint32_t QMAX = (1u << BITS) - 1;
  const int64_t idx = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (idx >= ov.R * cv.L * ov.C) return;
  int64_t r, w, c;
  unit_coords(idx, cv.L, ov.C, word_fastest, r, w, c);
  const uint32_t word = static_cast<uint32_t>(codes[r * cv.sr + w * cv.st + c * cv.sc]);
  T* op = out + r * ov.sr + c * ov.sc;
#pragma unroll
  for (int k = 0; k < CPW; ++k) {
    const int64_t t = w * CPW + k;
    if (t >= ov.L) break;
    const int64_t so = r * sv.sr + (t / G) * sv.st + c * sv.sc;
    const float q = static_cast<float>((word >> (BITS * k)) & QMAX);
    float v = __fadd_rn(__fmul_rn(q, __half2float(scale[so])), __half2float(zero[so]));
    if constexpr (std::is_same_v<T, at::Half>) {  // saturate like the reference (NaN stays NaN)
      v = v > 65504.f ? 65504.f : (v < -65504.f ? -65504.f : v);
    }
    op[t * ov.st] = static_cast<T>(v);
  }
}

// One warp per row of the last dim: amax by warp shuffle, then codes.
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

template <typename T>
__global__ void dequantize_fp8_kernel(const __nv_fp8_e4m3* __restrict__ codes, const float* __restrict__ scale,
                                      T* __restrict__ out, int64_t M, int64_t D) {
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (i >= M * D) return;
  out[i] = static_cast<T>(__fmul_rn(static_cast<float>(codes[i]), scale[i / D]));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

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
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto* sp = reinterpret_cast<__half*>(scale.data_ptr<at::Half>());
  auto* zp = reinterpret_cast<__half*>(zero.data_ptr<at::Half>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "kv_quantize_cuda", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    int32_t* cp = codes.data_ptr<int32_t>();
    // 16-byte loads when every group is a contiguous, 16-byte aligned run of full length.
    const bool vec = contiguous_groups && reinterpret_cast<uintptr_t>(xp) % 16 == 0 &&
                     (xv.L * int64_t(sizeof(scalar_t))) % 16 == 0 && (group_size * int64_t(sizeof(scalar_t))) % 16 == 0;
    const int64_t groups_total = xv.R * n_groups * xv.C;
    const int64_t blocks = ceil_div(groups_total, kThreads);
    TOKOPS_DISPATCH_BITS(bits, [&] {
      auto fast = [&](auto g_const) {
        constexpr int G = decltype(g_const)::value;
        if (vec) {
          TOKOPS_LAUNCH(blocks, kThreads, 0, stream, quantize_group_kernel<scalar_t, BITS, G, true>)(
              xp, cp, sp, zp, xv, cv, sv, n_groups, contiguous_groups);
        } else {
          TOKOPS_LAUNCH(blocks, kThreads, 0, stream, quantize_group_kernel<scalar_t, BITS, G, false>)(
              xp, cp, sp, zp, xv, cv, sv, n_groups, contiguous_groups);
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
            xp, cp, sp, zp, xv, cv, sv, int(group_size), unit, n_units, contiguous_groups);
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
  const View3 ov = view3(out.sizes(), axis), cv = view3(codes.sizes(), axis), sv = view3(scale.sizes(), axis);
  const int64_t total = ov.R * cv.L * ov.C;
  const auto stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "kv_dequantize_cuda", [&] {
    TOKOPS_DISPATCH_BITS(bits, [&] {
      TOKOPS_LAUNCH(ceil_div(total, kThreads), kThreads, 0, stream, dequantize_kernel<scalar_t, BITS>)(
          codes.data_ptr<int32_t>(), reinterpret_cast<const __half*>(scale.data_ptr<at::Half>()),
          reinterpret_cast<const __half*>(zero.data_ptr<at::Half>()), out.data_ptr<scalar_t>(), ov, cv, sv,
          int(group_size), axis == -1);
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
    TOKOPS_LAUNCH(ceil_div(M * D, kThreads), kThreads, 0, stream, dequantize_fp8_kernel<scalar_t>)(
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
