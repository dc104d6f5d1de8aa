// packed_gemv.cu -- decode-time GEMV for pyquant's 2-bit packed weights (torch-free; C ABI in packed_gemv.h).
//
//   y[m, n] = sum_k x[m, k] * (c[n, k] - z[n, g]) * s[n, g]  (+ bias[n]),   g = k / group_size,   m < M <= 8
//
// The packed layout is defined once, in pyquant/formats.py: qweight is uint8 [N, ceil(K/64)*16]; code c[n, k] sits
// in byte k/4 of row n at bits 2*(k%4)..2*(k%4)+1.  Read as little-endian 32-bit words, word q of a row therefore
// holds the 16 codes k = 16q .. 16q+15 with code k at bits 2*(k%16): a 16-byte vector (uint4) is 64 consecutive
// codes of one row, and every row starts on a 16-byte boundary.
//
// ---------------------------------------------------------------------------------------------------------------
// Work decomposition (and why)
// ---------------------------------------------------------------------------------------------------------------
// * A block is 4 warps (128 threads).  Each warp owns kRowsPerWarp = 4 consecutive output rows n, the block owns
//   16.  At M <= 8 the kernel streams N*K/4 bytes of weights and touches only M*K elements of x, so the only thing
//   that matters is keeping enough 16-byte weight loads in flight and spending as few instructions as possible per
//   weight.  Owning 4 rows per warp lets every x value read from shared memory serve 4 rows (4*M FMAs per load).
// * K is walked in tiles of kTileK = 2048 * kU weights (kU = 2 for M <= 2, else 1).  Within a tile, lane l of a warp
//   handles the 64-weight chunks  l, l + 32, ..., l + 32*(kU-1): for each of its 4 rows one uint4 load per chunk,
//   so a warp's loads of one row are 512 contiguous bytes (fully coalesced) and a lane has 4*kU independent
//   16-byte loads in flight.  All weight and scale loads of a tile are issued *before* the block stages that tile's
//   x, so their DRAM latency overlaps the staging and the barrier.  Weights are read once: they are loaded with
//   ld.global.nc.L1::no_allocate so they do not evict x / scales from L1.
// * x is staged per tile in shared memory as fp32, in the same chunk order the lanes consume it, with a pad of
//   4 floats after every 64 (row stride 68 floats = 272 B).  A lane reads its chunk with 16-byte LDS.128; the 8 lanes
//   of one shared-memory phase then start at banks 4*l + const (mod 32): conflict free.  Without the pad all 8
//   would hit the same 4 banks (8-way conflict).
// * Partial sums live in registers: acc[r][m] (4*M floats per lane).  At the end each warp reduces its 4*M values
//   across the 32 lanes with __shfl_xor_sync (no shared memory, no atomics) and lane (r*M + m) writes y[m, n_r].
//
// ---------------------------------------------------------------------------------------------------------------
// Dequantization without per-weight conversions (and why)
// ---------------------------------------------------------------------------------------------------------------
// The inner loop costs per weight and per row: 1 LOP3 (extract the code, 16 codes share one 32-bit word and one
// extra shift), 1 FADD, and M FFMAs.  Two tricks get it there:
// 1. Integer -> float through the exponent, no I2F (I2F issues on the narrower conversion pipe):
//    for v < 2^23,  as_float(0x4B000000 | v) == 2^23 + v  exactly, so  as_float(0x4B000000 | v) - 2^23 == v.
// 2. Leave the code where it is.  Code j of a word (j = k % 16) is  w & (3 << 2j) == c * 4^j.  For j <= 10 this is
//    < 2^23, so step 1 turns it into the float c * 4^j with one LOP3 ((w & mask) | magic) and one FADD.  Codes
//    j = 11..15 use w >> 22 (one shift per word) and become c * 4^(j-11).  To compensate, x is stored in shared
//    memory pre-multiplied by 4^-pos(j) (pos(j) = j for j <= 10, j - 11 above), which is exact in fp32 (a power of
//    two scale; only bf16 inputs below ~1e-32 could lose bits to fp32 subnormals).  So x' * (c * 4^pos) == x * c
//    with exactly the rounding of the plain product.
// The zero point and the scale never enter the inner loop: per 32-weight sub-chunk (which lies inside one group,
// since group_size is a multiple of 32 or K itself) the lane computes  D = sum x*c  and uses the sub-chunk's
//    sum x  (computed once per block while staging x, shared by all rows):
//    sum x * (c - z) * s  =  s * (D - z * sum x).
// Accumulation is fp32 throughout; the result is rounded once to x's dtype.
//
// Tails: bytes past K in a row are zero, and staging writes x = 0 for k >= K, so a partial last chunk contributes
// exactly 0 (codes past K are never trusted); sub-chunks that start at or past K are skipped entirely (their group
// index would be out of range).  Rows past N read row N-1 (always valid memory) and are not stored.
//
// Register budget (per thread, worst case M = 8): acc 32 + D 32 + x 32 + weights 16 + scales/zeros 16 floats.
// Check with `nvcc -Xptxas -v` or `bash csrc/check_compile.sh` (tests/test_cuda_ext.py asserts 0 bytes of spills
// and stack frame for every instantiation).
//
// Shared memory per block: M * (kTileK * 68/64 + kTileK/32) floats, i.e. 17.5 KiB (M = 1) to 70 KiB (M = 8).
// M >= 6 opts in to more than 48 KiB (sm_80: up to 163 KiB, sm_86/89: 99 KiB, sm_90: 227 KiB).  On a GPU with a
// smaller opt-in limit the launch returns an error code; it never computes a wrong result.
//
// Not done here (known limits): no split-K, so a small N (N/16 blocks) can leave SMs idle; CUDA-core FMAs only, so
// M near 8 is bound by FFMA throughput rather than by the weight stream (a tensor-core mma path would fix that).

