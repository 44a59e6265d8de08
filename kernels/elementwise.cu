// Row-wise and element-wise kernels: RMSNorm, RoPE (rotate_half), SiLU*mul,
// embedding gather. Activations in T (f32, f16 or bf16), arithmetic in f32.
// Entry points are `<name>_<dtype>`.

// out[r, :] = x[r, :] * rsqrt(mean(x[r, :]^2) + eps) * w[:]. One block per row.
template <typename T>
__device__ void rms_norm_impl(const T* __restrict__ x, const T* __restrict__ w,
                              T* __restrict__ out, int d, float eps) {
    __shared__ float scratch[32];
    const long long row = blockIdx.x;
    const T* xr = x + row * d;
    T* yr = out + row * d;
    float ss = 0.0f;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        float v = to_f32(xr[i]);
        ss += v * v;
    }
    ss = block_sum(ss, scratch);
    const float inv = rsqrtf(ss / (float)d + eps);
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        yr[i] = from_f32<T>(to_f32(xr[i]) * inv * to_f32(w[i]));
    }
}

// In-place NeoX/HF "rotate_half" rotary embedding on q [T, nh*hd] and
// k [T, nkv*hd]. inv_freq [hd/2] is computed on the host (so Llama-3 scaling
// is the host's business). One block per token; threads over (head, i).
template <typename T>
__device__ void rope_impl(T* __restrict__ q, T* __restrict__ k, const i32* __restrict__ pos,
                          const float* __restrict__ inv_freq, int nh, int nkv, int hd) {
    const long long t = blockIdx.x;
    const int half = hd / 2;
    const float p = (float)pos[t];
    const int total = (nh + nkv) * half;
    for (int idx = threadIdx.x; idx < total; idx += blockDim.x) {
        const int h = idx / half, i = idx - h * half;
        T* base = (h < nh) ? (q + (t * nh + h) * (long long)hd)
                           : (k + (t * nkv + (h - nh)) * (long long)hd);
        float s, c;
        sincosf(p * inv_freq[i], &s, &c);
        const float x1 = to_f32(base[i]);
        const float x2 = to_f32(base[i + half]);
        base[i] = from_f32<T>(x1 * c - x2 * s);
        base[i + half] = from_f32<T>(x2 * c + x1 * s);
    }
}

// out = silu(gate) * up, element-wise over n values.
template <typename T>
__device__ void silu_mul_impl(const T* __restrict__ gate, const T* __restrict__ up,
                              T* __restrict__ out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float g = to_f32(gate[i]);
        const float s = g / (1.0f + expf(-g));
        out[i] = from_f32<T>(s * to_f32(up[i]));
    }
}

// out[t, :] = table[ids[t], :]; the host validated every id < vocab, the
// kernel still writes zeros rather than reading out of bounds.
template <typename T>
__device__ void embedding_impl(const T* __restrict__ table, const u32* __restrict__ ids,
                               T* __restrict__ out, u32 vocab, int d) {
    const long long t = blockIdx.x;
    const u32 id = ids[t];
    T* o = out + t * d;
    if (id >= vocab) {
        for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = from_f32<T>(0.0f);
        return;
    }
    const T* row = table + (long long)id * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) o[i] = row[i];
}

#define ELEMENTWISE_ENTRY(T, S)                                                              \
    extern "C" __global__ void rms_norm_##S(const T* x, const T* w, T* out, int d, float eps) { \
        rms_norm_impl<T>(x, w, out, d, eps);                                                 \
    }                                                                                        \
    extern "C" __global__ void rope_##S(T* q, T* k, const i32* pos, const float* inv_freq,   \
                                        int nh, int nkv, int hd) {                           \
        rope_impl<T>(q, k, pos, inv_freq, nh, nkv, hd);                                      \
    }                                                                                        \
    extern "C" __global__ void silu_mul_##S(const T* g, const T* u, T* out, long long n) {   \
        silu_mul_impl<T>(g, u, out, n);                                                      \
    }                                                                                        \
    extern "C" __global__ void embedding_##S(const T* table, const u32* ids, T* out,         \
                                             u32 vocab, int d) {                             \
        embedding_impl<T>(table, ids, out, vocab, d);                                        \
    }

ELEMENTWISE_ENTRY(float, f32)
ELEMENTWISE_ENTRY(f16, f16)
ELEMENTWISE_ENTRY(bf16, bf16)
