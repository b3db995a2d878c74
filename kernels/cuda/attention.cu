// Attention over the paged KV cache (prefill and decode in one kernel), the KV cache write and
// Llama 4's attention temperature of NoPE layers.
//
// KV cache, per layer: keys and values each f32 [num_blocks, kv_heads, BLOCK_TOKENS, head_dim].
// Head-major blocks put one kv head's 16 rows of a block in one contiguous run (8 KiB at
// head_dim 128), so a CTA that serves one kv head reads whole runs. Position p of a sequence
// lives in block table[p / 16] at row p % 16; a slot is block * 16 + row.
#include "common.cuh"

#define BLOCK_TOKENS 16
// No math.h under NVRTC: -inf from its bits.
#define NEG_INF __int_as_float(0xff800000)
#define ATTN_THREADS 128
#define ATTN_WARPS (ATTN_THREADS / 32)
// Query heads per kv head (Maverick: 5) and head_dim bounds that the launcher enforces.
#define ATTN_MAX_GROUP 8
#define ATTN_MAX_DIM 256
// Output columns per thread: head_dim / ATTN_THREADS, rounded up.
#define ATTN_MAX_COLS (ATTN_MAX_DIM / ATTN_THREADS)
// Heads whose softmax state one warp owns (head h belongs to warp h % ATTN_WARPS).
#define ATTN_HEADS_PER_WARP (ATTN_MAX_GROUP / ATTN_WARPS)

// k, v: f32 [tokens, kv_heads, head_dim]; slots: i32 [tokens]; caches as above with
// `cache_slots` = num_blocks · 16 slots. A negative slot (a padding token) writes nothing, and so
// does a slot past the cache (the launcher cannot see the slots; this keeps a bad one from
// corrupting memory). head_dim must be a multiple of 4. Launch: 1-D grid, any size, 256 threads.
extern "C" __global__ void kv_write(const float* __restrict__ k, const float* __restrict__ v,
                                    const int* __restrict__ slots, float* __restrict__ key_cache,
                                    float* __restrict__ value_cache, int tokens, int kv_heads,
                                    int head_dim, long long cache_slots) {
    const int d4 = head_dim / 4;
    const long long n = (long long)tokens * kv_heads * d4;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const int c4 = (int)(i % d4);
        const long long th = i / d4;  // token · kv_heads + head
        const int h = (int)(th % kv_heads);
        const int t = (int)(th / kv_heads);
        const int slot = slots[t];
        if (slot < 0 || slot >= cache_slots) continue;
        const long long block = slot / BLOCK_TOKENS, row = slot % BLOCK_TOKENS;
        const long long dst = ((block * kv_heads + h) * BLOCK_TOKENS + row) * d4 + c4;
        reinterpret_cast<float4*>(key_cache)[dst] = reinterpret_cast<const float4*>(k)[i];
        reinterpret_cast<float4*>(value_cache)[dst] = reinterpret_cast<const float4*>(v)[i];
    }
}

