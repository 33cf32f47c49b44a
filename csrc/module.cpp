// tokops._C: the compiled extension. Loading it registers the C++ ops
// (TORCH_LIBRARY_FRAGMENT(tokops, ...) in each source) with the dispatcher.
#include <torch/extension.h>

#include "common.h"

namespace tokops {
#ifndef TOKOPS_WITH_CUDA
std::string cuda_arch_list() { return ""; }
#endif
}  // namespace tokops

PYBIND11_MODULE(_C, m) {
  m.doc() = "tokops compiled extension";
  m.def("cuda_compiled", []() {
#ifdef TOKOPS_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("build_info", []() {
    pybind11::dict d;
    d["torch_version"] = TOKOPS_STR(TORCH_VERSION_MAJOR) "." TOKOPS_STR(TORCH_VERSION_MINOR) "." TOKOPS_STR(TORCH_VERSION_PATCH);
    std::vector<std::string> archs;
    std::string s = tokops::cuda_arch_list();
    size_t start = 0;
    while (start < s.size()) {
      size_t end = s.find(',', start);
      if (end == std::string::npos) end = s.size();
      if (end > start) archs.push_back("sm_" + s.substr(start, end - start - 1));
      start = end + 1;
    }
    d["cuda_archs"] = archs;
#ifdef TOKOPS_WITH_CUDA
    d["cuda_compiled"] = true;
#else
    d["cuda_compiled"] = false;
#endif
    return d;
  });
}
