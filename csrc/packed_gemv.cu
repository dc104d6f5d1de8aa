// packed_gemv.cu -- decode-time GEMV for pyquant's 2-bit packed weights (torch-free; C ABI in packed_gemv.h).
//
//   y[m, n] = sum_k x[m, k] * (c[n, k] - z[n, g]) * s[n, g]  (+ bias[n]),   g = k / group_size,   m < M <= 8
//
// The packed layout is defined once, in pyquant/formats.py: qweight is uint8 [N, ceil(K/64)*16]; code c[n, k] sits
// in byte k/4 of row n at bits 2*(k%4)..2*(k%4)+1.  Read as little-endian 32-bit words, word q of a row holds the
// 16 codes k = 16q .. 16q+15 with code k at bits 2*(k%16): the low 16 bits hold codes 0..7 of the word, the high
// 16 bits codes 8..15.  A 16-byte vector (uint4) is 64 consecutive codes ("a chunk") of one row.
//
// Budget (why the kernel looks like this): an H200 issues ~3.3e13 thread-instructions/s and streams 2-bit weights
// at ~1.6e13 weights/s, so at M = 1 the kernel must spend <= ~2 SASS instructions per weight to be memory bound.
//
// ---------------------------------------------------------------------------------------------------------------
// Inner loop: 2 weights per instruction (half2), ~1.5 instructions per weight at M = 1, (2 + M) / 2 in general
// ---------------------------------------------------------------------------------------------------------------
// For a 32-bit word w and a position p in 0..4, (w & (0x00030003 << 2p)) | 0x64006400 read as two fp16 values
// is (1024 + c_lo * 4^p, 1024 + c_hi * 4^p) exactly -- fp16 0x6400 is 1024, whose ulp is 1, and c * 4^p <= 768
// fits its 10 mantissa bits -- where c_lo is code p and c_hi code p + 8 of the word.  Positions 5..7 come from
// w >> 10 (one SHF per word) as positions 0..2.  So per PAIR of weights:
//   1 LOP3   (mask + OR in one instruction: the magic 0x64006400 lives in a register, see lop3_and_or)
//   1 HFMA2  v * 4^-p + (-1024 * 4^-p - z0)  ==  c - z0  exactly (fp16 computes it exactly: the result is a
//            small integer), an integer code offset z0 folded in for free (ternary formats)
//   M HFMA2  d[m] += (c - z0) * x'[m]        (the dequantized pair is reused for every row of x)
// plus per 16 weights one SHF and per 64 weights (per row) one 16-byte LDG.  x' comes from shared memory as
// fp16 pairs (x[k], x[k + 8]) in exactly the order the codes come out of the word, so no shuffle is needed.
//
// fp16 accumulation, and its bound.  d is an fp16x2 accumulator over one 32-weight sub-chunk (16 products per
// half), then folded (lo + hi, one HADD2), converted and added into fp32 with one FFMA.  To keep fp16 in range and
// precise, x is staged per 32-weight sub-chunk and x row as x' = x * 2^e with e chosen so max|x'| is in
// [256, 512): |partial sums| <= 32 * 3 * 512 < 65504, and the FFMA of the flush multiplies by 2^-e (times the
// group scale).  A bf16 x is exact in fp16 after that scaling (8-bit mantissa) and so are its products with
// c - z0 (<= 10 bits); an fp16 x rounds at most once per product.  With u = 2^-11, the error of one output is
// bounded by   17 * u * sum_k |x[m,k]| * |c[n,k] - z~| * |s[n,g]|   (z~ = z0 when folded, 0 otherwise) plus the
// fp32 rounding of the flushes and the final rounding to x's dtype; tests/test_cuda_ext.py checks exactly this.
//
// Zero points.  An integer code offset z0 in [0, 3] (ternary formats: z0 = 1) is folded into the dequantization
// constant, which must be exact in fp16 (-1024 - z0 is; -1025.5 for z0 = 1.5 is not).  Otherwise (per-group zero
// tensors, half-integer or odd offsets) the dequantization yields c and the kernel subtracts s * z * sum(x) per
// sub-chunk (grouped) or per row (per-channel), with sum(x) computed once per CTA while staging x.
// Scales: per-channel (one group per row) are applied once in the epilogue; grouped scales once per 32-weight
// sub-chunk in the flush (group_size is a multiple of 32, so a sub-chunk never straddles two groups).
//
// ---------------------------------------------------------------------------------------------------------------
// Work decomposition
// ---------------------------------------------------------------------------------------------------------------
// * A CTA owns `passes` x (warps * R) consecutive output rows (R = rows per warp = 8 / 4 / 1 for M <= 2 / <= 4 / > 4) and one
//   K slice of `iters` * 2048 weights (split-K: gridDim.y slices).  Lane l of a warp takes chunks l, l + 32, ...
//   of the slice for its R rows: per trip a warp reads 512 contiguous bytes of each row (coalesced 16-byte loads,
//   ld.global.nc.L1::no_allocate: weights are read once).  K stays inside the thread: one warp reduction per pass.
// * x of the CTA's K slice is staged ONCE into shared memory (fp16 pairs, scaled per sub-chunk, zero past K),
//   behind a single barrier, and then serves every row of every pass: staging costs M * slice / (rows per CTA)
//   per weight.  Chunk rows in shared memory are 144 bytes apart (128 + 16 pad): the 8 lanes of a 16-byte LDS
//   phase hit 8 different 16-byte bank groups (conflict free).
// * Next-tile prefetch: the weights (and scales) of trip j + 1 are loaded into a second register buffer before
//   trip j is computed (the loop is unrolled by two and alternates buffers, so there is no register copy).
// * Split-K with a fused reduction: with gridDim.y = S > 1, every CTA writes its fp32 partial sums to the
//   workspace, fences, and bumps the per-column counter; the CTA that sees S - 1 is last: it sums the S partials,
//   adds the bias, writes y and sets the counter back to 0, which re-arms the workspace for the next launch (no
//   memset and no extra kernel per call).  The caller zeroes the workspace once, when it allocates it.
// * The launch plan (threads, rows, passes, splits, shared memory) is a pure function of (M, N, K):
//   pyquant_packed_gemv_plan below, mirrored by pyquant/_cuda_ext.py:static_launches.
//
// Counted SASS (sm_90a, nvcc 13.0, cuobjdump; main loop = two 2048-weight trips per iteration): at M = 1 the main
// loop spends 1.79 instructions per weight per-channel (943 HFMA2 + 113 HADD2 + 512 LOP3 + 65 SHF + 16 LDG.128 +
// 22 LDS per 1024 weights), 2.02 with g128 scales, 3.29 with per-sub-chunk (s, z) (zero tensors, g % 64 == 32).
// Known limits: (1) the plan splits K until a CTA has only 1-2 trips, so the per-CTA staging and epilogue are
// poorly amortized: counted with every loop's real trips (pyquant/_cuda_ext.py), 3.6 / 4.6 instructions per weight
// overall at M = 1 (4096x14336 / 14336x4096, per-channel), 8.1 at M = 4, ~20 at M = 8 (one row per warp: R = 2
// spills at the 255-register limit, so x is re-read per row).  (2) The tensor-core kernel further down
// (packed_gemv_mma_kernel: ~1.25 per weight at M = 1, all of M = 1..8 predicted memory- or near-memory-bound)
// replaces it once a GPU run has confirmed its fragment layout; until then this kernel is the default.
//
// Every bit trick is a __host__ __device__ helper with inline PTX on the device and a bit-exact host equivalent
// (#ifndef __CUDA_ARCH__), so csrc/host_emulation.h runs this very kernel body on the CPU (tests/test_cuda_ext.py).

#include "packed_gemv.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stddef.h>
#include <stdint.h>

#include <algorithm>

// PYQUANT_GEMV_ONLY_M=m / PYQUANT_GEMV_MMA_ONLY=1 / PYQUANT_GEMV_SIMT_ONLY=1 (static-analysis builds) instantiate
// one M / only the tensor-core kernel / only the fp16 kernel
#if defined(PYQUANT_GEMV_MMA_ONLY) || defined(PYQUANT_GEMV_SIMT_ONLY) || defined(PYQUANT_GEMV_ONLY_M)
#ifndef PYQUANT_GEMV_ONLY_M
#define PYQUANT_GEMV_ONLY_M M
#endif
#ifndef PYQUANT_GEMV_MMA_ONLY
#define PYQUANT_GEMV_MMA_ONLY 0
#endif
#ifndef PYQUANT_GEMV_SIMT_ONLY
#define PYQUANT_GEMV_SIMT_ONLY 0
#endif
#endif

#ifdef PYQUANT_HOST_EMULATION
#include "host_emulation.h"
#else
#define PYQUANT_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define PYQUANT_DYNAMIC_SMEM(name) extern __shared__ uint4 name[]
#define PYQUANT_CHECK_ALIGN(ptr, n) ((void)0)  // the host emulation checks vector accesses' alignment
#endif

#ifndef __CUDA_ARCH__
#include <cmath>
#include <cstring>
#endif

