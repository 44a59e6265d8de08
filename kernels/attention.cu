// Paged attention over the batos KV cache (see CONTRACTS.md):
//   k_cache, v_cache [num_blocks, block_size, num_kv_heads, head_dim], contiguous;
//   token at position p of a sequence lives in block table[p / block_size],
//   offset p % block_size; its slot is block * block_size + offset.
// Queries q [T, nh*hd]; each token t belongs to sequence tok_seq[t] and sits at
// position tok_pos[t]; it attends causally to cache positions 0..=tok_pos[t]
// (its own K/V were written by write_kv first). GQA: head h reads kv head
// h / (nh / nkv). Block tables are padded rows [num_seqs, max_blocks] of i32.
// Activations, cache and output share the dtype T; softmax runs in f32.

#define ATT_THREADS 128
#define ATT_MAX_GROUP 8
#define DEC_PARTITION 256
#define PF_BQ 16
#define PF_BKV 32

// Scatter new K/V rows into the cache at their slots. grid (T), block 128.
template <typename T>
__device__ void write_kv_impl(const T* __restrict__ k_new, const T* __restrict__ v_new,
                              const i64* __restrict__ slots, T* __restrict__ k_cache,
                              T* __restrict__ v_cache, int row) {
    const long long t = blockIdx.x;
    const long long dst = slots[t] * row;
    for (int i = threadIdx.x; i < row; i += blockDim.x) {
        k_cache[dst + i] = k_new[t * row + i];
        v_cache[dst + i] = v_new[t * row + i];
    }
}

__device__ __forceinline__ float4 load4(const float* p) { return *reinterpret_cast<const float4*>(p); }
__device__ __forceinline__ float4 load4(const f16* p) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    return make_float4(f16_bits_to_f32(u.x & 0xffffu), f16_bits_to_f32(u.x >> 16),
                       f16_bits_to_f32(u.y & 0xffffu), f16_bits_to_f32(u.y >> 16));
}
__device__ __forceinline__ float4 load4(const bf16* p) {
    const uint2 u = *reinterpret_cast<const uint2*>(p);
    return make_float4(bf16_bits_to_f32(u.x & 0xffffu), bf16_bits_to_f32(u.x >> 16),
                       bf16_bits_to_f32(u.y & 0xffffu), bf16_bits_to_f32(u.y >> 16));
}

// 16 bytes of K/V as floats: 4 (f32) or 8 (f16, bf16) elements.
template <typename T> struct Vec16 { static constexpr int N = 16 / sizeof(T); };
__device__ __forceinline__ void load16(const float* p, float* v) {
    const float4 a = *reinterpret_cast<const float4*>(p);
    v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
}
__device__ __forceinline__ void load16(const f16* p, float* v) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) { v[2 * i] = h2_lo(w[i]); v[2 * i + 1] = h2_hi(w[i]); }
}
__device__ __forceinline__ void load16(const bf16* p, float* v) {
    const uint4 u = *reinterpret_cast<const uint4*>(p);
    const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        v[2 * i] = bf16_bits_to_f32((u16)(w[i] & 0xffffu));
        v[2 * i + 1] = bf16_bits_to_f32((u16)(w[i] >> 16));
    }
}

