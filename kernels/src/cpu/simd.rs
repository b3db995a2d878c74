//! Runtime CPU feature dispatch and the element types kernels widen to f32.
//!
//! Kernel bodies are written once as `#[inline(always)]` generic functions over fixed-size
//! arrays, which LLVM vectorises; they are instantiated inside `#[target_feature]` wrappers
//! (AVX-512, AVX2+FMA) and a portable fallback, and one is chosen at run time.

use half::{bf16, f16};
use std::sync::OnceLock;

/// Instruction sets a kernel can be compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Isa {
    /// AVX-512F/BW/VL + FMA.
    Avx512,
    /// AVX2 + FMA (the x86-64 baseline we optimise for).
    Avx2Fma,
    /// Anything else: plain Rust, no fused multiply-add.
    Portable,
}

pub(crate) fn isa() -> Isa {
    static ISA: OnceLock<Isa> = OnceLock::new();
    *ISA.get_or_init(detect)
}

#[cfg(target_arch = "x86_64")]
fn detect() -> Isa {
    if is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("avx512bw")
        && is_x86_feature_detected!("avx512vl")
        && is_x86_feature_detected!("fma")
    {
        Isa::Avx512
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        Isa::Avx2Fma
    } else {
        Isa::Portable
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Portable
}

/// A stored weight element that widens exactly to f32.
pub(crate) trait Widen: Copy + Send + Sync + 'static {
    fn widen(self) -> f32;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }
}

impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        // bf16 is the top half of an f32: the shift is exact and vectorises.
        f32::from_bits((self.to_bits() as u32) << 16)
    }
}

impl Widen for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }
}

/// `a * b + c`, fused when the kernel is compiled with FMA.
#[inline(always)]
pub(crate) fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}
