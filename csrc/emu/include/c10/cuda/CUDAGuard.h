// Emulator stand-in for c10/cuda/CUDAGuard.h (csrc/emu).
#pragma once
#include "../../../torch_shim.h"
