// Emulator stand-in for cuda_runtime.h (csrc/emu).
#pragma once
#include "../torch_shim.h"
