// Greedy and nucleus (top-p) sampling over logits [rows, vocab]; one block per
// row. The random numbers come from the host (one uniform in [0,1) per row),
// so a seeded host RNG makes GPU sampling reproducible.

// Arg-max with ties broken towards the lowest index; NaN never wins.
template <typename T>
__device__ void argmax_impl(const T* __restrict__ logits, u32* __restrict__ out, int vocab) {
    __shared__ float sv[32];
    __shared__ u32 si[32];
    const T* row = logits + (long long)blockIdx.x * vocab;
    float best = NEG_INF;
    u32 bi = 0xffffffffu;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
        const float v = to_f32(row[i]);
        if (v > best || (bi == 0xffffffffu && !(v != v))) { best = v; bi = (u32)i; }
    }
    // Warp then block reduction on (value, index).
    for (int o = 16; o > 0; o >>= 1) {
        const float ov = __shfl_xor_sync(0xffffffffu, best, o);
        const u32 oi = __shfl_xor_sync(0xffffffffu, bi, o);
        if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
    }
    const int lane = threadIdx.x & 31, wid = threadIdx.x >> 5;
    if (lane == 0) { sv[wid] = best; si[wid] = bi; }
    __syncthreads();
    if (wid == 0) {
        const int nw = (blockDim.x + 31) >> 5;
        best = lane < nw ? sv[lane] : NEG_INF;
        bi = lane < nw ? si[lane] : 0xffffffffu;
        for (int o = 16; o > 0; o >>= 1) {
            const float ov = __shfl_xor_sync(0xffffffffu, best, o);
            const u32 oi = __shfl_xor_sync(0xffffffffu, bi, o);
            if (ov > best || (ov == best && oi < bi)) { best = ov; bi = oi; }
        }
        // An all-NaN row yields index 0.
        if (lane == 0) out[blockIdx.x] = (bi == 0xffffffffu) ? 0u : bi;
    }
}

// Nucleus sampling. With p = softmax(logits / temperature), the kept set is
// {i : p_i >= tau} for the largest tau whose kept mass is >= top_p (the usual
// sorted-prefix nucleus, ties at the edge kept together). tau is found by a
// binary search over the bit patterns of positive floats (exact, no sort).
// The token is then drawn by inverse CDF over the kept set in index order:
// the first kept i whose running mass exceeds u * kept_mass.
template <typename T>
__device__ void top_p_impl(const T* __restrict__ logits, const float* __restrict__ uniforms,
                           u32* __restrict__ out, int vocab, float inv_temp, float top_p) {
    __shared__ float scratch[32];
    __shared__ float chunk_sums[1024];
    const T* row = logits + (long long)blockIdx.x * vocab;
    float m = NEG_INF;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) m = fmaxf(m, to_f32(row[i]) * inv_temp);
    m = block_max(m, scratch);
    float z = 0.0f;
    for (int i = threadIdx.x; i < vocab; i += blockDim.x) z += expf(to_f32(row[i]) * inv_temp - m);
    z = block_sum(z, scratch);
    const float inv_z = 1.0f / z;
    // p_max = exp(0) / z. Search tau in [0, p_max]: lo keeps mass >= top_p, hi does not.
    u32 lo = 0u, hi = __float_as_uint(inv_z) + 1u;
    while (hi - lo > 1u) {
        const u32 mid = lo + (hi - lo) / 2u;
        const float tau = __uint_as_float(mid);
        float mass = 0.0f;
        for (int i = threadIdx.x; i < vocab; i += blockDim.x) {
            const float p = expf(to_f32(row[i]) * inv_temp - m) * inv_z;
            mass += (p >= tau) ? p : 0.0f;
        }
        mass = block_sum(mass, scratch);
        if (mass >= top_p) lo = mid; else hi = mid;
    }
    const float tau = __uint_as_float(lo);
    // Contiguous chunk per thread so an exclusive scan of chunk sums gives index order.
    const int per = (vocab + blockDim.x - 1) / blockDim.x;
    const int begin = threadIdx.x * per;
    const int end = min(vocab, begin + per);
    float local = 0.0f;
    for (int i = begin; i < end; ++i) {
        const float p = expf(to_f32(row[i]) * inv_temp - m) * inv_z;
        local += (p >= tau) ? p : 0.0f;
    }
    chunk_sums[threadIdx.x] = local;
    __syncthreads();
    // Serial exclusive scan by thread 0 (<= 1024 values, once per row).
    __shared__ float total;
    __shared__ u32 chosen;
    if (threadIdx.x == 0) {
        float acc = 0.0f;
        for (int j = 0; j < (int)blockDim.x; ++j) {
            const float s = chunk_sums[j];
            chunk_sums[j] = acc;
            acc += s;
        }
        total = acc;
        chosen = 0xffffffffu;
    }
    __syncthreads();
    const float target = uniforms[blockIdx.x] * total;
    const float before = chunk_sums[threadIdx.x];
    if (local > 0.0f && target >= before && target < before + local) {
        float acc = before;
        u32 pick = 0xffffffffu, last = 0xffffffffu;
        for (int i = begin; i < end; ++i) {
            const float p = expf(to_f32(row[i]) * inv_temp - m) * inv_z;
            if (p >= tau) {
                last = (u32)i;
                acc += p;
                if (target < acc) { pick = (u32)i; break; }
            }
        }
        atomicMin(&chosen, pick != 0xffffffffu ? pick : last);
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        u32 c = chosen;
        if (c == 0xffffffffu) {
            // Rounding put target at the very end: take the last kept token.
            for (int i = vocab - 1; i >= 0; --i) {
                const float p = expf(to_f32(row[i]) * inv_temp - m) * inv_z;
                if (p >= tau) { c = (u32)i; break; }
            }
        }
        out[blockIdx.x] = c;
    }
}

#define SAMPLING_ENTRY(T, S)                                                                  \
    extern "C" __global__ void argmax_##S(const T* logits, u32* out, int vocab) {            \
        argmax_impl<T>(logits, out, vocab);                                                   \
    }                                                                                         \
    extern "C" __global__ void top_p_##S(const T* logits, const float* u, u32* out, int vocab, \
                                         float inv_temp, float top_p) {                       \
        top_p_impl<T>(logits, u, out, vocab, inv_temp, top_p);                                \
    }

SAMPLING_ENTRY(float, f32)
SAMPLING_ENTRY(f16, f16)
SAMPLING_ENTRY(bf16, bf16)
