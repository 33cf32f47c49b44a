// WMMA (nvcuda::wmma) for the CPU emulator, 16x16x16 shapes, fp16/bf16 inputs, fp32 accumulator.
//
// The CUDA spec leaves the mapping of fragment elements (x[i] of each lane) to matrix positions
// unspecified. Here it is a seeded random permutation (one per fragment kind, see wmma_pos), so
// code that assumes a layout (e.g. "x[i] of lane l is row l/4") computes garbage, while code that
// treats fragments as opaque (load, mma, store, elementwise ops over x[]) is exact. load/store are
// per lane (each lane reads/writes its own elements when it arrives) and then wait for the whole
// warp; mma_sync is a warp collective. Products are exact in fp32 and summed in k order (tensor
// cores may round/sum differently).
#pragma once
#include "cuda_emu.h"

namespace nvcuda {
namespace wmma {

struct matrix_a {};
struct matrix_b {};
struct accumulator {};
struct row_major {};
struct col_major {};
enum layout_t { mem_row_major, mem_col_major };

namespace detail {
template <typename Use>
constexpr int kind() {
  return std::is_same_v<Use, matrix_a> ? 0 : std::is_same_v<Use, matrix_b> ? 1 : 2;
}
inline float to_f(float x) { return x; }
inline float to_f(__half x) { return __half2float(x); }
inline float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T>
T from_f(float x) {
  if constexpr (std::is_same_v<T, __half>) return __float2half_rn(x);
  else if constexpr (std::is_same_v<T, __nv_bfloat16>) return __float2bfloat16_rn(x);
  else return x;
}
}  // namespace detail

template <typename Use, int M, int N, int K, typename T, typename Layout = void>
struct fragment {
  static_assert(M == 16 && N == 16 && K == 16, "the emulator implements the 16x16x16 WMMA shape");
  using element_type = T;
  static constexpr int num_elements = 8;  // 256 elements over 32 lanes
  T x[num_elements];
};

template <typename Use, int M, int N, int K, typename T, typename L>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const T& v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = v;
}
template <typename Use, int M, int N, int K, typename T, typename L, typename V>
inline void fill_fragment(fragment<Use, M, N, K, T, L>& f, const V& v) {
  for (int i = 0; i < f.num_elements; ++i) f.x[i] = detail::from_f<T>(static_cast<float>(v));
}

namespace detail {
inline void warp_op(int op, const tokops_emu::Site& s, const void* p0 = nullptr, const void* p1 = nullptr,
                    const void* p2 = nullptr, const void* p3 = nullptr,
                    tokops_emu::detail::Completion done = [](tokops_emu::detail::Arrival*, unsigned) {}) {
  tokops_emu::detail::Arrival a{};
  a.op = op;
  a.mask = 0xffffffffu;
  a.site = s;
  a.p[0] = p0;
  a.p[1] = p1;
  a.p[2] = p2;
  a.p[3] = p3;
  tokops_emu::detail::warp_collective(a, done);
}
template <typename F>
inline void load(F& f, const typename F::element_type* p, unsigned ldm, bool row_major, int kind) {
  const int lane = tokops_emu::detail::lane_id();
  for (int i = 0; i < F::num_elements; ++i) {
    const int pos = tokops_emu::detail::wmma_pos(kind, lane, i), r = pos / 16, c = pos % 16;
    f.x[i] = row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r];
  }
}
}  // namespace detail

template <typename Use, typename T, typename L>
inline void load_matrix_sync(fragment<Use, 16, 16, 16, T, L>& f, const T* p, unsigned ldm,
                             const tokops_emu::Site& s = tokops_emu::Site::current()) {
  static_assert(!std::is_same_v<Use, accumulator>, "accumulator loads take a layout_t");
  detail::load(f, p, ldm, std::is_same_v<L, row_major>, detail::kind<Use>());
  detail::warp_op(tokops_emu::detail::kWmmaLoad, s);
}
template <typename T>
inline void load_matrix_sync(fragment<accumulator, 16, 16, 16, T, void>& f, const T* p, unsigned ldm, layout_t l,
                             const tokops_emu::Site& s = tokops_emu::Site::current()) {
  detail::load(f, p, ldm, l == mem_row_major, 2);
  detail::warp_op(tokops_emu::detail::kWmmaLoad, s);
}
template <typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, 16, 16, 16, T, void>& f, unsigned ldm, layout_t l,
                              const tokops_emu::Site& s = tokops_emu::Site::current()) {
  const int lane = tokops_emu::detail::lane_id();
  for (int i = 0; i < f.num_elements; ++i) {
    const int pos = tokops_emu::detail::wmma_pos(2, lane, i), r = pos / 16, c = pos % 16;
    (l == mem_row_major ? p[size_t(r) * ldm + c] : p[size_t(c) * ldm + r]) = f.x[i];
  }
  detail::warp_op(tokops_emu::detail::kWmmaStore, s);
}

// D = A * B + C over the whole warp (D may alias C).
template <typename TA, typename LA, typename LB, typename TC>
inline void mma_sync(fragment<accumulator, 16, 16, 16, TC, void>& d, const fragment<matrix_a, 16, 16, 16, TA, LA>& a,
                     const fragment<matrix_b, 16, 16, 16, TA, LB>& b,
                     const fragment<accumulator, 16, 16, 16, TC, void>& c,
                     const tokops_emu::Site& s = tokops_emu::Site::current()) {
  using FA = fragment<matrix_a, 16, 16, 16, TA, LA>;
  using FB = fragment<matrix_b, 16, 16, 16, TA, LB>;
  using FC = fragment<accumulator, 16, 16, 16, TC, void>;
  detail::warp_op(tokops_emu::detail::kWmmaMma, s, &d, &a, &b, &c, [](tokops_emu::detail::Arrival* lanes, unsigned) {
    using tokops_emu::detail::wmma_pos;
    float A[256], B[256], C[256];
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 8; ++i) {
        A[wmma_pos(0, l, i)] = detail::to_f(static_cast<const FA*>(lanes[l].p[1])->x[i]);
        B[wmma_pos(1, l, i)] = detail::to_f(static_cast<const FB*>(lanes[l].p[2])->x[i]);
        C[wmma_pos(2, l, i)] = detail::to_f(static_cast<const FC*>(lanes[l].p[3])->x[i]);
      }
    for (int l = 0; l < 32; ++l)
      for (int i = 0; i < 8; ++i) {
        const int pos = wmma_pos(2, l, i), r = pos / 16, col = pos % 16;
        float acc = C[pos];
        for (int k = 0; k < 16; ++k) acc += A[r * 16 + k] * B[k * 16 + col];
        const_cast<FC*>(static_cast<const FC*>(lanes[l].p[0]))->x[i] = detail::from_f<TC>(acc);
      }
  });
}

}  // namespace wmma
}  // namespace nvcuda
