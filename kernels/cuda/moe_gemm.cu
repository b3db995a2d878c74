// Grouped FP8 e4m3 GEMM over experts: every expert e multiplies its packed rows of activations
// by its own weight matrix, in one launch.
//
//   y[r, n] = b_scale[e, n] · Σ_g a_scale[r, g] · Σ_{k in group g} A[r, k] · B[e, n, k]
//
// A: e4m3 [rows, K], rows packed by expert (rows row_offsets[e]..row_offsets[e+1] belong to
//    expert e), activation scales per row and per K-group (kgroups groups of K/kgroups; 1 group
//    = per-token scaling). B: e4m3 [E, N, K], K-major (nn.Linear layout, one row per output
//    channel) with one f32 scale per output channel. f32 accumulation throughout.
//
// Two epilogues:
// - `moe_gemm_fp8_swiglu` (gate_up): B holds [gate | up] as N = 2·width rows. Each block owns
//   64 columns j of the intermediate and loads the matching gate rows j and up rows width + j,
//   so one thread holds gate and up of the same column: h = silu(gate) · up is computed in
//   registers and re-quantized to e4m3 at once, with one scale per (row, 64-column group).
//   Per-token scales would need the absmax over all `width` columns, which span 128 blocks;
//   1×64 group scales (the DeepSeek-V3 / DeepGEMM "fine-grained" scheme at a finer grain) keep
//   the re-quantization inside the block, and the down GEMM applies them per K-group.
// - `moe_gemm_fp8` (down): y in f32.
//
// Tiling (correctness first): block tile 64 rows × 128 columns × 64 K bytes, 4 warps as 2×2,
// warp tile 32 × 64 = 2 × 8 `mma.sync.m16n8k32.e4m3` tiles, cp.async double buffering into
// shared memory (rows padded to 80 B: conflict-free fragment loads). Each K-group's partial sum
// is kept apart and promoted into the main accumulator with its activation scale.
//
// What a faster sm_90a version would do (not done: it needs a GPU to validate): TMA loads into
// a 4–6 stage mbarrier pipeline, wgmma.m64nNk32 e4m3 from shared memory with a producer warp and
// two consumer warpgroups (128×256 tiles), a persistent tile scheduler over experts, and a TMA
// store epilogue. That is the DeepGEMM / CUTLASS grouped-GEMM design, and it is what the ≥70 %
// of dense FP8 peak goal needs; mma.sync tops out at roughly half of the wgmma rate on H100.
#include "common.cuh"

#define BM 64
#define BN 128
#define BK 64
#define SROW 80  // shared row stride in bytes: 64 data + 16 padding
#define THREADS 128

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
    const u32 s = static_cast<u32>(__cvta_generic_to_shared(smem));
    const int n = valid ? 16 : 0;  // 0 source bytes: the 16 destination bytes are zero-filled
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(s), "l"(gmem), "r"(n));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;"); }
__device__ __forceinline__ void cp_async_wait1() { asm volatile("cp.async.wait_group 1;" ::: "memory"); }

