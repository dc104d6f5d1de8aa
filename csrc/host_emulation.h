// host_emulation.h -- just enough of the CUDA execution model, on the host, to run packed_gemv.cu's kernel body
// with a host C++ compiler (g++ -x c++ -std=c++20 -DPYQUANT_HOST_EMULATION -shared -fPIC csrc/packed_gemv.cu).  Included by packed_gemv.cu only when
// PYQUANT_HOST_EMULATION is defined; never part of the real build.
//
// Why: there is no GPU on the development/CI machines, and the kernel's risk is in its indexing (tiles, lanes,
// chunk tails, sub-chunk groups, shared-memory layout, warp reduction).  Running the very same kernel code with
// every CUDA thread as a host thread (blocks one after another, __syncthreads as a block barrier, __shfl_xor_sync
// through a per-warp exchange buffer) checks all of that against the PyTorch reference.  It says nothing about
// speed, and nothing about the PTX-level details (the inline-asm load is replaced by memcpy).
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>

#define __launch_bounds__(...)

namespace pyquant_emu {

struct BlockState {
    explicit BlockState(int nthreads)
        : block_barrier(nthreads), nwarps((nthreads + 31) / 32), warp_slots(nwarps * 32, 0u),
          warp_words(nwarps * 32 * kMaxWords, 0u) {
        for (int w = 0; w < nwarps; ++w) warp_barriers.emplace_back(new std::barrier<>(32));
    }
    ~BlockState() {
        for (auto* b : warp_barriers) delete b;
    }
    std::barrier<> block_barrier;
    int nwarps;
    std::vector<std::barrier<>*> warp_barriers;
    std::vector<unsigned> warp_slots;  // one 32-bit exchange slot per thread
    static constexpr int kMaxWords = 16;
    std::vector<uint32_t> warp_words;  // kMaxWords exchange words per thread (warp_allgather)
};

inline thread_local BlockState* tls_block = nullptr;
inline thread_local uint3 tls_thread_idx;
inline thread_local uint3 tls_block_idx;
inline dim3 g_grid_dim, g_block_dim;  // of the launch being emulated
inline std::vector<float4> shared_buffer;  // the block's dynamic shared memory (blocks run one at a time)
// set when a vector access the GPU would fault on (misaligned) is seen; the launcher reports it
inline std::atomic<int> g_misaligned{0};

}  // namespace pyquant_emu

#define threadIdx (::pyquant_emu::tls_thread_idx)
#define blockIdx (::pyquant_emu::tls_block_idx)
#define gridDim (::pyquant_emu::g_grid_dim)
#define blockDim (::pyquant_emu::g_block_dim)

inline void __syncthreads() { pyquant_emu::tls_block->block_barrier.arrive_and_wait(); }

inline float __uint_as_float(unsigned u) {
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}
inline float __int_as_float(int i) {
    float f;
    memcpy(&f, &i, sizeof f);
    return f;
}
using std::max;
using std::min;

// Blocks run one after another, so device-wide ordering is trivially satisfied; the fence still orders this
// thread's writes, and the atomic is a real one (only thread 0 of a block calls it in the kernel).
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_SEQ_CST); }

// All 32 lanes must call it (as on the GPU with a full mask); the exchange goes through the warp's slots.
inline float __shfl_xor_sync(unsigned /*mask*/, float v, int lane_mask) {
    auto* b = pyquant_emu::tls_block;
    const int tid = (int)threadIdx.x;
    const int warp = tid / 32, lane = tid % 32;
    unsigned bits;
    memcpy(&bits, &v, sizeof bits);
    b->warp_slots[warp * 32 + lane] = bits;
    b->warp_barriers[warp]->arrive_and_wait();
    bits = b->warp_slots[warp * 32 + (lane ^ lane_mask)];
    b->warp_barriers[warp]->arrive_and_wait();
    float r;
    memcpy(&r, &bits, sizeof r);
    return r;
}

namespace pyquant_emu {
// All 32 lanes of the warp call it: each contributes n <= 16 words and receives every lane's words, lane-major
// (all[lane * n + i]).  What a warp-wide instruction such as mma.sync sees of its operands.
inline void warp_allgather(const uint32_t* mine, int n, uint32_t* all) {
    auto* b = tls_block;
    const int tid = (int)tls_thread_idx.x;
    const int warp = tid / 32, lane = tid % 32;
    uint32_t* slots = b->warp_words.data() + (size_t)warp * 32 * BlockState::kMaxWords;
    for (int i = 0; i < n; ++i) slots[lane * BlockState::kMaxWords + i] = mine[i];
    b->warp_barriers[warp]->arrive_and_wait();
    for (int l = 0; l < 32; ++l)
        for (int i = 0; i < n; ++i) all[l * n + i] = slots[l * BlockState::kMaxWords + i];
    b->warp_barriers[warp]->arrive_and_wait();
}
}  // namespace pyquant_emu

// a 16- or 8-byte vector access must be aligned to its size on the GPU (x86 would not care)
#define PYQUANT_CHECK_ALIGN(ptr, n) \
    ((reinterpret_cast<uintptr_t>(ptr) % (n)) ? (void)::pyquant_emu::g_misaligned.store(1) : (void)0)

// The kernel's dynamic shared memory is this buffer (poisoned with NaN before each block).
#define PYQUANT_DYNAMIC_SMEM(name) float4* name = ::pyquant_emu::shared_buffer.data()

// kernel<<<grid, block, smem, stream>>>(args...): run each block with `block` host threads, blocks in order
// (x fastest, then y).
#define PYQUANT_LAUNCH(kernel, grid, block, smem, stream, ...)                                                  \
    do {                                                                                                       \
        (void)(stream);                                                                                        \
        const dim3 emu_grid_(grid);                                                                            \
        const int emu_threads_ = (int)(block);                                                                 \
        ::pyquant_emu::g_grid_dim = emu_grid_;                                                                 \
        ::pyquant_emu::g_block_dim = dim3((unsigned)emu_threads_);                                             \
        for (unsigned emu_b_ = 0; emu_b_ < emu_grid_.x * emu_grid_.y; ++emu_b_) {                              \
            ::pyquant_emu::BlockState emu_state_(emu_threads_);                                                \
            ::pyquant_emu::shared_buffer.assign(((size_t)(smem) + 15) / 16 + 1,                                \
                                                make_float4(NAN, NAN, NAN, NAN)); /* poisoned per block */     \
            std::vector<std::thread> emu_pool_;                                                                \
            for (int emu_t_ = 0; emu_t_ < emu_threads_; ++emu_t_)                                              \
                emu_pool_.emplace_back([&, emu_t_] {                                                           \
                    ::pyquant_emu::tls_block = &emu_state_;                                                    \
                    ::pyquant_emu::tls_thread_idx = make_uint3((unsigned)emu_t_, 0u, 0u);                      \
                    ::pyquant_emu::tls_block_idx = make_uint3(emu_b_ % emu_grid_.x, emu_b_ / emu_grid_.x, 0u); \
                    kernel(__VA_ARGS__);                                                                       \
                });                                                                                            \
            for (auto& th : emu_pool_) th.join();                                                              \
        }                                                                                                      \
    } while (0)

// no device, no attributes, no launch errors in emulation
#define cudaFuncSetAttribute(...) cudaSuccess
#define cudaGetLastError() cudaSuccess