namespace pyquant {
namespace {

constexpr int kChunk = 64;             // weights per 16-byte vector
constexpr int kChunkWords = 32 + 4;    // 32-bit words per chunk row of staged x (32 fp16 pairs + 16-byte pad)
constexpr int kLanesK = 32;            // chunks per warp per trip
constexpr int kTargetCtas = 264;       // 2 CTAs per SM on a 132-SM H100/H200 (>= 1 per SM on any 80-132 SM GPU)
constexpr size_t kSmemBudget = 100 * 1024;  // two CTAs fit per SM on sm_90 (228 KiB); at most M * 2.5 KiB per trip
constexpr int kMaxPasses = 4;
constexpr uint32_t kMagic = 0x64006400u;  // fp16x2 (1024, 1024)

template <int M>
struct Cfg {
    static_assert(M >= 1 && M <= PYQUANT_GEMV_MAX_M, "M must be in 1..8");
    // rows per warp: 2 weight buffers + R*M accumulators (R = 2 at M = 5..8 spills at the 255-register limit)
    static constexpr int R = (M <= 2) ? 8 : (M <= 4) ? 4 : 1;
};

__host__ __device__ inline int rows_per_warp(int M) { return M <= 2 ? 8 : (M <= 4 ? 4 : 1); }

// Staged x in shared memory per CTA: M * chunks * (144 B pairs + 2 floats 2^-e + 2 floats sum(x)), + a flag.
__host__ __device__ inline size_t smem_bytes_for(int M, int chunks) {
    return (size_t)M * chunks * (kChunkWords * 4 + 4 * sizeof(float)) + 16;  // + the split-K "last CTA" flag
}

// ---------------------------------------------------------------------------------------------------------------
// bit-trick helpers: device = one PTX instruction each, host = the same bits computed in C++
// ---------------------------------------------------------------------------------------------------------------
#ifndef __CUDA_ARCH__
// round a double to fp16 bits, round-to-nearest-even (the hfma2 emulation below computes a*b+c in double: exact,
// or off by far less than half an fp16 ulp with no fp16 tie in between, so one rounding here is the fp16 result)
inline uint16_t host_f16_bits(double v) {
    uint16_t sign = std::signbit(v) ? 0x8000u : 0u;
    double a = std::fabs(v);
    if (std::isnan(v)) return 0x7e00u;
    if (a == 0.0) return sign;
    int e;
    std::frexp(a, &e);  // a = f * 2^e, f in [0.5, 1)
    e -= 1;             // a = f' * 2^e, f' in [1, 2)
    if (e < -14) {      // subnormal: units of 2^-24
        const double q = std::nearbyint(std::ldexp(a, 24));
        return (uint16_t)(sign | (uint16_t)q);  // q == 1024 is the smallest normal, bits carry into the exponent
    }
    double q = std::nearbyint(std::ldexp(a, 10 - e));  // in [1024, 2048]
    if (q == 2048.0) {
        q = 1024.0;
        ++e;
    }
    if (e > 15) return (uint16_t)(sign | 0x7c00u);
    return (uint16_t)(sign | (uint16_t)((e + 15) << 10) | (uint16_t)(q - 1024.0));
}
inline double host_f16_value(uint16_t h) {
    const int e = (h >> 10) & 31, f = h & 1023;
    double v;
    if (e == 31) v = f ? NAN : INFINITY;
    else if (e == 0) v = std::ldexp((double)f, -24);
    else v = std::ldexp((double)(f + 1024), e - 25);
    return (h & 0x8000u) ? -v : v;
}
#endif

// (a & kMask) | magic in ONE LOP3 (lut 0xEA = (A & B) | C): the mask is the instruction's immediate, the magic a
// register operand (written as C, `(a & mask) | 0x64006400` needs two LOP3s: LOP3 takes one 32-bit immediate).
template <uint32_t kMask>
__host__ __device__ __forceinline__ uint32_t lop3_and_or(uint32_t a, uint32_t magic) {
#ifdef __CUDA_ARCH__
    uint32_t d;
    asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "n"(kMask), "r"(magic));
    return d;
#else
    return (a & kMask) | magic;
#endif
}

// d = a * b + c on fp16x2 (round to nearest even, one rounding per half).
__host__ __device__ __forceinline__ uint32_t hfma2(uint32_t a, uint32_t b, uint32_t c) {
#ifdef __CUDA_ARCH__
    uint32_t d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
#else
    uint32_t d = 0;
    for (int h = 0; h < 2; ++h) {
        const int sh = 16 * h;
        const double r = host_f16_value((uint16_t)(a >> sh)) * host_f16_value((uint16_t)(b >> sh)) +
                         host_f16_value((uint16_t)(c >> sh));
        d |= (uint32_t)host_f16_bits(r) << sh;
    }
    return d;
#endif
}

// d = a * b on fp16x2 (the first product of a sub-chunk: no zeroed accumulator to add)
__host__ __device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b) {
#ifdef __CUDA_ARCH__
    uint32_t d;
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
    return d;
#else
    return hfma2(a, b, 0x80008000u);  // a * b + (-0) == a * b, signed zeros included
#endif
}

// float(lo + hi) of an fp16x2 (the add rounds to fp16 once; the conversion is exact).
__host__ __device__ __forceinline__ float h2_fold(uint32_t a) {
#ifdef __CUDA_ARCH__
    float f;
    asm("{.reg .b16 lo, hi, s;\n\tmov.b32 {lo, hi}, %1;\n\tadd.rn.f16 s, lo, hi;\n\tcvt.f32.f16 %0, s;}"
        : "=f"(f) : "r"(a));
    return f;
#else
    return (float)host_f16_value(host_f16_bits(host_f16_value((uint16_t)a) + host_f16_value((uint16_t)(a >> 16))));
#endif
}

// fp16x2 bits of (lo, hi), each rounded to nearest even.
__host__ __device__ __forceinline__ uint32_t pack_f16x2(float lo, float hi) {
#ifdef __CUDA_ARCH__
    uint32_t d;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(d) : "f"(hi), "f"(lo));
    return d;
#else
    return (uint32_t)host_f16_bits((double)lo) | ((uint32_t)host_f16_bits((double)hi) << 16);
#endif
}

