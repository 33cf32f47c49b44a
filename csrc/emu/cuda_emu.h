// tokops CUDA emulator: runs the CUDA kernels of csrc/ on the CPU, compiled by g++ (tests only).
//
// The kernel sources are compiled unchanged except for two macros of csrc/cuda_portable.cuh:
// TOKOPS_LAUNCH (the <<<>>> launch) and TOKOPS_EXTERN_SHARED (dynamic shared memory).
// Execution model (implementation: runtime.cpp):
//  * every CUDA thread is a user-space fiber (ucontext) with its own stack; the blocks of a grid run
//    one after another (in a seeded shuffled order), the threads of a block cooperatively;
//  * a thread runs until it blocks in __syncthreads or a warp-collective (shuffle, vote, __syncwarp,
//    WMMA, mma.sync, ldmatrix); after every barrier/collective the released threads resume in a
//    shuffled order (seed: TOKOPS_EMU_SEED or emu_set_seed), so code that relies on an ordering
//    that CUDA does not promise computes garbage under some seed;
//  * warps are exactly 32 consecutive threads; a warp collective completes when every lane named
//    in its mask has arrived at the same kind of collective with the same mask. A lane not in its own
//    mask, a named lane that exited or does not exist, a mask/op mismatch, reading a lane outside the
//    mask, and a deadlock (nothing runnable, someone waiting) abort the launch with a message naming
//    the source lines;
//  * __shared__ variables live in one ELF section (tokops_emu_shared, instrumented by ASan with
//    -fsanitize-sections) and dynamic shared memory is a fresh heap block per CUDA block; both are
//    poisoned (0xFF bytes: NaN for floats) before every block, so a read of shared memory that no
//    thread of this block wrote shows up as garbage;
//  * WMMA fragments use a scrambled element <-> (row, col) map (seeded), so code that assumes a
//    fragment layout breaks; the PTX instruction layer (ptx.cuh) emulates the documented layouts.
// Errors become a C++ exception (c10::Error) thrown by the launch, i.e. a RuntimeError in Python.
#pragma once

#if defined(__CUDACC__)
#error "cuda_emu.h is for the g++ emulation build only"
#endif

// CUDA keywords, defined before the CUDA headers so that host_defines.h keeps them.
#define __host__
#define __device__
#define __global__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __constant__ static
#define __managed__
#define __grid_constant__
// Static shared memory: one section, poisoned before every block (see runtime.cpp).
#define __shared__ static __attribute__((section("tokops_emu_shared")))