// q, out: f32 [tokens, q_heads, head_dim]. q_start: i32 [seqs + 1], each sequence's first query
// token (cumulative); q_pos0: i32 [seqs], the absolute position of that token; block_tables:
// i32 [seqs, max_blocks]. Query token i of sequence s sits at p = q_pos0[s] + i and sees the keys
// at first_key(p) ..= p, with first_key = 0 (chunk == 0, causal) or p / chunk · chunk (Llama 4's
// chunked local attention). Query head h reads kv head h / group.
//
// One CTA per (query token, kv head) serves the `group` query heads that share the kv head, so
// every key and value row it loads is used `group` times. The keys are scanned one cache block
// (16 rows) at a time with an online softmax in f32: warp w owns heads w, w + 4 and computes their
// 16 scores per block (lane = key row + 16 · half of the dot product), then every thread
// rescales and accumulates P·V for its output columns of all heads.
//
// Shared memory (dynamic, floats): k_s, v_s [16][head_dim + 1] (the +1 makes the lanes' rows
// fall in distinct banks), q_s [group][head_dim], p_s [group][16], alpha_s and l_s [8].
// head_dim: a multiple of 16 (the score loop splits each row into 16-column halves), at most
// 256; group at most 8.
// Launch: grid = (tokens, kv_heads), block = ATTN_THREADS.
extern "C" __global__ void __launch_bounds__(ATTN_THREADS)
    paged_attention(const float* __restrict__ q, const int* __restrict__ q_start,
                    const int* __restrict__ q_pos0, const int* __restrict__ block_tables, int max_blocks,
                    const float* __restrict__ key_cache, const float* __restrict__ value_cache,
                    float* __restrict__ out, int seqs, int q_heads, int kv_heads, int head_dim, float scale,
                    int chunk) {
    extern __shared__ float smem[];
    const int t = blockIdx.x, g = blockIdx.y;
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int group = q_heads / kv_heads, d = head_dim, stride = d + 1;
    float* k_s = smem;                             // [16][d + 1]
    float* v_s = k_s + BLOCK_TOKENS * stride;      // [16][d + 1]
    float* q_s = v_s + BLOCK_TOKENS * stride;      // [group][d]
    float* p_s = q_s + group * d;                  // [group][16]
    float* alpha_s = p_s + group * BLOCK_TOKENS;   // [8]
    float* l_s = alpha_s + ATTN_MAX_GROUP;         // [8]

    // The token's sequence: the last s with q_start[s] <= t (empty sequences are skipped over).
    int lo_s = 0, hi_s = seqs;
    while (hi_s - lo_s > 1) {
        const int mid = (lo_s + hi_s) >> 1;
        if (q_start[mid] <= t) lo_s = mid; else hi_s = mid;
    }
    const int s = lo_s;
    const int p = q_pos0[s] + (t - q_start[s]);
    const int first = chunk > 0 ? p / chunk * chunk : 0;
    const int* table = block_tables + (size_t)s * max_blocks;

    // The group's queries are contiguous: heads g·group .. g·group + group - 1 of token t.
    const float* qg = q + ((size_t)t * q_heads + (size_t)g * group) * d;
    for (int i = tid; i < group * d; i += ATTN_THREADS) q_s[i] = qg[i];

    // Softmax state of the heads this warp owns (every lane keeps a copy).
    float m[ATTN_HEADS_PER_WARP], l[ATTN_HEADS_PER_WARP];
#pragma unroll
    for (int r = 0; r < ATTN_HEADS_PER_WARP; ++r) m[r] = NEG_INF, l[r] = 0.0f;
    // acc[ci][h]: column tid + ci · ATTN_THREADS of head h.
    float acc[ATTN_MAX_COLS][ATTN_MAX_GROUP];
#pragma unroll
    for (int ci = 0; ci < ATTN_MAX_COLS; ++ci)
#pragma unroll
        for (int h = 0; h < ATTN_MAX_GROUP; ++h) acc[ci][h] = 0.0f;

    const int half = lane >> 4, j = lane & 15;
    for (int pos0 = first / BLOCK_TOKENS * BLOCK_TOKENS; pos0 <= p; pos0 += BLOCK_TOKENS) {
        // Visible rows of this block: [j0, j1). Only those are loaded or used, so a partial last
        // block (rows past p not written yet) and the rows before a chunk start are never read.
        const int j0 = max(first - pos0, 0), j1 = min(p - pos0 + 1, BLOCK_TOKENS);
        const size_t base = ((size_t)table[pos0 / BLOCK_TOKENS] * kv_heads + g) * BLOCK_TOKENS * d;
        const float* kb = key_cache + base;
        const float* vb = value_cache + base;
        for (int e = j0 * d + tid; e < j1 * d; e += ATTN_THREADS) {
            const int r = e / d, c = e - r * d;
            k_s[r * stride + c] = kb[e];
            v_s[r * stride + c] = vb[e];
        }
        __syncthreads();  // k_s, v_s (and q_s on the first block) are ready

        // Scores: lane (j, half) sums the columns c ≡ 16·half + k (mod 32), k < 16: at each step
        // the 32 lanes read 32 distinct banks of k_s (row stride d + 1).
#pragma unroll
        for (int r = 0; r < ATTN_HEADS_PER_WARP; ++r) {
            const int h = warp + r * ATTN_WARPS;
            if (h >= group) break;  // warp-uniform
            const float* qh = q_s + h * d;
            const float* kr = k_s + j * stride;
            float dot = 0.0f;
            for (int c0 = 16 * half; c0 < d; c0 += 32) {
#pragma unroll
                for (int k = 0; k < 16; ++k) dot = fmaf(qh[c0 + k], kr[c0 + k], dot);
            }
            dot += __shfl_xor_sync(0xffffffffu, dot, 16);
            const bool visible = j >= j0 && j < j1;
            const float score = visible ? dot * scale : NEG_INF;
            // Some row of every scanned block is visible, so the block max is finite.
            const float m_new = fmaxf(m[r], warp_max(score));
            const float e = visible ? expf(score - m_new) : 0.0f;
            const float alpha = expf(m[r] - m_new);  // 0 on the first block (m = -inf)
            // Both halves hold the same 16 values: sum one copy.
            const float block_sum = warp_sum(half == 0 ? e : 0.0f);
            l[r] = l[r] * alpha + block_sum;
            m[r] = m_new;
            if (half == 0) p_s[h * BLOCK_TOKENS + j] = e;
            if (lane == 0) alpha_s[h] = alpha;
        }
        __syncthreads();  // p_s, alpha_s are ready

#pragma unroll
        for (int ci = 0; ci < ATTN_MAX_COLS; ++ci) {
            const int c = tid + ci * ATTN_THREADS;
            if (c >= d) break;
#pragma unroll
            for (int h = 0; h < ATTN_MAX_GROUP; ++h) {
                if (h >= group) break;
                float a = acc[ci][h] * alpha_s[h];
                for (int r = j0; r < j1; ++r) a = fmaf(p_s[h * BLOCK_TOKENS + r], v_s[r * stride + c], a);
                acc[ci][h] = a;
            }
        }
        __syncthreads();  // k_s, v_s, p_s, alpha_s are reused by the next block
    }

#pragma unroll
    for (int r = 0; r < ATTN_HEADS_PER_WARP; ++r) {
        const int h = warp + r * ATTN_WARPS;
        if (h < group && lane == 0) l_s[h] = l[r];
    }
    __syncthreads();
    float* og = out + ((size_t)t * q_heads + (size_t)g * group) * d;
#pragma unroll
    for (int ci = 0; ci < ATTN_MAX_COLS; ++ci) {
        const int c = tid + ci * ATTN_THREADS;
        if (c >= d) break;
#pragma unroll
        for (int h = 0; h < ATTN_MAX_GROUP; ++h) {
            if (h >= group) break;
            og[h * d + c] = acc[ci][h] / l_s[h];
        }
    }
}

// q: f32 [tokens, q_heads, head_dim], scaled in place by
// 1 + attn_scale · log1p(floor((positions[t] + 1) / floor_scale)) (Llama 4 NoPE layers). The
// multiply and the add are kept apart (no fma), as the host computes them.
// Launch: 1-D grid, any size, 256 threads.
extern "C" __global__ void attn_temperature(float* __restrict__ q, const int* __restrict__ positions,
                                            int tokens, int row, float attn_scale, float floor_scale) {
    const long long n = (long long)tokens * row;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        const float p1 = (float)positions[i / row] + 1.0f;
        const float f = __fadd_rn(__fmul_rn(log1pf(floorf(p1 / floor_scale)), attn_scale), 1.0f);
        q[i] *= f;
    }
}