__host__ __device__ __forceinline__ uint32_t f32_bits(float f) {
#ifdef __CUDA_ARCH__
    return __float_as_uint(f);
#else
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
#endif
}
__host__ __device__ __forceinline__ float bits_f32(uint32_t u) {
#ifdef __CUDA_ARCH__
    return __uint_as_float(u);
#else
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

// Per-sub-chunk scaling of x: for the largest |x| of a sub-chunk, 2^e with max * 2^e in [256, 512) and its
// inverse 2^-e (both normal floats; a zero / tiny max clamps e so 2^-e stays >= 2^-126).
// (kExp = 14, the tensor-core kernel: max * 2^e in [2^14, 2^15))
template <int kExp = 8>
__host__ __device__ __forceinline__ void x_scale_for(float amax, float* scale, float* inv) {
    const int E = (int)((f32_bits(amax) >> 23) & 0xffu);
    const int es = min(254 + kExp - E, 253);  // biased exponent of 2^e = 2^(127 + kExp - E)
    *scale = bits_f32((uint32_t)es << 23);
    *inv = bits_f32((uint32_t)(254 - es) << 23);
}

// Dequantization constants for position p (0..7) of a word, as fp16x2 bits: the LOP3 mask, and (a, b) with
// v * a + b == c - z0 for v = 1024 + c * 4^pp (pp = p for p <= 4, p - 5 for the w >> 10 positions).
__host__ __device__ constexpr int deq_pp(int p) { return p <= 4 ? p : p - 5; }
__host__ __device__ constexpr uint32_t deq_mask(int p) { return 0x00030003u << (2 * deq_pp(p)); }
__host__ __device__ inline uint32_t deq_a(int p) {  // 4^-pp in both halves (exact fp16 powers of two)
    const uint32_t h = (uint32_t)(15 - 2 * deq_pp(p)) << 10;
    return h | (h << 16);
}
__host__ __device__ inline uint32_t deq_b(int p, float z0) {  // -1024 * 4^-pp - z0 (exact: z0 is an integer <= 3)
    const float b = -bits_f32((uint32_t)(137 - 2 * deq_pp(p)) << 23) - z0;
    return pack_f16x2(b, b);
}

// dequantized fp16x2 pair (c_lo - z0, c_hi - z0) at position P of word w (w10 = w >> 10)
template <int P>
__host__ __device__ __forceinline__ uint32_t dequant_pair(uint32_t w, uint32_t w10, uint32_t magic,
                                                          const uint32_t (&ca)[5], const uint32_t (&cb)[5]) {
    const uint32_t v = lop3_and_or<deq_mask(P)>(P <= 4 ? w : w10, magic);
    return hfma2(v, ca[deq_pp(P)], cb[deq_pp(P)]);
}

// ---------------------------------------------------------------------------------------------------------------
// loads
// ---------------------------------------------------------------------------------------------------------------
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
__device__ __forceinline__ float to_float(float v) { return v; }

// x, bias and y are fp16 or bf16, chosen at run time (only staging and the epilogue touch them, not the hot loop)
__device__ __forceinline__ float act_to_float(uint16_t bits, bool bf16) {
    return bf16 ? bits_f32((uint32_t)bits << 16) : __half2float(__ushort_as_half(bits));
}
__device__ __forceinline__ float load_act(const void* base, size_t i, bool bf16) {
    return act_to_float(static_cast<const uint16_t*>(base)[i], bf16);
}
__device__ __forceinline__ void store_act(void* base, size_t i, float v, bool bf16) {
    static_cast<uint16_t*>(base)[i] = bf16 ? __bfloat16_as_ushort(__float2bfloat16_rn(v))
                                           : __half_as_ushort(__float2half_rn(v));
}

// 16-byte streaming load of packed weights: read-only path, no L1 allocation (each byte is used once).
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

// read a split-K partial written by another CTA of this launch: bypass L1 (not coherent across SMs)
__device__ __forceinline__ float load_partial(const float* p) {
#ifdef PYQUANT_HOST_EMULATION
    return *p;
#else
    return __ldcg(p);
#endif
}

__device__ __forceinline__ uint32_t word_of(const uint4& v, int q) {
    return q == 0 ? v.x : (q == 1 ? v.y : (q == 2 ? v.z : v.w));  // q is a compile-time constant after unrolling
}

// weights + scales of one trip for a lane's R rows (the prefetch unit)
template <int R>
struct Trip {
    uint4 w[R];
    float s[R][2];  // grouped scales (per chunk: [r][0]; per sub-chunk: [r][h])
    float z[R][2];  // grouped zero points (zero tensor modes)
};

struct Params {
    const uint8_t* qweight;
    const void* scale;
    const void* zero;
    const void* bias;
    const void* x;
    void* y;
    float* partial;  // [splits][M][N] fp32 (split-K only)
    int* counters;   // [gridDim.x] (split-K only)
    int N, K, n_chunks, n_groups, group_size, group_shift, iters, passes;
    float code_offset;
    int fold_zero;  // 1: z0 = code_offset folded into the dequantization; 0: subtract s * z * sum(x)
    int x_bf16;     // x / bias / y dtype: 1 bfloat16, 0 float16
};

// How scales / zero points are applied (one template instantiation each):
enum ScaleMode {
    kPerChannel = 0,  // one group per row: s (and z) once per row in the epilogue
    kChunkScale = 1,  // group_size % 64 == 0, no zero tensor: one scale per 64-weight chunk
    kSubScale = 2,    // anything else (zero tensors, group_size % 64 == 32): (s, z) per 32-weight sub-chunk
};

// Split-K with a fused reduction (both kernels): every CTA has written its fp32 partials [split][m][n] for rows
// row0 .. row0 + rows - 1; it fences, bumps its column's counter, and the CTA that arrives last sums the splits,
// adds the bias, stores y and sets the counter back to 0 (re-armed for the next launch: no memset per call).
template <int M>
__device__ __forceinline__ void splitk_finish(const Params& p, int& is_last, int row0, int rows, int nthreads,
                                              bool xbf) {
    __threadfence();  // make this CTA's partials visible device-wide before counting it
    __syncthreads();
    if (threadIdx.x == 0) {
        const int prev = atomicAdd(&p.counters[blockIdx.x], 1);
        is_last = prev == (int)gridDim.y - 1;
        if (is_last) p.counters[blockIdx.x] = 0;  // every split has arrived: re-arm for the next launch
    }
    __syncthreads();
    if (is_last) {
        __threadfence();
        for (int idx = threadIdx.x; idx < M * rows; idx += nthreads) {
            const int m = idx / rows;
            const int n = row0 + (idx - m * rows);
            if (n >= p.N) continue;
            float v = 0.f;
            for (int s = 0; s < (int)gridDim.y; ++s) v += load_partial(p.partial + ((size_t)s * M + m) * p.N + n);
            if (p.bias != nullptr) v += load_act(p.bias, n, xbf);
            store_act(p.y, (size_t)m * p.N + n, v, xbf);
        }
    }
}

template <int M, typename S, int kMode>
__global__ void __launch_bounds__(256)
packed_gemv_kernel(const Params p) {
    constexpr int R = Cfg<M>::R;
    constexpr bool kPerChunk = kMode == kChunkScale;
    const bool xbf = p.x_bf16 != 0;
    const int nthreads = (int)blockDim.x;
    const int nwarps = nthreads >> 5;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const int rows_pp = nwarps * R;               // rows per pass
    const int ncl = p.iters * kLanesK;            // chunks in this CTA's K slice (multiple of 32)
    const int c0 = blockIdx.y * ncl;              // first chunk of the slice
    const int k0 = c0 * kChunk;
    const bool has_zero = kMode != kChunkScale && p.zero != nullptr;
    const bool fold = p.fold_zero != 0;
    const S* scale = static_cast<const S*>(p.scale);
    const S* zero = static_cast<const S*>(p.zero);

    PYQUANT_DYNAMIC_SMEM(smem_raw);
    uint32_t* xs_sm = reinterpret_cast<uint32_t*>(smem_raw);          // [M][ncl][kChunkWords] fp16x2 x'
    float* inv_sm = reinterpret_cast<float*>(xs_sm + (size_t)M * ncl * kChunkWords);  // [M][ncl][2] 2^-e
    float* xsum_sm = inv_sm + (size_t)M * ncl * 2;                     // [M][ncl][2] sum x (unscaled)

    // ---- 1. stage x[:, slice] once: each thread one word group (16 k), pairs (k + i, k + 8 + i) ----------------
    {
        const int items = M * ncl * 4;  // multiple of 128: whole warps are in or out (the shuffle below)
        for (int u = threadIdx.x; u < items; u += nthreads) {
            const int m = u / (ncl * 4);
            const int rem = u - m * (ncl * 4);
            const int ch = rem >> 2, q = rem & 3;
            const int k = k0 + ch * kChunk + q * 16;
            const uint16_t* xr = static_cast<const uint16_t*>(p.x) + (size_t)m * p.K + k;
            float v[16];
            if (k + 16 <= p.K && (reinterpret_cast<uintptr_t>(xr) & 15) == 0) {  // two 16-byte loads
                const uint4 a = reinterpret_cast<const uint4*>(xr)[0], b = reinterpret_cast<const uint4*>(xr)[1];
                const uint32_t wa[4] = {a.x, a.y, a.z, a.w}, wb[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    v[2 * i] = act_to_float((uint16_t)wa[i], xbf);
                    v[2 * i + 1] = act_to_float((uint16_t)(wa[i] >> 16), xbf);
                    v[2 * i + 8] = act_to_float((uint16_t)wb[i], xbf);
                    v[2 * i + 9] = act_to_float((uint16_t)(wb[i] >> 16), xbf);
                }
            } else {
#pragma unroll
                for (int i = 0; i < 16; ++i) v[i] = (k + i < p.K) ? act_to_float(xr[i], xbf) : 0.f;
            }
            float amax = 0.f;
#pragma unroll
            for (int i = 0; i < 16; ++i) amax = fmaxf(amax, fabsf(v[i]));
            amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, 1));  // the two word groups of a sub-chunk
            float sc, inv;
            x_scale_for(amax, &sc, &inv);
            uint32_t pr[8];
#pragma unroll
            for (int i = 0; i < 8; ++i) pr[i] = pack_f16x2(v[i] * sc, v[i + 8] * sc);
            uint4* dst = reinterpret_cast<uint4*>(xs_sm + ((size_t)m * ncl + ch) * kChunkWords + q * 8);
            dst[0] = make_uint4(pr[0], pr[1], pr[2], pr[3]);
            dst[1] = make_uint4(pr[4], pr[5], pr[6], pr[7]);
            if (!fold) {
                float s16 = 0.f;
#pragma unroll
                for (int i = 0; i < 16; ++i) s16 += v[i];
                s16 += __shfl_xor_sync(0xffffffffu, s16, 1);
                if ((q & 1) == 0) xsum_sm[((size_t)m * ncl + ch) * 2 + (q >> 1)] = s16;
            }
            if ((q & 1) == 0) inv_sm[((size_t)m * ncl + ch) * 2 + (q >> 1)] = inv;
        }
    }
    __syncthreads();

    // ---- 2. constants in registers: magic, dequantization (a, b) per position -------------------------------------
    const uint32_t magic = kMagic;
    uint32_t ca[5], cb[5];
#pragma unroll
    for (int i = 0; i < 5; ++i) {
        ca[i] = deq_a(i);
        cb[i] = deq_b(i, fold ? p.code_offset : 0.f);
    }

    const size_t row_bytes = (size_t)p.n_chunks * 16;
    const int row_cta0 = blockIdx.x * p.passes * rows_pp;
    const int iters = p.iters;

    float acc[R][M];
    float xt[M];  // per-channel without folding: sum of x over the lane's chunks (for s * z * sum x)
#pragma unroll
    for (int m = 0; m < M; ++m) {
        xt[m] = 0.f;
#pragma unroll
        for (int r = 0; r < R; ++r) acc[r][m] = 0.f;
    }

    // per pass: row pointers (rows past N read row N - 1, a valid row, and are never stored)
    const uint8_t* wrow[R];
    const S* srow[R];
    const S* zrow[R];
    auto set_rows = [&](int pass) {
#pragma unroll
        for (int r = 0; r < R; ++r) {
            const int n = min(row_cta0 + pass * rows_pp + warp * R + r, p.N - 1);
            wrow[r] = p.qweight + (size_t)n * row_bytes + (size_t)(c0 + lane) * 16;
            srow[r] = scale + (size_t)n * p.n_groups;
            zrow[r] = has_zero ? zero + (size_t)n * p.n_groups : srow[r];
        }
    };

    auto load_trip = [&](Trip<R>& t, int j) {
        // chunks past the row (c >= n_chunks) re-read the last chunk: their staged x is 0, so they add exactly 0
        const int c = min(c0 + j * kLanesK + lane, p.n_chunks - 1);
        const size_t off = (size_t)(c - c0 - lane) * 16;
#pragma unroll
        for (int r = 0; r < R; ++r) t.w[r] = load_weights(wrow[r] + off);
        if (kMode != kPerChannel) {
#pragma unroll
            for (int h = 0; h < (kPerChunk ? 1 : 2); ++h) {
                const int ks = min(c * kChunk + h * 32, p.K - 1);  // sub-chunks past K: any valid group
                const int g = p.group_shift >= 0 ? (ks >> p.group_shift) : (ks / p.group_size);
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    t.s[r][h] = to_float(srow[r][g]);
                    if (kMode == kSubScale) t.z[r][h] = has_zero ? to_float(zrow[r][g]) : p.code_offset;
                }
            }
        }
    };

    auto compute_trip = [&](const Trip<R>& t, int j) {
        const int cl = j * kLanesK + lane;
        float tch[R][M];  // per-chunk modes: sum over the two sub-chunks of fold(d) * 2^-e
        float xch[M];
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            uint32_t d[R][M];
#pragma unroll
            for (int qw = 0; qw < 2; ++qw) {
                const int q = 2 * h + qw;
                // 4 pairs per 16-byte LDS of x (halves the live x registers); not unrolled for M > 4, where the
                // unrolled body runs out of registers (sm_90a, M = 8, per-sub-chunk scales)
#pragma unroll(M > 4 ? 1 : 2)
                for (int hh = 0; hh < 2; ++hh) {
                    uint32_t xp[M][4];
#pragma unroll
                    for (int m = 0; m < M; ++m) {
                        const uint4 a = *reinterpret_cast<const uint4*>(
                            xs_sm + ((size_t)m * ncl + cl) * kChunkWords + q * 8 + hh * 4);
                        xp[m][0] = a.x; xp[m][1] = a.y; xp[m][2] = a.z; xp[m][3] = a.w;
                    }
#pragma unroll
                    for (int r = 0; r < R; ++r) {
                        const uint32_t w = word_of(t.w[r], q);
                        const uint32_t w10 = w >> 10;
                        uint32_t dq[4];
                        if (hh == 0) {
                            dq[0] = dequant_pair<0>(w, w10, magic, ca, cb);
                            dq[1] = dequant_pair<1>(w, w10, magic, ca, cb);
                            dq[2] = dequant_pair<2>(w, w10, magic, ca, cb);
                            dq[3] = dequant_pair<3>(w, w10, magic, ca, cb);
                        } else {
                            dq[0] = dequant_pair<4>(w, w10, magic, ca, cb);
                            dq[1] = dequant_pair<5>(w, w10, magic, ca, cb);
                            dq[2] = dequant_pair<6>(w, w10, magic, ca, cb);
                            dq[3] = dequant_pair<7>(w, w10, magic, ca, cb);
                        }
#pragma unroll
                        for (int i = 0; i < 4; ++i)
#pragma unroll
                            for (int m = 0; m < M; ++m)
                                d[r][m] = (qw == 0 && hh == 0 && i == 0) ? hmul2(dq[i], xp[m][i])
                                                                         : hfma2(dq[i], xp[m][i], d[r][m]);
                    }
                }
            }
            // flush the sub-chunk into fp32
            float inv[M], xs[M];
#pragma unroll
            for (int m = 0; m < M; ++m) {
                inv[m] = inv_sm[((size_t)m * ncl + cl) * 2 + h];
                xs[m] = fold ? 0.f : xsum_sm[((size_t)m * ncl + cl) * 2 + h];
                if (kMode == kPerChannel && !fold) xt[m] += xs[m];
                if (kPerChunk && !fold) xch[m] = h == 0 ? xs[m] : xch[m] + xs[m];
            }
#pragma unroll
            for (int r = 0; r < R; ++r) {
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    const float f = h2_fold(d[r][m]);
                    if (kMode == kPerChannel) {
                        acc[r][m] = fmaf(f, inv[m], acc[r][m]);
                    } else if (kPerChunk) {
                        tch[r][m] = h == 0 ? f * inv[m] : fmaf(f, inv[m], tch[r][m]);
                    } else {
                        acc[r][m] = fmaf(f, inv[m] * t.s[r][h], acc[r][m]);
                        if (!fold) acc[r][m] = fmaf(-t.s[r][h] * t.z[r][h], xs[m], acc[r][m]);
                    }
                }
            }
        }
        if (kPerChunk) {
#pragma unroll
            for (int r = 0; r < R; ++r) {
                const float s = t.s[r][0];
                const float z = p.code_offset;
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    acc[r][m] = fmaf(s, tch[r][m], acc[r][m]);
                    if (!fold) acc[r][m] = fmaf(-s * z, xch[m], acc[r][m]);
                }
            }
        }
    };

    // per pass: per-channel scale, warp reduction, store (or write the split-K partial); resets the accumulators
    auto finish_pass = [&](int pass) {
        const int n_base = row_cta0 + pass * rows_pp + warp * R;
#pragma unroll
        for (int r = 0; r < R; ++r) {
            float s = 1.f, sz = 0.f;
            if (kMode == kPerChannel) {
                const int nr = min(n_base + r, p.N - 1);
                s = to_float(scale[nr]);
                const float z = has_zero ? to_float(zero[nr]) : p.code_offset;
                sz = fold ? 0.f : s * z;
            }
#pragma unroll
            for (int m = 0; m < M; ++m) {
                float v = kMode == kPerChannel ? fmaf(-sz, xt[m], s * acc[r][m]) : acc[r][m];
                acc[r][m] = 0.f;
#pragma unroll
                for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
                const int n = n_base + r;
                if (lane == ((r * M + m) & 31) && n < p.N) {
                    if (gridDim.y == 1) {
                        if (p.bias != nullptr) v += load_act(p.bias, n, xbf);
                        store_act(p.y, (size_t)m * p.N + n, v, xbf);
                    } else {
                        p.partial[((size_t)blockIdx.y * M + m) * p.N + n] = v;
                    }
                }
            }
        }
    };

    // ---- 3. main loop: per pass, trips double-buffered (trip j + 1 is loaded while trip j is computed) ----------
    for (int pass = 0; pass < p.passes; ++pass) {
        Trip<R> ta, tb;
        set_rows(pass);
        load_trip(ta, 0);
        for (int j = 0; j < iters; j += 2) {
            if (j + 1 < iters) load_trip(tb, j + 1);
            compute_trip(ta, j);
            if (j + 1 >= iters) break;
            if (j + 2 < iters) load_trip(ta, j + 2);
            compute_trip(tb, j + 1);
        }
        finish_pass(pass);
    }

    // ---- 4. split-K: the last CTA of this column sums the partials and re-arms the counter ----------------------
    if (gridDim.y > 1)
        splitk_finish<M>(p, *reinterpret_cast<int*>(xsum_sm + (size_t)M * ncl * 2), row_cta0, p.passes * rows_pp,
                         nthreads, xbf);
}

