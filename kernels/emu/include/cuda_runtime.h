// Shim: kernels that include <cuda_runtime.h> get the emulator header instead.
#pragma once
#include "../cuemu.h"
