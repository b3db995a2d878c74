// Helpers shared by every kernel in kernels/cuda/.
//
// Deliberately free of CUDA headers (no cuda_fp8.h, no cuda_bf16.h): NVRTC 12.x ships no
// cuda_fp8.h, so a header-free source compiles with NVRTC alone at run time and with the pip
// NVRTC wheel in CI. The FP8 conversions are the hardware instructions (sm_89+) via inline PTX.
#pragma once

typedef unsigned char u8;
typedef unsigned short u16;
typedef unsigned int u32;

// Largest finite e4m3 value; scales map a row's absmax onto it.
#define FP8_E4M3_MAX 448.0f
// Below this absmax a row is treated as all zeros (its scale would underflow).
#define FP8_MIN_ABSMAX 1e-12f

// Two f32 → two e4m3 (round to nearest even, saturate to ±448). `lo` lands in the low byte.
__device__ __forceinline__ u16 f32x2_to_e4m3x2(float lo, float hi) {
    u16 out;
    // PTX puts the first source in the upper byte.
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(out) : "f"(hi), "f"(lo));
    return out;
}

// Two e4m3 (low byte first) → two f32, exactly (every e4m3 value is an f16 value).
__device__ __forceinline__ float2 e4m3x2_to_f32x2(u16 v) {
    u32 h2;
    asm("cvt.rn.f16x2.e4m3x2 %0, %1;" : "=r"(h2) : "h"(v));
    float lo, hi;
    asm("cvt.f32.f16 %0, %1;" : "=f"(lo) : "h"((u16)(h2 & 0xffff)));
    asm("cvt.f32.f16 %0, %1;" : "=f"(hi) : "h"((u16)(h2 >> 16)));
    return make_float2(lo, hi);
}

__device__ __forceinline__ float silu(float x) { return x / (1.0f + expf(-x)); }

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Max over a block of `nwarps * 32` threads; `scratch` holds one float per warp. Every thread
// gets the result.
__device__ __forceinline__ float block_max(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_max(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    v = warp_max(v);
    __syncthreads();  // scratch may be reused right after
    return v;
}

__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    v = warp_sum(v);
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < nwarps ? scratch[lane] : 0.0f;
    v = warp_sum(v);
    __syncthreads();
    return v;
}