template <int M, typename S, int kMode>
cudaError_t launch_typed(const Params& prm, const pyquant_gemv_plan& plan, cudaStream_t stream) {
    auto kernel = packed_gemv_kernel<M, S, kMode>;
    if (plan.smem_bytes > 48 * 1024) {  // opt in to more than the default 48 KiB of dynamic shared memory
        const cudaError_t err =
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)plan.smem_bytes);
        if (err != cudaSuccess) return err;
    }
    const dim3 grid((unsigned)plan.grid_x, (unsigned)plan.splits);
    PYQUANT_LAUNCH(kernel, grid, plan.threads, plan.smem_bytes, stream, prm);
    return cudaGetLastError();
}

template <int M, typename S>
cudaError_t dispatch_mode(int mode, const Params& prm, const pyquant_gemv_plan& plan, cudaStream_t s) {
    switch (mode) {
        case kPerChannel:
            return launch_typed<M, S, kPerChannel>(prm, plan, s);
        case kChunkScale:
            return launch_typed<M, S, kChunkScale>(prm, plan, s);
        default:
            return launch_typed<M, S, kSubScale>(prm, plan, s);
    }
}

template <int M>
cudaError_t dispatch_scale(int scale_dtype, int mode, const Params& prm, const pyquant_gemv_plan& plan,
                           cudaStream_t s) {
#if defined(PYQUANT_GEMV_ONLY_M) || defined(PYQUANT_GEMV_MMA_ONLY)
    // development / static-analysis builds: instantiate one M only (or only the tensor-core kernel: compile time);
    // the calls left out are refused
    if constexpr (M != PYQUANT_GEMV_ONLY_M || PYQUANT_GEMV_MMA_ONLY) {
        return cudaErrorInvalidValue;
    } else
#endif
    switch (scale_dtype) {
        case PYQUANT_DTYPE_FLOAT16:
            return dispatch_mode<M, __half>(mode, prm, plan, s);
        case PYQUANT_DTYPE_BFLOAT16:
            return dispatch_mode<M, __nv_bfloat16>(mode, prm, plan, s);
        case PYQUANT_DTYPE_FLOAT32:
            return dispatch_mode<M, float>(mode, prm, plan, s);
        default:
            return cudaErrorInvalidValue;
    }
}


// ===============================================================================================================
// Tensor-core decode kernel: mma.sync m16n8k16 (fp16 x fp16 -> fp32), weights dequantized by ONE LOP3 per pair
// ===============================================================================================================
// Why: the fp16 kernel above spends LOP3 + HFMA2 (dequant) + M HFMA2 (products) per pair of weights, >= 1.5
// instructions per weight at M = 1 before any overhead.  Here the tensor core does the products AND the sum over
// K, and the dequantization is the LOP3 alone: per 8 weights of a thread, 4 LOP3 + 1 HMMA (+ 1/16 SHF, 1/64 LDG).
//
// Dequantization without a subtraction.  v = (w & (0x00030003 << 2pp)) | 0x64006400 is the fp16 pair
// (1024 + 4^pp c_lo, 1024 + 4^pp c_hi) exactly (see "Inner loop" above); it goes into the A fragment as is.  x is
// staged as b = x * 2^e * 4^-pp (fp16, exact: a power-of-two scaling of a bf16/fp16 value), so the tensor core
// computes  sum v * b = sum c * x' + beta,  beta = 1024 * sum b  (x' = x * 2^e), with exact fp16 x fp16 products
// and fp32 accumulation.  beta does not depend on the weight row: it is computed ONCE per CTA while staging x
// (together with z0 * sum x' for a constant code offset z0 -- any float, it never has to be exact in fp16) and
// enters as the accumulator's initial value -beta, so the MMA's output is already sum (c - z0) * x'.  Cost of the
// trick: the accumulation carries the 1024 * b terms, ~340x the signal on average over the 8 positions, so the
// fp32 accumulation error is ~2^-24 * 340 * sum |x'| per step (~2^-15.6 relative to sum |x|, far below the fp16
// kernel's 17 * 2^-11 * sum |x| |c - z|; tests/test_cuda_ext.py bounds it).
//
// Fragments (PTX ISA, mma.m16n8k16 .f16): lane = 4 * gid + tig.  A (16 x 16, row): reg 0 = (row gid, k 2tig,
// 2tig + 1), reg 1 = (row gid + 8, same k), reg 2 = (row gid, k 2tig + 8, 2tig + 9), reg 3 = (row gid + 8, those k);
// B (16 x 8, col): reg 0 = (k 2tig, 2tig + 1; col gid), reg 1 = (k 2tig + 8, 2tig + 9; col gid); C/D (16 x 8 f32):
// d0, d1 = (row gid, col 2tig, 2tig + 1), d2, d3 = (row gid + 8, same cols).  The lower half of a .b32 is the
// lower k.  A lane's A values come from ITS OWN 16-byte weight loads: reg 0 = position p of word q of its row-gid
// vector, reg 1 = the same of its row-(gid + 8) vector, reg 2 / 3 = position p + 1 (8 positions x 4 words = 16
// MMAs per chunk of 64 weights); the k each slot stands for is whatever that position holds, and B is staged to
// match (staged word 8q + p = (b[16q + p], b[16q + p + 8])).
//
// Several weight rows per MMA ("t-groups").  An M = 1 product would use 1 of B's 8 columns.  Instead the 4 tig
// lanes of a row group are split into TG t-groups of TS = 4 / TG lanes, each with ITS OWN weight rows, and B's
// columns into TG blocks of CW = 8 / TG x rows: B is nonzero only where column block == the k-slot's t-group, so
// D's column block tg holds exactly t-group tg's rows.  M <= 2: TG = 4 (64 weight rows per MMA, one chunk per
// step); M = 3..8: TG = 2 (32 rows, two chunks per step; M = 5..8 issue two MMAs per A fragment, one per 4 x rows,
// MH = 2).  A lane's D elements are always its own rows: no cross-lane reduction at all, K stays in the MMAs.
// B's zero entries are read from a zeroed block of shared memory (per-lane base address, chosen once).
//
// Work decomposition: 4 warps (the fewest that keep 4 schedulers busy) x R = 2 row fragments per warp = 512 rows
// per CTA (TG = 4) or 256 (TG = 2); a CTA owns `iters` steps (TS chunks each) of K, and the plan splits K so that
// the grid is about one wave of 132 SMs (fused split-K reduction, shared with the kernel above).  x of the slice
// is staged once per CTA (per step and x row: scale 2^e, -beta, sum x) and serves all 512 (256) rows.  Weights and
// grouped scales of step j + 1 are loaded before step j is computed (two register buffers, loop unrolled by two).
// Scales: per-channel once in the epilogue; grouped once per step (group_size must be a multiple of 64 * TS, so a
// step never straddles two groups; other group sizes take the fp16 kernel above).  Zero-point tensors: s * z *
// sum x once per step (grouped) or in the epilogue (per-channel), sum x computed while staging.
//
// Counted (pyquant bench static, sm_90a, nvcc 13.0, every loop with its real trips; predicted, not measured), the
// two large shapes 4096x14336 / 14336x4096: M = 1 1.19-1.41 SASS instructions per weight (main loop ~0.94: 0.5 LOP3
// + 0.125 HMMA + 0.06 SHF + addressing), 6.2-6.9x cuBLAS bf16, memory-bound; M = 4 1.54-1.76, 5.6-6.1x; M = 8
// 2.3-2.6, 4.9-5.3x (bound by x re-read per CTA column and the split-K partials, counted as global bytes).
//
// Status: the fragment layout is inline PTX that only a GPU can confirm; the host emulation runs this kernel body
// with an MMA that follows the documented layout (rounding once per MMA), so indexing, staging and the epilogue are
// tested here, the layout itself only by the GPU tests.  Opt-in (PYQUANT_CUDA_GEMV=mma) until a GPU run passes.

