//! herd-kernels: the math of Llama 4 inference. No I/O, no async, no model knowledge.
//!
//! Modules:
//! - [`tensor`]: borrowed views of weight matrices in their stored dtype (f32, bf16, f16,
//!   FP8 e4m3 with per-row scales, int4 with group scales).
//! - [`quant`]: the quantized formats: e4m3 encode/decode, FP8 and int4 row quantizers.
//! - [`device`]: `cpu` / `cuda:N` and the check that a device is usable (always built; without
//!   the `cuda` feature it refuses CUDA with a typed error).
//! - [`cuda`] (feature `cuda`): the GPU kernels of `kernels/cuda/*.cu`, compiled at run time by
//!   NVRTC for the device's exact architecture, and their launchers.
//! - [`cpu`]: the CPU implementation of every op; it is also the specification that
//!   other backends are tested against.
//!   - [`cpu::matmul`]: `x·Wᵀ` (nn.Linear layout) and `x·W` (input-major expert layout),
//!     f32 activations, f32 accumulation, any weight dtype; its doc states the fixed
//!     accumulation order. `matmul/avx2.rs` holds the register-tiled AVX2+FMA kernels,
//!     `matmul/portable.rs` the fallback with the same order; quantized `[n, k]` weights go
//!     to the private `cpu::matmul_q` kernels (explicit AVX2 for one token in
//!     `matmul_q/{fp8,int4}_decode.rs`; batches decode a panel of weight rows once and pass
//!     64-row activation blocks over it with the 3×2 register kernel of
//!     `matmul_q/batch_avx2.rs`). `matmul_t_many` runs several products of the same input
//!     (q/k/v, router + gate/up) in one parallel region.
//!   - [`cpu::parallel`]: `on_pool` runs a whole model step on a compute-pool thread, so its
//!     parallel regions are joins rather than cross-thread handoffs.
//!   - [`cpu::norm`]: RMSNorm (with and without weight).
//!   - [`cpu::rope`]: rotary embedding on interleaved pairs, llama3 frequency scaling.
//!   - [`cpu::attention`]: causal / chunked-local attention with GQA over a paged KV history,
//!     in jobs of query-token blocks × one kv head's query group.
//!   - [`cpu::activation`]: SiLU, SwiGLU, sigmoid, softmax, argmax, top-k.
//!
//! A model layer calls these in sequence: norm → matmul (q, k, v) → rope → attention →
//! matmul (o) → norm → matmul (experts) → activation → matmul (down).
//!
//! Every reduction here has a fixed order per output element that does not depend on how
//! many rows are in the batch. A token's result is therefore bit-identical whether it is
//! computed alone or alongside others, which is what lets a distributed run equal a local one.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod quant;
pub mod tensor;

pub use tensor::{Elems, MatRef};
