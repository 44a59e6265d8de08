// Batched multi-LoRA for mixed batches (punica-style semantics):
//   h[t, r] = sum_k x[t, k] * A[s, r, k]              (shrink, r < rank[s])
//   y[t, n] += scale[s] * sum_r h[t, r] * Bt[s, r, n]  (expand)
// where s is the slot of token t. Adapter weights are stacked per hot slot:
//   A  [slots, max_rank, in]   (PEFT lora_A rows, zero-padded to max_rank)
//   Bt [slots, max_rank, out]  (PEFT lora_B transposed, so expand reads rows)
// Tokens with no adapter are simply absent from the launch lists, so they cost
// nothing. The shrink splits K over blocks (grid dimension `ks`, LORA_K_CHUNK
// columns each) and writes f32 partials h [ksplits, rows, max_rank]; the expand
// sums the partials as it stages h in shared memory (deterministic, no atomics).
//
// BGMV (decode): one block per active token, gathered by `tok[i]`/`slot[i]`.
// SGMV (prefill): one block per tile of <= SGMV_TILE consecutive tokens that
// share a slot (the host cuts segments into tiles): tile_start/tile_len/tile_slot,
// and the tile's h rows are tile_hrow[i] .. +tile_len[i].

#define SGMV_TILE 16
#define SHRINK_KC 256
#define LORA_K_CHUNK 256

// ---- BGMV ---------------------------------------------------------------
// grid (n_active, ceil(max_rank / warps), ksplits), block = warps * 32. One warp per
// (rank row, K chunk).
template <typename T>
__device__ void bgmv_shrink_impl(const T* __restrict__ x, const T* __restrict__ a,
                                 const i32* __restrict__ tok, const i32* __restrict__ slot,
                                 const i32* __restrict__ ranks, float* __restrict__ h,
                                 int in_dim, int max_rank) {
    const int i = blockIdx.x;
    const int s = slot[i];
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const int r = blockIdx.y * (blockDim.x >> 5) + wid;
    if (r >= max_rank) return;
    const int ks = blockIdx.z;
    const int kb = ks * LORA_K_CHUNK, ke = min(in_dim, kb + LORA_K_CHUNK);
    float acc = 0.0f;
    if (r < ranks[s]) {
        const T* xr = x + (long long)tok[i] * in_dim;
        const T* ar = a + ((long long)s * max_rank + r) * in_dim;
        for (int k = kb + lane; k < ke; k += 32) acc += to_f32(xr[k]) * to_f32(ar[k]);
        acc = warp_sum(acc);
    }
    if (lane == 0) h[((long long)ks * gridDim.x + i) * max_rank + r] = acc;
}

// grid (n_active, ceil(out / blockDim)); thread per output column.
template <typename T>
__device__ void bgmv_expand_impl(const float* __restrict__ h, const T* __restrict__ bt,
                                 const i32* __restrict__ tok, const i32* __restrict__ slot,
                                 const i32* __restrict__ ranks, const float* __restrict__ scales,
                                 T* __restrict__ y, int out_dim, int max_rank, int ksplits) {
    extern __shared__ float hs[];
    const int i = blockIdx.x;
    const int s = slot[i];
    const int rank = ranks[s];
    for (int r = threadIdx.x; r < rank; r += blockDim.x) {
        float v = 0.0f;
#pragma unroll 8
        for (int k = 0; k < ksplits; ++k) v += h[((long long)k * gridDim.x + i) * max_rank + r];
        hs[r] = v;
    }
    __syncthreads();
    const int n = blockIdx.y * blockDim.x + threadIdx.x;
    if (n >= out_dim) return;
    const T* b = bt + (long long)s * max_rank * out_dim + n;
    float acc = 0.0f;
    for (int r = 0; r < rank; ++r) acc += hs[r] * to_f32(b[(long long)r * out_dim]);
    T* yr = y + (long long)tok[i] * out_dim + n;
    *yr = from_f32<T>(to_f32(*yr) + scales[s] * acc);
}

