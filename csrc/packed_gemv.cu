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
// Known limits (not done yet): (1) the plan splits K until a CTA has only 1-2 trips, so the per-CTA staging
// (0.33-0.38 per weight at M = 1, ~3 at M = 4: the staging loop converts through fp32, ~20 instructions per x
// value) and epilogue are poorly amortized -- staging x with half2 ops and planning fewer, longer CTAs is the next
// step; (2) M = 5..8 use one row per warp (R = 2 spills at the 255-register limit), so x is re-read per row; a
// tensor-core (mma.sync) path would serve M = 4..16 better.
//
// Every bit trick is a __host__ __device__ helper with inline PTX on the device and a bit-exact host equivalent
// (#ifndef __CUDA_ARCH__), so csrc/host_emulation.h runs this very kernel body on the CPU (tests/test_cuda_ext.py).

#include "packed_gemv.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <stddef.h>
#include <stdint.h>

#ifdef PYQUANT_HOST_EMULATION
#include "host_emulation.h"
#else
#define PYQUANT_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define PYQUANT_DYNAMIC_SMEM(name) extern __shared__ uint4 name[]
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
__host__ __device__ __forceinline__ void x_scale_for(float amax, float* scale, float* inv) {
    const int E = (int)((f32_bits(amax) >> 23) & 0xffu);
    const int es = min(262 - E, 253);  // biased exponent of 2^e = 2^(135 - E)
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
    if (gridDim.y > 1) {
        int& is_last = *reinterpret_cast<int*>(xsum_sm + (size_t)M * ncl * 2);
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
            const int rows = p.passes * rows_pp;
            for (int idx = threadIdx.x; idx < M * rows; idx += nthreads) {
                const int m = idx / rows;
                const int n = row_cta0 + (idx - m * rows);
                if (n >= p.N) continue;
                float v = 0.f;
                for (int s = 0; s < (int)gridDim.y; ++s) v += load_partial(p.partial + ((size_t)s * M + m) * p.N + n);
                if (p.bias != nullptr) v += load_act(p.bias, n, xbf);
                store_act(p.y, (size_t)m * p.N + n, v, xbf);
            }
        }
    }
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
#if defined(PYQUANT_GEMV_ONLY_M)
    // development / static-analysis builds: instantiate one M only (compile time); other M are refused
    if constexpr (M != PYQUANT_GEMV_ONLY_M) {
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

}  // namespace
}  // namespace pyquant

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
