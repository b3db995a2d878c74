// MoE dispatch: per-route FP8 e4m3 quantization fused with the router-score scaling and the
// packing of routes into expert order.
//
// Llama 4 scales each routed expert's *input* by sigmoid(router logit), so the row an expert
// sees is `x[token] · score`, and its per-token dynamic FP8 scale is taken after that scaling.
// One block per packed route; the row is read twice (absmax, then quantize) and the second read
// hits L1/L2, so the kernel moves ~1 read + ¼ write of the row per route: memory-bound, which is
// all it can be.
#include "common.cuh"

// x:           f32 [tokens, hidden]      post-norm activations
// route_token: i32 [routes]              source token of each packed route (expert order)
// route_score: f32 [routes]              sigmoid(router logit) of that route
// q:           u8  [routes, hidden]      e4m3 of x[token]·score / a_scale
// a_scale:     f32 [routes]              absmax(x[token]·score) / 448 (1 for an all-zero row)
// hidden must be even. Launch: grid = routes, block = 256 (any multiple of 32 up to 1024).
extern "C" __global__ void moe_quant_dispatch_fp8(const float* __restrict__ x,
                                                  const int* __restrict__ route_token,
                                                  const float* __restrict__ route_score,
                                                  u8* __restrict__ q, float* __restrict__ a_scale,
                                                  int hidden) {
    __shared__ float scratch[32];
    const int r = blockIdx.x;
    const float score = route_score[r];
    const float2* row = reinterpret_cast<const float2*>(x + (size_t)route_token[r] * hidden);
    const int pairs = hidden / 2;

    float m = 0.0f;
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
        const float2 v = row[i];
        m = fmaxf(m, fmaxf(fabsf(v.x * score), fabsf(v.y * score)));
    }
    m = block_max(m, scratch);

    // Same f32 operations, in the same order, as the CPU reference: scale = absmax / 448,
    // q = (x·score) · (448 / absmax).
    const bool zero = m < FP8_MIN_ABSMAX;
    const float inv = zero ? 0.0f : FP8_E4M3_MAX / m;
    if (threadIdx.x == 0) a_scale[r] = zero ? 1.0f : m / FP8_E4M3_MAX;
    u16* out = reinterpret_cast<u16*>(q + (size_t)r * hidden);
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
        const float2 v = row[i];
        out[i] = f32x2_to_e4m3x2((v.x * score) * inv, (v.y * score) * inv);
    }
}

// Plain per-token quantization (no routing), e.g. for a dense FP8 layer's input.
// x: f32 [rows, cols] → q: u8 [rows, cols], scale: f32 [rows]. Launch: grid = rows, block = 256.
extern "C" __global__ void quant_rows_fp8(const float* __restrict__ x, u8* __restrict__ q,
                                         float* __restrict__ scale, int cols) {
    __shared__ float scratch[32];
    const float2* row = reinterpret_cast<const float2*>(x + (size_t)blockIdx.x * cols);
    const int pairs = cols / 2;
    float m = 0.0f;
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
        const float2 v = row[i];
        m = fmaxf(m, fmaxf(fabsf(v.x), fabsf(v.y)));
    }
    m = block_max(m, scratch);
    const bool zero = m < FP8_MIN_ABSMAX;
    const float inv = zero ? 0.0f : FP8_E4M3_MAX / m;
    if (threadIdx.x == 0) scale[blockIdx.x] = zero ? 1.0f : m / FP8_E4M3_MAX;
    u16* out = reinterpret_cast<u16*>(q + (size_t)blockIdx.x * cols);
    for (int i = threadIdx.x; i < pairs; i += blockDim.x) {
        const float2 v = row[i];
        out[i] = f32x2_to_e4m3x2(v.x * inv, v.y * inv);
    }
}
