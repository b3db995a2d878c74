// Grouped FP8 e4m3 GEMM over experts for Hopper (sm_90a): TMA loads into a multi-stage mbarrier
// pipeline, wgmma from shared memory. Exactly the semantics of moe_gemm.cu (read its header):
//
//   y[r, n] = b_scale[e, n] · Σ_g a_scale[r, g] · Σ_{k in group g} A[r, k] · B[e, n, k]
//
// with the same two epilogues (`moe_gemm_fp8_sm90`: f32 out; `moe_gemm_fp8_swiglu_sm90`: gate/up
// pairing, SiLU, e4m3 re-quantization of h with one scale per (row, 64 columns)).
//
// Block: 384 threads = 3 warpgroups. Warpgroup 0 is the producer (one thread issues the TMA
// loads); warpgroups 1 and 2 are consumers, each owning 64 rows of the 128-row block tile and all
// of its 128 columns (wgmma.m64n128k32, accumulator 64 f32 per thread). A block tile is one
// expert's rows [row0, row0 + 128) × 128 B rows (down: output channels n0..n0+128; gate_up:
// gate rows j0..j0+64 then up rows width+j0..width+j0+64, so gate and up of one intermediate
// column land in the same thread: accumulator columns c and c + 64).
//
// Shared memory: STAGES stages of { A: 2 × [64 rows × 128 B], B: 2 × [64 rows × 128 B] } = 32 KB,
// each box written by one TMA load (cp.async.bulk.tensor.2d) with the 128-byte swizzle, which is
// what the wgmma descriptors (layout type 1 = SWIZZLE_128B, stride byte offset 1024 = one 8-row
// atom) describe. The K extent of one stage is 128 bytes = 4 wgmma k-steps of 32; a k-step
// advances the descriptors' start address by 32 bytes (inside the 1024-byte-aligned atom the
// hardware applies the XOR swizzle to the full address, as TMA did).
//
// Pipeline: full[s] (1 arrival + the TMA transaction bytes) and empty[s] (one arrival per
// consumer warp). The producer waits empty[s] (parity starts at 1: a fresh barrier counts as
// released), posts the expected bytes, issues the loads. A consumer waits full[s], issues its
// wgmmas, commits, waits for them (wgmma.wait_group 0) and releases the stage. Two consumer
// warpgroups keep the tensor cores busy while either one waits or promotes.
//
// Activation scales and precision: each consumer sums at most 128 bytes of K (one stage) in a
// partial wgmma accumulator (zeroed by the first wgmma's scale-d = 0), then promotes it into an
// f32 accumulator with the activation scale of its K-group, and also at every group end (groups
// of K/kgroups ≥ 64 bytes) — DeepGEMM's fine-grained promotion: the tensor cores' FP8
// accumulation is not f32-exact, so a long K in one wgmma chain would lose precision.
//
// Rows: A is one [rows_total, K] tensor map, so a tile's rows past its expert are other experts'
// (or TMA's zero fill past rows_total): computed, never stored. A tile with ≤ 64 rows loads and
// computes only the first half (the second consumer warpgroup exits at once). K need not be a
// multiple of 128: TMA zero-fills past K and the k-steps past K are skipped (K % 64 == 0).
#include "common.cuh"

typedef unsigned long long u64;

// CUtensorMap: 128 opaque bytes built on the host by cuTensorMapEncodeTiled, passed by value.
struct __align__(64) TmaMap {
    u64 opaque[16];
};

#define BM 128          // rows per block tile (two consumer warpgroups × 64)
#define BN 128          // B rows (output channels) per block tile
#define BKB 128         // K bytes per stage
#define BOX_BYTES 8192  // one TMA box: 64 rows × 128 B
#define STAGE_BYTES (4 * BOX_BYTES)
#define STAGES 6
#define THREADS 384
// Dynamic shared memory the launcher must request (1024 B for aligning the swizzled buffers).
#define SMEM_BYTES (STAGES * STAGE_BYTES + 1024 + 2 * STAGES * 8)

__device__ __forceinline__ u32 smem_u32(const void* p) { return static_cast<u32>(__cvta_generic_to_shared(p)); }

