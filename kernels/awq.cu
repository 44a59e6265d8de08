// int4 AWQ (AutoAWQ "GEMM" layout) linear layers, y[t, n] = sum_k x[t, k] * W[k, n]:
//   qweight int32 [in, out/8], qzeros int32 [in/group, out/8], scales f16 [in/group, out],
//   W[k, n] = (q[k, n] - z[k/group, n]) * s[k/group, n].
// Packed word j of a row holds columns 8j..8j+7 with AutoAWQ's interleaved
// nibble order [0,2,4,6,1,3,5,7]: column 8j+m lives in nibble [0,4,1,5,2,6,3,7][m].
//
// Decode (few tokens): awq_gemv_*, memory bound, split over K into f32
// partials [splits, tokens, out] that awq_reduce_* sums into y.
// Prefill (many tokens): awq_gemm_*, tensor cores (mma.sync m16n8k16, f16 in,
// f32 accumulate; sm_80+), dequantising each weight tile into shared memory.

// Exact float of a 4-bit field: OR it into the mantissa of 2^23, subtract 2^23.
// Two integer ops and one FADD, which keeps the slow int->float converter idle.
__device__ __forceinline__ float nibble_f32(u32 w, int m) {
    const int sh = 4 * ((m & 1) * 4 + (m >> 1));  // 4 * nibble index of column m; constant once unrolled
    return __uint_as_float(((w >> sh) & 0xfu) | 0x4b000000u) - 8388608.0f;
}

// 1 + q/16 for the 4-bit field of column m: the nibble shifted into mantissa bits
// 19..22 of 1.0f. One shift and one LOP3 per weight (nibble_f32 needs a third op,
// the FADD), which matters because the matvec is close to ALU bound on the big
// GPUs. sum x*q = 16 * (sum x*(1 + q/16) - sum x), exact up to f32 rounding.
__device__ __forceinline__ float nibble_1p16(u32 w, int m) {
    const int p = (m & 1) * 4 + (m >> 1);  // nibble index of column m; constant once unrolled
    const u32 t = p <= 4 ? (w << (19 - 4 * p)) : (w >> (4 * p - 19));
    return __uint_as_float((t & 0x00780000u) | 0x3f800000u);
}

#define GEMV_THREADS 256
#define GEMV_WARPS (GEMV_THREADS / WARP)
#define GEMV_KC 128

