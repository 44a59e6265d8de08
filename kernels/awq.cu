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

// ---- f16 matvec with packed-half2 dequantisation ----------------------------------
// For f16 activations and one token (decode), the hot loop works on f16 pairs:
// OR-ing a nibble pair into 0x6400 (1024.0 in f16) makes two f16 values
// {1024 + q_a, 1024 + q_b} from the low nibbles of both 16-bit halves, or
// {1024 + 16 q_a, 1024 + 16 q_b} from the second nibbles, in one LOP3. AutoAWQ's
// nibble order [0,2,4,6,1,3,5,7] puts columns (2p, 2p+1) of a word in nibbles
// (p, p+4), i.e. at the same place in the low and high half, so a LOP3 on `w`
// and one on `w >> 8` give the four column pairs (0,1) (2,3) (4,5) (6,7). One
// HFMA2 removes the bias exactly (v - 1032, or v/16 - 72: q - 8 in [-8, 7]) and
// one HFMA2 accumulates x * (q - 8). Per packed word (8 weights): 1 shift,
// 4 LOP3, 8 HFMA2 = 13 instructions, against 24 for the f32 path.
//
// Accumulation is f16 over at most H2_SEG (<= 32) rows, then flushed to f32 with
// the zero point and scale: sum x (q - z) s = s (sum x (q - 8) - (z - 8) sum x).
// Centring q on 8 halves the magnitude of the f16 partial sums. f16 partial sums
// limit this path to activations of moderate size (|x| * 8 * 32 < 65504, i.e.
// |x| up to ~250 on average over a segment); larger activations overflow to inf.
//
// grid (blocks_x, splits), block H2_THREADS = 8 warps. Lane l of every warp owns
// VEC packed words (VEC*8 output columns); the block's warps take contiguous,
// equal slices (rows_per_split / 8, a multiple of H2_RING) of the block's K range
// and are summed through shared memory. Each thread keeps H2_RING row loads in
// flight: a slot is refilled with the row H2_RING ahead as soon as it is consumed.
// x for a segment is loaded one segment ahead (lane i holds row i) and broadcast
// with a shuffle. With one split the block writes y; otherwise it writes f32
// partials [split, out] and the last block of its column range to finish (an
// atomic ticket in `counters`, which it resets to 0) sums the splits in split
// order into y: deterministic, one launch, no reduce kernel.
#define H2_WARPS 8
#define H2_THREADS (H2_WARPS * WARP)
#define H2_RING 8
#define H2_ONE 0x3c003c00u        // {1, 1}
#define H2_SIXTEENTH 0x2c002c00u  // {1/16, 1/16}
#define H2_M1032 0xe408e408u      // {-1032, -1032}
#define H2_M72 0xd480d480u        // {-72, -72}

// The four column pairs of packed word w as f16 {q - 8} pairs: (0,1) (2,3) (4,5) (6,7).
__device__ __forceinline__ void h2_nibbles(u32 w, u32* q) {
    const u32 w8 = w >> 8;
    q[0] = h2_fma(lop3_and_or(w, 0x000f000fu, 0x64006400u), H2_ONE, H2_M1032);
    q[1] = h2_fma(lop3_and_or(w, 0x00f000f0u, 0x64006400u), H2_SIXTEENTH, H2_M72);
    q[2] = h2_fma(lop3_and_or(w8, 0x000f000fu, 0x64006400u), H2_ONE, H2_M1032);
    q[3] = h2_fma(lop3_and_or(w8, 0x00f000f0u, 0x64006400u), H2_SIXTEENTH, H2_M72);
}