#include "packed_gemv.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stddef.h>
#include <stdint.h>

// PYQUANT_HOST_EMULATION: tests/test_cuda_ext.py compiles this file with a host C++ compiler (g++ -x c++, see
// csrc/host_emulation.h) into a shared library that runs every CUDA thread of a block as a host thread, to check
// the kernel's indexing without a GPU.  Only the weight load, the shared-memory declaration and the launch
// differ; the kernel body is the same code.
#ifdef PYQUANT_HOST_EMULATION
#include "host_emulation.h"
#else
#define PYQUANT_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define PYQUANT_DYNAMIC_SMEM(name) extern __shared__ float4 name[]
#endif

namespace pyquant {
namespace {

constexpr int kThreads = 128;  // 4 warps
constexpr int kWarps = kThreads / 32;
constexpr int kRowsPerWarp = 4;
constexpr int kRowsPerBlock = kWarps * kRowsPerWarp;
constexpr int kChunk = 64;            // weights per 16-byte vector
constexpr int kChunkStride = 64 + 4;  // floats per chunk in shared memory (pad: conflict-free LDS.128)

template <int M>
struct TileConfig {
    static_assert(M >= 1 && M <= PYQUANT_GEMV_MAX_M, "M must be in 1..8");
    // chunks per lane per tile: more in-flight loads when M is small (registers are cheap there)
    static constexpr int kU = (M <= 2) ? 2 : 1;
    static constexpr int kChunksPerTile = 32 * kU;
    static constexpr int kTileK = kChunksPerTile * kChunk;
    static constexpr int kXRowFloats = kChunksPerTile * kChunkStride;  // one row m of staged x
    static constexpr int kSubPerTile = 2 * kChunksPerTile;              // 32-weight sub-chunks per tile
    static constexpr size_t kSmemBytes = sizeof(float) * (size_t)M * (kXRowFloats + kSubPerTile);
};

__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// 16-byte streaming load of packed weights: read-only path, do not allocate in L1 (each byte is used once).
__device__ __forceinline__ uint4 load_weights(const uint8_t* p) {
    uint4 v;
#ifdef PYQUANT_HOST_EMULATION
    memcpy(&v, p, sizeof(v));
#else
    asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
                 : "l"(p));
#endif
    return v;
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int q) {
    return q == 0 ? v.x : (q == 1 ? v.y : (q == 2 ? v.z : v.w));  // q is a compile-time constant after unrolling
}

// pos(j) of the module comment: code j of a 32-bit word is extracted as c * 4^pos(j).
__host__ __device__ constexpr int code_pos(int j) { return j <= 10 ? j : j - 11; }

// c * 4^pos(J) as an exact float: one LOP3 + one FADD (see "Dequantization" above).  `hi` is w >> 22.
template <int J>
__device__ __forceinline__ float code_scaled(uint32_t w, uint32_t hi) {
    constexpr uint32_t kMask = 3u << (2 * code_pos(J));
    const uint32_t bits = ((J <= 10 ? w : hi) & kMask) | 0x4B000000u;
    return __uint_as_float(bits) - 8388608.0f;
}

// 4^-pos(j) for a runtime j in 0..15 (used once per staged x value, not in the inner loop).
__device__ __forceinline__ float inv_pow4(int j) {
    const int pos = j <= 10 ? j : j - 11;
    return __int_as_float((127 - 2 * pos) << 23);
}

template <int M, typename T, typename S>
__global__ void __launch_bounds__(kThreads)
packed_gemv_kernel(const T* __restrict__ x, const uint8_t* __restrict__ qweight, const S* __restrict__ scale,
                   const S* __restrict__ zero, const T* __restrict__ bias, T* __restrict__ y, int N, int K,
                   int group_size, int group_shift, float code_offset) {
    using Cfg = TileConfig<M>;
    constexpr int kU = Cfg::kU;
    constexpr int kR = kRowsPerWarp;

    PYQUANT_DYNAMIC_SMEM(smem_f4);
    float* x_sm = reinterpret_cast<float*>(smem_f4);   // [M][kChunksPerTile][kChunkStride]  (x * 4^-pos)
    float* xsum_sm = x_sm + M * Cfg::kXRowFloats;        // [M][2 halves][kChunksPerTile]    (sum of x per 32)

    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int n_base = blockIdx.x * kRowsPerBlock + warp * kR;
    const int n_chunks = (K + kChunk - 1) / kChunk;
    const size_t row_bytes = (size_t)n_chunks * 16;
    const int n_groups = K / group_size;
    const bool has_zero = zero != nullptr;

    const uint8_t* wrow[kR];
    const S* srow[kR];
    const S* zrow[kR];
#pragma unroll
    for (int r = 0; r < kR; ++r) {
        const int n = min(n_base + r, N - 1);  // rows past N: read a valid row, never store it
        wrow[r] = qweight + (size_t)n * row_bytes;
        srow[r] = scale + (size_t)n * n_groups;
        zrow[r] = has_zero ? zero + (size_t)n * n_groups : nullptr;
    }

    float acc[kR][M];
#pragma unroll
    for (int r = 0; r < kR; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.f;

    const int n_tiles = (n_chunks + Cfg::kChunksPerTile - 1) / Cfg::kChunksPerTile;
    for (int t = 0; t < n_tiles; ++t) {
        // ---- 1. issue this tile's weight / scale / zero loads (consumed after the x staging below) ----------
        uint4 wv[kU][kR];
        S sv[kU][2][kR];
        S zv[kU][2][kR];
#pragma unroll
        for (int u = 0; u < kU; ++u) {
            const int c = t * Cfg::kChunksPerTile + u * 32 + lane;
            const bool chunk_ok = c < n_chunks;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int ks = c * kChunk + h * 32;
                int g = 0;  // sub-chunks at/after K are skipped later; g = 0 keeps the address valid
                if (ks < K) g = group_shift >= 0 ? (ks >> group_shift) : (ks / group_size);
#pragma unroll
                for (int r = 0; r < kR; ++r) {
                    sv[u][h][r] = srow[r][g];
                    zv[u][h][r] = has_zero ? zrow[r][g] : sv[u][h][r];  // (unused without zero)
                }
            }
#pragma unroll
            for (int r = 0; r < kR; ++r)
                wv[u][r] = chunk_ok ? load_weights(wrow[r] + (size_t)c * 16) : make_uint4(0u, 0u, 0u, 0u);
        }

        // ---- 2. stage x[:, tile] into shared memory: fp32, pre-scaled by 4^-pos, zero past K; sums per 32 ----
        __syncthreads();  // every warp is done reading the previous tile
        {
            constexpr int kQuadsPerRow = Cfg::kTileK / 4;  // multiple of kThreads: same trip count for all lanes
            const int k_tile0 = t * Cfg::kTileK;
#pragma unroll 1
            for (int idx = threadIdx.x; idx < M * kQuadsPerRow; idx += kThreads) {
                const int m = idx / kQuadsPerRow;
                const int kk = (idx % kQuadsPerRow) * 4;  // offset inside the tile
                const int k = k_tile0 + kk;
                const T* xr = x + (size_t)m * K;
                float v[4];
                float s4 = 0.f;
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    v[i] = (k + i < K) ? to_float(xr[k + i]) : 0.f;
                    s4 += v[i];
                }
                const int j0 = kk & 15;
                float4 o;
                o.x = v[0] * inv_pow4(j0 + 0);
                o.y = v[1] * inv_pow4(j0 + 1);
                o.z = v[2] * inv_pow4(j0 + 2);
                o.w = v[3] * inv_pow4(j0 + 3);
                *reinterpret_cast<float4*>(x_sm + m * Cfg::kXRowFloats + (kk >> 6) * kChunkStride + (kk & 63)) = o;
                // 8 consecutive lanes hold one 32-weight sub-chunk (idx is lane-contiguous, 8 | 128)
                s4 += __shfl_xor_sync(0xffffffffu, s4, 1);
                s4 += __shfl_xor_sync(0xffffffffu, s4, 2);
                s4 += __shfl_xor_sync(0xffffffffu, s4, 4);
                if ((idx & 7) == 0) {
                    const int sub = kk >> 5;  // sub-chunk in tile = 2 * chunk + half
                    xsum_sm[m * Cfg::kSubPerTile + (sub & 1) * Cfg::kChunksPerTile + (sub >> 1)] = s4;
                }
            }
        }
        __syncthreads();

        // ---- 3. compute: per 32-weight sub-chunk D[r][m] = sum x*c, then acc += s * (D - z * sum x) ---------
#pragma unroll
        for (int u = 0; u < kU; ++u) {
            const int cl = u * 32 + lane;  // chunk inside the tile
            const int c = t * Cfg::kChunksPerTile + cl;
            const float* xc = x_sm + cl * kChunkStride;
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int ks = c * kChunk + h * 32;
                float d[kR][M];
#pragma unroll
                for (int r = 0; r < kR; ++r)
#pragma unroll
                    for (int m = 0; m < M; ++m) d[r][m] = 0.f;
#pragma unroll
                for (int qw = 0; qw < 2; ++qw) {
                    const int q = 2 * h + qw;  // 32-bit word of the uint4 (16 codes)
                    uint32_t w[kR], hi[kR];
#pragma unroll
                    for (int r = 0; r < kR; ++r) {
                        w[r] = word_of(wv[u][r], q);
                        hi[r] = w[r] >> 22;
                    }
#pragma unroll
                    for (int qq = 0; qq < 4; ++qq) {  // 4 codes per LDS.128 of x
                        float4 xv[M];
#pragma unroll
                        for (int m = 0; m < M; ++m)
                            xv[m] = *reinterpret_cast<const float4*>(xc + m * Cfg::kXRowFloats + q * 16 + qq * 4);
#pragma unroll
                        for (int r = 0; r < kR; ++r) {
                            float cf[4];
                            // J = 4*qq + i; spelled out so every J is a template constant
                            if (qq == 0) {
                                cf[0] = code_scaled<0>(w[r], hi[r]);
                                cf[1] = code_scaled<1>(w[r], hi[r]);
                                cf[2] = code_scaled<2>(w[r], hi[r]);
                                cf[3] = code_scaled<3>(w[r], hi[r]);
                            } else if (qq == 1) {
                                cf[0] = code_scaled<4>(w[r], hi[r]);
                                cf[1] = code_scaled<5>(w[r], hi[r]);
                                cf[2] = code_scaled<6>(w[r], hi[r]);
                                cf[3] = code_scaled<7>(w[r], hi[r]);
                            } else if (qq == 2) {
                                cf[0] = code_scaled<8>(w[r], hi[r]);
                                cf[1] = code_scaled<9>(w[r], hi[r]);
                                cf[2] = code_scaled<10>(w[r], hi[r]);
                                cf[3] = code_scaled<11>(w[r], hi[r]);
                            } else {
                                cf[0] = code_scaled<12>(w[r], hi[r]);
                                cf[1] = code_scaled<13>(w[r], hi[r]);
                                cf[2] = code_scaled<14>(w[r], hi[r]);
                                cf[3] = code_scaled<15>(w[r], hi[r]);
                            }
#pragma unroll
                            for (int m = 0; m < M; ++m) {
                                d[r][m] = fmaf(xv[m].x, cf[0], d[r][m]);
                                d[r][m] = fmaf(xv[m].y, cf[1], d[r][m]);
                                d[r][m] = fmaf(xv[m].z, cf[2], d[r][m]);
                                d[r][m] = fmaf(xv[m].w, cf[3], d[r][m]);
                            }
                        }
                    }
                }
                if (ks < K) {  // sub-chunks starting at/after K hold no weights (and have no group)
                    float xs[M];
#pragma unroll
                    for (int m = 0; m < M; ++m)
                        xs[m] = xsum_sm[m * Cfg::kSubPerTile + h * Cfg::kChunksPerTile + cl];
#pragma unroll
                    for (int r = 0; r < kR; ++r) {
                        const float s = to_float(sv[u][h][r]);
                        const float z = has_zero ? to_float(zv[u][h][r]) : code_offset;
#pragma unroll
                        for (int m = 0; m < M; ++m) acc[r][m] = fmaf(s, fmaf(-z, xs[m], d[r][m]), acc[r][m]);
                    }
                }
            }
        }
    }

    // ---- 4. reduce over the 32 lanes and store (lane r*M + m writes y[m, n_base + r]) -------------------------