// grid (ceil(out/8 / (VEC*WARP)), splits, ceil(tokens/TOK)), block GEMV_THREADS.
// Lane l of every warp owns VEC packed columns (VEC*8 outputs) for TOK tokens, so a
// warp reads VEC*128 contiguous bytes of a weight row; the block's 8 warps take
// interleaved rows of K (row kk of a chunk goes to warp kk % 8) and their sums are
// added in shared memory at the end. Block y owns K rows [y*rows_per_split, ..).
// x is staged through shared memory `chunk` rows at a time (chunk divides group and
// rows_per_split, so a chunk never straddles two groups). Within a group the thread
// accumulates sum x*(1+q/16) and sum x and applies zero and scale once:
// sum x*(q-z)*s = s*(16*sum x*(1+q/16) - (16+z)*sum x). Each thread issues GEMV_UNROLL independent
// row loads before using them, so enough bytes are in flight to cover DRAM latency.
template <typename T, int TOK, int VEC>
__device__ void awq_gemv_impl(const u32* __restrict__ qw, const u32* __restrict__ qz,
                              const f16* __restrict__ scales, const T* __restrict__ x,
                              float* __restrict__ partial, int ntok, int in_dim, int out_dim,
                              int group, int rows_per_split, int chunk) {
    constexpr int NC = VEC * 8;
    // Row loads in flight per thread: 4 x 16 bytes, or 8 x 4 bytes for scalar columns.
    constexpr int GEMV_UNROLL = VEC == 1 ? 8 : 4;
    __shared__ float xs[TOK][GEMV_KC];
    __shared__ float red[GEMV_WARPS][NC * TOK][WARP + 1];  // +1: conflict-free both ways
    const int lane = threadIdx.x & (WARP - 1), wy = threadIdx.x / WARP;
    const int out8 = out_dim >> 3;
    const int j0 = (blockIdx.x * WARP + lane) * VEC;
    const bool active = j0 < out8;
    const int t0 = blockIdx.z * TOK;
    const int kb = blockIdx.y * rows_per_split;
    const int ke = min(in_dim, kb + rows_per_split);
    float out_acc[NC][TOK];
    float accq[NC][TOK];
    float xsum[TOK];
#pragma unroll
    for (int t = 0; t < TOK; ++t) {
        xsum[t] = 0.0f;
#pragma unroll
        for (int c = 0; c < NC; ++c) { out_acc[c][t] = 0.0f; accq[c][t] = 0.0f; }
    }
    for (int k0 = kb; k0 < ke; k0 += chunk) {
        __syncthreads();
        for (int idx = threadIdx.x; idx < TOK * chunk; idx += GEMV_THREADS) {
            const int t = idx / chunk, kk = idx - t * chunk;
            xs[t][kk] = (t0 + t < ntok) ? to_f32(x[(long long)(t0 + t) * in_dim + k0 + kk]) : 0.0f;
        }
        __syncthreads();
        if (active) {
            const u32* wp = qw + (long long)k0 * out8 + j0;
            for (int kk0 = wy; kk0 < chunk; kk0 += GEMV_WARPS * GEMV_UNROLL) {
                u32 w[GEMV_UNROLL][VEC];
#pragma unroll
                for (int u = 0; u < GEMV_UNROLL; ++u) {
                    const int kk = kk0 + u * GEMV_WARPS;
                    const u32* rp = wp + (long long)(kk < chunk ? kk : 0) * out8;
                    if (VEC == 4) {
                        const uint4 v = *reinterpret_cast<const uint4*>(rp);
                        w[u][0] = v.x; w[u][VEC > 1 ? 1 : 0] = v.y; w[u][VEC > 2 ? 2 : 0] = v.z; w[u][VEC > 3 ? 3 : 0] = v.w;
                    } else {
#pragma unroll
                        for (int v = 0; v < VEC; ++v) w[u][v] = rp[v];
                    }
                }
#pragma unroll
                for (int u = 0; u < GEMV_UNROLL; ++u) {
                    const int kk = kk0 + u * GEMV_WARPS;
                    if (kk < chunk) {
                        float xv[TOK];
#pragma unroll
                        for (int t = 0; t < TOK; ++t) { xv[t] = xs[t][kk]; xsum[t] += xv[t]; }
#pragma unroll
                        for (int v = 0; v < VEC; ++v)
#pragma unroll
                            for (int m = 0; m < 8; ++m) {
                                const float q = nibble_1p16(w[u][v], m);  // 1 + q/16
#pragma unroll
                                for (int t = 0; t < TOK; ++t) accq[v * 8 + m][t] += xv[t] * q;
                            }
                    }
                }
            }
            const int k1 = k0 + chunk;
            if (k1 % group == 0 || k1 >= ke) {
                const int g = k0 / group;
#pragma unroll
                for (int v = 0; v < VEC; ++v) {
                    const u32 zw = qz[(long long)g * out8 + j0 + v];
                    // 8 scales = 16 aligned bytes: out % 8 == 0 and the column is 8-aligned.
                    const uint4 sv = *reinterpret_cast<const uint4*>(scales + (long long)g * out_dim + (long long)(j0 + v) * 8);
                    const u32 sw[4] = {sv.x, sv.y, sv.z, sv.w};
#pragma unroll
                    for (int m = 0; m < 8; ++m) {
                        const float z = nibble_f32(zw, m);
                        const float sc = f16_bits_to_f32((u16)(sw[m >> 1] >> (16 * (m & 1))));
#pragma unroll
                        for (int t = 0; t < TOK; ++t) {
                            // sum x*(q - z) = 16*sum x*(1 + q/16) - (16 + z)*sum x
                            out_acc[v * 8 + m][t] += sc * (16.0f * accq[v * 8 + m][t] - (16.0f + z) * xsum[t]);
                            accq[v * 8 + m][t] = 0.0f;
                        }
                    }
                }
#pragma unroll
                for (int t = 0; t < TOK; ++t) xsum[t] = 0.0f;
            }
        }
    }
    // Sum the warps' partial results (inactive lanes contribute zeros).
#pragma unroll
    for (int c = 0; c < NC; ++c)
#pragma unroll
        for (int t = 0; t < TOK; ++t) red[wy][c * TOK + t][lane] = out_acc[c][t];
    __syncthreads();
    const int n_base = blockIdx.x * WARP * NC;  // first output column of this block
    for (int e = threadIdx.x; e < TOK * WARP * NC; e += GEMV_THREADS) {
        const int t = e / (WARP * NC), col = e - t * (WARP * NC);
        const int l = col / NC, c = col - l * NC;
        const int n = n_base + col;
        if (t0 + t < ntok && n < out_dim) {
            float acc = 0.0f;
#pragma unroll
            for (int w = 0; w < GEMV_WARPS; ++w) acc += red[w][c * TOK + t][l];
            partial[((long long)blockIdx.y * ntok + t0 + t) * out_dim + n] = acc;
        }
    }
}