__device__ __forceinline__ void mma_e4m3(float (&d)[4], const u32 (&a)[4], const u32 (&b)[2]) {
    // Not volatile: a pure function of its operands, so the compiler may schedule it freely.
    asm("mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Which expert and which of its row tiles this block computes. tile_offsets[e] = number of BM
// row tiles of experts before e. Returns false for the spare blocks of the upper-bound grid.
__device__ __forceinline__ bool find_tile(const int* tile_offsets, int experts, int& e, int& tile) {
    const int t = blockIdx.x;
    if (t >= tile_offsets[experts]) return false;
    int lo = 0, hi = experts;  // invariant: tile_offsets[lo] <= t < tile_offsets[hi]
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (tile_offsets[mid] <= t) lo = mid; else hi = mid;
    }
    e = lo;
    tile = t - tile_offsets[lo];
    return true;
}

// The shared main loop. On return acc[mt][nt][i] holds the scaled sum (activation scales
// applied, weight scales not) of row  warp_m·32 + mt·16 + g + 8·(i/2)  and tile column
// warp_n·64 + nt·8 + 2t + i%2, where g = lane/4, t = lane%4. `brow(s)` maps shared B row s
// (0..BN) to the global output channel it holds.
template <typename BRow>
__device__ __forceinline__ void mainloop(const u8* __restrict__ A, const u8* __restrict__ Bexp,
                                         const float* __restrict__ a_scale, int kgroups,
                                         int row0, int rows, int K, BRow brow,
                                         float (&acc)[2][8][4]) {
    __shared__ __align__(16) u8 As[2][BM * SROW];
    __shared__ __align__(16) u8 Bs[2][BN * SROW];
    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int warp_m = warp >> 1, warp_n = warp & 1, g = lane >> 2, t = lane & 3;
    const int group_k = K / kgroups;

    // Each thread copies 2 A chunks and 4 B chunks of 16 B per stage.
    auto load = [&](int stage, int k0) {
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            const int c = tid + i * THREADS, r = c >> 2, kc = (c & 3) * 16;
            const bool ok = r < rows;
            const u8* src = A + (size_t)(row0 + (ok ? r : 0)) * K + k0 + kc;
            cp_async16(&As[stage][r * SROW + kc], src, ok);
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const int c = tid + i * THREADS, s = c >> 2, kc = (c & 3) * 16;
            cp_async16(&Bs[stage][s * SROW + kc], Bexp + (size_t)brow(s) * K + k0 + kc, true);
        }
    };

    float part[2][8][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int nt = 0; nt < 8; ++nt)
#pragma unroll
            for (int i = 0; i < 4; ++i) acc[mt][nt][i] = part[mt][nt][i] = 0.0f;

    // Activation scales of this thread's four rows (clamped for the zero-filled tail rows).
    int srow[2][2];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int h = 0; h < 2; ++h) {
            const int r = warp_m * 32 + mt * 16 + g + 8 * h;
            srow[mt][h] = row0 + (r < rows ? r : 0);
        }

    const int ktiles = K / BK;
    load(0, 0);
    cp_async_commit();
    for (int kt = 0; kt < ktiles; ++kt) {
        if (kt + 1 < ktiles) load((kt + 1) & 1, (kt + 1) * BK);
        cp_async_commit();  // possibly empty: keeps wait_group 1 meaning "stage kt has landed"
        cp_async_wait1();
        __syncthreads();
        const u8* as = As[kt & 1];
        const u8* bs = Bs[kt & 1];
#pragma unroll
        for (int ks = 0; ks < BK; ks += 32) {
            u32 a[2][4];
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                const u8* p = as + (warp_m * 32 + mt * 16 + g) * SROW + ks + t * 4;
                a[mt][0] = *reinterpret_cast<const u32*>(p);
                a[mt][1] = *reinterpret_cast<const u32*>(p + 8 * SROW);
                a[mt][2] = *reinterpret_cast<const u32*>(p + 16);
                a[mt][3] = *reinterpret_cast<const u32*>(p + 8 * SROW + 16);
            }
            // B fragments one n-tile at a time: holding all eight costs 16 registers that the
            // two accumulator sets (128) cannot spare.
#pragma unroll
            for (int nt = 0; nt < 8; ++nt) {
                const u8* p = bs + (warp_n * 64 + nt * 8 + g) * SROW + ks + t * 4;
                const u32 b[2] = {*reinterpret_cast<const u32*>(p), *reinterpret_cast<const u32*>(p + 16)};
                mma_e4m3(part[0][nt], a[0], b);
                mma_e4m3(part[1][nt], a[1], b);
            }
        }
        __syncthreads();  // the next iteration's load overwrites the stage just read

        if (((kt + 1) * BK) % group_k == 0) {  // end of a K-group: promote with its scale
            const int grp = (kt + 1) * BK / group_k - 1;
#pragma unroll
            for (int mt = 0; mt < 2; ++mt) {
                const float s0 = a_scale[(size_t)srow[mt][0] * kgroups + grp];
                const float s1 = a_scale[(size_t)srow[mt][1] * kgroups + grp];
#pragma unroll
                for (int nt = 0; nt < 8; ++nt) {
                    acc[mt][nt][0] += part[mt][nt][0] * s0;
                    acc[mt][nt][1] += part[mt][nt][1] * s0;
                    acc[mt][nt][2] += part[mt][nt][2] * s1;
                    acc[mt][nt][3] += part[mt][nt][3] * s1;
#pragma unroll
                    for (int i = 0; i < 4; ++i) part[mt][nt][i] = 0.0f;
                }
            }
        }
    }
}

// Down projection (and any grouped FP8 GEMM with an f32 output).
// A: u8 [rows_total, K]; a_scale: f32 [rows_total, kgroups]; B: u8 [E, N, K]; b_scale: f32 [E, N];
// row_offsets, tile_offsets: i32 [E + 1]; y: f32 [rows_total, N].
// K % 64 == 0, (K / kgroups) % 64 == 0, N % 128 == 0.
// Launch: grid = (ceil(rows_total / 64) + E, N / 128), block = 128.
extern "C" __global__ void __launch_bounds__(THREADS)
moe_gemm_fp8(const u8* __restrict__ A, const float* __restrict__ a_scale, int kgroups,
             const u8* __restrict__ B, const float* __restrict__ b_scale,
             const int* __restrict__ row_offsets, const int* __restrict__ tile_offsets, int experts,
             float* __restrict__ y, int N, int K) {
    int e, tile;
    if (!find_tile(tile_offsets, experts, e, tile)) return;
    const int row0 = row_offsets[e] + tile * BM;
    const int rows = min(BM, row_offsets[e + 1] - row0);
    const int n0 = blockIdx.y * BN;
    const u8* Bexp = B + (size_t)e * N * K;
    float acc[2][8][4];
    mainloop(A, Bexp, a_scale, kgroups, row0, rows, K, [n0](int s) { return n0 + s; }, acc);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warp_m = warp >> 1, warp_n = warp & 1, g = lane >> 2, t = lane & 3;
    const float* bsc = b_scale + (size_t)e * N;
#pragma unroll
    for (int nt = 0; nt < 8; ++nt) {
        const int n = n0 + warp_n * 64 + nt * 8 + 2 * t;
        const float w0 = bsc[n], w1 = bsc[n + 1];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int r = warp_m * 32 + mt * 16 + g + 8 * h;
                if (r < rows)
                    *reinterpret_cast<float2*>(y + (size_t)(row0 + r) * N + n) =
                        make_float2(acc[mt][nt][2 * h] * w0, acc[mt][nt][2 * h + 1] * w1);
            }
    }
}