#include <cuda_bf16.h>  // __nv_bfloat16 (CUDA 13 headers, host code paths)
#include <cuda_fp16.h>  // __half
#include <cuda_fp8.h>   // __nv_fp8_e4m3
#include <vector_functions.h>
#include <vector_types.h>  // dim3, uint3, uint4, float4 ...

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <source_location>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace tokops_emu {

using Site = std::source_location;

namespace detail {
struct ThreadState;
// The running fiber's state; the built-ins read it.
extern ThreadState* g_cur;
extern uint3 g_block_idx;
extern dim3 g_block_dim, g_grid_dim;
extern unsigned char* g_dyn_smem;
extern size_t g_dyn_smem_bytes;
const uint3& thread_idx();
int lane_id();

// Collective kinds (warp level).
enum Op : int {
  kShflIdx, kShflUp, kShflDown, kShflXor, kBallot, kAny, kAll, kSyncWarp,
  kWmmaLoad, kWmmaStore, kWmmaMma, kMma, kLdmatrix, kNumOps
};
const char* op_name(int op);

// One lane's arrival at a warp collective.
struct Arrival {
  int op;
  unsigned mask;
  uint64_t value;   // shuffle/vote operand bits
  int arg;          // shuffle lane / delta / xor mask; ldmatrix: variant
  int width;        // shuffle width
  const void* p[4]; // operand pointers (mma, ldmatrix)
  uint64_t result;  // filled by the completion
  Site site;
};
// Completion of a collective: called once, when all lanes of `mask` have arrived (lanes[] indexed by lane).
using Completion = void (*)(Arrival* lanes, unsigned mask);
// Arrive at a collective, wait for the lanes of the mask; returns this lane's result.
uint64_t warp_collective(Arrival a, Completion done);

// Abort the running launch with a message (never returns).
[[noreturn]] void fail(const std::string& msg);
std::string where(const Site& s);

// Block-wide barrier.
void syncthreads(const Site& s);

// Type-erased launch.
struct KernelRun {
  void (*run)(void* ctx);
  void* ctx;
};
void launch(dim3 grid, dim3 block, size_t smem, const char* name, KernelRun k);

// Scrambled WMMA layout: element i of a lane's fragment of `kind` (0: a, 1: b, 2: acc) -> row * 16 + col.
int wmma_pos(int kind, int lane, int i);

// Per-thread deferred cp.async copies (ptx.cuh).
void cp_async_push(void* dst, const void* src, int bytes, int src_bytes);
void cp_async_commit();
void cp_async_wait(int keep_groups);
}  // namespace detail

void set_seed(uint64_t seed);
uint64_t seed();

template <typename T>
T* dynamic_shared() {
  return reinterpret_cast<T*>(detail::g_dyn_smem);
}

// TOKOPS_LAUNCH(grid, block, smem, stream, kernel)(args...): arguments are converted to the kernel's
// parameter types and copied once (as a CUDA launch does); every thread runs kernel(args...).
template <typename... P>
struct Launcher {
  void (*kernel)(P...);
  dim3 grid, block;
  size_t smem;
  const char* name;
  void operator()(P... args) const {
    struct Ctx {
      void (*kernel)(P...);
      std::tuple<std::decay_t<P>...> args;
    } ctx{kernel, std::tuple<std::decay_t<P>...>(args...)};
    detail::KernelRun k{[](void* c) {
                          auto* x = static_cast<Ctx*>(c);
                          std::apply(x->kernel, x->args);
                        },
                        &ctx};
    detail::launch(grid, block, smem, name, k);
  }
};
template <typename... P>
Launcher<P...> make_launcher(dim3 grid, dim3 block, size_t smem, const char* name, void (*kernel)(P...)) {
  return Launcher<P...>{kernel, grid, block, smem, name};
}

}  // namespace tokops_emu

// ------------------------------------------------------------------------------ built-in variables
#define threadIdx (::tokops_emu::detail::thread_idx())
#define blockIdx (static_cast<const uint3&>(::tokops_emu::detail::g_block_idx))
#define blockDim (static_cast<const dim3&>(::tokops_emu::detail::g_block_dim))
#define gridDim (static_cast<const dim3&>(::tokops_emu::detail::g_grid_dim))
constexpr int warpSize = 32;

// ------------------------------------------------------------------------------ synchronisation
inline void __syncthreads(const tokops_emu::Site& s = tokops_emu::Site::current()) {
  tokops_emu::detail::syncthreads(s);
}
inline void __syncwarp(unsigned mask = 0xffffffffu, const tokops_emu::Site& s = tokops_emu::Site::current()) {
  tokops_emu::detail::Arrival a{};
  a.op = tokops_emu::detail::kSyncWarp;
  a.mask = mask;
  a.site = s;
  tokops_emu::detail::warp_collective(a, [](tokops_emu::detail::Arrival*, unsigned) {});
}
inline void __threadfence() {}
inline void __threadfence_block() {}
[[noreturn]] inline void __trap() { tokops_emu::detail::fail("__trap() called"); }

// ------------------------------------------------------------------------------ warp shuffles / votes
namespace tokops_emu::detail {
void shfl_complete(Arrival* lanes, unsigned mask);
void vote_complete(Arrival* lanes, unsigned mask);
template <typename T>
T shfl(int op, unsigned mask, T var, int arg, int width, const Site& s) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable_v<T>, "__shfl_*_sync: unsupported type");
  Arrival a{};
  a.op = op;
  a.mask = mask;
  std::memcpy(&a.value, &var, sizeof(T));
  a.arg = arg;
  a.width = width;
  a.site = s;
  const uint64_t r = warp_collective(a, shfl_complete);
  T out;
  std::memcpy(&out, &r, sizeof(T));
  return out;
}
inline unsigned vote(int op, unsigned mask, int pred, const Site& s) {
  Arrival a{};
  a.op = op;
  a.mask = mask;
  a.value = pred != 0;
  a.site = s;
  return static_cast<unsigned>(warp_collective(a, vote_complete));
}
}  // namespace tokops_emu::detail

