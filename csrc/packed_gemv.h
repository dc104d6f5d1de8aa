// packed_gemv.h -- C ABI of the torch-free 2-bit packed decode GEMV (csrc/packed_gemv.cu).
//
//   y[m, n] = sum_k x[m, k] * (c[n, k] - z[n, k / group_size]) * s[n, k / group_size]  (+ bias[n])
//
// for M = 1..8 rows of x.  The packed layout is the one defined in pyquant/formats.py (module docstring):
//   qweight: uint8 [N, packed_cols(K)], packed_cols(K) = ceil(K / 64) * 16 bytes per row (16-byte aligned rows);
//            W[n, k] is byte qweight[n, k / 4], bits 2 * (k % 4) .. 2 * (k % 4) + 1 (k % 4 == 0 is the lowest pair).
//   scale:   [N, K / group_size]; zero: same shape/dtype as scale (asymmetric) or NULL (then z = code_offset).
//
// This header is plain C/C++ (no CUDA, no torch), so the torch binding and any other host code can include it.
#pragma once

#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

// dtype codes shared by the launcher and its callers
enum pyquant_dtype {
    PYQUANT_DTYPE_FLOAT16 = 0,
    PYQUANT_DTYPE_BFLOAT16 = 1,
    PYQUANT_DTYPE_FLOAT32 = 2,
};

// Largest number of x rows the decode kernel handles (one template instantiation per M).
#define PYQUANT_GEMV_MAX_M 8

// Launch the packed GEMV on `stream` (a cudaStream_t; NULL = legacy default stream).
//
//   x        [M, K] row-major contiguous, dtype x_dtype (FLOAT16 or BFLOAT16)
//   qweight  [N, ceil(K/64)*16] uint8, row-major contiguous, base address 16-byte aligned
//   scale    [N, K/group_size] contiguous, dtype scale_dtype (FLOAT16, BFLOAT16 or FLOAT32)
//   zero     NULL, or like scale (per-group float zero point)
//   bias     NULL, or [N] with dtype x_dtype
//   y        [M, N] row-major contiguous, dtype x_dtype (fully overwritten)
//   group_size must divide K and be a multiple of 32, or equal K (one group per row).
//   code_offset is the constant zero point used when zero == NULL (1.0, 1.5 or 2.0 for pyquant's formats).
//
// Returns a cudaError_t value: 0 (cudaSuccess), cudaErrorInvalidValue (1) for arguments the kernel does not
// accept (checked here too, so a caller without the torch binding gets an error code, never a bad launch), or
// the error reported by the launch itself.  M == 0 or N == 0 is a no-op returning 0.
int pyquant_packed_gemv_launch(const void* x, const uint8_t* qweight, const void* scale, const void* zero,
                               const void* bias, void* y, int M, int N, int K, int group_size, float code_offset,
                               int x_dtype, int scale_dtype, void* stream);

#ifdef __cplusplus
}  // extern "C"
#endif