// ---- mbarrier ----
__device__ __forceinline__ void mbar_init(u32 bar, u32 count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive_expect_tx(u32 bar, u32 bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar), "r"(bytes) : "memory");
}
__device__ __forceinline__ void mbar_arrive(u32 bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" ::"r"(bar) : "memory");
}
__device__ __forceinline__ bool mbar_try_wait(u32 bar, u32 parity) {
    u32 ok;
    asm volatile(
        "{\n\t.reg .pred p;\n\t"
        "mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\t"
        "selp.u32 %0, 1, 0, p;\n\t}"
        : "=r"(ok)
        : "r"(bar), "r"(parity)
        : "memory");
    return ok != 0;
}
// Waits until the phase of parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(u32 bar, u32 parity) {
    while (!mbar_try_wait(bar, parity)) {
    }
}

// ---- TMA ----
__device__ __forceinline__ void tma_load_2d(u32 dst, const TmaMap* map, int k, int row, u32 bar, u64 policy) {
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint"
        " [%0], [%1, {%2, %3}], [%4], %5;" ::"r"(dst),
        "l"(reinterpret_cast<u64>(map)), "r"(k), "r"(row), "r"(bar), "l"(policy)
        : "memory");
}
__device__ __forceinline__ u64 policy_evict_first() {
    u64 p;
    asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;" : "=l"(p));
    return p;
}
__device__ __forceinline__ u64 policy_evict_last() {
    u64 p;
    asm volatile("createpolicy.fractional.L2::evict_last.b64 %0, 1.0;" : "=l"(p));
    return p;
}

