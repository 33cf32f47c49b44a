// The two places where a kernel source differs between nvcc and the CPU emulator (csrc/emu, tests only):
//   TOKOPS_LAUNCH(grid, block, smem, stream, kernel)(args...)   is   kernel<<<grid, block, smem, stream>>>(args...)
//   TOKOPS_EXTERN_SHARED(T, name);                              is   extern __shared__ __align__(128) T name[];
#pragma once

#ifdef TOKOPS_EMU
#include "emu/cuda_emu.h"
#define TOKOPS_LAUNCH(grid, block, smem, stream, ...) \
  ((void)(stream), ::tokops_emu::make_launcher((grid), (block), (smem), #__VA_ARGS__, __VA_ARGS__))
#define TOKOPS_EXTERN_SHARED(T, name) T* const name = ::tokops_emu::dynamic_shared<T>()
#else
#define TOKOPS_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<(grid), (block), (smem), (stream)>>>
#define TOKOPS_EXTERN_SHARED(T, name) extern __shared__ __align__(128) T name[]
#endif
