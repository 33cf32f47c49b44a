// Ops of the emulation test library itself (csrc/emu): scheduling seed.
#include <torch/library.h>

#include "cuda_emu.h"

TORCH_LIBRARY_FRAGMENT(tokops_emu, m) {
  m.def("emu_set_seed(int seed) -> ()", [](int64_t s) { tokops_emu::set_seed(uint64_t(s)); });
  m.def("emu_seed() -> int", []() { return int64_t(tokops_emu::seed()); });
}