// Predicated row load: a slot that is not loaded keeps its old value, which is
// either never consumed (past the warp's slice) or belongs to an inactive lane
// whose columns are never stored.
template <int VEC>
__device__ __forceinline__ void h2_load_row(const u32* p, bool ok, u32* w) {
    if (!ok) return;
    if (VEC == 4) {
        const uint4 v = ld_stream_v4(p);
        w[0] = v.x; w[VEC > 1 ? 1 : 0] = v.y; w[VEC > 2 ? 2 : 0] = v.z; w[VEC > 3 ? 3 : 0] = v.w;
    } else {
#pragma unroll
        for (int v = 0; v < VEC; ++v) w[v] = ld_stream_u32(p + v);
    }
}

// Eight rows of the ring: row u of the step is lane (row0 + u)'s x and slot u.
template <int VEC, int TOK, bool REFILL>
__device__ __forceinline__ void h2_step(u32 (&ring)[H2_RING][VEC], u32 (&acc)[VEC * 4][TOK],
                                        const u32 (&x2)[TOK], int row0, const u32*& rp, int out8) {
#pragma unroll
    for (int u = 0; u < H2_RING; ++u) {
        u32 xr[TOK];
#pragma unroll
        for (int t = 0; t < TOK; ++t) xr[t] = __shfl_sync(0xffffffffu, x2[t], row0 + u);
#pragma unroll
        for (int v = 0; v < VEC; ++v) {
            u32 q[4];
            h2_nibbles(ring[u][v], q);
#pragma unroll
            for (int p = 0; p < 4; ++p)
#pragma unroll
                for (int t = 0; t < TOK; ++t) acc[v * 4 + p][t] = h2_fma(xr[t], q[p], acc[v * 4 + p][t]);
        }
        if (REFILL) {
            // The slot just consumed takes the row H2_RING ahead; the other slots'
            // loads stay in flight meanwhile.
            h2_load_row<VEC>(rp, true, ring[u]);
            rp += out8;
        }
    }
}

