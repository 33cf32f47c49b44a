// Emulator stand-in for <mma.h> (csrc/emu).
#pragma once
#include "../wmma.h"
