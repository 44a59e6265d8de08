// Host emulation of the CUDA subset batos kernels use: one OS thread per CUDA
// thread, blocks run one at a time, __syncthreads and warp shuffles via barriers.
#pragma once
#include <barrier>
#include <thread>
#include <vector>
#include <functional>
#include <cmath>
#include <cstring>
#include <atomic>
#include <memory>
#include <algorithm>

struct dim3e { unsigned x = 1, y = 1, z = 1; };
inline thread_local dim3e threadIdx, blockIdx;
inline dim3e blockDim, gridDim;
struct uint2 { unsigned x, y; };
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }

#define __global__
#define __device__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline void sincosf(float x, float* s, float* c) { *s = std::sin(x); *c = std::cos(x); }
#include <math.h>
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }

inline float emu_f16_to_f32(unsigned short h) { _Float16 v; std::memcpy(&v, &h, 2); return (float)v; }
inline unsigned short emu_f32_to_f16(float f) { _Float16 v = (_Float16)f; unsigned short h; std::memcpy(&h, &v, 2); return h; }

// Block state.
struct EmuBlock {
    std::unique_ptr<std::barrier<>> block_bar;
    std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
    std::vector<float> fslots;      // per-thread shuffle slots
    std::vector<unsigned> uslots;
    std::vector<unsigned> mma_slots; // 32 lanes * 6 regs per warp
    std::vector<float> dyn_smem;
};
inline EmuBlock* g_blk;
inline void __syncthreads() { g_blk->block_bar->arrive_and_wait(); }
inline int emu_tid() { return threadIdx.x; }
inline std::barrier<>& emu_warp_bar() { return *g_blk->warp_bar[threadIdx.x / 32]; }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp_bar().arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int o) {
    int t = threadIdx.x; g_blk->fslots[t] = v; emu_warp_bar().arrive_and_wait();
    int p = (t & ~31) | ((t & 31) ^ o); float r = g_blk->fslots[p]; emu_warp_bar().arrive_and_wait(); return r;
}
inline unsigned __shfl_xor_sync(unsigned, unsigned v, int o) {
    int t = threadIdx.x; g_blk->uslots[t] = v; emu_warp_bar().arrive_and_wait();
    int p = (t & ~31) | ((t & 31) ^ o); unsigned r = g_blk->uslots[p]; emu_warp_bar().arrive_and_wait(); return r;
}
inline float __shfl_sync(unsigned, float v, int src) {
    int t = threadIdx.x; g_blk->fslots[t] = v; emu_warp_bar().arrive_and_wait();
    float r = g_blk->fslots[(t & ~31) | (src & 31)]; emu_warp_bar().arrive_and_wait(); return r;
}
inline unsigned __shfl_sync(unsigned, unsigned v, int src) {
    int t = threadIdx.x; g_blk->uslots[t] = v; emu_warp_bar().arrive_and_wait();
    unsigned r = g_blk->uslots[(t & ~31) | (src & 31)]; emu_warp_bar().arrive_and_wait(); return r;
}
inline unsigned atomicAdd(unsigned* p, unsigned v) { return std::atomic_ref<unsigned>(*p).fetch_add(v); }
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
// fma.rn.f16x2: exact a*b+c in double (exact for the operands the kernels use), one rounding to f16.
inline unsigned emu_h2_fma(unsigned a, unsigned b, unsigned c) {
    auto h = [](unsigned x, int i) { return (double)emu_f16_to_f32((unsigned short)(x >> (16 * i))); };
    unsigned r = 0;
    for (int i = 0; i < 2; ++i) {
        _Float16 v = (_Float16)(h(a, i) * h(b, i) + h(c, i));
        unsigned short bits; std::memcpy(&bits, &v, 2);
        r |= (unsigned)bits << (16 * i);
    }
    return r;
}
inline unsigned atomicMin(unsigned* p, unsigned v) {
    std::atomic_ref<unsigned> a(*p); unsigned old = a.load();
    while (v < old && !a.compare_exchange_weak(old, v)) {}
    return old;
}
inline float* emu_dyn_smem() { return g_blk->dyn_smem.data(); }

// mma.sync.m16n8k16 row.col f32 += f16*f16, per the PTX ISA fragment layouts.
inline void emu_mma_16816(float* c, unsigned a0, unsigned a1, unsigned a2, unsigned a3, unsigned b0, unsigned b1) {
    int t = threadIdx.x, lane = t & 31, wbase = (t & ~31);
    unsigned* s = g_blk->mma_slots.data();
    unsigned regs[6] = {a0, a1, a2, a3, b0, b1};
    for (int i = 0; i < 6; ++i) s[(wbase + lane) * 6 + i] = regs[i];
    emu_warp_bar().arrive_and_wait();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        int g = l >> 2, tg = l & 3;
        unsigned* r = &s[(wbase + l) * 6];
        auto lo = [](unsigned x) { return emu_f16_to_f32(x & 0xffff); };
        auto hi = [](unsigned x) { return emu_f16_to_f32(x >> 16); };
        A[g][2 * tg] = lo(r[0]); A[g][2 * tg + 1] = hi(r[0]);
        A[g + 8][2 * tg] = lo(r[1]); A[g + 8][2 * tg + 1] = hi(r[1]);
        A[g][2 * tg + 8] = lo(r[2]); A[g][2 * tg + 9] = hi(r[2]);
        A[g + 8][2 * tg + 8] = lo(r[3]); A[g + 8][2 * tg + 9] = hi(r[3]);
        B[2 * tg][g] = lo(r[4]); B[2 * tg + 1][g] = hi(r[4]);
        B[2 * tg + 8][g] = lo(r[5]); B[2 * tg + 9][g] = hi(r[5]);
    }
    emu_warp_bar().arrive_and_wait();
    int g = lane >> 2, tg = lane & 3;
    for (int i = 0; i < 4; ++i) {
        int row = g + (i >= 2 ? 8 : 0), col = 2 * tg + (i & 1);
        float acc = c[i];
        for (int k = 0; k < 16; ++k) acc += A[row][k] * B[k][col];
        c[i] = acc;
    }
}

// Launch: run each block with blockDim.x threads.
inline void emu_launch(unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned smem_bytes, const std::function<void()>& k) {
    gridDim = {gx, gy, gz};
    blockDim = {bx, 1, 1};
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                EmuBlock blk;
                blk.block_bar = std::make_unique<std::barrier<>>(bx);
                for (unsigned w = 0; w < (bx + 31) / 32; ++w)
                    blk.warp_bar.push_back(std::make_unique<std::barrier<>>(std::min(32u, bx - w * 32)));
                blk.fslots.resize(bx); blk.uslots.resize(bx); blk.mma_slots.resize(((bx + 31) / 32) * 32 * 6);
                // Poison dynamic shared memory: a kernel must not read what it did not write.
                blk.dyn_smem.assign(smem_bytes / 4 + 1, __int_as_float(0x7fc00001));
                g_blk = &blk;
                std::vector<std::thread> ts;
                ts.reserve(bx);
                for (unsigned t = 0; t < bx; ++t)
                    ts.emplace_back([&, t, x, y, z] {
                        threadIdx = {t, 0, 0};
                        blockIdx = {x, y, z};
                        k();
                        g_blk->warp_bar[t / 32]->arrive_and_drop();
                        g_blk->block_bar->arrive_and_drop();
                    });
                for (auto& th : ts) th.join();
            }
}