// TOK tokens (ntok <= TOK of them real) share every dequantised weight pair: per
// packed word 9 instructions of dequantisation, then 4 HFMA2 per token.
// partial [splits, ntok, out], y [ntok, out].
template <int VEC, int TOK>
__device__ void awq_gemv_h2_impl(const u32* __restrict__ qw, const u32* __restrict__ qz,
                                 const f16* __restrict__ scales, const f16* __restrict__ x,
                                 float* __restrict__ partial, u32* __restrict__ counters,
                                 f16* __restrict__ y, int ntok, int in_dim, int out_dim, int group,
                                 int rows_per_split, int seg) {
    constexpr int NC = VEC * 8;
    // Per-thread f32 column sums live here (each thread its own slots) rather than in
    // registers, which keeps the ring of loads in registers; summed across warps at the end.
    __shared__ float red[H2_WARPS][NC * TOK][WARP + 1];
    __shared__ u32 is_last;
    const int lane = threadIdx.x & (WARP - 1), wy = threadIdx.x / WARP;
    const int out8 = out_dim >> 3;
    const int j0 = (blockIdx.x * WARP + lane) * VEC;
    const bool active = j0 < out8;
    const int kb = blockIdx.y * rows_per_split;
    const int ke = min(in_dim, kb + rows_per_split);
    const int rpw = rows_per_split / H2_WARPS;
    const int wb = min(ke, kb + wy * rpw), we = min(ke, wb + rpw);
#pragma unroll
    for (int c = 0; c < NC * TOK; ++c) red[wy][c][lane] = 0.0f;
    // Row pointer walked by one row per load (no 64-bit multiply per row).
    const u32* rp = qw + (long long)wb * out8 + (active ? j0 : 0);
    u32 ring[H2_RING][VEC];
#pragma unroll
    for (int u = 0; u < H2_RING; ++u) {
#pragma unroll
        for (int v = 0; v < VEC; ++v) ring[u][v] = 0u;
        h2_load_row<VEC>(rp, active && wb + u < we, ring[u]);
        rp += out8;
    }
    u32 acc[VEC * 4][TOK];
#pragma unroll
    for (int i = 0; i < VEC * 4; ++i)
#pragma unroll
        for (int t = 0; t < TOK; ++t) acc[i][t] = 0u;
    // x of the next segment, one row per lane (f16 bits; 0 past the segment or ntok).
    u16 xnext[TOK];
    {
        const bool in_seg = wb + lane < min(we, (wb / seg + 1) * seg);
#pragma unroll
        for (int t = 0; t < TOK; ++t)
            xnext[t] = (in_seg && t < ntok) ? x[(long long)t * in_dim + wb + lane].bits : (u16)0;
    }
    int s0 = wb, s1 = wb;
    u32 x2[TOK], zw[VEC];
    uint4 sv[VEC];
    float sx[TOK];
#pragma unroll
    for (int t = 0; t < TOK; ++t) { x2[t] = 0u; sx[t] = 0.0f; }
    for (int k = wb; k < we; k += H2_RING) {
        if (k == s1) {  // segment start: [s0, s1) lies inside one group and one warp slice
            s0 = k;
            s1 = min(we, (k / seg + 1) * seg);
            const int n1 = min(we, s1 + seg);
            const bool in_next = s1 + lane < n1;
#pragma unroll
            for (int t = 0; t < TOK; ++t) {
                const u16 xb = xnext[t];
                xnext[t] = (in_next && t < ntok) ? x[(long long)t * in_dim + s1 + lane].bits : (u16)0;
                x2[t] = (u32)xb | ((u32)xb << 16);
                sx[t] = warp_sum(f16_bits_to_f32(xb));
            }
            const int g = k / group;
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
                zw[v] = active ? qz[(long long)g * out8 + j0 + v] : 0u;
                // 8 scales = 16 aligned bytes: out % 8 == 0 and the column is 8-aligned.
                sv[v] = active ? *reinterpret_cast<const uint4*>(scales + (long long)g * out_dim + (long long)(j0 + v) * 8)
                               : make_uint4(0u, 0u, 0u, 0u);
            }
        }
        // Every step but the warp's last refills each slot with the row H2_RING ahead
        // (unpredicated: inactive lanes read column 0, a valid address); the last step
        // only drains the ring. The branch is warp-uniform.
        if (k + H2_RING < we) h2_step<VEC, TOK, true>(ring, acc, x2, k - s0, rp, out8);
        else h2_step<VEC, TOK, false>(ring, acc, x2, k - s0, rp, out8);
        if (k + H2_RING == s1) {  // segment end: fold zero point and scale in f32
#pragma unroll
            for (int v = 0; v < VEC; ++v) {
                u32 zq[4];
                h2_nibbles(zw[v], zq);  // z - 8, same nibble order as the weights
                const u32 sp[4] = {sv[v].x, sv[v].y, sv[v].z, sv[v].w};
#pragma unroll
                for (int p = 0; p < 4; ++p) {
#pragma unroll
                    for (int t = 0; t < TOK; ++t) {
                        const u32 a = acc[v * 4 + p][t];
                        red[wy][(v * 8 + 2 * p) * TOK + t][lane] += h2_lo(sp[p]) * (h2_lo(a) - h2_lo(zq[p]) * sx[t]);
                        red[wy][(v * 8 + 2 * p + 1) * TOK + t][lane] += h2_hi(sp[p]) * (h2_hi(a) - h2_hi(zq[p]) * sx[t]);
                        acc[v * 4 + p][t] = 0u;
                    }
                }
            }
        }
    }
    __syncthreads();
    // Sum the warps' column sums (inactive lanes hold zeros). Element e of the block's
    // output is token e / (WARP*NC), column n_base + e % (WARP*NC).
    constexpr int PER_TOK = WARP * NC;
    const int n_base = blockIdx.x * PER_TOK;  // first output column of this block
    const bool direct = gridDim.y == 1;
    for (int e = threadIdx.x; e < TOK * PER_TOK; e += H2_THREADS) {
        const int t = e / PER_TOK, col = e - t * PER_TOK;
        const int l = col / NC, c = col - l * NC;
        const int n = n_base + col;
        if (t < ntok && n < out_dim) {
            float a = 0.0f;
#pragma unroll
            for (int w = 0; w < H2_WARPS; ++w) a += red[w][c * TOK + t][l];
            if (direct) y[(long long)t * out_dim + n] = from_f32<f16>(a);
            else partial[((long long)blockIdx.y * ntok + t) * out_dim + n] = a;
        }
    }
    if (direct) return;
    // Publish this split's partials, then take a ticket; the last block sums all splits.
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(&counters[blockIdx.x], 1u) == gridDim.y - 1u;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    // Each thread sums its elements threadIdx.x + i * H2_THREADS over the splits in
    // split order (deterministic). All loads of a chunk of H2_RED_S splits are issued
    // before any is added, so the tail costs a few L2 round trips, not one per split.
    constexpr int COLS = (TOK * PER_TOK + H2_THREADS - 1) / H2_THREADS;
    constexpr int H2_RED_S = COLS == 1 ? 32 : 16;
    const int splits = gridDim.y;
    const long long split_stride = (long long)ntok * out_dim;
    float sum[COLS];
    long long off[COLS];
    bool ok[COLS];