// y[i] = sum over splits of partial[s, i]; n = tokens * out.
template <typename T>
__device__ void awq_reduce_impl(const float* __restrict__ partial, T* __restrict__ y, int splits, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float acc = 0.0f;
        for (int s = 0; s < splits; ++s) acc += partial[(long long)s * n + i];
        y[i] = from_f32<T>(acc);
    }
}

// ---- tensor-core GEMM ------------------------------------------------------
#define GEMM_BM 64
#define GEMM_BN 64
#define GEMM_BK 32
#define GEMM_PAD 8

__device__ __forceinline__ void mma_16816(float* c, u32 a0, u32 a1, u32 a2, u32 a3, u32 b0, u32 b1) {
#ifdef BATOS_CUDA_EMU
    emu_mma_16816(c, a0, a1, a2, a3, b0, b1);
#else
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
#endif
}

// grid (ceil(out/64), ceil(M/64), ksplits), block 128 (4 warps in a 2x2 arrangement,
// each a 32x32 sub-tile = 2 m16 x 4 n8 mma tiles). Block z covers K rows
// [z*k_per_split, ..). The next K tile's global loads are issued into registers
// before the current tile's mma work, so memory latency overlaps the tensor cores.
// With one split the result goes to y; otherwise f32 partials [z, M, out] go to
// `partial` for awq_reduce. Needs in % 32 == 0, out % 8 == 0, k_per_split % 32 == 0.
template <typename T>
__device__ void awq_gemm_impl(const u32* __restrict__ qw, const u32* __restrict__ qz,
                              const f16* __restrict__ scales, const T* __restrict__ x,
                              T* __restrict__ y, float* __restrict__ partial, int M, int in_dim,
                              int out_dim, int group, int k_per_split) {
    __shared__ __align__(16) u16 As[GEMM_BM][GEMM_BK + GEMM_PAD];
    __shared__ __align__(16) u16 Bs[GEMM_BN][GEMM_BK + GEMM_PAD];  // [n][k]: "col" operand
    const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
    const int warp_m = wid >> 1, warp_n = wid & 1;
    const int gid = lane >> 2, tig = lane & 3;
    const int m0 = blockIdx.y * GEMM_BM, n0 = blockIdx.x * GEMM_BN;
    const int out8 = out_dim >> 3;
    const int kb = blockIdx.z * k_per_split;
    const int ke = min(in_dim, kb + k_per_split);
    constexpr int A_PER = (GEMM_BM * GEMM_BK) / 128;        // activations per thread
    constexpr int B_PER = (GEMM_BK * GEMM_BN / 8) / 128;    // packed words per thread
    float acc[2][4][4];
#pragma unroll
    for (int i = 0; i < 2; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int c = 0; c < 4; ++c) acc[i][j][c] = 0.0f;

    // Register staging of one K tile.
    float ra[A_PER];
    u32 rw[B_PER], rz[B_PER];
    uint4 rs[B_PER];
    auto load_tile = [&](int k0) {
#pragma unroll
        for (int i = 0; i < A_PER; ++i) {
            const int idx = tid + i * 128;
            const int r = idx / GEMM_BK, c = idx - r * GEMM_BK;
            ra[i] = (m0 + r < M) ? to_f32(x[(long long)(m0 + r) * in_dim + k0 + c]) : 0.0f;
        }
#pragma unroll
        for (int i = 0; i < B_PER; ++i) {
            const int idx = tid + i * 128;
            const int kr = idx >> 3, jj = idx & 7;
            const int j = (n0 >> 3) + jj;
            const int k = k0 + kr;
            if (j < out8) {
                const int g = k / group;
                rw[i] = qw[(long long)k * out8 + j];
                rz[i] = qz[(long long)g * out8 + j];
                rs[i] = *reinterpret_cast<const uint4*>(scales + (long long)g * out_dim + (long long)j * 8);
            } else {
                rw[i] = 0u; rz[i] = 0u; rs[i] = make_uint4(0u, 0u, 0u, 0u);
            }
        }
    };
    auto store_tile = [&]() {
#pragma unroll
        for (int i = 0; i < A_PER; ++i) {
            const int idx = tid + i * 128;
            const int r = idx / GEMM_BK, c = idx - r * GEMM_BK;
            As[r][c] = f32_to_f16_bits(ra[i]);
        }
#pragma unroll
        for (int i = 0; i < B_PER; ++i) {
            const int idx = tid + i * 128;
            const int kr = idx >> 3, jj = idx & 7;
            const u32 sw[4] = {rs[i].x, rs[i].y, rs[i].z, rs[i].w};
#pragma unroll
            for (int m = 0; m < 8; ++m) {
                const float s = f16_bits_to_f32((u16)((m & 1) ? (sw[m >> 1] >> 16) : (sw[m >> 1] & 0xffffu)));
                Bs[jj * 8 + m][kr] = f32_to_f16_bits((nibble_f32(rw[i], m) - nibble_f32(rz[i], m)) * s);
            }
        }
    };

    if (kb < ke) load_tile(kb);
    for (int k0 = kb; k0 < ke; k0 += GEMM_BK) {
        store_tile();
        __syncthreads();
        if (k0 + GEMM_BK < ke) load_tile(k0 + GEMM_BK);
#pragma unroll
        for (int kk = 0; kk < GEMM_BK; kk += 16) {
            u32 a[2][4];
#pragma unroll
            for (int mi = 0; mi < 2; ++mi) {
                const int rb = warp_m * 32 + mi * 16;
                a[mi][0] = *reinterpret_cast<const u32*>(&As[rb + gid][kk + 2 * tig]);
                a[mi][1] = *reinterpret_cast<const u32*>(&As[rb + gid + 8][kk + 2 * tig]);
                a[mi][2] = *reinterpret_cast<const u32*>(&As[rb + gid][kk + 2 * tig + 8]);
                a[mi][3] = *reinterpret_cast<const u32*>(&As[rb + gid + 8][kk + 2 * tig + 8]);
            }
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) {
                const int nb = warp_n * 32 + ni * 8;
                const u32 b0 = *reinterpret_cast<const u32*>(&Bs[nb + gid][kk + 2 * tig]);
                const u32 b1 = *reinterpret_cast<const u32*>(&Bs[nb + gid][kk + 2 * tig + 8]);
#pragma unroll
                for (int mi = 0; mi < 2; ++mi)
                    mma_16816(acc[mi][ni], a[mi][0], a[mi][1], a[mi][2], a[mi][3], b0, b1);
            }
        }
        __syncthreads();
    }
    const bool direct = gridDim.z == 1;
    float* pz = partial + (long long)blockIdx.z * M * out_dim;
