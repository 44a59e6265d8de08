// Shared prelude of every batos CUDA module. The Rust module registry prepends
// this text to each kernels/*.cu source before NVRTC sees it, so the modules
// need no CUDA headers at all: the f16/bf16 types below are plain 16-bit
// storage types converted with PTX `cvt`, which keeps NVRTC independent of a
// toolkit's include folder on the machine that runs the kernels.

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;
typedef int i32;
typedef long long i64;
typedef unsigned long long u64;

// IEEE binary16 storage.
struct __align__(2) f16 { u16 bits; };
// bfloat16 storage.
struct __align__(2) bf16 { u16 bits; };

#define NEG_INF (__int_as_float(0xff800000))
#define WARP 32

#ifdef BATOS_CUDA_EMU
// Host emulation build (scripts/cuda-emu): same semantics without PTX.
__device__ __forceinline__ float f16_bits_to_f32(u16 h) { return emu_f16_to_f32(h); }
__device__ __forceinline__ u16 f32_to_f16_bits(float f) { return emu_f32_to_f16(f); }
#else
__device__ __forceinline__ float f16_bits_to_f32(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}
__device__ __forceinline__ u16 f32_to_f16_bits(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif
__device__ __forceinline__ float bf16_bits_to_f32(u16 b) {
    return __uint_as_float(((u32)b) << 16);
}
// Round to nearest even, NaN stays a (quiet) NaN: matches `half::bf16::from_f32`.
__device__ __forceinline__ u16 f32_to_bf16_bits(float f) {
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        return (u16)((u >> 16) | 0x0040u);
    }
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

__device__ __forceinline__ float to_f32(float x) { return x; }
__device__ __forceinline__ float to_f32(f16 x) { return f16_bits_to_f32(x.bits); }
__device__ __forceinline__ float to_f32(bf16 x) { return bf16_bits_to_f32(x.bits); }

template <typename T> __device__ __forceinline__ T from_f32(float x);
template <> __device__ __forceinline__ float from_f32<float>(float x) { return x; }
template <> __device__ __forceinline__ f16 from_f32<f16>(float x) { f16 r; r.bits = f32_to_f16_bits(x); return r; }
template <> __device__ __forceinline__ bf16 from_f32<bf16>(float x) { bf16 r; r.bits = f32_to_bf16_bits(x); return r; }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

// Block-wide sum; `scratch` holds at least 32 floats. Every thread gets the result.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[wid] = v;
    __syncthreads();
    v = (lane < nw) ? scratch[lane] : 0.0f;
    v = warp_sum(v);
    return v;
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int nw = (blockDim.x + 31) >> 5;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[wid] = v;
    __syncthreads();
    v = (lane < nw) ? scratch[lane] : NEG_INF;
    v = warp_max(v);
    return v;
}

// ---- packed f16 pairs (f16x2 in a u32: low half = first element) -------------
#ifdef BATOS_CUDA_EMU
__device__ __forceinline__ u32 h2_fma(u32 a, u32 b, u32 c) { return emu_h2_fma(a, b, c); }
#else
// d = a * b + c on both halves, one rounding (HFMA2).
__device__ __forceinline__ u32 h2_fma(u32 a, u32 b, u32 c) {
    u32 d;
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
#endif
// (a & b) | c in one LOP3 (ptxas otherwise emits an AND and an OR for constant masks).
#ifdef BATOS_CUDA_EMU
__device__ __forceinline__ u32 lop3_and_or(u32 a, u32 b, u32 c) { return (a & b) | c; }
#else
__device__ __forceinline__ u32 lop3_and_or(u32 a, u32 b, u32 c) {
    u32 d;
    asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
    return d;
}
#endif
__device__ __forceinline__ float h2_lo(u32 h) { return f16_bits_to_f32((u16)(h & 0xffffu)); }
__device__ __forceinline__ float h2_hi(u32 h) { return f16_bits_to_f32((u16)(h >> 16)); }

// Streaming loads that skip L1 (read-once weights and K/V rows): the data goes
// through L2 only, so L1 keeps the small operands (activations, scales) that are
// reused. Emulation: plain loads.
#ifdef BATOS_CUDA_EMU
__device__ __forceinline__ uint4 ld_stream_v4(const void* p) { return *reinterpret_cast<const uint4*>(p); }
__device__ __forceinline__ u32 ld_stream_u32(const u32* p) { return *p; }
__device__ __forceinline__ float ld_cg_f32(const float* p) { return *p; }
#else
__device__ __forceinline__ uint4 ld_stream_v4(const void* p) {
    uint4 v;
    asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
        : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}
__device__ __forceinline__ u32 ld_stream_u32(const u32* p) {
    u32 v;
    asm("ld.global.nc.L1::no_allocate.u32 %0, [%1];" : "=r"(v) : "l"(p));
    return v;
}
// L2-coherent load (skips L1): for data other blocks wrote during this launch.
__device__ __forceinline__ float ld_cg_f32(const float* p) {
    float v;
    asm volatile("ld.global.cg.f32 %0, [%1];" : "=f"(v) : "l"(p));
    return v;
}
#endif