// ---- SGMV ---------------------------------------------------------------
// grid (n_tiles, ksplits), block = warps * 32. x tile staged through shared memory
// in SHRINK_KC pieces of the block's K chunk; each warp owns rank rows r = wid,
// wid + warps, ...
template <typename T>
__device__ void sgmv_shrink_impl(const T* __restrict__ x, const T* __restrict__ a,
                                 const i32* __restrict__ tile_start, const i32* __restrict__ tile_len,
                                 const i32* __restrict__ tile_slot, const i32* __restrict__ tile_hrow,
                                 const i32* __restrict__ ranks, float* __restrict__ h,
                                 int in_dim, int max_rank, int rows) {
    __shared__ float xs[SGMV_TILE][SHRINK_KC];
    const int ks = blockIdx.y;
    const int kb = ks * LORA_K_CHUNK, ke = min(in_dim, kb + LORA_K_CHUNK);
    const int tile = blockIdx.x;
    const int t0 = tile_start[tile], len = tile_len[tile], s = tile_slot[tile];
    const int hrow = tile_hrow[tile];
    const int rank = ranks[s];
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = blockDim.x >> 5;
    // Each warp handles at most MAXR rank rows in registers per pass.
    for (int rbase = 0; rbase < max_rank; rbase += nw * 4) {
        float acc[4][SGMV_TILE];
#pragma unroll
        for (int j = 0; j < 4; ++j)
#pragma unroll
            for (int t = 0; t < SGMV_TILE; ++t) acc[j][t] = 0.0f;
        for (int k0 = kb; k0 < ke; k0 += SHRINK_KC) {
            const int kc = min(SHRINK_KC, ke - k0);
            __syncthreads();
            for (int idx = threadIdx.x; idx < SGMV_TILE * SHRINK_KC; idx += blockDim.x) {
                const int t = idx / SHRINK_KC, k = idx - t * SHRINK_KC;
                xs[t][k] = (t < len && k < kc) ? to_f32(x[(long long)(t0 + t) * in_dim + k0 + k]) : 0.0f;
            }
            __syncthreads();
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int r = rbase + j * nw + wid;
                if (r < rank) {
                    const T* ar = a + ((long long)s * max_rank + r) * in_dim + k0;
                    for (int k = lane; k < kc; k += 32) {
                        const float av = to_f32(ar[k]);
#pragma unroll
                        for (int t = 0; t < SGMV_TILE; ++t) acc[j][t] += av * xs[t][k];
                    }
                }
            }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int r = rbase + j * nw + wid;
#pragma unroll
            for (int t = 0; t < SGMV_TILE; ++t) {
                const float v = warp_sum(acc[j][t]);
                if (lane == 0 && r < max_rank && t < len)
                    h[((long long)ks * rows + hrow + t) * max_rank + r] = (r < rank) ? v : 0.0f;
            }
        }
    }
}

// grid (n_tiles, ceil(out / blockDim)); thread per output column, SGMV_TILE accumulators.
template <typename T>
__device__ void sgmv_expand_impl(const float* __restrict__ h, const T* __restrict__ bt,
                                 const i32* __restrict__ tile_start, const i32* __restrict__ tile_len,
                                 const i32* __restrict__ tile_slot, const i32* __restrict__ tile_hrow,
                                 const i32* __restrict__ ranks, const float* __restrict__ scales,
                                 T* __restrict__ y, int out_dim, int max_rank, int ksplits,
                                 int rows) {
    extern __shared__ float hs[];  // [SGMV_TILE][max_rank]
    const int tile = blockIdx.x;
    const int t0 = tile_start[tile], len = tile_len[tile], s = tile_slot[tile];
    const int hrow = tile_hrow[tile];
    const int rank = ranks[s];
    for (int idx = threadIdx.x; idx < SGMV_TILE * max_rank; idx += blockDim.x) {
        const int t = idx / max_rank, r = idx - t * max_rank;
        float v = 0.0f;
        if (t < len && r < rank)
#pragma unroll 8
            for (int k = 0; k < ksplits; ++k) v += h[((long long)k * rows + hrow + t) * max_rank + r];
        hs[idx] = v;
    }
    __syncthreads();
    const int n = blockIdx.y * blockDim.x + threadIdx.x;
    if (n >= out_dim) return;
    float acc[SGMV_TILE];
#pragma unroll
    for (int t = 0; t < SGMV_TILE; ++t) acc[t] = 0.0f;
    const T* b = bt + (long long)s * max_rank * out_dim + n;
    for (int r = 0; r < rank; ++r) {
        const float bv = to_f32(b[(long long)r * out_dim]);
#pragma unroll
        for (int t = 0; t < SGMV_TILE; ++t) acc[t] += hs[t * max_rank + r] * bv;
    }
    const float sc = scales[s];
#pragma unroll
    for (int t = 0; t < SGMV_TILE; ++t) {
        if (t < len) {
            T* yr = y + (long long)(t0 + t) * out_dim + n;
            *yr = from_f32<T>(to_f32(*yr) + sc * acc[t]);
        }
    }
}