// ---- wgmma ----
// Shared-memory matrix descriptor of a K-major tile with the 128-byte swizzle: start address >> 4
// (bits 0–13), leading byte offset (bits 16–29; unused for swizzled K-major, 1 by convention),
// stride byte offset >> 4 (bits 32–45: 1024 B between 8-row atoms), base offset 0 (bits 49–51;
// every tile is 1024-byte aligned), layout type 1 = SWIZZLE_128B (bits 62–63).
__device__ __forceinline__ u64 smem_desc(u32 addr) {
    return static_cast<u64>((addr & 0x3FFFF) >> 4) | (static_cast<u64>(1) << 16) |
           (static_cast<u64>(1024 >> 4) << 32) | (static_cast<u64>(1) << 62);
}
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_wait0() { asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory"); }
// Keeps the compiler from moving accumulator accesses across the asynchronous MMA.
__device__ __forceinline__ void fence_acc(float (&d)[64]) {
#pragma unroll
    for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d (+)= A[64 × 32] · B[128 × 32]ᵀ; scale_d == 0: d = A·Bᵀ (the old d is ignored).
__device__ __forceinline__ void wgmma_m64n128k32(float (&d)[64], u64 da, u64 db, int scale_d) {
    asm volatile(
        "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 "
        "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
        "%64, %65, p, 1, 1;\n}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
          "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
          "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
          "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]),
          "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]),
          "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]),
          "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
          "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(da), "l"(db), "r"(scale_d));
}

// Which expert, which of its 128-row tiles and which column block this block computes
// (tile_offsets in 128-row tiles; the grid is one-dimensional over Σ tiles × cols). Block order:
// expert-major, then column block, then the expert's row tiles, so that the blocks running at the
// same time share one expert: its A tiles stay in L2 across the column blocks, and the row tiles
// that read the same weight panel run side by side (one DRAM read of each panel, the rest L2
// hits). A row-tile-fastest order over all experts re-reads all of A from DRAM for every column
// block once A outgrows L2 (84 MB at 16k tokens). Returns false for spare blocks.
__device__ __forceinline__ bool find_tile(const int* tile_offsets, int experts, int cols, int& e, int& tile,
                                          int& col) {
    const int t = blockIdx.x;
    if (t >= tile_offsets[experts] * cols) return false;
    int lo = 0, hi = experts;  // invariant: tile_offsets[lo]·cols <= t < tile_offsets[hi]·cols
    while (hi - lo > 1) {
        const int mid = (lo + hi) >> 1;
        if (tile_offsets[mid] * cols <= t) lo = mid; else hi = mid;
    }
    e = lo;
    const int ntiles = tile_offsets[lo + 1] - tile_offsets[lo];
    const int local = t - tile_offsets[lo] * cols;
    col = local / ntiles;
    tile = local - col * ntiles;
    return true;
}

// The consumer main loop of one warpgroup (cw = 0 or 1: rows cw·64..cw·64+64 of the tile).
// On return acc[i] = Σ_g a_scale[r, g] · Σ_{k in g} A[r, k]·B[n, k] for row
// cw·64 + warp·16 + lane/4 + 8·((i/2)&1) (srow0 / srow1 are those two rows, clamped into the
// expert) and tile column n = 8·(i/4) + 2·(lane%4) + (i&1).
//
// The tensor cores accumulate FP8 products with a truncated (not f32) accumulator, so every
// partial sum is promoted into the f32 acc after at most 128 bytes of K (4 k-steps), as DeepGEMM
// does, and also at every end of a scale group (groups of 64 bytes: twice per stage). A promotion
// in the middle of a group uses that group's scale: s·(p1 + p2) = s·p1 + s·p2.
__device__ __forceinline__ void consume(u32 tiles, u32 bars, int cw, int K, int kgroups,
                                        const float* __restrict__ a_scale, int srow0, int srow1,
                                        float (&acc)[64]) {
    const int lane = threadIdx.x & 31;
    const int ktiles = (K + BKB - 1) / BKB;
    const int group_k = K / kgroups;
    float part[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
    bool fresh = true;  // the next wgmma starts a new partial sum (scale-d = 0)
    for (int kt = 0; kt < ktiles; ++kt) {
        const int s = kt % STAGES;
        const u32 parity = (kt / STAGES) & 1;
        const u64 da = smem_desc(tiles + s * STAGE_BYTES + cw * BOX_BYTES);
        const u64 db = smem_desc(tiles + s * STAGE_BYTES + 2 * BOX_BYTES);
        const int k0 = kt * BKB;
        mbar_wait(bars + 8 * s, parity);
        // Two halves of 64 bytes = 2 k-steps each. Every k-step is issued, also past K (a
        // K % 128 == 64 tail): TMA zero-filled those bytes, so they add exact zeros, and a wgmma
        // under a data-dependent branch would make ptxas serialize all of them (C7520).
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
            const int kend = k0 + 64 * (hf + 1);
            const bool promote = kend <= K && (hf == 1 || kend % group_k == 0);
            float s0 = 0.0f, s1 = 0.0f;
            if (promote) {  // loaded before the MMAs so that their latency hides behind them
                const int grp = (kend - 1) / group_k;
                s0 = a_scale[(size_t)srow0 * kgroups + grp];
                s1 = a_scale[(size_t)srow1 * kgroups + grp];
            }
            wgmma_fence();
            // +2 = 32 bytes >> 4: the next k-step inside the 128-byte swizzled rows.
            wgmma_m64n128k32(part, da + 4 * hf, db + 4 * hf, fresh ? 0 : 1);
            wgmma_m64n128k32(part, da + 4 * hf + 2, db + 4 * hf + 2, 1);
            wgmma_commit();
            fresh = false;
            if (promote || hf == 1) {  // a stage is released only after its MMAs are done
                wgmma_wait0();
                fence_acc(part);
            }
            if (promote) {
#pragma unroll
                for (int i = 0; i < 64; ++i) acc[i] += part[i] * (((i >> 1) & 1) ? s1 : s0);
                fresh = true;
            }
        }
        // This warp's reads of stage s are complete: release it (empty[s] counts consumer warps).
        __syncwarp();
        if (lane == 0) mbar_arrive(bars + 8 * (STAGES + s));
    }
}

// The producer: one thread streams the K tiles of A (rows row0.., row0+64.. when two halves)
// and of B (rows brow0.., brow1.., 64 each) through the stages.
__device__ __forceinline__ void produce(u32 tiles, u32 bars, const TmaMap* ta, const TmaMap* tb, int K,
                                        int row0, int halves, int brow0, int brow1) {
    const u64 keep = policy_evict_last();   // A: re-read by every column block
    const u64 stream = policy_evict_first();  // B: weights, read once per row tile
    const int ktiles = (K + BKB - 1) / BKB;
    const u32 bytes = (halves + 2) * BOX_BYTES;
    for (int kt = 0; kt < ktiles; ++kt) {
        const int s = kt % STAGES;
        const u32 parity = ((kt / STAGES) & 1) ^ 1;
        mbar_wait(bars + 8 * (STAGES + s), parity);
        const u32 full = bars + 8 * s;
        mbar_arrive_expect_tx(full, bytes);
        const u32 st = tiles + s * STAGE_BYTES;
        const int k0 = kt * BKB;
        tma_load_2d(st, ta, k0, row0, full, keep);
        if (halves == 2) tma_load_2d(st + BOX_BYTES, ta, k0, row0 + 64, full, keep);
        tma_load_2d(st + 2 * BOX_BYTES, tb, k0, brow0, full, stream);
        tma_load_2d(st + 3 * BOX_BYTES, tb, k0, brow1, full, stream);
    }
}

// Shared set-up: the aligned tile buffers and the barriers. Returns the tile base; bars follows.
__device__ __forceinline__ u32 setup(int halves, u32& bars) {
    extern __shared__ u8 smem_raw[];
    const u32 tiles = (smem_u32(smem_raw) + 1023) & ~1023u;
    bars = tiles + STAGES * STAGE_BYTES;
    if (threadIdx.x == 0) {
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(bars + 8 * s, 1);
            mbar_init(bars + 8 * (STAGES + s), 4 * halves);
        }
        asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
        asm volatile("fence.proxy.async.shared::cta;" ::: "memory");
    }
    __syncthreads();
    return tiles;
}

// Down projection (and any grouped FP8 GEMM with an f32 output), as moe_gemm_fp8.
// ta: A u8 [rows_total, K] (box 128 B × 64 rows, 128B swizzle); tb: B u8 [E·N, K] (same box);
// a_scale: f32 [rows_total, kgroups]; b_scale: f32 [E, N]; row_offsets: i32 [E + 1];
// tile_offsets: i32 [E + 1] in 128-row tiles; y: f32 [rows_total, N].
// K % 64 == 0, (K / kgroups) % 64 == 0, N % 128 == 0.
// Launch: grid = 128-row tiles × (N / 128) (one dimension), block = 384, dynamic smem = SMEM_BYTES.
extern "C" __global__ void __launch_bounds__(THREADS, 1)
moe_gemm_fp8_sm90(const __grid_constant__ TmaMap ta, const __grid_constant__ TmaMap tb,
                  const float* __restrict__ a_scale, int kgroups, const float* __restrict__ b_scale,
                  const int* __restrict__ row_offsets, const int* __restrict__ tile_offsets, int experts,
                  float* __restrict__ y, int N, int K) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    int e, tile, col;
    if (!find_tile(tile_offsets, experts, N / BN, e, tile, col)) return;
    const int row0 = row_offsets[e] + tile * BM;
    const int rows = min(BM, row_offsets[e + 1] - row0);
    const int halves = rows > 64 ? 2 : 1;
    const int n0 = col * BN;
    u32 bars;
    const u32 tiles = setup(halves, bars);
    const int wg = threadIdx.x >> 7;
    if (wg == 0) {
        if (threadIdx.x == 0) produce(tiles, bars, &ta, &tb, K, row0, halves, e * N + n0, e * N + n0 + 64);
        return;
    }
    const int cw = wg - 1;
    if (cw >= halves) return;
    const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
    const int r0 = cw * 64 + warp * 16 + (lane >> 2), r1 = r0 + 8;  // this thread's two rows
    const int srow0 = row0 + (r0 < rows ? r0 : 0), srow1 = row0 + (r1 < rows ? r1 : 0);
    float acc[64];
    consume(tiles, bars, cw, K, kgroups, a_scale, srow0, srow1, acc);
    const float* bsc = b_scale + (size_t)e * N + n0;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
        const int c = 8 * j + 2 * (lane & 3);
        const float w0 = bsc[c], w1 = bsc[c + 1];
        if (r0 < rows)
            *reinterpret_cast<float2*>(y + (size_t)(row0 + r0) * N + n0 + c) =
                make_float2(acc[4 * j] * w0, acc[4 * j + 1] * w1);
        if (r1 < rows)
            *reinterpret_cast<float2*>(y + (size_t)(row0 + r1) * N + n0 + c) =
                make_float2(acc[4 * j + 2] * w0, acc[4 * j + 3] * w1);
    }
#else
    __trap();  // built only for sm_90a; the launcher never picks this kernel elsewhere
#endif
}

