// Dense linear layers: y[m, n] = x[m, k] · W[n, k]ᵀ with f32 activations and f32 accumulation,
// for three weight types (f32, bf16 bits, e4m3 codes with one f32 scale per output row).
//
// Two kernels, chosen by the launcher (kernels/src/cuda/linear.rs):
// - `linear_gemv_*_m{1..8}`: decode. Reading W once is the whole cost, so each warp owns 8 weight
//   rows (every x value it loads serves 8 rows, which keeps the L1 traffic of x below the HBM
//   stream of W even at m = 8) and all m ≤ 8 activation rows, and streams W with L1-bypassing
//   loads. A lane handles 4 consecutive k per step, so the warp's loads of W (4 weights per
//   lane: 128–512 B) and of x (one float4 per lane: 512 B) are both contiguous. When n is small,
//   `ksplit` warps share a row group along K and add up in shared memory, in a fixed order.
// - `linear_tiled_*`: prefill of small models. A plain 64×64×16 shared-memory SGEMM (4×4 per
//   thread, f32 FMA, registers prefetch the next K tile). Correct for any m, n, k.
// No tf32, no reduced precision: the model's golden tests compare logits at 2e-3.
#include "common.cuh"

#define WT_F32 0
#define WT_BF16 1
#define WT_FP8 2

#define GEMV_ROWS 8    // weight rows per warp
#define GEMV_WARPS 8   // warps per block (256 threads)

// Per weight type: u32 words holding 4 weights, bytes per weight, steps of 128 k unrolled per
// loop trip (fp8 loads are only 128 B per warp, so two steps keep 2 KB per warp in flight).
template <int WT> struct Wt;
template <> struct Wt<WT_F32> { static constexpr int WORDS = 4, BYTES = 4, U = 1; };
template <> struct Wt<WT_BF16> { static constexpr int WORDS = 2, BYTES = 2, U = 1; };
template <> struct Wt<WT_FP8> { static constexpr int WORDS = 1, BYTES = 1, U = 2; };

// Weights are read exactly once: skip L1 (x lives there) and let L2 fetch 256 B ahead.
template <int WORDS> __device__ __forceinline__ void ld_stream(const u8* p, u32 (&r)[WORDS]);
template <> __device__ __forceinline__ void ld_stream<1>(const u8* p, u32 (&r)[1]) {
    asm("ld.global.nc.L1::no_allocate.L2::256B.u32 %0, [%1];" : "=r"(r[0]) : "l"(p));
}
template <> __device__ __forceinline__ void ld_stream<2>(const u8* p, u32 (&r)[2]) {
    asm("ld.global.nc.L1::no_allocate.L2::256B.v2.u32 {%0,%1}, [%2];" : "=r"(r[0]), "=r"(r[1]) : "l"(p));
}
template <> __device__ __forceinline__ void ld_stream<4>(const u8* p, u32 (&r)[4]) {
    asm("ld.global.nc.L1::no_allocate.L2::256B.v4.u32 {%0,%1,%2,%3}, [%4];"
        : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
        : "l"(p));
}

// x is small and reused by every warp: the read-only path, cached in L1.
__device__ __forceinline__ float4 ld_x4(const float* p) {
    float4 v;
    asm("ld.global.nc.v4.f32 {%0,%1,%2,%3}, [%4];" : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w) : "l"(p));
    return v;
}

__device__ __forceinline__ float bits_f32(u32 b) {
    float f;
    asm("mov.b32 %0, %1;" : "=f"(f) : "r"(b));
    return f;
}

// Four consecutive weights from their words (the e4m3 scale is applied once per output).
template <int WT> __device__ __forceinline__ void decode4(const u32 (&r)[Wt<WT>::WORDS], float (&w)[4]);
template <> __device__ __forceinline__ void decode4<WT_F32>(const u32 (&r)[4], float (&w)[4]) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = bits_f32(r[i]);
}
template <> __device__ __forceinline__ void decode4<WT_BF16>(const u32 (&r)[2], float (&w)[4]) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
        w[2 * i] = bits_f32(r[i] << 16);
        w[2 * i + 1] = bits_f32(r[i] & 0xffff0000u);
    }
}
template <> __device__ __forceinline__ void decode4<WT_FP8>(const u32 (&r)[1], float (&w)[4]) {
    const float2 lo = e4m3x2_to_f32x2((u16)(r[0] & 0xffffu)), hi = e4m3x2_to_f32x2((u16)(r[0] >> 16));
    w[0] = lo.x; w[1] = lo.y; w[2] = hi.x; w[3] = hi.y;
}