template <typename T>
T __shfl_sync(unsigned mask, T var, int src, int width = 32, const tokops_emu::Site& s = tokops_emu::Site::current()) {
  return tokops_emu::detail::shfl(tokops_emu::detail::kShflIdx, mask, var, src, width, s);
}
template <typename T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = 32,
                 const tokops_emu::Site& s = tokops_emu::Site::current()) {
  return tokops_emu::detail::shfl(tokops_emu::detail::kShflUp, mask, var, int(delta), width, s);
}
template <typename T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32,
                   const tokops_emu::Site& s = tokops_emu::Site::current()) {
  return tokops_emu::detail::shfl(tokops_emu::detail::kShflDown, mask, var, int(delta), width, s);
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = 32,
                  const tokops_emu::Site& s = tokops_emu::Site::current()) {
  return tokops_emu::detail::shfl(tokops_emu::detail::kShflXor, mask, var, lane_mask, width, s);
}
inline unsigned __ballot_sync(unsigned mask, int pred, const tokops_emu::Site& s = tokops_emu::Site::current()) {
  return tokops_emu::detail::vote(tokops_emu::detail::kBallot, mask, pred, s);
}
inline int __any_sync(unsigned mask, int pred, const tokops_emu::Site& s = tokops_emu::Site::current()) {
  return int(tokops_emu::detail::vote(tokops_emu::detail::kAny, mask, pred, s));
}
inline int __all_sync(unsigned mask, int pred, const tokops_emu::Site& s = tokops_emu::Site::current()) {
  return int(tokops_emu::detail::vote(tokops_emu::detail::kAll, mask, pred, s));
}
inline unsigned __activemask() { return 0xffffffffu; }

// ------------------------------------------------------------------------------ atomics
// Fibers of one block never run at the same time and blocks run one after another: a plain
// read-modify-write is atomic here.
template <typename T>
T atomicAdd(T* p, T v) { T o = *p; *p = o + v; return o; }
template <typename T>
T atomicSub(T* p, T v) { T o = *p; *p = o - v; return o; }
template <typename T>
T atomicMax(T* p, T v) { T o = *p; *p = o < v ? v : o; return o; }
template <typename T>
T atomicMin(T* p, T v) { T o = *p; *p = v < o ? v : o; return o; }
template <typename T>
T atomicExch(T* p, T v) { T o = *p; *p = v; return o; }
template <typename T>
T atomicCAS(T* p, T cmp, T v) { T o = *p; if (o == cmp) *p = v; return o; }
template <typename T>
T atomicOr(T* p, T v) { T o = *p; *p = o | v; return o; }
template <typename T>
T atomicAnd(T* p, T v) { T o = *p; *p = o & v; return o; }

// ------------------------------------------------------------------------------ math intrinsics
// IEEE single precision, no contraction (the build uses -ffp-contract=off).
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.f / a; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __saturatef(float x) { return x < 0.f ? 0.f : (x > 1.f ? 1.f : x); }
inline int __float_as_int(float x) { int i; std::memcpy(&i, &x, 4); return i; }
inline float __int_as_float(int i) { float x; std::memcpy(&x, &i, 4); return x; }
inline unsigned __float_as_uint(float x) { unsigned i; std::memcpy(&i, &x, 4); return i; }
inline float __uint_as_float(unsigned i) { float x; std::memcpy(&x, &i, 4); return x; }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(unsigned(x)); }
// CUDA's global isfinite / isnan / isinf (device math API).
using std::isfinite;
using std::isinf;
using std::isnan;
// CUDA's device min/max overloads (integer and float); mixed int/int64 promote like CUDA's.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline unsigned min(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned max(unsigned a, unsigned b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline long min(long a, long b) { return a < b ? a : b; }
inline long max(long a, long b) { return a > b ? a : b; }
inline long min(int a, long b) { return min(long(a), b); }
inline long min(long a, int b) { return min(a, long(b)); }
inline long max(int a, long b) { return max(long(a), b); }
inline long max(long a, int b) { return max(a, long(b)); }
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