// ---- grouped (gather by slot, segmented) ----------------------------------
// One shrink and one expand launch for a whole mixed batch, whatever the mix of
// slots: the host sorts the active tokens by slot (stable, so token order within
// a slot is kept) into `perm`, and cuts each slot's run into tiles of <=
// GRP_TILE tokens: tile i covers perm[tile_start[i] .. + tile_len[i]], all of
// slot tile_slot[i]; perm position p is also h row p. Every weight row is read
// with 16-byte vector loads (8 elements), once per tile rather than once per token.
// Needs in % 8 == 0 and out % 8 == 0 (checked by the launcher).
#define GRP_TILE 16
#define GRP_SHRINK_THREADS 256
#define GRP_EXPAND_THREADS 128

__device__ __forceinline__ void load8(const float* p, float* v) {
    const float4 a = *reinterpret_cast<const float4*>(p), b = *reinterpret_cast<const float4*>(p + 4);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w; v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}
__device__ __forceinline__ void load8(const f16* p, float* v) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) { v[2 * i] = h2_lo(w[i]); v[2 * i + 1] = h2_hi(w[i]); }
}
__device__ __forceinline__ void load8(const bf16* p, float* v) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = bf16_bits_to_f32((u16)(w[i] & 0xffffu));
        v[2 * i + 1] = bf16_bits_to_f32((u16)(w[i] >> 16));
    }
}
// 8 elements loaded raw (2 x 16 bytes for f32, 16 bytes otherwise) and converted
// later, so that several loads are in flight before the first conversion waits.
template <typename T> struct Raw8 { uint4 r[sizeof(T) / 2]; };
template <typename T> __device__ __forceinline__ Raw8<T> load8_raw(const T* p) {
    Raw8<T> v;
#pragma unroll
    for (int i = 0; i < (int)(sizeof(T) / 2); ++i) v.r[i] = reinterpret_cast<const uint4*>(p)[i];
    return v;
}
__device__ __forceinline__ void cvt8(const Raw8<float>& v, float* o) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        o[4 * i] = __uint_as_float(v.r[i].x); o[4 * i + 1] = __uint_as_float(v.r[i].y);
        o[4 * i + 2] = __uint_as_float(v.r[i].z); o[4 * i + 3] = __uint_as_float(v.r[i].w);
    }
}
__device__ __forceinline__ void cvt8(const Raw8<f16>& v, float* o) {
    const u32 w[4] = {v.r[0].x, v.r[0].y, v.r[0].z, v.r[0].w};
#pragma unroll
    for (int i = 0; i < 4; ++i) { o[2 * i] = h2_lo(w[i]); o[2 * i + 1] = h2_hi(w[i]); }
}
__device__ __forceinline__ void cvt8(const Raw8<bf16>& v, float* o) {
    const u32 w[4] = {v.r[0].x, v.r[0].y, v.r[0].z, v.r[0].w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        o[2 * i] = bf16_bits_to_f32((u16)(w[i] & 0xffffu));
        o[2 * i + 1] = bf16_bits_to_f32((u16)(w[i] >> 16));
    }
}
__device__ __forceinline__ void store8(float* p, const float* v) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
    *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
}
__device__ __forceinline__ void store8(f16* p, const float* v) {
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = (u32)f32_to_f16_bits(v[2 * i]) | ((u32)f32_to_f16_bits(v[2 * i + 1]) << 16);
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}
__device__ __forceinline__ void store8(bf16* p, const float* v) {
    u32 w[4];
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = (u32)f32_to_bf16_bits(v[2 * i]) | ((u32)f32_to_bf16_bits(v[2 * i + 1]) << 16);
    *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
}