// x: f32 [M, k]; W: [n, k] of type WT; scale: f32 [n] (fp8 only); y: f32 [M, n].
// k % 4 == 0; ksplit ∈ {1, 2, 4, 8}. Launch: block 256, grid ceil(n / (8 · 8 / ksplit)).
template <int WT, int M>
__device__ __forceinline__ void gemv(const float* __restrict__ x, const void* __restrict__ W,
                                     const float* __restrict__ scale, float* __restrict__ y,
                                     int n, int k, int ksplit) {
    typedef Wt<WT> T;
    __shared__ float red[GEMV_WARPS][GEMV_ROWS * M];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int groups = GEMV_WARPS / ksplit;  // row groups per block
    const int group = warp / ksplit, part = warp - group * ksplit;
    const int rows_per_block = groups * GEMV_ROWS;
    const int row0 = blockIdx.x * rows_per_block + group * GEMV_ROWS;
    const size_t row_bytes = (size_t)k * T::BYTES;
    // Rows past n (last block only) re-read the group's last valid row and are never written.
    const int first = min(row0, n - 1), last = min(GEMV_ROWS, n - first) - 1;
    const u8* wbase = static_cast<const u8*>(W) + (size_t)first * row_bytes;

    float acc[GEMV_ROWS][M];
#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = 0.0f;

    const int step = 128 * ksplit;  // k covered by one step of all the parts of a row group
    for (int k0 = part * 128 + lane * 4; k0 < k; k0 += step * T::U) {
        u32 raw[T::U][GEMV_ROWS][T::WORDS];
#pragma unroll
        for (int u = 0; u < T::U; ++u) {
            const int kk = k0 + u * step;
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; ++r) {
                if (kk < k) {
                    ld_stream<T::WORDS>(wbase + (size_t)min(r, last) * row_bytes + (size_t)kk * T::BYTES, raw[u][r]);
                } else {
#pragma unroll
                    for (int i = 0; i < T::WORDS; ++i) raw[u][r][i] = 0u;
                }
            }
        }
#pragma unroll
        for (int u = 0; u < T::U; ++u) {
            const int kk = k0 + u * step;
            if (kk >= k) continue;  // only in the last trip
            float4 xv[M];
#pragma unroll
            for (int m = 0; m < M; ++m) xv[m] = ld_x4(x + (size_t)m * k + kk);
#pragma unroll
            for (int r = 0; r < GEMV_ROWS; ++r) {
                float w[4];
                decode4<WT>(raw[u][r], w);
#pragma unroll
                for (int m = 0; m < M; ++m) {
                    float a = acc[r][m];
                    a = fmaf(w[0], xv[m].x, a);
                    a = fmaf(w[1], xv[m].y, a);
                    a = fmaf(w[2], xv[m].z, a);
                    a = fmaf(w[3], xv[m].w, a);
                    acc[r][m] = a;
                }
            }
        }
    }

#pragma unroll
    for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
        for (int m = 0; m < M; ++m) acc[r][m] = warp_sum(acc[r][m]);
    if (lane == 0) {
#pragma unroll
        for (int r = 0; r < GEMV_ROWS; ++r)
#pragma unroll
            for (int m = 0; m < M; ++m) red[warp][r * M + m] = acc[r][m];
    }
    __syncthreads();
    // One thread per output; the K parts are added in part order, so the result is deterministic.
    for (int t = threadIdx.x; t < rows_per_block * M; t += blockDim.x) {
        const int m = t / rows_per_block, i = t - m * rows_per_block;
        const int g = i / GEMV_ROWS, r = i - g * GEMV_ROWS;
        const int row = blockIdx.x * rows_per_block + i;
        float s = 0.0f;
        for (int p = 0; p < ksplit; ++p) s += red[g * ksplit + p][r * M + m];
        if (row < n) y[(size_t)m * n + row] = WT == WT_FP8 ? s * scale[row] : s;
    }
}

#define GEMV(name, WT, M)                                                                       \
    extern "C" __global__ void __launch_bounds__(GEMV_WARPS * 32, 1)                             \
    linear_gemv_##name##_m##M(const float* __restrict__ x, const void* __restrict__ W,          \
                              const float* __restrict__ scale, float* __restrict__ y, int n,    \
                              int k, int ksplit) {                                              \
        gemv<WT, M>(x, W, scale, y, n, k, ksplit);                                              \
    }