constexpr int kMmaThreads = 128;
constexpr int kMmaSms = 132;  // the plan sizes the grid for one wave on an H100/H200

template <int M>
struct MmaCfg {
    static_assert(M >= 1 && M <= PYQUANT_GEMV_MAX_M, "M must be in 1..8");
    static constexpr int TG = M <= 2 ? 4 : 2;      // t-groups: independent weight-row sets per MMA
    static constexpr int TS = 4 / TG;              // lanes of a t-group along K = chunks per step
    static constexpr int CW = 8 / TG;              // B columns (x rows) per t-group
    static constexpr int MH = (M + CW - 1) / CW;   // MMAs per A fragment (x rows in blocks of CW)
    static constexpr int MP = MH * CW;             // x rows of the per-step metadata, padded
    static constexpr int R = 2;                    // row fragments (16 * TG rows each) per warp
    static constexpr int ROWS_W = 16 * TG * R;     // rows per warp
};
__host__ __device__ inline int mma_tg(int M) { return M <= 2 ? 4 : 2; }
__host__ __device__ inline int mma_mp(int M) {
    const int cw = 8 / mma_tg(M);
    return (M + cw - 1) / cw * cw;
}
// shared memory: staged x [M][chunks][36 words], a zero block (36 words), 32 bytes of staging scratch per thread,
// metadata [3][steps][MP] floats and the split-K flag (16 bytes)
__host__ __device__ inline size_t mma_smem_bytes(int M, int steps) {
    const int chunks = steps * (4 / mma_tg(M));
    return (size_t)M * chunks * kChunkWords * 4 + kChunkWords * 4 + (size_t)3 * steps * mma_mp(M) * 4 + 16 +
           (size_t)kMmaThreads * 32;
}

// d = a * b + c on one m16n8k16 tile; every lane of the warp calls it with its own fragments.
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1,
                                          const float (&c)[4]) {
#if defined(__CUDA_ARCH__)
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%10, %11, %12, %13};"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1), "f"(c[0]), "f"(c[1]), "f"(c[2]),
          "f"(c[3]));
#elif defined(PYQUANT_HOST_EMULATION)
    // the documented fragment layout, products exact and the 16 products + c summed in double, rounded once
    uint32_t mine[10] = {a[0], a[1], a[2], a[3], b0, b1, f32_bits(c[0]), f32_bits(c[1]), f32_bits(c[2]),
                         f32_bits(c[3])};
    uint32_t all[32 * 10];
    ::pyquant_emu::warp_allgather(mine, 10, all);
    const int lane = threadIdx.x & 31, gid = lane >> 2, tig = lane & 3;
    auto half_of = [&](int ln, int reg, int hi) {
        return host_f16_value((uint16_t)(all[ln * 10 + reg] >> (16 * hi)));
    };
    for (int i = 0; i < 4; ++i) {
        const int row = gid + 8 * (i >> 1), col = 2 * tig + (i & 1);
        double acc = (double)c[i];
        for (int k = 0; k < 16; ++k) {
            const int tk = (k & 7) >> 1;
            const double av = half_of((row & 7) * 4 + tk, (row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0), k & 1);
            const double bv = half_of(col * 4 + tk, 4 + (k >= 8 ? 1 : 0), k & 1);
            acc += av * bv;
        }
        d[i] = (float)acc;
    }
#endif
}

// LOP3 dequantization of position p (a compile-time constant once the caller's loops are unrolled)
__host__ __device__ __forceinline__ uint32_t deq_pos(int p, uint32_t w, uint32_t w10, uint32_t magic) {
    switch (p) {
        case 0: return lop3_and_or<deq_mask(0)>(w, magic);
        case 1: return lop3_and_or<deq_mask(1)>(w, magic);
        case 2: return lop3_and_or<deq_mask(2)>(w, magic);
        case 3: return lop3_and_or<deq_mask(3)>(w, magic);
        case 4: return lop3_and_or<deq_mask(4)>(w, magic);
        case 5: return lop3_and_or<deq_mask(5)>(w10, magic);
        case 6: return lop3_and_or<deq_mask(6)>(w10, magic);
        default: return lop3_and_or<deq_mask(7)>(w10, magic);
    }
}

// 4^-pp for position p as a float (exact)
__host__ __device__ __forceinline__ float pos_factor(int p) { return bits_f32((uint32_t)(127 - 2 * deq_pp(p)) << 23); }

template <int R>
struct MmaTrip {
    uint4 w[R][2];  // row slots gid and gid + 8 of each fragment
    float s[R][2];  // grouped scales of the step
    float z[R][2];  // grouped zero points of the step (zero tensor)
};

// scale modes of the tensor-core kernel (one instantiation each)
enum MmaMode {
    kMmaPerChannel = 0,   // s (and z) once per row in the epilogue
    kMmaGrouped = 1,      // grouped scales, constant code offset (folded into beta)
    kMmaGroupedZero = 2,  // grouped scales and zero points: s * z * sum x per step
};