#pragma unroll
    for (int r = 0; r < kR; ++r) {
#pragma unroll
        for (int m = 0; m < M; ++m) {
            float v = acc[r][m];
#pragma unroll
            for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
            const int n = n_base + r;
            if (lane == ((r * M + m) & 31) && n < N) {
                if (bias != nullptr) v += to_float(bias[n]);
                y[(size_t)m * N + n] = from_float<T>(v);
            }
        }
    }
}

template <int M, typename T, typename S>
cudaError_t launch_typed(const void* x, const uint8_t* qweight, const void* scale, const void* zero,
                         const void* bias, void* y, int N, int K, int group_size, int group_shift,
                         float code_offset, cudaStream_t stream) {
    using Cfg = TileConfig<M>;
    auto kernel = packed_gemv_kernel<M, T, S>;
    constexpr size_t smem = Cfg::kSmemBytes;
    if (smem > 48 * 1024) {  // M >= 6: opt in to more than the default 48 KiB of dynamic shared memory
        const cudaError_t err =
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
        if (err != cudaSuccess) return err;
    }
    const dim3 grid((unsigned)((N + kRowsPerBlock - 1) / kRowsPerBlock));
    PYQUANT_LAUNCH(kernel, grid, kThreads, smem, stream, static_cast<const T*>(x), qweight,
                   static_cast<const S*>(scale), static_cast<const S*>(zero), static_cast<const T*>(bias),
                   static_cast<T*>(y), N, K, group_size, group_shift, code_offset);
    return cudaGetLastError();
}