#define GEMV_ALL_M(name, WT) \
    GEMV(name, WT, 1) GEMV(name, WT, 2) GEMV(name, WT, 3) GEMV(name, WT, 4) \
    GEMV(name, WT, 5) GEMV(name, WT, 6) GEMV(name, WT, 7) GEMV(name, WT, 8)
GEMV_ALL_M(f32, WT_F32)
GEMV_ALL_M(bf16, WT_BF16)
GEMV_ALL_M(fp8, WT_FP8)

#define TM 64
#define TN 64
#define TK 16
#define TILE_THREADS 256

// One weight as f32, any alignment (the tiled kernel accepts every k).
template <int WT> __device__ __forceinline__ float load_w1(const void* W, size_t i);
template <> __device__ __forceinline__ float load_w1<WT_F32>(const void* W, size_t i) {
    return static_cast<const float*>(W)[i];
}
template <> __device__ __forceinline__ float load_w1<WT_BF16>(const void* W, size_t i) {
    return bits_f32((u32) static_cast<const u16*>(W)[i] << 16);
}
template <> __device__ __forceinline__ float load_w1<WT_FP8>(const void* W, size_t i) {
    return e4m3x2_to_f32x2((u16) static_cast<const u8*>(W)[i]).x;
}

// x: f32 [m, k]; W: [n, k]; scale: f32 [n] (fp8 only); y: f32 [m, n]. Any m, n, k ≥ 0.
// Launch: block 256, grid (ceil(n / 64), ceil(m / 64)).
template <int WT>
__device__ __forceinline__ void tiled(const float* __restrict__ x, const void* __restrict__ W,
                                      const float* __restrict__ scale, float* __restrict__ y,
                                      int m, int n, int k) {
    // Stored K-major so that a thread's 4 rows (and 4 columns) are one float4; +4 keeps rows
    // 16-byte aligned.
    __shared__ __align__(16) float As[TK][TM + 4];
    __shared__ __align__(16) float Bs[TK][TN + 4];
    const int tid = threadIdx.x, tx = tid & 15, ty = tid >> 4;
    const int n0 = blockIdx.x * TN, m0 = blockIdx.y * TM;
    // Loader: each thread brings 4 consecutive k of one x row and one W row per K tile.
    const int lr = tid >> 2, lk = (tid & 3) * 4;
    const int am = m0 + lr, bn = n0 + lr;
    float ra[4], rb[4];
    auto load = [&](int k0) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int kk = k0 + lk + j;
            ra[j] = (am < m && kk < k) ? x[(size_t)am * k + kk] : 0.0f;
            rb[j] = (bn < n && kk < k) ? load_w1<WT>(W, (size_t)bn * k + kk) : 0.0f;
        }
    };
    auto store = [&]() {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            As[lk + j][lr] = ra[j];
            Bs[lk + j][lr] = rb[j];
        }
    };
    float acc[4][4];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) acc[i][j] = 0.0f;

    load(0);
    store();
    __syncthreads();
    for (int k0 = 0; k0 < k; k0 += TK) {
        const bool more = k0 + TK < k;
        if (more) load(k0 + TK);  // in flight while this tile is multiplied
#pragma unroll
        for (int kk = 0; kk < TK; ++kk) {
            const float4 a = *reinterpret_cast<const float4*>(&As[kk][ty * 4]);
            const float4 b = *reinterpret_cast<const float4*>(&Bs[kk][tx * 4]);
            const float av[4] = {a.x, a.y, a.z, a.w}, bv[4] = {b.x, b.y, b.z, b.w};
#pragma unroll
            for (int i = 0; i < 4; ++i)
#pragma unroll
                for (int j = 0; j < 4; ++j) acc[i][j] = fmaf(av[i], bv[j], acc[i][j]);
        }
        __syncthreads();
        if (more) {
            store();
            __syncthreads();
        }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int row = m0 + ty * 4 + i;
        if (row >= m) continue;
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const int col = n0 + tx * 4 + j;
            if (col < n) y[(size_t)row * n + col] = WT == WT_FP8 ? acc[i][j] * scale[col] : acc[i][j];
        }
    }
}

#define TILED(name, WT)                                                                         \
    extern "C" __global__ void __launch_bounds__(TILE_THREADS)                                  \
    linear_tiled_##name(const float* __restrict__ x, const void* __restrict__ W,                \
                        const float* __restrict__ scale, float* __restrict__ y, int m, int n,   \
                        int k) {                                                                \
        tiled<WT>(x, W, scale, y, m, n, k);                                                     \
    }
TILED(f32, WT_F32)
TILED(bf16, WT_BF16)
TILED(fp8, WT_FP8)
