// RMSNorm and the fused RoPE + QK-norm of Llama 4 attention.
//
// Llama 4 rotates q and k on interleaved pairs (x[2j], x[2j+1]) and then, on RoPE layers with
// use_qk_norm, applies a weightless RMS norm per head (Llama4TextL2Norm). Both touch the same
// head row, so one warp does both while the row sits in registers.
#include "common.cuh"

// x: f32 [rows, dim]; weight: f32 [dim] or null; out: f32 [rows, dim] (may alias x).
// out = x · rsqrt(mean(x²) + eps) (· weight). Launch: grid = rows, block = 256.
extern "C" __global__ void rms_norm(const float* __restrict__ x, const float* __restrict__ weight,
                                    float* out, int dim, float eps) {
    __shared__ float scratch[32];
    const float* row = x + (size_t)blockIdx.x * dim;
    float s = 0.0f;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) s += row[i] * row[i];
    s = block_sum(s, scratch);
    const float inv = rsqrtf(s / (float)dim + eps);
    float* o = out + (size_t)blockIdx.x * dim;
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float v = row[i] * inv;
        o[i] = weight ? v * weight[i] : v;
    }
}

// Rotates every head of q ([tokens, heads, head_dim]) in place with the token's cos/sin
// ([tokens, head_dim / 2] each) and, when qk_norm != 0, RMS-normalises each rotated head
// (no weight). cos/sin may be null (NoPE layer): only the norm is applied.
// head_dim must be even and at most 256 (Llama 4: 128; the tiny test models: 16).
// Launch: grid = ceil(tokens · heads / 4), block = 128 (one warp per head row).
extern "C" __global__ void rope_qk_norm(float* __restrict__ q, const float* __restrict__ cos_t,
                                        const float* __restrict__ sin_t, int tokens, int heads,
                                        int head_dim, int qk_norm, float eps) {
    const int lane = threadIdx.x & 31;
    const int hr = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);  // head row
    if (hr >= tokens * heads) return;
    const int token = hr / heads, pairs = head_dim / 2;
    float2* row = reinterpret_cast<float2*>(q + (size_t)hr * head_dim);
    float2 v[4];  // pairs lane, lane + 32, …: up to 128 pairs
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int j = lane + 32 * i;
        if (j >= pairs) break;
        float2 p = row[j];
        if (cos_t) {
            const float c = cos_t[(size_t)token * pairs + j], s = sin_t[(size_t)token * pairs + j];
            p = make_float2(p.x * c - p.y * s, p.x * s + p.y * c);
        }
        v[i] = p;
        ss += p.x * p.x + p.y * p.y;
    }
    float inv = 1.0f;
    if (qk_norm) inv = rsqrtf(warp_sum(ss) / (float)head_dim + eps);
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const int j = lane + 32 * i;
        if (j >= pairs) break;
        row[j] = make_float2(v[i].x * inv, v[i].y * inv);
    }
}