template <int M, typename S, int kMode>
__global__ void __launch_bounds__(kMmaThreads)
packed_gemv_mma_kernel(const Params p) {
    using Cf = MmaCfg<M>;
    constexpr bool kGrouped = kMode != kMmaPerChannel;
    constexpr int TG = Cf::TG, TS = Cf::TS, CW = Cf::CW, MH = Cf::MH, MP = Cf::MP, R = Cf::R;
    const bool xbf = p.x_bf16 != 0;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int gid = lane >> 2, tig = lane & 3;
    const int tg = tig / TS, ts = tig % TS;
    const int steps = p.iters;     // steps (TS chunks each) in this CTA's K slice
    const int ncl = steps * TS;    // chunks in the slice
    const int c0 = blockIdx.y * ncl;
    const int k0 = c0 * kChunk;
    const bool has_zero = p.zero != nullptr;
    const float z0 = has_zero ? 0.f : p.code_offset;  // folded into beta: any float
    const S* scale = static_cast<const S*>(p.scale);
    const S* zero = static_cast<const S*>(p.zero);

    PYQUANT_DYNAMIC_SMEM(smem_raw);
    uint32_t* xs_sm = reinterpret_cast<uint32_t*>(smem_raw);                  // [M][ncl][kChunkWords]
    // every region starts 16-byte aligned where it is read with 16-byte (or 8-byte) accesses
    uint32_t* zero_sm = xs_sm + (size_t)M * ncl * kChunkWords;                 // [kChunkWords] zeros
    uint32_t* scratch_sm = zero_sm + kChunkWords;                              // [threads][8] x tails
    float* nbeta_sm = reinterpret_cast<float*>(scratch_sm + kMmaThreads * 8);  // [steps][MP] -beta (x' units)
    float* inv_sm = nbeta_sm + (size_t)steps * MP;                             // [steps][MP] 2^-e
    float* xsum_sm = inv_sm + (size_t)steps * MP;                              // [steps][MP] sum x (unscaled)

    // ---- 1. stage x[:, slice]: one thread per 16 k (word group q of a chunk), 4 * TS threads per step ---------
    {
        const int per_m = ncl * 4;
        const int items = M * per_m;
        for (int u0 = 0; u0 < items; u0 += kMmaThreads) {
            const int u = u0 + (int)threadIdx.x;
            const bool ok = u < items;
            const int uu = ok ? u : items - 1;  // lanes past the end duplicate the last item (all lanes shuffle)
            const int m = uu / per_m;
            const int rem = uu - m * per_m;
            const int ch = rem >> 2, q = rem & 3;
            const int k = k0 + ch * kChunk + q * 16;
            const uint16_t* xr = static_cast<const uint16_t*>(p.x) + (size_t)m * p.K + k;
            // two 16-byte loads: from x, or (a K tail, a misaligned row, chunks past K) from this thread's
            // scratch, filled by a short loop that nvcc keeps rolled (it runs for tails only)
            const uint4* src = reinterpret_cast<const uint4*>(xr);
            if (!(k + 16 <= p.K && (reinterpret_cast<uintptr_t>(xr) & 15) == 0)) {
                uint16_t* mine = reinterpret_cast<uint16_t*>(scratch_sm + threadIdx.x * 8);
                PYQUANT_CHECK_ALIGN(mine, 16);
                reinterpret_cast<uint4*>(mine)[0] = make_uint4(0u, 0u, 0u, 0u);
                reinterpret_cast<uint4*>(mine)[1] = make_uint4(0u, 0u, 0u, 0u);
                const int nv = min(max(p.K - k, 0), 16);
#pragma unroll 1
                for (int i = 0; i < nv; ++i) mine[i] = xr[i];
                src = reinterpret_cast<const uint4*>(mine);
            }
            float v[16];
            {
                const uint4 a = src[0], b = src[1];
                const uint32_t wa[4] = {a.x, a.y, a.z, a.w}, wb[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    v[2 * i] = act_to_float((uint16_t)wa[i], xbf);
                    v[2 * i + 1] = act_to_float((uint16_t)(wa[i] >> 16), xbf);
                    v[2 * i + 8] = act_to_float((uint16_t)wb[i], xbf);
                    v[2 * i + 9] = act_to_float((uint16_t)(wb[i] >> 16), xbf);
                }
            }
            float amax = 0.f, xsum = 0.f;
#pragma unroll
            for (int i = 0; i < 16; ++i) {
                amax = fmaxf(amax, fabsf(v[i]));
                xsum += v[i];
            }
#pragma unroll
            for (int off = 1; off < 4 * TS; off <<= 1)  // the step's 4 * TS word groups (aligned lanes)
                amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
            float sc, inv;
            x_scale_for<14>(amax, &sc, &inv);
            uint32_t pr[8];
            float beta = 0.f;
#pragma unroll
            for (int pp = 0; pp < 8; ++pp) {
                const float f = sc * pos_factor(pp);
                pr[pp] = pack_f16x2(v[pp] * f, v[pp + 8] * f);
                beta = fmaf(v[pp] + v[pp + 8], fmaf(1024.f, pos_factor(pp), z0), beta);
            }
            beta *= sc;  // after the sum: sc * 1024 overflows for an all-zero step (sc = 2^126)
#pragma unroll
            for (int off = 1; off < 4 * TS; off <<= 1) {
                beta += __shfl_xor_sync(0xffffffffu, beta, off);
                xsum += __shfl_xor_sync(0xffffffffu, xsum, off);
            }
            if (ok) {
                uint4* dst = reinterpret_cast<uint4*>(xs_sm + ((size_t)m * ncl + ch) * kChunkWords + q * 8);
                PYQUANT_CHECK_ALIGN(dst, 16);
                dst[0] = make_uint4(pr[0], pr[1], pr[2], pr[3]);
                dst[1] = make_uint4(pr[4], pr[5], pr[6], pr[7]);
                if ((rem & (4 * TS - 1)) == 0) {
                    const int i = (ch / TS) * MP + m;
                    nbeta_sm[i] = -beta;
                    inv_sm[i] = inv;
                    xsum_sm[i] = xsum;
                }
            }
        }
        for (int i = threadIdx.x; i < kChunkWords; i += kMmaThreads) zero_sm[i] = 0u;
        if constexpr (MP > M) {  // padded x rows: contribute nothing
            constexpr int kPad = MP > M ? MP - M : 1;
            for (int i = threadIdx.x; i < steps * kPad; i += kMmaThreads) {
                const int j = (i / kPad) * MP + M + i % kPad;
                nbeta_sm[j] = 0.f;
                inv_sm[j] = 0.f;
                xsum_sm[j] = 0.f;
            }
        }
    }
    __syncthreads();

    // ---- 2. per-lane addresses -------------------------------------------------------------------------------------
    const uint32_t magic = kMagic;  // a register: the LOP3 takes the mask as its immediate
    // B: this lane carries column gid = x row h * CW + gid % CW for k-slots of t-group tg, if gid is in tg's block
    const uint32_t* bptr[MH];
    int bstep[MH];
#pragma unroll
    for (int h = 0; h < MH; ++h) {
        const int mb = h * CW + gid - tg * CW;
        const bool live = gid / CW == tg && mb < M;
        bptr[h] = live ? xs_sm + ((size_t)mb * ncl + ts) * kChunkWords : zero_sm;
        bstep[h] = live ? TS * kChunkWords : 0;
    }
    const int mcol = (2 * tig) % CW;  // x row (within a block of CW) of this lane's D columns 2 tig, 2 tig + 1
    const size_t row_bytes = (size_t)p.n_chunks * 16;
    const int row_w0 = (blockIdx.x * 4 + warp) * Cf::ROWS_W;
    int rows[R][2];
    const uint8_t* wptr[R][2];
#pragma unroll
    for (int f = 0; f < R; ++f)
#pragma unroll
        for (int sl = 0; sl < 2; ++sl) {
            rows[f][sl] = row_w0 + f * 16 * TG + tg * 16 + gid + 8 * sl;
            const int n = min(rows[f][sl], p.N - 1);  // rows past N read row N - 1 and are never stored
            wptr[f][sl] = p.qweight + (size_t)n * row_bytes + (size_t)(c0 + ts) * 16;
        }

    // weights of step j: chunks past the row (the last split's tail) are not loaded -- their staged x is 0, so
    // whatever codes the buffer holds add exactly 0 (LOP3 outputs are finite for any bits)
    const int jvalid = p.n_chunks > c0 + ts ? (p.n_chunks - c0 - ts + TS - 1) / TS : 0;
    // grouped scales: a step never straddles two groups; count steps instead of dividing k by group_size
    const S* sptr[R][2];
    const S* zptr[R][2];
    const int spg = kGrouped ? p.group_size / (kChunk * TS) : 1;  // steps per group
    int lgrp = kGrouped ? (c0 * kChunk) / p.group_size : 0;       // group of the next step loaded
    int lleft = kGrouped ? spg - ((c0 * kChunk) % p.group_size) / (kChunk * TS) : 1;
#pragma unroll
    for (int f = 0; f < R; ++f)
#pragma unroll
        for (int sl = 0; sl < 2; ++sl) {
            const size_t i = (size_t)min(rows[f][sl], p.N - 1) * p.n_groups;
            sptr[f][sl] = scale + i;
            zptr[f][sl] = (kMode == kMmaGroupedZero ? zero : scale) + i;
        }
    auto load_step = [&](MmaTrip<R>& t, int j) {
        if (j < jvalid) {
            const size_t off = (size_t)j * (TS * 16);
#pragma unroll
            for (int f = 0; f < R; ++f)
#pragma unroll
                for (int sl = 0; sl < 2; ++sl) t.w[f][sl] = load_weights(wptr[f][sl] + off);
        }
        if (kGrouped) {
            const int grp = min(lgrp, p.n_groups - 1);
            if (--lleft == 0) {
                ++lgrp;
                lleft = spg;
            }
#pragma unroll
            for (int f = 0; f < R; ++f)
#pragma unroll
                for (int sl = 0; sl < 2; ++sl) {
                    t.s[f][sl] = to_float(sptr[f][sl][grp]);
                    t.z[f][sl] = kMode == kMmaGroupedZero ? to_float(zptr[f][sl][grp]) : 0.f;
                }
        }
    };

    float acc[R][MH][4];
    float xt[MH][2];  // per-channel with a zero tensor: sum x of the slice for this lane's two x rows
#pragma unroll
    for (int h = 0; h < MH; ++h) {
        xt[h][0] = xt[h][1] = 0.f;
#pragma unroll
        for (int f = 0; f < R; ++f)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[f][h][e] = 0.f;
    }

    auto compute_step = [&](const MmaTrip<R>& t, int j) {
        uint32_t xb[MH][32];  // this lane's B fragments of the step's 16 MMAs
        float nb[MH][2], iv[MH][2], xm[MH][2];
#pragma unroll
        for (int h = 0; h < MH; ++h) {
            const uint4* src = reinterpret_cast<const uint4*>(bptr[h] + j * bstep[h]);
            PYQUANT_CHECK_ALIGN(src, 16);
#pragma unroll
            for (int i = 0; i < 8; ++i) {
                const uint4 v = src[i];
                xb[h][4 * i] = v.x; xb[h][4 * i + 1] = v.y; xb[h][4 * i + 2] = v.z; xb[h][4 * i + 3] = v.w;
            }
            const int mi = j * MP + h * CW + mcol;
            PYQUANT_CHECK_ALIGN(nbeta_sm + mi, 8);
            PYQUANT_CHECK_ALIGN(inv_sm + mi, 8);
            PYQUANT_CHECK_ALIGN(xsum_sm + mi, 8);
            const float2 b2 = *reinterpret_cast<const float2*>(nbeta_sm + mi);
            const float2 i2 = *reinterpret_cast<const float2*>(inv_sm + mi);
            nb[h][0] = b2.x; nb[h][1] = b2.y;
            iv[h][0] = i2.x; iv[h][1] = i2.y;
            xm[h][0] = xm[h][1] = 0.f;
            if (kMode == kMmaGroupedZero || (kMode == kMmaPerChannel && has_zero)) {
                const float2 x2 = *reinterpret_cast<const float2*>(xsum_sm + mi);
                xm[h][0] = x2.x; xm[h][1] = x2.y;
                if (!kGrouped) { xt[h][0] += x2.x; xt[h][1] += x2.y; }
            }
        }
#pragma unroll
        for (int f = 0; f < R; ++f) {
            const uint32_t wa[4] = {t.w[f][0].x, t.w[f][0].y, t.w[f][0].z, t.w[f][0].w};
            const uint32_t wb[4] = {t.w[f][1].x, t.w[f][1].y, t.w[f][1].z, t.w[f][1].w};
            float d[MH][4], c_init[MH][4];  // the first MMA of the step starts from -beta
#pragma unroll
            for (int h = 0; h < MH; ++h) {
                c_init[h][0] = nb[h][0]; c_init[h][1] = nb[h][1]; c_init[h][2] = nb[h][0]; c_init[h][3] = nb[h][1];
            }
#pragma unroll
            for (int qw = 0; qw < 4; ++qw) {
                const uint32_t wa10 = wa[qw] >> 10, wb10 = wb[qw] >> 10;
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const int p0 = 2 * i, p1 = 2 * i + 1;
                    const uint32_t a[4] = {deq_pos(p0, wa[qw], wa10, magic), deq_pos(p0, wb[qw], wb10, magic),
                                           deq_pos(p1, wa[qw], wa10, magic), deq_pos(p1, wb[qw], wb10, magic)};
                    const int mm = qw * 4 + i;
#pragma unroll
                    for (int h = 0; h < MH; ++h)
                        mma_16816(d[h], a, xb[h][2 * mm], xb[h][2 * mm + 1], mm == 0 ? c_init[h] : d[h]);
                }
            }
            // flush: acc += (sum (c - z0) x') * 2^-e (* s); a zero tensor subtracts s * z * sum x per step
#pragma unroll
            for (int h = 0; h < MH; ++h)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    if (kGrouped) {
                        const float s = t.s[f][e >> 1];
                        acc[f][h][e] = fmaf(d[h][e], iv[h][e & 1] * s, acc[f][h][e]);
                        if (kMode == kMmaGroupedZero)
                            acc[f][h][e] = fmaf(-s * t.z[f][e >> 1], xm[h][e & 1], acc[f][h][e]);
                    } else {
                        acc[f][h][e] = fmaf(d[h][e], iv[h][e & 1], acc[f][h][e]);
                    }
                }
        }
    };

    // ---- 3. main loop over the slice's steps, double-buffered (step j + 1 is loaded while step j is computed) -----
    {
        MmaTrip<R> ta{}, tb{};
        load_step(ta, 0);
        for (int j = 0; j < steps; j += 2) {
            if (j + 1 < steps) load_step(tb, j + 1);
            compute_step(ta, j);
            if (j + 1 >= steps) break;
            if (j + 2 < steps) load_step(ta, j + 2);
            compute_step(tb, j + 1);
        }
    }

    // ---- 4. epilogue: per-channel scale (and zero point), store y or the split-K partial -------------------------