// gate_up with the SwiGLU epilogue, as moe_gemm_fp8_swiglu. tb: B u8 [E·2·width, K] = per expert
// [gate rows | up rows]; b_scale: f32 [E, 2·width]; h: u8 [rows_total, width]; h_scale: f32
// [rows_total, width / 64]. width % 64 == 0.
// Launch: grid = 128-row tiles × (width / 64) (one dimension), block = 384, dynamic smem = SMEM_BYTES.
extern "C" __global__ void __launch_bounds__(THREADS, 1)
moe_gemm_fp8_swiglu_sm90(const __grid_constant__ TmaMap ta, const __grid_constant__ TmaMap tb,
                         const float* __restrict__ a_scale, int kgroups, const float* __restrict__ b_scale,
                         const int* __restrict__ row_offsets, const int* __restrict__ tile_offsets,
                         int experts, u8* __restrict__ h, float* __restrict__ h_scale, int width, int K) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    int e, tile, col;
    if (!find_tile(tile_offsets, experts, width / 64, e, tile, col)) return;
    const int row0 = row_offsets[e] + tile * BM;
    const int rows = min(BM, row_offsets[e + 1] - row0);
    const int halves = rows > 64 ? 2 : 1;
    const int j0 = col * 64;  // first intermediate column of this block
    u32 bars;
    const u32 tiles = setup(halves, bars);
    const int wg = threadIdx.x >> 7;
    if (wg == 0) {
        const int b0 = e * 2 * width + j0;
        if (threadIdx.x == 0) produce(tiles, bars, &ta, &tb, K, row0, halves, b0, b0 + width);
        return;
    }
    const int cw = wg - 1;
    if (cw >= halves) return;
    const int lane = threadIdx.x & 31, warp = (threadIdx.x >> 5) & 3;
    const int r0 = cw * 64 + warp * 16 + (lane >> 2), r1 = r0 + 8;
    const int srow0 = row0 + (r0 < rows ? r0 : 0), srow1 = row0 + (r1 < rows ? r1 : 0);
    float acc[64];
    consume(tiles, bars, cw, K, kgroups, a_scale, srow0, srow1, acc);
    // acc[4j + x] (j < 8) is gate column c = 8j + 2·(lane%4) + (x&1), acc[32 + 4j + x] its up.
    const float* bsc = b_scale + (size_t)e * 2 * width + j0;
    float m0 = 0.0f, m1 = 0.0f;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int c = 8 * j + 2 * (lane & 3);
        const float g0 = bsc[c], g1 = bsc[c + 1], u0 = bsc[width + c], u1 = bsc[width + c + 1];
