// Dense f16-weight matmul and the small row kernels of the device-resident model
// runtime (batos-model `forward::cuda`). Activations in T (f32, f16 or bf16),
// weights f16, arithmetic in f32. Entry points are `<name>_<dtype>`.

// Tokens per warp in dense_matmul: each warp streams one weight row once per
// tile of this many tokens (decode batches of <= 8 read the weights once).
#define DENSE_TT 8
// Warps (output rows) per dense_matmul block.
#define DENSE_WARPS 8

// y[t, n] = sum_k x[t, k] * W[n, k] with W f16 [N, K] row-major (PyTorch linear
// layout). Block (bx, by): rows n = bx*DENSE_WARPS + warp, tokens
// by*DENSE_TT .. +DENSE_TT. When K % 4 == 0 each lane reads 4 weights (8 bytes)
// per step; the buffers are 256-byte aligned and rows are K*2 bytes apart, so
// the loads stay 8-byte aligned.
template <typename T>
__device__ void dense_matmul_impl(const T* __restrict__ x, const f16* __restrict__ w,
                                  T* __restrict__ y, int ntok, int K, int N) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int n = blockIdx.x * DENSE_WARPS + warp;
    const int t0 = blockIdx.y * DENSE_TT;
    if (n >= N) return;
    const int nt = min(DENSE_TT, ntok - t0);
    float acc[DENSE_TT];
#pragma unroll
    for (int j = 0; j < DENSE_TT; ++j) acc[j] = 0.0f;
    const f16* wr = w + (long long)n * K;
    const T* xb = x + (long long)t0 * K;
    int kdone = 0;
    if ((K & 3) == 0) {
        const uint2* w4 = reinterpret_cast<const uint2*>(wr);
        const int K4 = K >> 2;
        for (int k4 = lane; k4 < K4; k4 += WARP) {
            const uint2 p = w4[k4];
            const float w0 = f16_bits_to_f32((u16)(p.x & 0xffffu));
            const float w1 = f16_bits_to_f32((u16)(p.x >> 16));
            const float w2 = f16_bits_to_f32((u16)(p.y & 0xffffu));
            const float w3 = f16_bits_to_f32((u16)(p.y >> 16));
            const int k = k4 << 2;
#pragma unroll
            for (int j = 0; j < DENSE_TT; ++j) {
                if (j < nt) {
                    const T* xr = xb + (long long)j * K + k;
                    acc[j] += w0 * to_f32(xr[0]) + w1 * to_f32(xr[1]) + w2 * to_f32(xr[2]) +
                              w3 * to_f32(xr[3]);
                }
            }
        }
        kdone = K;
    }
    for (int k = kdone + lane; k < K; k += WARP) {
        const float wk = to_f32(wr[k]);
#pragma unroll
        for (int j = 0; j < DENSE_TT; ++j) {
            if (j < nt) acc[j] += wk * to_f32(xb[(long long)j * K + k]);
        }
    }
#pragma unroll
    for (int j = 0; j < DENSE_TT; ++j) {
        const float s = warp_sum(acc[j]);
        if (lane == 0 && j < nt) y[(long long)(t0 + j) * N + n] = from_f32<T>(s);
    }
}

// x[i] += y[i] (the residual connection), grid-stride over n values.
template <typename T>
__device__ void add_rows_impl(T* __restrict__ x, const T* __restrict__ y, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        x[i] = from_f32<T>(to_f32(x[i]) + to_f32(y[i]));
    }
}

// out[r, :] = in[rows[r], :] for rows of `width` values; one block per output row.
// The host checked every rows[r] against the input's row count.
template <typename T>
__device__ void gather_rows_impl(const T* __restrict__ in, const i32* __restrict__ rows,
                                 T* __restrict__ out, int width) {
    const long long r = blockIdx.x;
    const T* src = in + (long long)rows[r] * width;
    T* dst = out + r * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = src[i];
}

// out[t, 0..width] = in[t, off..off+width] for rows `in_stride` values apart (the
// split of a fused q|k|v or gate|up output); one block per token row.
template <typename T>
__device__ void copy_cols_impl(const T* __restrict__ in, T* __restrict__ out, int in_stride,
                               int off, int width) {
    const long long t = blockIdx.x;
    const T* src = in + t * in_stride + off;
    T* dst = out + t * width;
    for (int i = threadIdx.x; i < width; i += blockDim.x) dst[i] = src[i];
}

// out[t, :] = table[ids[t], :] from an f16 table (the embedding stays f16 on the
// device whatever the activation type). Ids >= vocab give zeros (the host
// checks them first; this only keeps a bad id from reading out of bounds).
template <typename T>
__device__ void embed_h_impl(const f16* __restrict__ table, const u32* __restrict__ ids,
                             T* __restrict__ out, u32 vocab, int d) {
    const long long t = blockIdx.x;
    const u32 id = ids[t];
    T* dst = out + t * d;
    for (int i = threadIdx.x; i < d; i += blockDim.x) {
        dst[i] = from_f32<T>(id < vocab ? to_f32(table[(long long)id * d + i]) : 0.0f);
    }
}

#define DENSE_ENTRY(T, S)                                                                      \
    extern "C" __global__ void dense_matmul_##S(const T* x, const f16* w, T* y, int ntok,      \
                                                int K, int N) {                                \
        dense_matmul_impl<T>(x, w, y, ntok, K, N);                                             \
    }                                                                                          \
    extern "C" __global__ void add_rows_##S(T* x, const T* y, long long n) {                   \
        add_rows_impl<T>(x, y, n);                                                             \
    }                                                                                          \
    extern "C" __global__ void gather_rows_##S(const T* in, const i32* rows, T* out,           \
                                               int width) {                                    \
        gather_rows_impl<T>(in, rows, out, width);                                             \
    }                                                                                          \
    extern "C" __global__ void copy_cols_##S(const T* in, T* out, int in_stride, int off,      \
                                             int width) {                                      \
        copy_cols_impl<T>(in, out, in_stride, off, width);                                     \
    }                                                                                          \
    extern "C" __global__ void embed_h_##S(const f16* table, const u32* ids, T* out,           \
                                           u32 vocab, int d) {                                 \
        embed_h_impl<T>(table, ids, out, vocab, d);                                            \
    }

DENSE_ENTRY(float, f32)
DENSE_ENTRY(f16, f16)
DENSE_ENTRY(bf16, bf16)