#pragma unroll
    for (int i = 0; i < COLS; ++i) {
        const int e = threadIdx.x + i * H2_THREADS;
        const int t = e / PER_TOK, n = n_base + (e - t * PER_TOK);
        ok[i] = t < ntok && n < out_dim;
        off[i] = (long long)t * out_dim + n;
        sum[i] = 0.0f;
    }
    for (int s0 = 0; s0 < splits; s0 += H2_RED_S) {
        float v[COLS][H2_RED_S];
#pragma unroll
        for (int i = 0; i < COLS; ++i)
#pragma unroll
            for (int j = 0; j < H2_RED_S; ++j)
                v[i][j] = (ok[i] && s0 + j < splits) ? ld_cg_f32(partial + (long long)(s0 + j) * split_stride + off[i]) : 0.0f;
#pragma unroll
        for (int i = 0; i < COLS; ++i)
#pragma unroll
            for (int j = 0; j < H2_RED_S; ++j) sum[i] += v[i][j];
    }
#pragma unroll
    for (int i = 0; i < COLS; ++i)
        if (ok[i]) y[off[i]] = from_f32<f16>(sum[i]);
    if (threadIdx.x == 0) counters[blockIdx.x] = 0u;  // ready for the next launch in stream order
}

extern "C" __global__ void __launch_bounds__(H2_THREADS, 2) awq_gemv_h2v4_f16(
    const u32* qw, const u32* qz, const f16* sc, const f16* x, float* partial, u32* counters,
    f16* y, int in_dim, int out_dim, int group, int rps, int seg) {
    awq_gemv_h2_impl<4, 1>(qw, qz, sc, x, partial, counters, y, 1, in_dim, out_dim, group, rps, seg);
}
extern "C" __global__ void __launch_bounds__(H2_THREADS, 2) awq_gemv_h2v1_f16(
    const u32* qw, const u32* qz, const f16* sc, const f16* x, float* partial, u32* counters,
    f16* y, int in_dim, int out_dim, int group, int rps, int seg) {
    awq_gemv_h2_impl<1, 1>(qw, qz, sc, x, partial, counters, y, 1, in_dim, out_dim, group, rps, seg);
}
// 2-4 tokens: one packed word per lane (32 output columns per 4 tokens in f16 sums).
extern "C" __global__ void __launch_bounds__(H2_THREADS, 2) awq_gemv_h2t4_f16(
    const u32* qw, const u32* qz, const f16* sc, const f16* x, float* partial, u32* counters,
    f16* y, int ntok, int in_dim, int out_dim, int group, int rps, int seg) {
    awq_gemv_h2_impl<1, 4>(qw, qz, sc, x, partial, counters, y, ntok, in_dim, out_dim, group, rps, seg);
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