// ---- decode: split-K over partitions of DEC_PARTITION positions ----------
// grid (T, nkv, splits), block ATT_THREADS. Block z covers positions [z*part,
// (z+1)*part), part <= DEC_PARTITION chosen by the host so that the grid fills the
// GPU (smaller partitions for few sequences). One block serves all G = nh/nkv query
// heads of one kv head, so each K/V row is read once per token. Writes unnormalised
// partial outputs [T, nh, splits, hd] with their running max and sum of exponentials.
// The partition's cache slots are resolved once into shared memory (no block-table
// load on the K/V address path). Every K/V access is a 16-byte load: a key is
// covered by L = pow2 >= hd/VW lanes (VW = 16 / sizeof(T)), so a warp reads 32/L
// keys per step, and each warp keeps DEC_UNROLL steps of loads in flight before
// using them. Needs hd % VW == 0 and hd / VW <= 32 (checked by the launcher).
// Dynamic shared memory: G*hd + G*DEC_PARTITION + G*hd*(ATT_THREADS/(hd/VW)) floats.
#define DEC_UNROLL 4
template <typename T>
__device__ void paged_decode_impl(const T* __restrict__ q, const T* __restrict__ k_cache,
                                  const T* __restrict__ v_cache, const i32* __restrict__ tok_seq,
                                  const i32* __restrict__ tok_pos, const i32* __restrict__ block_tables,
                                  float* __restrict__ part_o, float* __restrict__ part_m,
                                  float* __restrict__ part_l, int nh, int nkv, int hd, int block_size,
                                  int max_blocks, float scale, int part) {
    constexpr int VW = Vec16<T>::N;
    extern __shared__ float smem[];
    __shared__ i32 slot_of[DEC_PARTITION];
    const int t = blockIdx.x, kvh = blockIdx.y, split = blockIdx.z, splits = gridDim.z;
    const int G = nh / nkv;
    const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5, nwarps = ATT_THREADS / 32;
    const int ctx = tok_pos[t] + 1;
    const int p0 = split * part;
    const int p1 = min(ctx, p0 + part);
    const int nch = hd / VW;  // 16-byte chunks per row
    if (p0 >= ctx) {
        for (int idx = tid; idx < G * hd; idx += ATT_THREADS) {
            const int g = idx / hd, d = idx - g * hd;
            part_o[(((long long)t * nh + kvh * G + g) * splits + split) * hd + d] = 0.0f;
        }
        if (tid < G) {
            const long long pi = ((long long)t * nh + kvh * G + tid) * splits + split;
            part_m[pi] = NEG_INF;
            part_l[pi] = 0.0f;
        }
        return;
    }
    float* qs = smem;                              // [G][hd]
    float* sc = qs + G * hd;                       // [G][DEC_PARTITION]
    float* red = sc + G * DEC_PARTITION;           // [KG][G][hd]
    const i32* bt = block_tables + (long long)tok_seq[t] * max_blocks;
    const long long kv_row = (long long)nkv * hd;
    const T* kbase = k_cache + (long long)kvh * hd;
    const T* vbase = v_cache + (long long)kvh * hd;
    for (int idx = tid; idx < G * hd; idx += ATT_THREADS) {
        const int g = idx / hd, d = idx - g * hd;
        qs[idx] = to_f32(q[(long long)t * nh * hd + (long long)(kvh * G + g) * hd + d]) * scale;
    }
    for (int i = tid; i < p1 - p0; i += ATT_THREADS) {
        const int j = p0 + i;
        slot_of[i] = bt[j / block_size] * block_size + (j % block_size);
    }
    __syncthreads();

    // Scores: L lanes per key, 32/L keys per warp step, DEC_UNROLL steps in flight.
    int L = 1;
    while (L < nch) L <<= 1;
    const int kpw = 32 / L;
    const int sub = lane / L, lk = lane - sub * L;
    const bool lane_ok = lk < nch;
    const int stride = nwarps * kpw;
    for (int base = p0 + wid * kpw + sub; base - sub < p1; base += stride * DEC_UNROLL) {
        float kv[DEC_UNROLL][VW];
#pragma unroll
        for (int u = 0; u < DEC_UNROLL; ++u) {
            const int j = base + u * stride;
            if (lane_ok && j < p1) load16(kbase + (long long)slot_of[j - p0] * kv_row + lk * VW, kv[u]);
        }
#pragma unroll
        for (int u = 0; u < DEC_UNROLL; ++u) {
            const int j = base + u * stride;
            const bool valid = j < p1;
#pragma unroll
            for (int g = 0; g < ATT_MAX_GROUP; ++g) {
                if (g < G) {
                    float v = 0.0f;
                    if (lane_ok && valid) {
                        const float* qg = qs + g * hd + lk * VW;
#pragma unroll
                        for (int i = 0; i < VW; ++i) v += qg[i] * kv[u][i];
                    }
                    for (int o = L >> 1; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
                    if (valid && lk == 0) sc[g * DEC_PARTITION + (j - p0)] = v;
                }
            }
        }
    }
    __syncthreads();

    // Softmax statistics: one warp per head.
    const int n = p1 - p0;
    __shared__ float row_m[ATT_MAX_GROUP], row_l[ATT_MAX_GROUP];
    for (int g = wid; g < G; g += nwarps) {
        float m = NEG_INF;
        for (int i = lane; i < n; i += 32) m = fmaxf(m, sc[g * DEC_PARTITION + i]);
        m = warp_max(m);
        float l = 0.0f;
        for (int i = lane; i < n; i += 32) {
            const float e = expf(sc[g * DEC_PARTITION + i] - m);
            sc[g * DEC_PARTITION + i] = e;
            l += e;
        }
        l = warp_sum(l);
        if (lane == 0) { row_m[g] = m; row_l[g] = l; }
    }
    __syncthreads();

    // P.V: nch threads per value row (one 16-byte chunk each), KG rows at a time,
    // unrolled so several V loads are in flight per thread.
    const int KG = max(1, ATT_THREADS / nch);
    const int kg = tid / nch, c = tid - kg * nch;
    if (kg < KG) {
        float acc[ATT_MAX_GROUP][VW];
#pragma unroll
        for (int g = 0; g < ATT_MAX_GROUP; ++g)
#pragma unroll
            for (int i = 0; i < VW; ++i) acc[g][i] = 0.0f;
#pragma unroll 4
        for (int j = p0 + kg; j < p1; j += KG) {
            float vv[VW];
            load16(vbase + (long long)slot_of[j - p0] * kv_row + c * VW, vv);
#pragma unroll
            for (int g = 0; g < ATT_MAX_GROUP; ++g) {
                if (g < G) {
                    const float p = sc[g * DEC_PARTITION + (j - p0)];
#pragma unroll
                    for (int i = 0; i < VW; ++i) acc[g][i] += p * vv[i];
                }
            }
        }
#pragma unroll
        for (int g = 0; g < ATT_MAX_GROUP; ++g) {
            if (g < G) {
                float* r = red + ((long long)kg * G + g) * hd + c * VW;
#pragma unroll
                for (int i = 0; i < VW; ++i) r[i] = acc[g][i];
            }
        }
    }
    __syncthreads();
    for (int idx = tid; idx < G * hd; idx += ATT_THREADS) {
        const int g = idx / hd, d = idx - g * hd;
        float s = 0.0f;
        for (int k = 0; k < KG; ++k) s += red[((long long)k * G + g) * hd + d];
        part_o[(((long long)t * nh + kvh * G + g) * splits + split) * hd + d] = s;
    }
    if (tid < G) {
        const long long pi = ((long long)t * nh + kvh * G + tid) * splits + split;
        part_m[pi] = row_m[tid];
        part_l[pi] = row_l[tid];
    }
}

// Combine the split partials: grid (T, nh), block ATT_THREADS.
template <typename T>
__device__ void paged_decode_reduce_impl(const float* __restrict__ part_o, const float* __restrict__ part_m,
                                         const float* __restrict__ part_l, T* __restrict__ out,
                                         int nh, int hd, int splits) {
    const long long th = (long long)blockIdx.x * nh + blockIdx.y;
    float mx = NEG_INF;
    for (int s = 0; s < splits; ++s) mx = fmaxf(mx, part_m[th * splits + s]);
    float l = 0.0f;
    for (int s = 0; s < splits; ++s) {
        const float m = part_m[th * splits + s];
        if (m != NEG_INF) l += part_l[th * splits + s] * expf(m - mx);
    }
    const float inv = l > 0.0f ? 1.0f / l : 0.0f;
    for (int d = threadIdx.x; d < hd; d += blockDim.x) {
        float o = 0.0f;
        for (int s = 0; s < splits; ++s) {
            const float m = part_m[th * splits + s];
            if (m != NEG_INF) o += part_o[(th * splits + s) * hd + d] * expf(m - mx);
        }
        out[th * hd + d] = from_f32<T>(o * inv);
    }
}

// ---- prefill: flash-attention style ---------------------------------------
// grid (n_tiles, nh), block ATT_THREADS. A tile is <= PF_BQ consecutive tokens of
// one sequence (tile_start, tile_len). Keys stream through shared memory PF_BKV
// at a time with an online softmax; the score matrix is never materialised.
// Needs hd <= 128. Dynamic shared memory: PF_BQ*hd + PF_BKV*(hd+1) + PF_BKV*hd
// + PF_BQ*PF_BKV + 3*PF_BQ floats.
template <typename T>
__device__ void paged_prefill_impl(const T* __restrict__ q, const T* __restrict__ k_cache,
                                   const T* __restrict__ v_cache, const i32* __restrict__ tok_seq,
                                   const i32* __restrict__ tok_pos, const i32* __restrict__ block_tables,
                                   const i32* __restrict__ tile_start, const i32* __restrict__ tile_len,
                                   T* __restrict__ out, int nh, int nkv, int hd, int block_size,
                                   int max_blocks, float scale) {
    extern __shared__ float smem[];
    const int tile = blockIdx.x, h = blockIdx.y;
    const int kvh = h / (nh / nkv);
    const int t0 = tile_start[tile], len = tile_len[tile];
    const int tid = threadIdx.x, lane = tid & 31, wid = tid >> 5;
    float* Qs = smem;                         // [BQ][hd]
    float* Ks = Qs + PF_BQ * hd;              // [BKV][hd+1]
    float* Vs = Ks + PF_BKV * (hd + 1);       // [BKV][hd]
    float* S = Vs + PF_BKV * hd;              // [BQ][BKV]
    float* rm = S + PF_BQ * PF_BKV;           // running max
    float* rl = rm + PF_BQ;                   // running sum
    float* ra = rl + PF_BQ;                   // rescale factor of this step
    __shared__ int qpos[PF_BQ];
    const i32* bt = block_tables + (long long)tok_seq[t0] * max_blocks;
    const long long kv_row = (long long)nkv * hd;
    for (int idx = tid; idx < PF_BQ * hd; idx += ATT_THREADS) {
        const int i = idx / hd, d = idx - i * hd;
        Qs[idx] = i < len ? to_f32(q[(long long)(t0 + i) * nh * hd + (long long)h * hd + d]) * scale : 0.0f;
    }
    if (tid < PF_BQ) {
        qpos[tid] = tid < len ? tok_pos[t0 + tid] : -1;
        rm[tid] = NEG_INF;
        rl[tid] = 0.0f;
    }
    __syncthreads();
    int maxpos = 0;
    for (int i = 0; i < len; ++i) maxpos = max(maxpos, qpos[i]);

    constexpr int OPT = PF_BQ * 128 / ATT_THREADS;  // O entries per thread for hd <= 128
    float o[OPT];
#pragma unroll
    for (int r = 0; r < OPT; ++r) o[r] = 0.0f;

    for (int c0 = 0; c0 <= maxpos; c0 += PF_BKV) {
        for (int idx = tid; idx < PF_BKV * hd; idx += ATT_THREADS) {
            const int j = idx / hd, d = idx - j * hd;
            const int p = c0 + j;
            float kv = 0.0f, vv = 0.0f;
            if (p <= maxpos) {
                const long long blk = bt[p / block_size];
                const long long off = (blk * block_size + (p % block_size)) * kv_row + (long long)kvh * hd + d;
                kv = to_f32(k_cache[off]);
                vv = to_f32(v_cache[off]);
            }
            Ks[j * (hd + 1) + d] = kv;
            Vs[j * hd + d] = vv;
        }
        __syncthreads();
        for (int e = tid; e < PF_BQ * PF_BKV; e += ATT_THREADS) {
            const int i = e / PF_BKV, j = e - i * PF_BKV;
            float s = NEG_INF;
            if (i < len && c0 + j <= qpos[i]) {
                s = 0.0f;
                for (int d = 0; d < hd; ++d) s += Qs[i * hd + d] * Ks[j * (hd + 1) + d];
            }
            S[e] = s;
        }
        __syncthreads();
        // Online softmax, one warp per 4 rows, lane j <-> key j (PF_BKV == 32).
        for (int i = wid; i < PF_BQ; i += ATT_THREADS / 32) {
            const float s = S[i * PF_BKV + lane];
            const float m_old = rm[i];
            const float m_new = fmaxf(m_old, warp_max(s));
            const float p = (s == NEG_INF) ? 0.0f : expf(s - m_new);
            const float psum = warp_sum(p);
            S[i * PF_BKV + lane] = p;
            // Every lane has read rm[i] above; order those reads before lane 0's update
            // (the shuffles in warp_max/warp_sum are not memory barriers).
            __syncwarp();
            if (lane == 0) {
                const float alpha = (m_old == NEG_INF) ? 0.0f : expf(m_old - m_new);
                ra[i] = alpha;
                rl[i] = rl[i] * alpha + psum;
                rm[i] = m_new;
            }
        }
        __syncthreads();
#pragma unroll
        for (int r = 0; r < OPT; ++r) {
            const int e = tid + r * ATT_THREADS;
            if (e < PF_BQ * hd) {
                const int i = e / hd, d = e - i * hd;
                float acc = o[r] * ra[i];
                for (int j = 0; j < PF_BKV; ++j) acc += S[i * PF_BKV + j] * Vs[j * hd + d];
                o[r] = acc;
            }
        }
        __syncthreads();
    }
#pragma unroll
    for (int r = 0; r < OPT; ++r) {
        const int e = tid + r * ATT_THREADS;
        if (e < PF_BQ * hd) {
            const int i = e / hd, d = e - i * hd;
            if (i < len) {
                const float l = rl[i];
                out[(long long)(t0 + i) * nh * hd + (long long)h * hd + d] = from_f32<T>(l > 0.0f ? o[r] / l : 0.0f);
            }
        }
    }
}

#define ATTN_ENTRY(T, S)                                                                          \
    extern "C" __global__ void write_kv_##S(const T* kn, const T* vn, const i64* slots, T* kc,   \
                                            T* vc, int row) {                                     \
        write_kv_impl<T>(kn, vn, slots, kc, vc, row);                                             \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) paged_decode_##S(                   \
        const T* q, const T* kc, const T* vc, const i32* ts, const i32* tp, const i32* bt,        \
        float* po, float* pm, float* pl, int nh, int nkv, int hd, int bs, int mb, float scale,    \
        int part) {                                                                               \
        paged_decode_impl<T>(q, kc, vc, ts, tp, bt, po, pm, pl, nh, nkv, hd, bs, mb, scale, part); \
    }                                                                                             \
    extern "C" __global__ void paged_decode_reduce_##S(const float* po, const float* pm,          \
                                                       const float* pl, T* out, int nh, int hd,   \
                                                       int splits) {                              \
        paged_decode_reduce_impl<T>(po, pm, pl, out, nh, hd, splits);                             \
    }                                                                                             \
    extern "C" __global__ void __launch_bounds__(ATT_THREADS) paged_prefill_##S(                  \
        const T* q, const T* kc, const T* vc, const i32* ts, const i32* tp, const i32* bt,        \
        const i32* tile_start, const i32* tile_len, T* out, int nh, int nkv, int hd, int bs,      \
        int mb, float scale) {                                                                    \
        paged_prefill_impl<T>(q, kc, vc, ts, tp, bt, tile_start, tile_len, out, nh, nkv, hd, bs,  \
                              mb, scale);                                                         \
    }

ATTN_ENTRY(float, f32)
ATTN_ENTRY(f16, f16)
ATTN_ENTRY(bf16, bf16)