template <int M, typename T>
cudaError_t dispatch_scale(int scale_dtype, const void* x, const uint8_t* qweight, const void* scale,
                           const void* zero, const void* bias, void* y, int N, int K, int group_size,
                           int group_shift, float code_offset, cudaStream_t stream) {
    switch (scale_dtype) {
        case PYQUANT_DTYPE_FLOAT16:
            return launch_typed<M, T, __half>(x, qweight, scale, zero, bias, y, N, K, group_size, group_shift,
                                              code_offset, stream);
        case PYQUANT_DTYPE_BFLOAT16:
            return launch_typed<M, T, __nv_bfloat16>(x, qweight, scale, zero, bias, y, N, K, group_size,
                                                     group_shift, code_offset, stream);
        case PYQUANT_DTYPE_FLOAT32:
            return launch_typed<M, T, float>(x, qweight, scale, zero, bias, y, N, K, group_size, group_shift,
                                             code_offset, stream);
        default:
            return cudaErrorInvalidValue;
    }
}

template <int M>
cudaError_t dispatch_x(int x_dtype, int scale_dtype, const void* x, const uint8_t* qweight, const void* scale,
                       const void* zero, const void* bias, void* y, int N, int K, int group_size, int group_shift,
                       float code_offset, cudaStream_t stream) {
    switch (x_dtype) {
        case PYQUANT_DTYPE_FLOAT16:
            return dispatch_scale<M, __half>(scale_dtype, x, qweight, scale, zero, bias, y, N, K, group_size,
                                             group_shift, code_offset, stream);
        case PYQUANT_DTYPE_BFLOAT16:
            return dispatch_scale<M, __nv_bfloat16>(scale_dtype, x, qweight, scale, zero, bias, y, N, K,
                                                    group_size, group_shift, code_offset, stream);
        default:
            return cudaErrorInvalidValue;
    }
}

}  // namespace
}  // namespace pyquant

