// Emulator stand-in for ATen/cuda/CUDAContext.h (csrc/emu): one fake sm_90 device, a null stream.
#pragma once
#include <ATen/ATen.h>

#include "../../../cuda_emu.h"
#include "../../../torch_shim.h"