#pragma unroll
    for (int f = 0; f < R; ++f)
#pragma unroll
        for (int h = 0; h < MH; ++h)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int n = rows[f][e >> 1];
                const int m = h * CW + mcol + (e & 1);
                if (m >= M || n >= p.N) continue;
                float v = acc[f][h][e];
                if (!kGrouped) {
                    const float s = to_float(scale[n]);
                    v = has_zero ? fmaf(-s * to_float(zero[n]), xt[h][e & 1], s * v) : s * v;
                }
                if (gridDim.y == 1) {
                    if (p.bias != nullptr) v += load_act(p.bias, n, xbf);
                    store_act(p.y, (size_t)m * p.N + n, v, xbf);
                } else {
                    p.partial[((size_t)blockIdx.y * M + m) * p.N + n] = v;
                }
            }
    if (gridDim.y > 1)
        splitk_finish<M>(p, *reinterpret_cast<int*>(xsum_sm + (size_t)steps * MP), blockIdx.x * 4 * Cf::ROWS_W,
                         4 * Cf::ROWS_W, kMmaThreads, xbf);
}

template <int M, typename S, int kMode>
cudaError_t launch_mma_typed(const Params& prm, const pyquant_gemv_plan& plan, cudaStream_t stream) {
    auto kernel = packed_gemv_mma_kernel<M, S, kMode>;
    if (plan.smem_bytes > 48 * 1024) {
        const cudaError_t err =
            cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)plan.smem_bytes);
        if (err != cudaSuccess) return err;
    }
    const dim3 grid((unsigned)plan.grid_x, (unsigned)plan.splits);
    PYQUANT_LAUNCH(kernel, grid, plan.threads, plan.smem_bytes, stream, prm);
#ifdef PYQUANT_HOST_EMULATION
    if (::pyquant_emu::g_misaligned.exchange(0)) return cudaErrorMisalignedAddress;
#endif
    return cudaGetLastError();
}

template <int M, typename S>
cudaError_t dispatch_mma_mode(int mode, const Params& prm, const pyquant_gemv_plan& plan, cudaStream_t s) {
    switch (mode) {
        case kMmaPerChannel:
            return launch_mma_typed<M, S, kMmaPerChannel>(prm, plan, s);
        case kMmaGrouped:
            return launch_mma_typed<M, S, kMmaGrouped>(prm, plan, s);
        default:
            return launch_mma_typed<M, S, kMmaGroupedZero>(prm, plan, s);
    }
}

template <int M>
cudaError_t dispatch_mma(int scale_dtype, int mode, const Params& prm, const pyquant_gemv_plan& plan,
                         cudaStream_t s) {
#if defined(PYQUANT_GEMV_ONLY_M) || defined(PYQUANT_GEMV_SIMT_ONLY)
    if constexpr (M != PYQUANT_GEMV_ONLY_M || PYQUANT_GEMV_SIMT_ONLY) {
        return cudaErrorInvalidValue;
    } else
#endif
    switch (scale_dtype) {
        case PYQUANT_DTYPE_FLOAT16:
            return dispatch_mma_mode<M, __half>(mode, prm, plan, s);
        case PYQUANT_DTYPE_BFLOAT16:
            return dispatch_mma_mode<M, __nv_bfloat16>(mode, prm, plan, s);
        case PYQUANT_DTYPE_FLOAT32:
            return dispatch_mma_mode<M, float>(mode, prm, plan, s);
        default:
            return cudaErrorInvalidValue;
    }
}

}  // namespace
}  // namespace pyquant

namespace {
// kernel parameters shared by both kernels' launchers (arguments already validated)
pyquant::Params make_params(const void* x, const uint8_t* qweight, const void* scale, const void* zero,
                            const void* bias, void* y, int N, int K, int group_size, float code_offset, int x_dtype,
                            void* workspace, const pyquant_gemv_plan& plan) {
    using namespace pyquant;
    Params prm;
    prm.qweight = qweight;
    prm.scale = scale;
    prm.zero = zero;
    prm.bias = bias;
    prm.x = x;
    prm.y = y;
    const int counter_words = (plan.grid_x + 3) / 4 * 4;
    prm.counters = static_cast<int*>(workspace);
    prm.partial = plan.splits > 1 ? reinterpret_cast<float*>(static_cast<int*>(workspace) + counter_words) : nullptr;
    prm.N = N;
    prm.K = K;
    prm.n_chunks = (K + kChunk - 1) / kChunk;
    prm.n_groups = K / group_size;
    prm.group_size = group_size;
    prm.group_shift = -1;  // k >> shift instead of k / group_size when group_size is a power of two
    if ((group_size & (group_size - 1)) == 0) {
        prm.group_shift = 0;
        while ((1 << prm.group_shift) < group_size) ++prm.group_shift;
    }
    prm.iters = plan.iters_per_split;
    prm.passes = plan.passes;
    prm.code_offset = code_offset;
    // fold z0 into the dequantization when it is an integer in [0, 3]: then -1024 * 4^-p - z0 is exact in fp16
    // (a half-integer z0 is not: -1025.5 has no fp16 representation; it takes the sum(x) path)
    prm.fold_zero = (zero == nullptr && code_offset >= 0.f && code_offset <= 3.f &&
                     code_offset == (float)(int)code_offset) ? 1 : 0;
    prm.x_bf16 = x_dtype == PYQUANT_DTYPE_BFLOAT16 ? 1 : 0;
    return prm;
}
}  // namespace

extern "C" int pyquant_packed_gemv_plan(int M, int N, int K, pyquant_gemv_plan* plan) {
    using namespace pyquant;
    if (plan == nullptr || M < 1 || M > PYQUANT_GEMV_MAX_M || N < 1 || K < 1) return (int)cudaErrorInvalidValue;
    const int R = rows_per_warp(M);
    const int n_chunks = (K + kChunk - 1) / kChunk;
    const int trips = (n_chunks + kLanesK - 1) / kLanesK;  // 2048-weight trips along K
    // 8 warps per CTA (staged x shared by 8 * R rows), unless even a full split cannot fill the GPU
    int threads = 256;
    if ((long long)((N + 8 * R - 1) / (8 * R)) * trips < kTargetCtas) threads = 128;
    const int rows_pp = threads / 32 * R;
    const int gx1 = (N + rows_pp - 1) / rows_pp;
    // as many row passes per CTA as still leave room to fill the GPU by splitting K: staging x is amortized over
    // passes * rows_pp rows, while split-K only costs S * M * N * 8 bytes of partials
    // (keeping >= 2 trips per split where K allows, so the in-CTA prefetch has a next trip)
    const int trips2 = trips >= 2 ? trips / 2 : 1;
    int passes = 1;
    for (int pp = kMaxPasses; pp > 1; --pp)
        if ((long long)((gx1 + pp - 1) / pp) * trips2 >= kTargetCtas) {
            passes = pp;
            break;
        }
    const int grid_x = (gx1 + passes - 1) / passes;
    // split K when the grid is short of CTAs, or when one CTA's x slice would not fit the shared-memory budget
    const int max_iters = (int)((kSmemBudget - 16) / (smem_bytes_for(M, kLanesK) - 16));
    int splits = (kTargetCtas + grid_x - 1) / grid_x;
    splits = splits < 1 ? 1 : (splits > trips ? trips : splits);
    int iters = (trips + splits - 1) / splits;
    if (iters > max_iters) iters = max_iters;
    splits = (trips + iters - 1) / iters;
    plan->threads = threads;
    plan->rows_per_warp = R;
    plan->passes = passes;
    plan->splits = splits;
    plan->grid_x = grid_x;
    plan->iters_per_split = iters;
    plan->smem_bytes = smem_bytes_for(M, iters * kLanesK);
    plan->workspace_bytes =
        splits > 1 ? (size_t)((grid_x + 3) / 4 * 4) * sizeof(int) + (size_t)splits * M * N * sizeof(float) : 0;
    return 0;
}

extern "C" int pyquant_packed_gemv_launch(const void* x, const uint8_t* qweight, const void* scale,
                                          const void* zero, const void* bias, void* y, int M, int N, int K,
                                          int group_size, float code_offset, int x_dtype, int scale_dtype,
                                          void* workspace, size_t workspace_bytes, void* stream) {
    using namespace pyquant;
    if (M < 0 || M > PYQUANT_GEMV_MAX_M || N < 0 || K <= 0 || group_size <= 0 || K % group_size != 0 ||
        (group_size % 32 != 0 && group_size != K))
        return (int)cudaErrorInvalidValue;
    if (x_dtype != PYQUANT_DTYPE_FLOAT16 && x_dtype != PYQUANT_DTYPE_BFLOAT16) return (int)cudaErrorInvalidValue;
    if (scale_dtype < PYQUANT_DTYPE_FLOAT16 || scale_dtype > PYQUANT_DTYPE_FLOAT32) return (int)cudaErrorInvalidValue;
    if (!(code_offset == code_offset) || code_offset > 1e30f || code_offset < -1e30f) return (int)cudaErrorInvalidValue;
    if (M == 0 || N == 0) return (int)cudaSuccess;
    if (x == nullptr || qweight == nullptr || scale == nullptr || y == nullptr) return (int)cudaErrorInvalidValue;
    if (reinterpret_cast<uintptr_t>(qweight) % 16 != 0) return (int)cudaErrorInvalidValue;  // uint4 loads

    pyquant_gemv_plan plan;
    if (pyquant_packed_gemv_plan(M, N, K, &plan) != 0) return (int)cudaErrorInvalidValue;
    return pyquant_packed_gemv_launch_plan(x, qweight, scale, zero, bias, y, M, N, K, group_size, code_offset, x_dtype,
                                           scale_dtype, workspace, workspace_bytes, stream, &plan);
}

