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

#include <stddef.h>
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

// The launch the launcher makes for a problem (pure function of the shape; pyquant/_cuda_ext.py mirrors it in
// Python for the static roofline tool, and tests/test_cuda_ext.py checks the two agree).
typedef struct pyquant_gemv_plan {
    int threads;          // threads per CTA (128 or 256: 4 or 8 warps)
    int rows_per_warp;    // output rows a warp owns per pass (8 for M <= 2, 4 for M <= 4, else 1)
    int passes;           // row passes per CTA (each pass: threads/32 * rows_per_warp rows, same staged x)
    int splits;           // split-K factor = gridDim.y (1: no split, no workspace)
    int grid_x;           // CTAs along N
    int iters_per_split;  // main-loop trips per pass: 32 chunks (2048 weights) of K per warp per trip
    size_t smem_bytes;    // dynamic shared memory per CTA (staged x of the CTA's K slice)
    size_t workspace_bytes;  // split-K workspace: grid_x int32 counters + splits*M*N fp32 partials (0 if splits==1)
} pyquant_gemv_plan;

// Fill *plan for (M, N, K); returns 0, or cudaErrorInvalidValue (1) for M outside 1..8, N < 1 or K < 1.
int pyquant_packed_gemv_plan(int M, int N, int K, pyquant_gemv_plan* plan);

// Launch the packed GEMV on `stream` (a cudaStream_t; NULL = legacy default stream).
//
//   x        [M, K] row-major contiguous, dtype x_dtype (FLOAT16 or BFLOAT16)
//   qweight  [N, ceil(K/64)*16] uint8, row-major contiguous, base address 16-byte aligned
//   scale    [N, K/group_size] contiguous, dtype scale_dtype (FLOAT16, BFLOAT16 or FLOAT32)
//   zero     NULL, or like scale (per-group float zero point)
//   bias     NULL, or [N] with dtype x_dtype
//   y        [M, N] row-major contiguous, dtype x_dtype (fully overwritten)
//   workspace  plan.workspace_bytes of device memory, 4-byte aligned, ZEROED BEFORE ITS FIRST USE and then kept
//            for later calls: the kernel leaves its counters at zero again (the last CTA of each column re-arms
//            its counter), so no memset is needed per call.  One workspace must not be used by two launches that
//            may run at the same time (keep one per stream).  May be NULL when plan.workspace_bytes == 0.
//   group_size must divide K and be a multiple of 32, or equal K (one group per row).
//   code_offset is the constant zero point used when zero == NULL (1.0, 1.5 or 2.0 for pyquant's formats).
//
// Returns a cudaError_t value: 0 (cudaSuccess), cudaErrorInvalidValue (1) for arguments the kernel does not
// accept (checked here too, so a caller without the torch binding gets an error code, never a bad launch), or
// the error reported by the launch itself.  M == 0 or N == 0 is a no-op returning 0.
int pyquant_packed_gemv_launch(const void* x, const uint8_t* qweight, const void* scale, const void* zero,
                               const void* bias, void* y, int M, int N, int K, int group_size, float code_offset,
                               int x_dtype, int scale_dtype, void* workspace, size_t workspace_bytes,
                               void* stream);

// Same, with an explicit plan (tests force row passes / split-K / multi-trip loops on small shapes).  The plan
// must be consistent with (M, N, K) -- every row and every 2048-weight trip covered exactly once, rows_per_warp
// and smem_bytes as pyquant_packed_gemv_plan computes them for M -- or the call returns cudaErrorInvalidValue.
int pyquant_packed_gemv_launch_plan(const void* x, const uint8_t* qweight, const void* scale, const void* zero,
                                    const void* bias, void* y, int M, int N, int K, int group_size,
                                    float code_offset, int x_dtype, int scale_dtype, void* workspace,
                                    size_t workspace_bytes, void* stream, const pyquant_gemv_plan* plan);

// The tensor-core (mma.sync) variant: same arguments and semantics, a different plan.  Opt-in until a GPU run has
// confirmed its fragment layout (pyquant/_cuda_ext.py: PYQUANT_CUDA_GEMV=mma).  The plan returns -1 when the kernel
// declines the group size (grouped scales need group_size % 64 == 0 for M <= 2, % 128 == 0 for M = 3..8); the
// launchers then return cudaErrorInvalidValue.  plan.rows_per_warp is the rows of one warp (128 or 64), passes 1.
int pyquant_packed_gemv_mma_plan(int M, int N, int K, int group_size, pyquant_gemv_plan* plan);
int pyquant_packed_gemv_mma_launch(const void* x, const uint8_t* qweight, const void* scale, const void* zero,
                                   const void* bias, void* y, int M, int N, int K, int group_size, float code_offset,
                                   int x_dtype, int scale_dtype, void* workspace, size_t workspace_bytes,
                                   void* stream);
int pyquant_packed_gemv_mma_launch_plan(const void* x, const uint8_t* qweight, const void* scale, const void* zero,
                                        const void* bias, void* y, int M, int N, int K, int group_size,
                                        float code_offset, int x_dtype, int scale_dtype, void* workspace,
                                        size_t workspace_bytes, void* stream, const pyquant_gemv_plan* plan);

#ifdef __cplusplus
}  // extern "C"
#endif
