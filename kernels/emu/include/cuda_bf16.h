// Shim: kernels that include <cuda_bf16.h> get the emulator header instead.
#pragma once
#include "../cuemu.h"
