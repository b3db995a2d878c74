//! CPU kernels: f32 activations, f32 accumulation, weights widened from their stored dtype.

pub mod activation;
pub mod attention;
pub mod matmul;
mod matmul_q;
pub mod norm;
pub mod parallel;
pub mod rope;

mod simd;
