// The small memory-bound steps between the big kernels of a decoder layer: embedding lookup,
// residual adds, the SwiGLU of dense layers, and the gather/scatter of routed-expert rows on the
// float path. Each is one read and one write of its rows; they exist so that activations never
// leave the device between kernels.
#include "common.cuh"

// table: f32 [vocab, hidden] or bf16 bits [vocab, hidden]; ids: i32 [tokens]; out: f32 [tokens,
// hidden]. Ids were checked against the vocabulary on the host. Launch: grid = tokens, block 256.
extern "C" __global__ void embed_rows_f32(const float* __restrict__ table, const int* __restrict__ ids,
                                          float* __restrict__ out, int hidden) {
    const float* row = table + (size_t)ids[blockIdx.x] * hidden;
    float* o = out + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = row[i];
}

extern "C" __global__ void embed_rows_bf16(const u16* __restrict__ table, const int* __restrict__ ids,
                                           float* __restrict__ out, int hidden) {
    const u16* row = table + (size_t)ids[blockIdx.x] * hidden;
    float* o = out + (size_t)blockIdx.x * hidden;
    // bf16 → f32 is exact: the bits move to the top half.
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = __uint_as_float((u32)row[i] << 16);
}

// x[i] += y[i] for i < n. Launch: grid = ceil(n / 256), block 256.
extern "C" __global__ void add_in_place(float* __restrict__ x, const float* __restrict__ y, int n) {
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) x[i] += y[i];
}

// gate_up: f32 [rows, 2·width] = [gate | up] per row; out: f32 [rows, width] = silu(gate) · up,
// with the CPU's operation order (silu(g) = g / (1 + e^-g), then times up).
// Launch: grid = (ceil(width / 256), rows), block 256.
extern "C" __global__ void swiglu_rows(const float* __restrict__ gate_up, float* __restrict__ out, int width) {
    const int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= width) return;
    const float* row = gate_up + (size_t)blockIdx.y * 2 * width;
    out[(size_t)blockIdx.y * width + j] = silu(row[j]) * row[width + j];
}

// The inputs of one expert's routes: out[r] = x[token[r]] · score[r].
// x: f32 [tokens, hidden]; token, score: [routes]; out: f32 [routes, hidden].
// Launch: grid = routes, block 256.
extern "C" __global__ void gather_scaled_rows(const float* __restrict__ x, const int* __restrict__ token,
                                              const float* __restrict__ score, float* __restrict__ out,
                                              int hidden) {
    const float* row = x + (size_t)token[blockIdx.x] * hidden;
    const float s = score[blockIdx.x];
    float* o = out + (size_t)blockIdx.x * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] = row[i] * s;
}

// out[token[r]] += y[r]. Within one launch the tokens are distinct (one expert sees a token at
// most once), so there is no race; launches run in expert order, a fixed summation order.
// Launch: grid = routes, block 256.
extern "C" __global__ void scatter_add_rows(const float* __restrict__ y, const int* __restrict__ token,
                                            float* __restrict__ out, int hidden) {
    const float* row = y + (size_t)blockIdx.x * hidden;
    float* o = out + (size_t)token[blockIdx.x] * hidden;
    for (int i = threadIdx.x; i < hidden; i += blockDim.x) o[i] += row[i];
}

// Benchmark weights without a host round trip: byte i of `out` becomes a finite e4m3 code of
// magnitude 2^-7 .. 2^1 with a random sign, from a hash of (seed, i). Launch: grid-stride, any.
extern "C" __global__ void fill_random_e4m3(u8* __restrict__ out, unsigned long long n, u32 seed) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        u32 h = (u32)i * 0x9E3779B1u ^ (u32)(i >> 32) * 0x85EBCA77u ^ seed * 0xC2B2AE3Du;
        h ^= h >> 15; h *= 0x2C1B3C6Du; h ^= h >> 12; h *= 0x297A2D39u; h ^= h >> 15;
        // Exponent field 0x0..0x8 over a bias of 7 with any mantissa: never the 0x7f/0xff NaNs.
        out[i] = (u8)(((h & 0x80u)) | (0x20u + (h >> 8) % 0x28u));
    }
}

// The same for f32 values uniform in [-scale, scale) (router weights, norms, KV caches).
extern "C" __global__ void fill_random_f32(float* __restrict__ out, unsigned long long n, u32 seed, float scale) {
    for (unsigned long long i = blockIdx.x * (unsigned long long)blockDim.x + threadIdx.x; i < n;
         i += (unsigned long long)gridDim.x * blockDim.x) {
        u32 h = (u32)i * 0x9E3779B1u ^ (u32)(i >> 32) * 0x85EBCA77u ^ seed * 0xC2B2AE3Du;
        h ^= h >> 15; h *= 0x2C1B3C6Du; h ^= h >> 12; h *= 0x297A2D39u; h ^= h >> 15;
        out[i] = ((float)(h >> 8) * (1.0f / 16777216.0f) * 2.0f - 1.0f) * scale;
    }
}
