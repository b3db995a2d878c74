//! Borrowed views of weight data in the dtype it is stored in.
//!
//! Weights stay in their checkpoint dtype (usually memory-mapped); kernels widen each
//! element to f32 as they stream it, so no f32 copy of a weight ever exists.

use half::{bf16, f16};

/// A slice of weight elements in one of the supported storage dtypes.
#[derive(Clone, Copy, Debug)]
pub enum Elems<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
}

impl<'a> Elems<'a> {
    pub fn len(&self) -> usize {
        match self {
            Elems::F32(s) => s.len(),
            Elems::Bf16(s) => s.len(),
            Elems::F16(s) => s.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sub-slice `[start, start + len)`.
    pub fn slice(&self, start: usize, len: usize) -> Elems<'a> {
        match *self {
            Elems::F32(s) => Elems::F32(&s[start..start + len]),
            Elems::Bf16(s) => Elems::Bf16(&s[start..start + len]),
            Elems::F16(s) => Elems::F16(&s[start..start + len]),
        }
    }

    /// Widen element `i` to f32 (exact for every supported dtype).
    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Elems::F32(s) => s[i],
            Elems::Bf16(s) => s[i].to_f32(),
            Elems::F16(s) => s[i].to_f32(),
        }
    }

    /// Widen the whole slice into `out` (same length).
    pub fn to_f32_into(&self, out: &mut [f32]) {
        assert_eq!(out.len(), self.len());
        match self {
            Elems::F32(s) => out.copy_from_slice(s),
            Elems::Bf16(s) => {
                for (o, v) in out.iter_mut().zip(s.iter()) {
                    *o = f32::from_bits((v.to_bits() as u32) << 16);
                }
            }
            Elems::F16(s) => {
                use half::slice::HalfFloatSliceExt;
                s.convert_to_f32_slice(out);
            }
        }
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut v = vec![0.0; self.len()];
        self.to_f32_into(&mut v);
        v
    }

    /// Bytes per element as stored.
    pub fn elem_bytes(&self) -> usize {
        match self {
            Elems::F32(_) => 4,
            Elems::Bf16(_) | Elems::F16(_) => 2,
        }
    }
}

/// A row-major matrix view `[rows, cols]`.
#[derive(Clone, Copy, Debug)]
pub struct MatRef<'a> {
    pub elems: Elems<'a>,
    pub rows: usize,
    pub cols: usize,
}

impl<'a> MatRef<'a> {
    pub fn new(elems: Elems<'a>, rows: usize, cols: usize) -> Self {
        assert_eq!(elems.len(), rows * cols, "matrix view: {rows}x{cols} != {} elements", elems.len());
        Self { elems, rows, cols }
    }

    /// Rows `[start, start + n)` as a matrix.
    pub fn rows_range(&self, start: usize, n: usize) -> MatRef<'a> {
        MatRef::new(self.elems.slice(start * self.cols, n * self.cols), n, self.cols)
    }

    /// One row widened to f32.
    pub fn row_f32(&self, r: usize) -> Vec<f32> {
        self.elems.slice(r * self.cols, self.cols).to_f32_vec()
    }
}