extern "C" int pyquant_packed_gemv_launch_plan(const void* x, const uint8_t* qweight, const void* scale,
                                               const void* zero, const void* bias, void* y, int M, int N, int K,
                                               int group_size, float code_offset, int x_dtype, int scale_dtype,
                                               void* workspace, size_t workspace_bytes, void* stream,
                                               const pyquant_gemv_plan* plan_in) {
    using namespace pyquant;
    if (M < 1 || M > PYQUANT_GEMV_MAX_M || N < 1 || K <= 0 || group_size <= 0 || K % group_size != 0 ||
        (group_size % 32 != 0 && group_size != K) || plan_in == nullptr)
        return (int)cudaErrorInvalidValue;
    if (x_dtype != PYQUANT_DTYPE_FLOAT16 && x_dtype != PYQUANT_DTYPE_BFLOAT16) return (int)cudaErrorInvalidValue;
    if (x == nullptr || qweight == nullptr || scale == nullptr || y == nullptr) return (int)cudaErrorInvalidValue;
    if (reinterpret_cast<uintptr_t>(qweight) % 16 != 0) return (int)cudaErrorInvalidValue;
    const pyquant_gemv_plan plan = *plan_in;
    {  // a plan must cover every row and every trip exactly once, with the kernel's own R and shared memory
        const int trips = ((K + kChunk - 1) / kChunk + kLanesK - 1) / kLanesK;
        const long long rows = (long long)plan.grid_x * plan.passes * (plan.threads / 32) * plan.rows_per_warp;
        const bool ok = (plan.threads == 128 || plan.threads == 256) && plan.rows_per_warp == rows_per_warp(M) &&
                        plan.passes >= 1 && plan.passes <= 64 && plan.grid_x >= 1 && rows >= N &&
                        rows - (long long)plan.passes * (plan.threads / 32) * plan.rows_per_warp < N &&
                        plan.splits >= 1 && plan.iters_per_split >= 1 &&
                        (long long)plan.splits * plan.iters_per_split >= trips &&
                        (long long)(plan.splits - 1) * plan.iters_per_split < trips &&
                        plan.smem_bytes == smem_bytes_for(M, plan.iters_per_split * kLanesK) &&
                        plan.workspace_bytes == (plan.splits > 1 ? (size_t)((plan.grid_x + 3) / 4 * 4) * sizeof(int) +
                                                                       (size_t)plan.splits * M * N * sizeof(float)
                                                                 : 0);
        if (!ok) return (int)cudaErrorInvalidValue;
    }
    if (plan.workspace_bytes > 0 &&
        (workspace == nullptr || workspace_bytes < plan.workspace_bytes || reinterpret_cast<uintptr_t>(workspace) % 4))
        return (int)cudaErrorInvalidValue;

    const Params prm = make_params(x, qweight, scale, zero, bias, y, N, K, group_size, code_offset, x_dtype,
                                   workspace, plan);
    const int mode = prm.n_groups == 1                             ? kPerChannel
                     : (group_size % 64 == 0 && zero == nullptr) ? kChunkScale
                                                                 : kSubScale;

    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    cudaError_t err;
    switch (M) {
#define PYQUANT_CASE_M(MM)                                                   \
    case MM:                                                                 \
        err = dispatch_scale<MM>(scale_dtype, mode, prm, plan, s);   \
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

// ---- tensor-core kernel: plan and launch ------------------------------------------------------------------------
extern "C" int pyquant_packed_gemv_mma_plan(int M, int N, int K, int group_size, pyquant_gemv_plan* plan) {
    using namespace pyquant;
    if (plan == nullptr || M < 1 || M > PYQUANT_GEMV_MAX_M || N < 1 || K < 1 || group_size < 1 || K % group_size)
        return (int)cudaErrorInvalidValue;
    const int TG = mma_tg(M), TS = 4 / TG;
    if (K / group_size > 1 && group_size % (kChunk * TS) != 0) return -1;  // a step would straddle two groups
    const int rows_cta = 4 * 16 * TG * 2;  // 4 warps x R = 2 fragments x 16 * TG rows
    const int grid_x = (N + rows_cta - 1) / rows_cta;
    const int total = ((K + kChunk - 1) / kChunk + TS - 1) / TS;  // steps along K
    // one wave of CTAs, as even as K allows: minimise (CTAs on the busiest SM) x (steps per CTA + ~2 steps of
    // per-CTA staging / epilogue), counting a grid of fewer than half the SMs as bandwidth-short
    int best_s = 0, best_it = 0;
    double best = 0.0;
    const int s_max = (int)std::min<long long>(total, 8LL * kMmaSms / grid_x + 1);
    for (int s = 1; s <= s_max; ++s) {
        const int it = (total + s - 1) / s;
        if ((total + it - 1) / it != s || mma_smem_bytes(M, it) > kSmemBudget) continue;
        const long long ctas = (long long)grid_x * s;
        double cost = (double)((ctas + kMmaSms - 1) / kMmaSms) * (it + 2.0);
        if (ctas < kMmaSms / 2) cost *= (double)(kMmaSms / 2) / (double)ctas;
        if (best_s == 0 || cost < best) {
            best = cost;
            best_s = s;
            best_it = it;
        }
    }
    if (best_s == 0) {  // only when even the smallest slices exceed the budget's split count: split further
        best_it = 1;
        best_s = total;
    }
    plan->threads = kMmaThreads;
    plan->rows_per_warp = 16 * TG * 2;
    plan->passes = 1;
    plan->splits = best_s;
    plan->grid_x = grid_x;
    plan->iters_per_split = best_it;
    plan->smem_bytes = mma_smem_bytes(M, best_it);
    plan->workspace_bytes =
        best_s > 1 ? (size_t)((grid_x + 3) / 4 * 4) * sizeof(int) + (size_t)best_s * M * N * sizeof(float) : 0;
    return 0;
}

extern "C" int pyquant_packed_gemv_mma_launch_plan(const void* x, const uint8_t* qweight, const void* scale,
                                                   const void* zero, const void* bias, void* y, int M, int N, int K,
                                                   int group_size, float code_offset, int x_dtype, int scale_dtype,
                                                   void* workspace, size_t workspace_bytes, void* stream,
                                                   const pyquant_gemv_plan* plan_in) {
    using namespace pyquant;
    if (M < 1 || M > PYQUANT_GEMV_MAX_M || N < 1 || K <= 0 || group_size <= 0 || K % group_size != 0 ||
        plan_in == nullptr)
        return (int)cudaErrorInvalidValue;
    if (x_dtype != PYQUANT_DTYPE_FLOAT16 && x_dtype != PYQUANT_DTYPE_BFLOAT16) return (int)cudaErrorInvalidValue;
    if (scale_dtype < PYQUANT_DTYPE_FLOAT16 || scale_dtype > PYQUANT_DTYPE_FLOAT32) return (int)cudaErrorInvalidValue;
    if (!(code_offset == code_offset) || code_offset > 1e30f || code_offset < -1e30f) return (int)cudaErrorInvalidValue;
    if (x == nullptr || qweight == nullptr || scale == nullptr || y == nullptr) return (int)cudaErrorInvalidValue;
    if (reinterpret_cast<uintptr_t>(qweight) % 16 != 0) return (int)cudaErrorInvalidValue;
    const int TG = mma_tg(M), TS = 4 / TG;
    if (K / group_size > 1 && group_size % (kChunk * TS) != 0) return (int)cudaErrorInvalidValue;
    const pyquant_gemv_plan plan = *plan_in;
    {  // every row and every step covered exactly once, with the kernel's fixed CTA shape and shared memory
        const int total = ((K + kChunk - 1) / kChunk + TS - 1) / TS;
        const int rows_cta = 4 * 16 * TG * 2;
        const bool ok = plan.threads == kMmaThreads && plan.rows_per_warp == 16 * TG * 2 && plan.passes == 1 &&
                        plan.grid_x == (N + rows_cta - 1) / rows_cta && plan.splits >= 1 &&
                        plan.iters_per_split >= 1 && (long long)plan.splits * plan.iters_per_split >= total &&
                        (long long)(plan.splits - 1) * plan.iters_per_split < total &&
                        plan.smem_bytes == mma_smem_bytes(M, plan.iters_per_split) &&
                        plan.smem_bytes <= 227 * 1024 &&
                        plan.workspace_bytes == (plan.splits > 1 ? (size_t)((plan.grid_x + 3) / 4 * 4) * sizeof(int) +
                                                                       (size_t)plan.splits * M * N * sizeof(float)
                                                                 : 0);
        if (!ok) return (int)cudaErrorInvalidValue;
    }
    if (plan.workspace_bytes > 0 &&
        (workspace == nullptr || workspace_bytes < plan.workspace_bytes || reinterpret_cast<uintptr_t>(workspace) % 4))
        return (int)cudaErrorInvalidValue;
    const Params prm = make_params(x, qweight, scale, zero, bias, y, N, K, group_size, code_offset, x_dtype,
                                   workspace, plan);
    const int mode = prm.n_groups == 1 ? kMmaPerChannel : (zero == nullptr ? kMmaGrouped : kMmaGroupedZero);
    const cudaStream_t s = static_cast<cudaStream_t>(stream);
    cudaError_t err;
    switch (M) {
#define PYQUANT_CASE_M(MM)                                              \
    case MM:                                                            \
        err = dispatch_mma<MM>(scale_dtype, mode, prm, plan, s);        \
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

extern "C" int pyquant_packed_gemv_mma_launch(const void* x, const uint8_t* qweight, const void* scale,
                                              const void* zero, const void* bias, void* y, int M, int N, int K,
                                              int group_size, float code_offset, int x_dtype, int scale_dtype,
                                              void* workspace, size_t workspace_bytes, void* stream) {
    if (M == 0 || N == 0) return M < 0 || N < 0 ? 1 : 0;
    pyquant_gemv_plan plan;
    const int rc = pyquant_packed_gemv_mma_plan(M, N, K, group_size, &plan);
    if (rc != 0) return 1;  // bad arguments, or a group size this kernel declines (cudaErrorInvalidValue)
    return pyquant_packed_gemv_mma_launch_plan(x, qweight, scale, zero, bias, y, M, N, K, group_size, code_offset,
                                               x_dtype, scale_dtype, workspace, workspace_bytes, stream, &plan);
}
