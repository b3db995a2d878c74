//! Weights from the host (the CPU model's memory-mapped tensors) to the device.
//!
//! Each weight goes up in the dtype it is stored in: f32 stays f32 (the golden tests' f32
//! path), bf16 stays bf16, FP8 keeps codes and per-channel scales, f16 is widened to f32
//! (exactly). int4 has no GPU kernel yet and is refused. The host staging copy of one weight
//! is dropped as soon as it is on the device, so the process never holds the model twice.

use super::GpuError;
use crate::model::weights::Weight;
use herd_kernels::Elems;
use herd_kernels::cuda::Gpu;
use herd_kernels::cuda::linear::LinearWeight;

/// A weight matrix `[rows, cols]` staged on the host in its upload dtype.
#[derive(Debug)]
pub enum HostMat {
    F32(Vec<f32>),
    /// bf16 bits
    Bf16(Vec<u16>),
    /// e4m3 codes and one scale per row
    Fp8(Vec<u8>, Vec<f32>),
}

impl HostMat {
    /// A rank-2 weight, rows as stored.
    pub fn of(w: &Weight) -> Result<(Self, usize, usize), GpuError> {
        let shape = w.shape();
        if shape.len() != 2 {
            return Err(GpuError::Unsupported(format!("a rank-{} weight as a matrix", shape.len())));
        }
        let m = match w.elems() {
            Elems::F32(v) => HostMat::F32(v.to_vec()),
            Elems::Bf16(v) => HostMat::Bf16(v.iter().map(|x| x.to_bits()).collect()),
            Elems::F16(v) => HostMat::F32(v.iter().map(|x| x.to_f32()).collect()),
            Elems::F8E4M3 { codes, scales, .. } => HostMat::Fp8(codes.to_vec(), scales.to_vec()),
            Elems::Int4 { .. } => return Err(GpuError::Unsupported("int4 weights".into())),
        };
        Ok((m, shape[0], shape[1]))
    }

    /// An input-major weight `[k, n]` (the fused expert tensors) transposed to `[n, k]`.
    pub fn transposed(w: &Weight) -> Result<(Self, usize, usize), GpuError> {
        let (m, k, n) = Self::of(w)?;
        // Element (r, c) of the result is element (c, r) of the stored [k, n] matrix.
        let idx: Vec<usize> = (0..n).flat_map(|r| (0..k).map(move |c| c * n + r)).collect();
        Ok((
            match m {
                HostMat::F32(v) => HostMat::F32(idx.iter().map(|&j| v[j]).collect()),
                HostMat::Bf16(v) => HostMat::Bf16(idx.iter().map(|&j| v[j]).collect()),
                HostMat::Fp8(..) => {
                    return Err(GpuError::Unsupported("an FP8 input-major expert tensor".into()));
                }
            },
            n,
            k,
        ))
    }

    /// Rows of `parts` stacked (all of one dtype and one column count).
    pub fn stack(parts: Vec<(HostMat, usize, usize)>) -> Result<(Self, usize, usize), GpuError> {
        let cols = parts.first().map_or(0, |p| p.2);
        let rows = parts.iter().map(|p| p.1).sum();
        if parts.iter().any(|p| p.2 != cols) {
            return Err(GpuError::Unsupported("stacking weights of different widths".into()));
        }
        let mut out = match parts.first().map(|p| &p.0) {
            Some(HostMat::F32(_)) | None => HostMat::F32(Vec::new()),
            Some(HostMat::Bf16(_)) => HostMat::Bf16(Vec::new()),
            Some(HostMat::Fp8(..)) => HostMat::Fp8(Vec::new(), Vec::new()),
        };
        for (m, _, _) in parts {
            match (&mut out, m) {
                (HostMat::F32(a), HostMat::F32(b)) => a.extend(b),
                (HostMat::Bf16(a), HostMat::Bf16(b)) => a.extend(b),
                (HostMat::Fp8(a, sa), HostMat::Fp8(b, sb)) => {
                    a.extend(b);
                    sa.extend(sb);
                }
                _ => return Err(GpuError::Unsupported("stacking weights of different dtypes".into())),
            }
        }
        Ok((out, rows, cols))
    }

    pub fn upload(self, gpu: &Gpu, rows: usize, cols: usize) -> Result<LinearWeight, GpuError> {
        Ok(match self {
            HostMat::F32(v) => LinearWeight::f32(gpu, &v, rows, cols)?,
            HostMat::Bf16(v) => LinearWeight::bf16(gpu, &v, rows, cols)?,
            HostMat::Fp8(c, s) => LinearWeight::fp8(gpu, &c, &s, rows, cols)?,
        })
    }
}

/// An nn.Linear weight `[out, in]` as stored.
pub fn linear(gpu: &Gpu, w: &Weight) -> Result<LinearWeight, GpuError> {
    let (m, r, c) = HostMat::of(w)?;
    m.upload(gpu, r, c)
}

/// nn.Linear weights with the same input stacked into one `[Σ out, in]` matrix (one launch
/// instead of several: gate and up of a SwiGLU).
pub fn stacked(gpu: &Gpu, ws: &[&Weight]) -> Result<LinearWeight, GpuError> {
    let parts = ws.iter().map(|w| HostMat::of(w)).collect::<Result<Vec<_>, _>>()?;
    let (m, r, c) = HostMat::stack(parts)?;
    m.upload(gpu, r, c)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacking_refuses_mixed_widths_and_dtypes() {
        let a = (HostMat::F32(vec![0.0; 6]), 2, 3);
        let b = (HostMat::F32(vec![0.0; 4]), 2, 2);
        assert!(HostMat::stack(vec![a, b]).is_err());
        let a = (HostMat::F32(vec![0.0; 6]), 2, 3);
        let b = (HostMat::Bf16(vec![0; 6]), 2, 3);
        assert!(HostMat::stack(vec![a, b]).is_err());
        let a = (HostMat::Fp8(vec![1; 6], vec![1.0, 2.0]), 2, 3);
        let b = (HostMat::Fp8(vec![2; 3], vec![3.0]), 1, 3);
        let (m, r, c) = HostMat::stack(vec![a, b]).expect("same dtype");
        assert_eq!((r, c), (3, 3));
        match m {
            HostMat::Fp8(codes, scales) => {
                assert_eq!(codes, vec![1, 1, 1, 1, 1, 1, 2, 2, 2]);
                assert_eq!(scales, vec![1.0, 2.0, 3.0]);
            }
            _ => panic!("dtype changed"),
        }
    }
}
