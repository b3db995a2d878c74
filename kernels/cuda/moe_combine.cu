// MoE combine: each token's output is its shared-expert output plus the outputs of its routed
// experts, summed in a fixed order (route slot 0, 1, …) so the result does not depend on how
// routes were packed or which rank computed them.
//
// Gather form (one block per token reads its k routed rows) rather than scatter-add with
// atomics: deterministic, and no zero-init pass over the output.
#include "common.cuh"

// shared_out:   f32 [tokens, hidden]   the shared expert's output (or null: treated as 0)
// expert_out:   f32 [routes, hidden]   routed expert outputs, in packed (expert) order
// token_routes: i32 [tokens, top_k]    packed index of each of the token's routes, -1 = none
// out:          f32 [tokens, hidden]
// Launch: grid = tokens, block = 256; hidden must be a multiple of 4.
extern "C" __global__ void moe_combine(const float* __restrict__ shared_out,
                                       const float* __restrict__ expert_out,
                                       const int* __restrict__ token_routes, float* __restrict__ out,
                                       int hidden, int top_k) {
    const int t = blockIdx.x;
    const int quads = hidden / 4;
    const float4* sh = shared_out ? reinterpret_cast<const float4*>(shared_out + (size_t)t * hidden) : nullptr;
    float4* o = reinterpret_cast<float4*>(out + (size_t)t * hidden);
    for (int i = threadIdx.x; i < quads; i += blockDim.x) {
        float4 acc = sh ? sh[i] : make_float4(0.f, 0.f, 0.f, 0.f);
        for (int j = 0; j < top_k; ++j) {
            const int r = token_routes[t * top_k + j];
            if (r < 0) continue;
            const float4 v = reinterpret_cast<const float4*>(expert_out + (size_t)r * hidden)[i];
            acc.x += v.x; acc.y += v.y; acc.z += v.z; acc.w += v.w;
        }
        o[i] = acc;
    }
}
