//! Borrowed views of weight data in the dtype it is stored in.
//!
//! Weights stay in their checkpoint dtype (usually memory-mapped); kernels widen each
//! element to f32 as they stream it, so no f32 copy of a weight ever exists.
//!
//! The quantized variants ([`Elems::F8E4M3`], [`Elems::Int4`]) are whole rows of an
//! output-major `[n, k]` matrix (nn.Linear layout) with their scales; see [`crate::quant`]
//! for the formats. They can be sliced only at row boundaries.

use crate::quant::{self, INT4_GROUP};
use half::{bf16, f16};

/// A slice of weight elements in one of the supported storage dtypes.
#[derive(Clone, Copy, Debug)]
pub enum Elems<'a> {
    F32(&'a [f32]),
    Bf16(&'a [bf16]),
    F16(&'a [f16]),
    /// FP8 e4m3fn codes `[rows, row_len]`; element `(r, c)` is `e4m3(codes[r·row_len + c]) · scales[r]`.
    F8E4M3 {
        codes: &'a [u8],
        scales: &'a [f32],
        row_len: usize,
    },
    /// int4 nibbles `[rows, ceil(row_len/2)]` with scales `[rows, ceil(row_len/128)]`;
    /// element `(r, c)` is `(nibble − 8) · scales[r, c / 128]`.
    Int4 {
        packed: &'a [u8],
        scales: &'a [f32],
        row_len: usize,
    },
}

impl<'a> Elems<'a> {
    pub fn len(&self) -> usize {
        match self {
            Elems::F32(s) => s.len(),
            Elems::Bf16(s) => s.len(),
            Elems::F16(s) => s.len(),
            Elems::F8E4M3 { codes, .. } => codes.len(),
            // Rows follow from the scales (one row of groups each).
            Elems::Int4 { scales, row_len, .. } => {
                scales.len().checked_div(quant::int4_row_groups(*row_len)).unwrap_or(0) * row_len
            }
        }
    }

    /// Whether the elements are quantized (FP8 or int4) rather than plain floats.
    pub fn is_quantized(&self) -> bool {
        matches!(self, Elems::F8E4M3 { .. } | Elems::Int4 { .. })
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Sub-slice `[start, start + len)`. Quantized slices must start and end on a row boundary.
    pub fn slice(&self, start: usize, len: usize) -> Elems<'a> {
        match *self {
            Elems::F32(s) => Elems::F32(&s[start..start + len]),
            Elems::Bf16(s) => Elems::Bf16(&s[start..start + len]),
            Elems::F16(s) => Elems::F16(&s[start..start + len]),
            Elems::F8E4M3 { codes, scales, row_len } => {
                let (r0, nr) = row_span(start, len, row_len);
                Elems::F8E4M3 { codes: &codes[start..start + len], scales: &scales[r0..r0 + nr], row_len }
            }
            Elems::Int4 { packed, scales, row_len } => {
                let (r0, nr) = row_span(start, len, row_len);
                let (rb, rg) = (quant::int4_row_bytes(row_len), quant::int4_row_groups(row_len));
                Elems::Int4 {
                    packed: &packed[r0 * rb..(r0 + nr) * rb],
                    scales: &scales[r0 * rg..(r0 + nr) * rg],
                    row_len,
                }
            }
        }
    }

    /// Widen element `i` to f32 (exact for the float dtypes; quantized ones are dequantized:
    /// code times scale, rounded once to f32).
    #[inline(always)]
    pub fn get(&self, i: usize) -> f32 {
        match self {
            Elems::F32(s) => s[i],
            Elems::Bf16(s) => s[i].to_f32(),
            Elems::F16(s) => s[i].to_f32(),
            Elems::F8E4M3 { codes, scales, row_len } => quant::e4m3_to_f32(codes[i]) * scales[i / row_len],
            Elems::Int4 { packed, scales, row_len } => {
                let (r, c) = (i / row_len, i % row_len);
                let (rb, rg) = (quant::int4_row_bytes(*row_len), quant::int4_row_groups(*row_len));
                quant::int4_get(&packed[r * rb..(r + 1) * rb], &scales[r * rg..(r + 1) * rg], c)
            }
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
            Elems::F8E4M3 { .. } | Elems::Int4 { .. } => {
                for (i, o) in out.iter_mut().enumerate() {
                    *o = self.get(i);
                }
            }
        }
    }

    pub fn to_f32_vec(&self) -> Vec<f32> {
        let mut v = vec![0.0; self.len()];
        self.to_f32_into(&mut v);
        v
    }

    /// Bytes as stored, scales included.
    pub fn stored_bytes(&self) -> usize {
        match self {
            Elems::F32(s) => 4 * s.len(),
            Elems::Bf16(s) => 2 * s.len(),
            Elems::F16(s) => 2 * s.len(),
            Elems::F8E4M3 { codes, scales, .. } => codes.len() + 4 * scales.len(),
            Elems::Int4 { packed, scales, .. } => packed.len() + 4 * scales.len(),
        }
    }

    /// The row length of a quantized slice (`None` for float dtypes, which have no rows).
    pub fn quant_row_len(&self) -> Option<usize> {
        match self {
            Elems::F8E4M3 { row_len, .. } | Elems::Int4 { row_len, .. } => Some(*row_len),
            _ => None,
        }
    }
}

/// `(first row, rows)` of the element range `[start, start + len)`, which must be whole rows.
fn row_span(start: usize, len: usize, row_len: usize) -> (usize, usize) {
    assert!(
        row_len > 0 && start.is_multiple_of(row_len) && len.is_multiple_of(row_len),
        "quantized weights slice only at row boundaries: [{start}, +{len}) with rows of {row_len}"
    );
    (start / row_len, len / row_len)
}

const _: () = assert!(INT4_GROUP.is_multiple_of(16), "int4 kernels assume groups of whole 16-lane chunks");

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
        if let Some(row_len) = elems.quant_row_len() {
            // Scales are per output row: a quantized matrix is output-major [n, k].
            assert_eq!(row_len, cols, "quantized matrix view: rows of {row_len} elements viewed with {cols} columns");
            if let Elems::Int4 { packed, .. } = elems {
                assert_eq!(packed.len(), rows * quant::int4_row_bytes(cols), "int4 matrix view: packed bytes");
            }
        }
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
