// Self-tests of the CUDA emulator and unit tests of the PTX instruction layer (csrc/ptx.cuh).
// Built only into the emulation test library (tests/emu); the kernels are plain CUDA and also
// compile with nvcc (the PTX path).
#include <ATen/cuda/CUDAContext.h>

#include <string>

#include "../common.h"
#include "../ptx.cuh"
#include <mma.h>

namespace tokops {
namespace {

// ---------------------------------------------------------------- emulator behaviour
// Block sum: warp shuffles + shared memory + __syncthreads.
__global__ void block_sum_kernel(const float* x, float* out, int n) {
  __shared__ float part[32];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  float v = 0.f;
  for (int i = blockIdx.x * blockDim.x + tid; i < n; i += gridDim.x * blockDim.x) v += x[i];
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  if (lane == 0) part[warp] = v;
  __syncthreads();
  if (warp == 0) {
    v = lane < int(blockDim.x / 32) ? part[lane] : 0.f;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (lane == 0) atomicAdd(out, v);
  }
}

// Every shuffle flavour and width, one row per (flavour, width, arg): out[row][lane].
__global__ void shfl_table_kernel(int* out) {
  const int lane = threadIdx.x;
  int row = 0;
  for (int w = 1; w <= 32; w *= 2)
    for (int arg = 0; arg < 33; arg += 3) {
      out[(row++) * 32 + lane] = __shfl_sync(0xffffffffu, 100 + lane, arg, w);
      out[(row++) * 32 + lane] = __shfl_up_sync(0xffffffffu, 100 + lane, unsigned(arg), w);
      out[(row++) * 32 + lane] = __shfl_down_sync(0xffffffffu, 100 + lane, unsigned(arg), w);
      out[(row++) * 32 + lane] = __shfl_xor_sync(0xffffffffu, 100 + lane, arg, w);
    }
  const unsigned b = __ballot_sync(0xffffffffu, lane % 3 == 0);
  out[(row++) * 32 + lane] = int(b);
  out[(row++) * 32 + lane] = __any_sync(0xffffffffu, lane == 7);
  out[(row++) * 32 + lane] = __all_sync(0xffffffffu, lane < 31);
  // a half-warp mask: only the lanes it names take part
  if (lane < 16) out[(row++) * 32 + lane] = __shfl_xor_sync(0x0000ffffu, lane, 1);
}

// Neighbour exchange through shared memory; `sync` = 0 drops the barrier (a race).
__global__ void neighbour_kernel(float* out, int sync) {
  __shared__ float buf[256];
  const int t = threadIdx.x;
  buf[t] = float(t);
  if (sync) __syncthreads();
  out[t] = buf[(t + 1) % blockDim.x];
}

// Reads a static __shared__ word nobody wrote in this block.
__global__ void unwritten_shared_kernel(float* out) {
  __shared__ float never[4];
  out[blockIdx.x] = never[threadIdx.x % 4];
}

// Dynamic shared memory: one word per thread, read back reversed.
__global__ void dynamic_shared_kernel(float* out, int overrun) {
  TOKOPS_EXTERN_SHARED(float, buf);
  const int t = threadIdx.x;
  buf[t + (overrun && t == 0 ? int(blockDim.x) : 0)] = float(t);
  __syncthreads();
  out[blockIdx.x * blockDim.x + t] = buf[blockDim.x - 1 - t];
}

// Broken patterns: each one must be reported.
__global__ void broken_kernel(int which, float* out) {
  const int lane = threadIdx.x % 32;
  float v = float(lane);
  switch (which) {
    case 0:  // a lane named in the mask exits
      if (lane == 5) return;
      v = __shfl_xor_sync(0xffffffffu, v, 1);
      break;
    case 1:  // full-mask shuffle inside a divergent branch
      if (lane < 16) v = __shfl_xor_sync(0xffffffffu, v, 1);
      else __syncthreads();
      break;
    case 2:  // the calling lane is not in its mask
      v = __shfl_xor_sync(0x0000ffffu, v, 1);
      break;
    case 3:  // reads a lane outside the mask
      if (lane < 16) v = __shfl_xor_sync(0x0000ffffu, v, 16);
      break;
    case 4:  // divergent __syncthreads
      if (threadIdx.x < 32) __syncthreads();
      else __syncthreads();
      break;
    case 5:  // half of each warp waits in __syncwarp, the other half in __syncthreads
      if (lane < 16) __syncwarp();
      else __syncthreads();
      break;
    case 6:  // a static shared array indexed past its end (ASan/UBSan abort the process)
    {
      __shared__ float small[8];
      small[threadIdx.x % 8] = v;
      __syncthreads();
      v = small[8 + (threadIdx.x == 0 ? 0 : -8)];
      break;
    }
    default: break;
  }
  out[threadIdx.x] = v;
}

// A WMMA GEMM (C = A B, 16x16x16) that treats fragments as opaque, and one that assumes a layout.
template <typename T>
__global__ void wmma_kernel(const T* a, const T* b, float* c, int assume_layout) {
  using namespace nvcuda;
  wmma::fragment<wmma::matrix_a, 16, 16, 16, T, wmma::row_major> fa;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, T, wmma::row_major> fb;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> fc;
  wmma::fill_fragment(fc, 0.f);
  wmma::load_matrix_sync(fa, a, 16);
  wmma::load_matrix_sync(fb, b, 16);
  wmma::mma_sync(fc, fa, fb, fc);
  if (!assume_layout) {
    wmma::store_matrix_sync(c, fc, 16, wmma::mem_row_major);
  } else {  // "lane l holds row l / 2, columns 8 * (l % 2) + i": not what WMMA promises
    const int l = threadIdx.x;
    for (int i = 0; i < fc.num_elements; ++i) c[(l / 2) * 16 + 8 * (l % 2) + i] = fc.x[i];
  }
}

// ---------------------------------------------------------------- PTX layer
// D (16x8 fp32) = A (16x16) B (16x8) + C: A and B^T (8x16) staged with cp.async, fragments via ldmatrix.
template <bool BF16>
__global__ void ptx_mma_kernel(const uint16_t* a, const uint16_t* bt, const float* c, float* d) {
  __shared__ __align__(16) uint16_t As[16 * 16];
  __shared__ __align__(16) uint16_t Bs[8 * 16];
  const int l = threadIdx.x;
  // 16x16 A = 32 chunks of 16 bytes, 8x16 B^T = 16 chunks
  ptx::cp_async_16(As + l * 8, a + l * 8);
  if (l < 16) ptx::cp_async_16(Bs + l * 8, bt + l * 8);
  ptx::cp_async_commit();
  ptx::cp_async_wait<0>();
  __syncwarp();
  uint32_t fa[4], fb[2];
  ptx::ldmatrix_x4(fa, As + (l % 16) * 16 + (l / 16) * 8);
  ptx::ldmatrix_x2(fb, Bs + (l % 8) * 16 + ((l / 8) % 2) * 8);
  const int g = l / 4, t = l % 4;
  float fc[4], fd[4];
  for (int i = 0; i < 4; ++i) fc[i] = c[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2];
  if (BF16) ptx::mma_m16n8k16_bf16(fd, fa, fb, fc);
  else ptx::mma_m16n8k16_f16(fd, fa, fb, fc);
  for (int i = 0; i < 4; ++i) d[(g + 8 * (i / 2)) * 8 + 2 * t + i % 2] = fd[i];
}

// ldmatrix x4 (trans or not) of a 32x8 b16 matrix (4 stacked 8x8): out[lane][j] = register j.
__global__ void ptx_ldmatrix_kernel(const uint16_t* x, uint32_t* out, int trans) {
  __shared__ __align__(16) uint16_t Xs[32 * 8];
  const int l = threadIdx.x;
  for (int i = 0; i < 8; ++i) Xs[l * 8 + i] = x[l * 8 + i];
  __syncwarp();
  uint32_t r[4];
  if (trans) ptx::ldmatrix_x4_trans(r, Xs + l * 8);
  else ptx::ldmatrix_x4(r, Xs + l * 8);
  for (int j = 0; j < 4; ++j) out[l * 4 + j] = r[j];
}

// cp.async groups: two groups in flight; after wait<1> only the first has landed.
__global__ void ptx_cp_async_kernel(const float* src, float* out) {
  __shared__ __align__(16) float s0[4 * 32];
  __shared__ __align__(16) float s1[4 * 32];
  const int l = threadIdx.x;
  for (int i = 0; i < 4; ++i) s0[l * 4 + i] = s1[l * 4 + i] = -1.f;
  ptx::cp_async_16(s0 + l * 4, src + l * 4);
  ptx::cp_async_commit();
  ptx::cp_async_16(s1 + l * 4, src + 128 + l * 4);
  ptx::cp_async_commit();
  ptx::cp_async_wait<1>();
  out[l] = s0[l * 4];
  out[32 + l] = s1[l * 4];  // not waited for yet: still -1 under the emulator
  ptx::cp_async_wait<0>();
  out[64 + l] = s1[l * 4];
}

// ---------------------------------------------------------------- host side
at::Tensor emu_selftest(c10::string_view name, const at::Tensor& x, int64_t arg) {
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto fopt = x.options().dtype(at::kFloat);
  if (name == "block_sum") {
    auto out = at::zeros({1}, fopt);
    TOKOPS_LAUNCH(int(arg), 128, 0, stream, block_sum_kernel)(x.data_ptr<float>(), out.data_ptr<float>(),
                                                               int(x.numel()));
    return out;
  }
  if (name == "shfl_table") {
    auto out = at::full({6 * 11 * 4 + 4, 32}, -7, x.options().dtype(at::kInt));
    TOKOPS_LAUNCH(1, 32, 0, stream, shfl_table_kernel)(out.data_ptr<int>());
    return out;
  }
  if (name == "neighbour") {
    auto out = at::empty({256}, fopt);
    TOKOPS_LAUNCH(1, 256, 0, stream, neighbour_kernel)(out.data_ptr<float>(), int(arg));
    return out;
  }
  if (name == "unwritten_shared") {
    auto out = at::zeros({4}, fopt);
    TOKOPS_LAUNCH(4, 32, 0, stream, unwritten_shared_kernel)(out.data_ptr<float>());
    return out;
  }
  if (name == "dynamic_shared") {
    auto out = at::empty({3 * 64}, fopt);
    TOKOPS_LAUNCH(3, 64, 64 * sizeof(float), stream, dynamic_shared_kernel)(out.data_ptr<float>(), int(arg));
    return out;
  }
  if (name == "broken") {
    auto out = at::zeros({64}, fopt);
    TOKOPS_LAUNCH(1, 64, 0, stream, broken_kernel)(int(arg), out.data_ptr<float>());
    return out;
  }
  TORCH_CHECK(false, "unknown self-test ", name);
}

at::Tensor emu_wmma(const at::Tensor& a, const at::Tensor& b, bool assume_layout) {
  auto c = at::empty({16, 16}, a.options().dtype(at::kFloat));
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (a.scalar_type() == at::kHalf)
    TOKOPS_LAUNCH(1, 32, 0, stream, wmma_kernel<__half>)(reinterpret_cast<const __half*>(a.data_ptr()),
                                                        reinterpret_cast<const __half*>(b.data_ptr()),
                                                        c.data_ptr<float>(), int(assume_layout));
  else
    TOKOPS_LAUNCH(1, 32, 0, stream, wmma_kernel<__nv_bfloat16>)(
        reinterpret_cast<const __nv_bfloat16*>(a.data_ptr()), reinterpret_cast<const __nv_bfloat16*>(b.data_ptr()),
        c.data_ptr<float>(), int(assume_layout));
  return c;
}

// a (16, 16), bt (8, 16) fp16/bf16; c (16, 8) fp32 -> d = a @ bt.T + c
at::Tensor emu_ptx_mma(const at::Tensor& a, const at::Tensor& bt, const at::Tensor& c) {
  TORCH_CHECK(a.sizes() == at::IntArrayRef({16, 16}) && bt.sizes() == at::IntArrayRef({8, 16}) &&
              c.sizes() == at::IntArrayRef({16, 8}) && a.is_contiguous() && bt.is_contiguous() && c.is_contiguous());
  auto d = at::empty({16, 8}, c.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  auto* ap = reinterpret_cast<const uint16_t*>(a.data_ptr());
  auto* bp = reinterpret_cast<const uint16_t*>(bt.data_ptr());
  if (a.scalar_type() == at::kBFloat16)
    TOKOPS_LAUNCH(1, 32, 0, stream, ptx_mma_kernel<true>)(ap, bp, c.data_ptr<float>(), d.data_ptr<float>());
  else
    TOKOPS_LAUNCH(1, 32, 0, stream, ptx_mma_kernel<false>)(ap, bp, c.data_ptr<float>(), d.data_ptr<float>());
  return d;
}

// x (32, 8) int16 -> (32, 4) int32 registers
at::Tensor emu_ptx_ldmatrix(const at::Tensor& x, bool trans) {
  TORCH_CHECK(x.sizes() == at::IntArrayRef({32, 8}) && x.scalar_type() == at::kShort && x.is_contiguous());
  auto out = at::empty({32, 4}, x.options().dtype(at::kInt));
  const auto stream = at::cuda::getCurrentCUDAStream();
  TOKOPS_LAUNCH(1, 32, 0, stream, ptx_ldmatrix_kernel)(reinterpret_cast<const uint16_t*>(x.data_ptr()),
                                                      reinterpret_cast<uint32_t*>(out.data_ptr<int>()), int(trans));
  return out;
}

at::Tensor emu_ptx_cp_async(const at::Tensor& src) {
  TORCH_CHECK(src.numel() == 256 && src.scalar_type() == at::kFloat && src.is_contiguous());
  auto out = at::empty({96}, src.options());
  const auto stream = at::cuda::getCurrentCUDAStream();
  TOKOPS_LAUNCH(1, 32, 0, stream, ptx_cp_async_kernel)(src.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(tokops, m) {
  m.def("emu_selftest(str name, Tensor x, int arg) -> Tensor");
  m.def("emu_wmma(Tensor a, Tensor b, bool assume_layout) -> Tensor");
  m.def("emu_ptx_mma(Tensor a, Tensor bt, Tensor c) -> Tensor");
  m.def("emu_ptx_ldmatrix(Tensor x, bool trans) -> Tensor");
  m.def("emu_ptx_cp_async(Tensor src) -> Tensor");
}

TORCH_LIBRARY_IMPL(tokops, CUDA, m) {
  m.impl("emu_selftest", &emu_selftest);
  m.impl("emu_wmma", &emu_wmma);
  m.impl("emu_ptx_mma", &emu_ptx_mma);
  m.impl("emu_ptx_ldmatrix", &emu_ptx_ldmatrix);
  m.impl("emu_ptx_cp_async", &emu_ptx_cp_async);
}

}  // namespace tokops