#pragma unroll
    for (int mi = 0; mi < 2; ++mi)
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) {
            const int r = m0 + warp_m * 32 + mi * 16 + gid;
            const int c = n0 + warp_n * 32 + ni * 8 + 2 * tig;
            if (c < out_dim) {
#pragma unroll
                for (int h = 0; h < 2; ++h) {
                    const int rr = r + 8 * h;
                    if (rr < M) {
                        const long long o = (long long)rr * out_dim + c;
                        if (direct) {
                            y[o] = from_f32<T>(acc[mi][ni][2 * h]);
                            y[o + 1] = from_f32<T>(acc[mi][ni][2 * h + 1]);
                        } else {
                            pz[o] = acc[mi][ni][2 * h];
                            pz[o + 1] = acc[mi][ni][2 * h + 1];
                        }
                    }
                }
            }
        }
}

#define AWQ_ENTRY(T, S)                                                                          \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) awq_gemv_t1v4_##S(                \
        const u32* qw, const u32* qz, const f16* sc, const T* x, float* partial, int ntok,       \
        int in_dim, int out_dim, int group, int rps, int chunk) {                                          \
        awq_gemv_impl<T, 1, 4>(qw, qz, sc, x, partial, ntok, in_dim, out_dim, group, rps, chunk);      \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) awq_gemv_t1v1_##S(                \
        const u32* qw, const u32* qz, const f16* sc, const T* x, float* partial, int ntok,       \
        int in_dim, int out_dim, int group, int rps, int chunk) {                                          \
        awq_gemv_impl<T, 1, 1>(qw, qz, sc, x, partial, ntok, in_dim, out_dim, group, rps, chunk);      \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(GEMV_THREADS) awq_gemv_t4v1_##S(                \
        const u32* qw, const u32* qz, const f16* sc, const T* x, float* partial, int ntok,       \
        int in_dim, int out_dim, int group, int rps, int chunk) {                                          \
        awq_gemv_impl<T, 4, 1>(qw, qz, sc, x, partial, ntok, in_dim, out_dim, group, rps, chunk);      \
    }                                                                                            \
    extern "C" __global__ void awq_reduce_##S(const float* partial, T* y, int splits, long long n) { \
        awq_reduce_impl<T>(partial, y, splits, n);                                               \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(128) awq_gemm_##S(                              \
        const u32* qw, const u32* qz, const f16* sc, const T* x, T* y, float* partial, int M,    \
        int in_dim, int out_dim, int group, int k_per_split) {                                   \
        awq_gemm_impl<T>(qw, qz, sc, x, y, partial, M, in_dim, out_dim, group, k_per_split);     \
    }

AWQ_ENTRY(float, f32)
AWQ_ENTRY(f16, f16)
AWQ_ENTRY(bf16, bf16)
