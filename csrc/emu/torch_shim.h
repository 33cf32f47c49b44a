// Host-side CUDA runtime / torch-CUDA pieces the kernel files use, for the emulator build (csrc/emu).
// TORCH_LIBRARY_IMPL(ns, CUDA, m) registers for the CPU key here: the emulated ops take CPU tensors.
#pragma once
#include <ATen/ATen.h>
#include <torch/library.h>

#include "cuda_emu.h"

#include <driver_types.h>  // cudaStream_t, cudaError_t, cudaDeviceProp (plain C declarations)

template <typename F>
inline cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }

namespace at::cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(c10::DeviceIndex = -1) { return {}; }
// A fake sm_90 device with few SMs: split heuristics take their multi-split paths on small inputs.
inline cudaDeviceProp* getCurrentDeviceProperties() {
  static cudaDeviceProp p = [] {
    cudaDeviceProp d{};
    d.major = 9;
    d.minor = 0;
    d.multiProcessorCount = 4;
    d.warpSize = 32;
    d.sharedMemPerBlockOptin = 227 * 1024;
    return d;
  }();
  return &p;
}
}  // namespace at::cuda

namespace c10::cuda {
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(c10::DeviceIndex) {}
};
struct OptionalCUDAGuard {
  OptionalCUDAGuard() = default;
  explicit OptionalCUDAGuard(std::optional<c10::Device>) {}
};
}  // namespace c10::cuda

#ifndef C10_CUDA_CHECK
#define C10_CUDA_CHECK(x) TORCH_CHECK((x) == cudaSuccess, "CUDA error")
#endif
#ifndef C10_CUDA_KERNEL_LAUNCH_CHECK
#define C10_CUDA_KERNEL_LAUNCH_CHECK() ((void)0)
#endif

#undef TORCH_LIBRARY_IMPL
#define TOKOPS_EMU_KEY_CUDA CPU
#define TOKOPS_EMU_KEY_CPU CPU
#define TOKOPS_EMU_KEY_Meta Meta
#define TOKOPS_EMU_KEY_Autograd Autograd
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(ns, TOKOPS_EMU_KEY_##k, m, C10_UID)