// grid (n_tiles, ksplits), block GRP_SHRINK_THREADS. The tile's x rows (gathered
// through perm) for the block's LORA_K_CHUNK columns are staged in shared memory;
// warp w owns rank rows w, w + 8, ...: lane l holds A[s, r, 8l .. 8l+8) of the chunk
// (one 16-byte load; the first rows are issued before the staging barrier) and the
// dot product with each of the tile's tokens is a warp sum. h [ksplits, rows, max_rank].
template <typename T>
__device__ void grouped_shrink_impl(const T* __restrict__ x, const T* __restrict__ a,
                                    const i32* __restrict__ perm, const i32* __restrict__ tile_start,
                                    const i32* __restrict__ tile_len, const i32* __restrict__ tile_slot,
                                    const i32* __restrict__ ranks, float* __restrict__ h,
                                    int in_dim, int max_rank, int rows) {
    constexpr int NW = GRP_SHRINK_THREADS / WARP;
    __shared__ __align__(16) float xs[GRP_TILE][LORA_K_CHUNK];
    const int tile = blockIdx.x, ks = blockIdx.y;
    const int p0 = tile_start[tile], len = tile_len[tile], s = tile_slot[tile];
    const int rank = ranks[s];
    const int kb = ks * LORA_K_CHUNK, kc = min(LORA_K_CHUNK, in_dim - kb);
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    const bool lane_in = lane * 8 < kc;
    const T* ap = a + ((long long)s * max_rank + wid) * in_dim + kb + lane * 8;  // row wid
    const long long a_step = (long long)NW * in_dim;  // 8 rank rows
    float av0[8], av1[8];
    if (wid < rank && lane_in) load8(ap, av0);
    if (wid + NW < rank && lane_in) load8(ap + a_step, av1);
    for (int idx = threadIdx.x; idx < len * (LORA_K_CHUNK / 8); idx += GRP_SHRINK_THREADS) {
        const int t = idx / (LORA_K_CHUNK / 8), c = (idx - t * (LORA_K_CHUNK / 8)) * 8;
        if (c < kc) {
            float v[8];
            load8(x + (long long)perm[p0 + t] * in_dim + kb + c, v);
            store8(&xs[t][c], v);
        }
    }
    __syncthreads();
    for (int r0 = wid; r0 < rank; r0 += 2 * NW) {
#pragma unroll
        for (int j = 0; j < 2; ++j) {
            const int r = r0 + j * NW;
            if (r < rank) {
                for (int t = 0; t < len; ++t) {
                    float d = 0.0f;
                    if (lane_in) {
                        float xv[8];
                        load8(&xs[t][lane * 8], xv);
#pragma unroll
                        for (int i = 0; i < 8; ++i) d += (j == 0 ? av0[i] : av1[i]) * xv[i];
                    }
                    d = warp_sum(d);
                    if (lane == 0) h[((long long)ks * rows + p0 + t) * max_rank + r] = d;
                }
            }
        }
        // Next two rank rows of this warp (rank > 16 only).
        ap += 2 * a_step;
        if (r0 + 2 * NW < rank && lane_in) load8(ap, av0);
        if (r0 + 3 * NW < rank && lane_in) load8(ap + a_step, av1);
    }
}

// grid (n_tiles, ceil(out / (GRP_EXPAND_THREADS * 8))), block GRP_EXPAND_THREADS,
// dynamic shared memory GRP_TILE * max_rank floats. The K-split partials of the
// tile's h rows are summed (split order: deterministic) into shared memory; thread
// i owns 8 consecutive output columns: for 4 tokens at a time it streams the slot's
// Bt rows (16-byte loads; re-reads for the next 4 tokens hit L1) and adds
// scale * h · Bt into y in one 16-byte read-modify-write per token.
template <typename T>
__device__ void grouped_expand_impl(const float* __restrict__ h, const T* __restrict__ bt,
                                    const i32* __restrict__ perm, const i32* __restrict__ tile_start,
                                    const i32* __restrict__ tile_len, const i32* __restrict__ tile_slot,
                                    const i32* __restrict__ ranks, const float* __restrict__ scales,
                                    T* __restrict__ y, int out_dim, int max_rank, int ksplits, int rows) {
    extern __shared__ float hs[];  // [len][rank]
    const int tile = blockIdx.x;
    const int p0 = tile_start[tile], len = tile_len[tile], s = tile_slot[tile];
    const int rank = ranks[s];
    for (int idx = threadIdx.x; idx < len * rank; idx += GRP_EXPAND_THREADS) {
        const int t = idx / rank, r = idx - t * rank;
        float v = 0.0f;
#pragma unroll 8
        for (int k = 0; k < ksplits; ++k) v += h[((long long)k * rows + p0 + t) * max_rank + r];
        hs[idx] = v;
    }
    __syncthreads();
    const int n0 = (blockIdx.y * GRP_EXPAND_THREADS + threadIdx.x) * 8;
    if (n0 >= out_dim) return;
    const T* b = bt + (long long)s * max_rank * out_dim + n0;
    const float sc = scales[s];
    for (int t0 = 0; t0 < len; t0 += 4) {
        float acc[4][8];
#pragma unroll
        for (int tt = 0; tt < 4; ++tt)
#pragma unroll
            for (int i = 0; i < 8; ++i) acc[tt][i] = 0.0f;
        // 4 rank rows per pass: their Bt loads are all issued before the FMAs.
        for (int r0 = 0; r0 < rank; r0 += 4) {
            Raw8<T> braw[4];
#pragma unroll
            for (int u = 0; u < 4; ++u)
                if (r0 + u < rank) braw[u] = load8_raw(b + (long long)(r0 + u) * out_dim);
#pragma unroll
            for (int u = 0; u < 4; ++u) {
                if (r0 + u < rank) {
                    float bv[8];
                    cvt8(braw[u], bv);
#pragma unroll
                    for (int tt = 0; tt < 4; ++tt) {
                        const float hv = (t0 + tt < len) ? hs[(t0 + tt) * rank + r0 + u] : 0.0f;
#pragma unroll
                        for (int i = 0; i < 8; ++i) acc[tt][i] += hv * bv[i];
                    }
                }
            }
        }
#pragma unroll
        for (int tt = 0; tt < 4; ++tt) {
            if (t0 + tt < len) {
                T* yp = y + (long long)perm[p0 + t0 + tt] * out_dim + n0;
                float yv[8];
                load8(yp, yv);
#pragma unroll
                for (int i = 0; i < 8; ++i) yv[i] += sc * acc[tt][i];
                store8(yp, yv);
            }
        }
    }
}

