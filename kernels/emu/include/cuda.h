// Shim: kernels that include <cuda.h> get the emulator header instead.
#pragma once
#include "../cuemu.h"
