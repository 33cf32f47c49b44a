// Build facts only nvcc knows: the architectures this extension was compiled for.
#include "common.h"

namespace tokops {
std::string cuda_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  return TOKOPS_STR(__CUDA_ARCH_LIST__);  // e.g. "800,900"
#else
  return "";
#endif
}
}  // namespace tokops