#define LORA_ENTRY(T, S)                                                                         \
    extern "C" __global__ void bgmv_shrink_##S(const T* x, const T* a, const i32* tok,          \
                                               const i32* slot, const i32* ranks, float* h,     \
                                               int in_dim, int max_rank) {                      \
        bgmv_shrink_impl<T>(x, a, tok, slot, ranks, h, in_dim, max_rank);                       \
    }                                                                                            \
    extern "C" __global__ void bgmv_expand_##S(const float* h, const T* bt, const i32* tok,     \
                                               const i32* slot, const i32* ranks,               \
                                               const float* scales, T* y, int out_dim,          \
                                               int max_rank, int ksplits) {                     \
        bgmv_expand_impl<T>(h, bt, tok, slot, ranks, scales, y, out_dim, max_rank, ksplits);    \
    }                                                                                            \
    extern "C" __global__ void sgmv_shrink_##S(const T* x, const T* a, const i32* ts,           \
                                               const i32* tl, const i32* tsl, const i32* th,    \
                                               const i32* ranks, float* h, int in_dim,          \
                                               int max_rank, int rows) {                        \
        sgmv_shrink_impl<T>(x, a, ts, tl, tsl, th, ranks, h, in_dim, max_rank, rows);           \
    }                                                                                            \
    extern "C" __global__ void sgmv_expand_##S(const float* h, const T* bt, const i32* ts,      \
                                               const i32* tl, const i32* tsl, const i32* th,    \
                                               const i32* ranks, const float* scales, T* y,     \
                                               int out_dim, int max_rank, int ksplits, int rows) { \
        sgmv_expand_impl<T>(h, bt, ts, tl, tsl, th, ranks, scales, y, out_dim, max_rank,       \
                            ksplits, rows);                                                      \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(GRP_SHRINK_THREADS) grouped_shrink_##S(         \
        const T* x, const T* a, const i32* perm, const i32* ts, const i32* tl, const i32* tsl,   \
        const i32* ranks, float* h, int in_dim, int max_rank, int rows) {                        \
        grouped_shrink_impl<T>(x, a, perm, ts, tl, tsl, ranks, h, in_dim, max_rank, rows);       \
    }                                                                                            \
    extern "C" __global__ void __launch_bounds__(GRP_EXPAND_THREADS) grouped_expand_##S(         \
        const float* h, const T* bt, const i32* perm, const i32* ts, const i32* tl,              \
        const i32* tsl, const i32* ranks, const float* scales, T* y, int out_dim, int max_rank,  \
        int ksplits, int rows) {                                                                 \
        grouped_expand_impl<T>(h, bt, perm, ts, tl, tsl, ranks, scales, y, out_dim, max_rank,    \
                               ksplits, rows);                                                   \
    }

LORA_ENTRY(float, f32)
LORA_ENTRY(f16, f16)
LORA_ENTRY(bf16, bf16)

// Adapter slot writes in one launch (LoraStack::write_slots): run i copies
// ops[3i + 2] 32-bit words from src + ops[3i + 1] to the device address ops[3i],
// one block per run. The runs' destinations never overlap (distinct slots, or a
// slot's rows, rank and scale), so the order inside the launch does not matter:
// kernels that read the slots wait for the whole launch.
extern "C" __global__ void lora_scatter_words(const u32* __restrict__ src,
                                              const u64* __restrict__ ops, int n_ops) {
    const int op = blockIdx.x;
    if (op >= n_ops) return;
    u32* dst = reinterpret_cast<u32*>(ops[3 * op]);
    const u32* from = src + ops[3 * op + 1];
    const u64 n = ops[3 * op + 2];
    for (u64 i = threadIdx.x; i < n; i += blockDim.x) dst[i] = from[i];
}