#pragma unroll
        for (int x = 0; x < 4; ++x) {
            const float gate = acc[4 * j + x] * ((x & 1) ? g1 : g0);
            const float up = acc[32 + 4 * j + x] * ((x & 1) ? u1 : u0);
            const float v = up * silu(gate);
            acc[4 * j + x] = v;
            if (x & 2) m1 = fmaxf(m1, fabsf(v)); else m0 = fmaxf(m0, fabsf(v));
        }
    }
    // Row absmax over the block's 64 columns: the four lanes of a quad hold one row.
    m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, 1));
    m0 = fmaxf(m0, __shfl_xor_sync(0xffffffffu, m0, 2));
    m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, 1));
    m1 = fmaxf(m1, __shfl_xor_sync(0xffffffffu, m1, 2));
    const int groups = width / 64;
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
        const int r = hh ? r1 : r0;
        if (r >= rows) continue;
        const float mx = hh ? m1 : m0;
        const bool zero = mx < FP8_MIN_ABSMAX;
        const float inv = zero ? 0.0f : FP8_E4M3_MAX / mx;
        if ((lane & 3) == 0) h_scale[(size_t)(row0 + r) * groups + col] = zero ? 1.0f : mx / FP8_E4M3_MAX;
        u8* hrow = h + (size_t)(row0 + r) * width + j0;
#pragma unroll
        for (int j = 0; j < 8; ++j)
            *reinterpret_cast<u16*>(hrow + 8 * j + 2 * (lane & 3)) =
                f32x2_to_e4m3x2(acc[4 * j + 2 * hh] * inv, acc[4 * j + 2 * hh + 1] * inv);
    }
#else
    __trap();
#endif
}
