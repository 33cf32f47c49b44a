// Shared helpers for tokops C++/CUDA sources.
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>

#include <cstdlib>
#include <limits>
#include <string>

#include "cuda_portable.cuh"

#define TOKOPS_STR2(...) #__VA_ARGS__
#define TOKOPS_STR(...) TOKOPS_STR2(__VA_ARGS__)

// Input checks of the C++ ops. The Python entry points check first and give the
// friendlier messages; these keep a direct torch.ops.tokops.* call from ever
// reaching a kernel with a layout it would read out of bounds.
#ifdef TOKOPS_EMU  // the CPU emulation build (csrc/emu, tests only): the "CUDA" ops take CPU tensors
#define TOKOPS_CHECK_CUDA(x) TORCH_CHECK((x).is_cpu(), #x " must be a CPU tensor (CUDA emulator), got ", (x).device())
#else
#define TOKOPS_CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got ", (x).device())
#endif
#define TOKOPS_CHECK_CONTIG(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define TOKOPS_CHECK_DTYPE(x, dt) \
  TORCH_CHECK((x).scalar_type() == (dt), #x " must have dtype ", (dt), ", got ", (x).scalar_type())

namespace tokops {
// Allocate a kernel output. With TOKOPS_POISON=1 in the environment (the tests
// set it) the buffer is filled with NaN (floats) or 0x55 bytes (everything else)
// so that an element a kernel forgot to write shows up as a mismatch.
inline at::Tensor new_output(at::IntArrayRef sizes, const at::TensorOptions& options) {
  static const bool poison = [] {
    const char* v = std::getenv("TOKOPS_POISON");
    return v != nullptr && std::string(v) != "" && std::string(v) != "0";
  }();
  at::Tensor out = at::empty(sizes, options);
  if (poison) {
    if (at::isFloatingType(out.scalar_type()) && out.element_size() > 1) {
      out.fill_(std::numeric_limits<float>::quiet_NaN());
    } else {
      out.view(at::kByte).fill_(0x55);
    }
  }
  return out;
}

// Comma-separated list of the GPU architectures compiled into the extension ("" for a CPU-only build).
std::string cuda_arch_list();
}  // namespace tokops