// gate_up projection with the SwiGLU epilogue and the e4m3 re-quantization of its output.
// A, a_scale, kgroups as above with K = hidden; B: u8 [E, 2·width, K] = [gate rows | up rows];
// b_scale: f32 [E, 2·width]; h: u8 [rows_total, width]; h_scale: f32 [rows_total, width / 64]
// (the K-group scales of the down GEMM, kgroups = width / 64).
// width % 64 == 0. Launch: grid = (ceil(rows_total / 64) + E, width / 64), block = 128.
extern "C" __global__ void __launch_bounds__(THREADS)
moe_gemm_fp8_swiglu(const u8* __restrict__ A, const float* __restrict__ a_scale, int kgroups,
                    const u8* __restrict__ B, const float* __restrict__ b_scale,
                    const int* __restrict__ row_offsets, const int* __restrict__ tile_offsets,
                    int experts, u8* __restrict__ h, float* __restrict__ h_scale, int width, int K) {
    __shared__ float row_max[2][BM];  // per warp_n column half, per tile row
    int e, tile;
    if (!find_tile(tile_offsets, experts, e, tile)) return;
    const int row0 = row_offsets[e] + tile * BM;
    const int rows = min(BM, row_offsets[e + 1] - row0);
    const int j0 = blockIdx.y * 64;  // first intermediate column of this block
    const u8* Bexp = B + (size_t)e * 2 * width * K;
    // Shared B row s: warp_n = s / 64 owns intermediate columns j0 + warp_n·32 + [0, 32); its
    // first 32 rows are their gate rows, the next 32 their up rows (n-tiles 0–3 and 4–7).
    auto brow = [j0, width](int s) {
        const int wn = s >> 6, i = s & 63;
        const int j = j0 + wn * 32 + (i & 31);
        return i < 32 ? j : width + j;
    };
    float acc[2][8][4];
    mainloop(A, Bexp, a_scale, kgroups, row0, rows, K, brow, acc);

    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const int warp_m = warp >> 1, warp_n = warp & 1, g = lane >> 2, t = lane & 3;
    const float* bsc = b_scale + (size_t)e * 2 * width;
    // act[mt][nt][i]: h at row warp_m·32 + mt·16 + g + 8·(i/2), column j0 + warp_n·32 + nt·8 + 2t + i%2.
    float act[2][4][4];
    float m[2][2] = {{0.f, 0.f}, {0.f, 0.f}};
#pragma unroll
    for (int nt = 0; nt < 4; ++nt) {
        const int j = j0 + warp_n * 32 + nt * 8 + 2 * t;
        const float g0 = bsc[j], g1 = bsc[j + 1], u0 = bsc[width + j], u1 = bsc[width + j + 1];
#pragma unroll
        for (int mt = 0; mt < 2; ++mt)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float gate = acc[mt][nt][i] * ((i & 1) ? g1 : g0);
                const float up = acc[mt][nt + 4][i] * ((i & 1) ? u1 : u0);
                const float v = up * silu(gate);
                act[mt][nt][i] = v;
                m[mt][i >> 1] = fmaxf(m[mt][i >> 1], fabsf(v));
            }
    }
    // Row absmax over the block's 64 columns: the 4 lanes of a quad, then the two warp_n halves.
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            float v = m[mt][hh];
            v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
            v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
            m[mt][hh] = v;
            if (t == 0) row_max[warp_n][warp_m * 32 + mt * 16 + g + 8 * hh] = v;
        }
    __syncthreads();
    const int groups = width / 64;
#pragma unroll
    for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
            const int r = warp_m * 32 + mt * 16 + g + 8 * hh;
            const float mx = fmaxf(row_max[0][r], row_max[1][r]);
            const bool zero = mx < FP8_MIN_ABSMAX;
            const float inv = zero ? 0.0f : FP8_E4M3_MAX / mx;
            if (r >= rows) continue;
            if (warp_n == 0 && t == 0) h_scale[(size_t)(row0 + r) * groups + blockIdx.y] = zero ? 1.0f : mx / FP8_E4M3_MAX;
#pragma unroll
            for (int nt = 0; nt < 4; ++nt) {
                const int j = j0 + warp_n * 32 + nt * 8 + 2 * t;
                *reinterpret_cast<u16*>(h + (size_t)(row0 + r) * width + j) =
                    f32x2_to_e4m3x2(act[mt][nt][2 * hh] * inv, act[mt][nt][2 * hh + 1] * inv);
            }
        }
}
