// Warp-level PTX instruction layer: one inline function per instruction.
// Under nvcc each function is the inline PTX (sm_80+); under the CPU emulator (TOKOPS_EMU, csrc/emu)
// it is an exact C++ emulation with the fragment layouts of the PTX ISA
// (https://docs.nvidia.com/cuda/parallel-thread-execution/, "Matrix fragments for mma.m16n8k16",
// "ldmatrix", "cp.async"). Write warp-level kernels through these so that they run under emulation.
//
//   groupID = lane / 4, tig = lane % 4 (thread in group)
//   mma m16n8k16, A (16x16, row): 4 regs x 2 halves, element i (reg i/2, half i%2):
//        row = groupID + 8 * ((i / 2) % 2), col = 2 * tig + i % 2 + 8 * (i / 4)
//   B (16x8, col): 2 regs x 2 halves, element i: k = 2 * tig + i % 2 + 8 * (i / 2), n = groupID
//   C/D (16x8 fp32): 4 floats, element i: row = groupID + 8 * (i / 2), col = 2 * tig + i % 2
//   ldmatrix .x1/.x2/.x4: lane l gives the address of row l % 8 of matrix l / 8 (16 bytes each);
//        register j of lane l receives matrix j, row l / 4, columns 2 * (l % 4) and +1
//        (.trans: rows 2 * (l % 4) and +1 of column l / 4), low half = lower index.
//   cp.async: the copy happens at some point before the wait_group that covers its group; the
//        emulator performs it exactly at that wait, so a read before the wait sees stale data.
#pragma once

#include <cstdint>

#include "cuda_portable.cuh"

namespace tokops {
namespace ptx {

#ifndef TOKOPS_EMU
// ------------------------------------------------------------------------------ nvcc: inline PTX
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// D = A * B + C, m16n8k16, fp16 inputs, fp32 accumulate.
__device__ __forceinline__ void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                 const float (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#else
  __trap();
#endif
}

// D = A * B + C, m16n8k16, bf16 inputs, fp32 accumulate.
__device__ __forceinline__ void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2],
                                                  const float (&c)[4]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%10,%11,%12,%13};\n"
      : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "f"(c[0]), "f"(c[1]), "f"(c[2]),
        "f"(c[3]));
#else
  __trap();
#endif
}

// ldmatrix.sync.aligned.m8n8.x{1,2,4}[.trans].shared.b16; `row` is this lane's row address (shared memory).
__device__ __forceinline__ void ldmatrix_x1(uint32_t (&r)[1], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x1.shared.b16 {%0}, [%1];\n" : "=r"(r[0]) : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x2(uint32_t (&r)[2], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n"
               : "=r"(r[0]), "=r"(r[1])
               : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(row)));
}

// cp.async.cg.shared.global 16 bytes; the _zfill form copies src_bytes (0..16) and zero-fills the rest.
__device__ __forceinline__ void cp_async_16(void* smem_dst, const void* gmem_src) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_u32(smem_dst)), "l"(gmem_src));
}
__device__ __forceinline__ void cp_async_16_zfill(void* smem_dst, const void* gmem_src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(smem_dst)), "l"(gmem_src),
               "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
// Wait until at most N committed groups are still pending.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

#else
// ------------------------------------------------------------------------------ emulator: exact C++
namespace emu {
using tokops_emu::detail::Arrival;

inline float f16_bits_to_float(uint16_t h) {
  __half x;
  std::memcpy(&x, &h, 2);
  return __half2float(x);
}
inline float bf16_bits_to_float(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t half_of(uint32_t reg, int i) { return uint16_t(i % 2 ? reg >> 16 : reg & 0xffffu); }

template <bool BF16>
void mma_complete(Arrival* lanes, unsigned) {
  float A[16][16], B[16][8], C[16][8];
  auto cvt = [](uint16_t h) { return BF16 ? bf16_bits_to_float(h) : f16_bits_to_float(h); };
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    const uint32_t* a = static_cast<const uint32_t*>(lanes[l].p[1]);
    const uint32_t* b = static_cast<const uint32_t*>(lanes[l].p[2]);
    const float* c = static_cast<const float*>(lanes[l].p[3]);
    for (int i = 0; i < 8; ++i) A[g + 8 * ((i / 2) % 2)][2 * t + i % 2 + 8 * (i / 4)] = cvt(half_of(a[i / 2], i));
    for (int i = 0; i < 4; ++i) B[2 * t + i % 2 + 8 * (i / 2)][g] = cvt(half_of(b[i / 2], i));
    for (int i = 0; i < 4; ++i) C[g + 8 * (i / 2)][2 * t + i % 2] = c[i];
  }
  for (int l = 0; l < 32; ++l) {
    const int g = l / 4, t = l % 4;
    float* d = static_cast<float*>(const_cast<void*>(lanes[l].p[0]));
    for (int i = 0; i < 4; ++i) {
      const int r = g + 8 * (i / 2), n = 2 * t + i % 2;
      float acc = C[r][n];
      for (int k = 0; k < 16; ++k) acc += A[r][k] * B[k][n];
      d[i] = acc;
    }
  }
}

template <bool BF16>
inline void mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                const tokops_emu::Site& s) {
  float out[4];
  Arrival x{};
  x.op = tokops_emu::detail::kMma;
  x.mask = 0xffffffffu;
  x.site = s;
  x.p[0] = out;
  x.p[1] = a;
  x.p[2] = b;
  x.p[3] = c;
  tokops_emu::detail::warp_collective(x, mma_complete<BF16>);
  for (int i = 0; i < 4; ++i) d[i] = out[i];
}

