//! Runtime CPU feature dispatch and the element types kernels widen to f32.
//!
//! Hot kernels have an explicit AVX2+FMA version (written with `std::arch` intrinsics, so the
//! register tiling and the accumulation order are exactly what the source says) and a
//! portable fallback with the same order per output element; one is chosen at run time.
//! AVX-512 machines run the AVX2 kernels (their results are then identical to an AVX2
//! machine's, which keeps mixed clusters bit-exact).

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

/// Prefetch (into L1) every cache line of the `bytes` bytes at `p`. A prefetch never faults,
/// so `p` may point anywhere; nothing is dereferenced.
#[cfg(target_arch = "x86_64")]
#[inline(always)]
pub(crate) fn prefetch_lines(p: *const u8, bytes: usize) {
    use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
    let mut off = 0;
    while off < bytes {
        // SAFETY: prefetching is a hint; it reads nothing and cannot fault.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(p.wrapping_add(off).cast::<i8>()) };
        off += 64;
    }
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
        && is_x86_feature_detected!("f16c")
    {
        Isa::Avx512
    } else if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") && is_x86_feature_detected!("f16c") {
        Isa::Avx2Fma
    } else {
        Isa::Portable
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn detect() -> Isa {
    Isa::Portable
}

#[cfg(target_arch = "x86_64")]
use std::arch::x86_64::{
    __m128i, __m256, _mm_loadu_si128, _mm256_castsi256_ps, _mm256_cvtepu16_epi32, _mm256_cvtph_ps, _mm256_loadu_ps,
    _mm256_slli_epi32,
};

/// A stored weight element that widens exactly to f32. `Default` is zero.
pub(crate) trait Widen: Copy + Default + Send + Sync + 'static {
    fn widen(self) -> f32;

    /// Eight consecutive elements at `p`, widened to f32.
    ///
    /// # Safety
    /// `p..p + 8` must be readable, and the CPU must support AVX2 and F16C.
    #[cfg(target_arch = "x86_64")]
    unsafe fn load8(p: *const Self) -> __m256;
}

impl Widen for f32 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        // SAFETY: forwarded from the caller.
        unsafe { _mm256_loadu_ps(p) }
    }
}

impl Widen for bf16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        // bf16 is the top half of an f32: the shift is exact and vectorises.
        f32::from_bits((self.to_bits() as u32) << 16)
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        // SAFETY: forwarded from the caller. Zero-extend to 32 bits, then shift into the
        // high half: the same exact widening as `widen`.
        unsafe {
            _mm256_castsi256_ps(_mm256_slli_epi32::<16>(_mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast::<__m128i>()))))
        }
    }
}

impl Widen for f16 {
    #[inline(always)]
    fn widen(self) -> f32 {
        self.to_f32()
    }

    #[cfg(target_arch = "x86_64")]
    #[inline(always)]
    unsafe fn load8(p: *const Self) -> __m256 {
        // SAFETY: forwarded from the caller (F16C converts exactly, as `to_f32` does).
        unsafe { _mm256_cvtph_ps(_mm_loadu_si128(p.cast::<__m128i>())) }
    }
}

/// `a * b + c`, fused when the kernel is compiled with FMA (the quantized kernels rely on
/// the compiler to vectorise their lanes around it).
#[inline(always)]
pub(crate) fn fmadd<const FMA: bool>(a: f32, b: f32, c: f32) -> f32 {
    if FMA { a.mul_add(b, c) } else { a * b + c }
}