extern "C" int pyquant_packed_gemv_launch(const void* x, const uint8_t* qweight, const void* scale,
                                          const void* zero, const void* bias, void* y, int M, int N, int K,
                                          int group_size, float code_offset, int x_dtype, int scale_dtype,
                                          void* stream) {
    using namespace pyquant;
    if (M < 0 || M > PYQUANT_GEMV_MAX_M || N < 0 || K <= 0 || group_size <= 0 || K % group_size != 0 ||
        (group_size % 32 != 0 && group_size != K))
        return (int)cudaErrorInvalidValue;
    if (x_dtype != PYQUANT_DTYPE_FLOAT16 && x_dtype != PYQUANT_DTYPE_BFLOAT16) return (int)cudaErrorInvalidValue;
    if (scale_dtype < PYQUANT_DTYPE_FLOAT16 || scale_dtype > PYQUANT_DTYPE_FLOAT32) return (int)cudaErrorInvalidValue;
    if (M == 0 || N == 0) return (int)cudaSuccess;
    if (x == nullptr || qweight == nullptr || scale == nullptr || y == nullptr) return (int)cudaErrorInvalidValue;
    if (reinterpret_cast<uintptr_t>(qweight) % 16 != 0) return (int)cudaErrorInvalidValue;  // uint4 loads

    int group_shift = -1;  // k >> shift instead of k / group_size when group_size is a power of two
    if ((group_size & (group_size - 1)) == 0) {
        group_shift = 0;
        while ((1 << group_shift) < group_size) ++group_shift;
    }
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    cudaError_t err;
    switch (M) {
#define PYQUANT_CASE_M(MM)                                                                                       \
    case MM:                                                                                                     \
        err = dispatch_x<MM>(x_dtype, scale_dtype, x, qweight, scale, zero, bias, y, N, K, group_size,           \
                             group_shift, code_offset, s);                                                       \
        break;
        PYQUANT_CASE_M(1)
        PYQUANT_CASE_M(2)
        PYQUANT_CASE_M(3)
        PYQUANT_CASE_M(4)
        PYQUANT_CASE_M(5)
        PYQUANT_CASE_M(6)
        PYQUANT_CASE_M(7)
        PYQUANT_CASE_M(8)
#undef PYQUANT_CASE_M
        default:
            err = cudaErrorInvalidValue;
    }
    return (int)err;
}