// arg: number of matrices (1, 2, 4) + 8 * trans; p[0]: this lane's row address, p[1]: its registers.
inline void ldmatrix_complete(Arrival* lanes, unsigned) {
  const int nmat = lanes[0].arg & 7;
  const bool trans = lanes[0].arg & 8;
  for (int l = 0; l < 32; ++l) {
    uint32_t* r = static_cast<uint32_t*>(const_cast<void*>(lanes[l].p[1]));
    for (int j = 0; j < nmat; ++j) {
      uint16_t lo, hi;
      if (!trans) {
        const uint16_t* row = static_cast<const uint16_t*>(lanes[8 * j + l / 4].p[0]);
        lo = row[2 * (l % 4)];
        hi = row[2 * (l % 4) + 1];
      } else {
        lo = static_cast<const uint16_t*>(lanes[8 * j + 2 * (l % 4)].p[0])[l / 4];
        hi = static_cast<const uint16_t*>(lanes[8 * j + 2 * (l % 4) + 1].p[0])[l / 4];
      }
      r[j] = uint32_t(lo) | uint32_t(hi) << 16;
    }
  }
}

inline void ldmatrix(uint32_t* r, int nmat, bool trans, const void* row, const tokops_emu::Site& s) {
  if (reinterpret_cast<uintptr_t>(row) % 16 != 0)
    tokops_emu::detail::fail("ldmatrix at " + tokops_emu::detail::where(s) + ": row address not 16-byte aligned");
  Arrival x{};
  x.op = tokops_emu::detail::kLdmatrix;
  x.mask = 0xffffffffu;
  x.site = s;
  x.arg = nmat + (trans ? 8 : 0);
  x.p[0] = tokops_emu::detail::lane_id() < 8 * nmat ? row : nullptr;
  x.p[1] = r;
  tokops_emu::detail::warp_collective(x, ldmatrix_complete);
}
}  // namespace emu

inline void mma_m16n8k16_f16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                             const tokops_emu::Site& s = tokops_emu::Site::current()) {
  emu::mma<false>(d, a, b, c, s);
}
inline void mma_m16n8k16_bf16(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], const float (&c)[4],
                              const tokops_emu::Site& s = tokops_emu::Site::current()) {
  emu::mma<true>(d, a, b, c, s);
}
inline void ldmatrix_x1(uint32_t (&r)[1], const void* row, const tokops_emu::Site& s = tokops_emu::Site::current()) {
  emu::ldmatrix(r, 1, false, row, s);
}
inline void ldmatrix_x2(uint32_t (&r)[2], const void* row, const tokops_emu::Site& s = tokops_emu::Site::current()) {
  emu::ldmatrix(r, 2, false, row, s);
}
inline void ldmatrix_x4(uint32_t (&r)[4], const void* row, const tokops_emu::Site& s = tokops_emu::Site::current()) {
  emu::ldmatrix(r, 4, false, row, s);
}
inline void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row,
                              const tokops_emu::Site& s = tokops_emu::Site::current()) {
  emu::ldmatrix(r, 4, true, row, s);
}
inline void cp_async_16(void* smem_dst, const void* gmem_src) {
  tokops_emu::detail::cp_async_push(smem_dst, gmem_src, 16, 16);
}
inline void cp_async_16_zfill(void* smem_dst, const void* gmem_src, int src_bytes) {
  tokops_emu::detail::cp_async_push(smem_dst, gmem_src, 16, src_bytes < 0 ? 0 : (src_bytes > 16 ? 16 : src_bytes));
}
inline void cp_async_commit() { tokops_emu::detail::cp_async_commit(); }
template <int N>
inline void cp_async_wait() {
  tokops_emu::detail::cp_async_wait(N);
}
#endif

}  // namespace ptx
}  // namespace tokops
