//! Weights in the dtype the model computes with, borrowed from the checkpoint map when possible.
//!
//! In the default compute dtype (bf16) weights stored as bf16 or f16 stay memory-mapped and
//! f32 weights are rounded to bf16 once at load. In f32 mode every weight keeps its stored
//! dtype: kernels widen bf16/f16 exactly, which equals transformers upcasting the weights to
//! f32, without materialising an f32 copy.
//!
//! Quantized nn.Linear weights (FP8 e4m3 with per-channel scales, int4 with group scales; see
//! [`super::quant_config`]) are used as stored in either compute dtype: their codes stay
//! memory-mapped, and only scales not stored as aligned f32 are converted once.

use super::ModelError;
use super::checkpoint::{Checkpoint, StoredDtype, TensorSlice};
use half::{bf16, f16};
use herd_kernels::{Elems, MatRef, quant};
use memmap2::Mmap;
use std::ops::Range;
use std::sync::Arc;

/// The precision the model computes in. Activations and accumulation are f32 in both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ComputeDtype {
    /// Weights used at full stored precision (f32 checkpoints stay f32). For golden tests.
    F32,
    /// Weights held in bf16 (f32 checkpoints are rounded once at load).
    #[default]
    Bf16,
}

impl std::str::FromStr for ComputeDtype {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "f32" | "float32" => Ok(ComputeDtype::F32),
            "bf16" | "bfloat16" => Ok(ComputeDtype::Bf16),
            other => Err(format!("unknown dtype {other:?} (expected f32 or bf16)")),
        }
    }
}

impl std::fmt::Display for ComputeDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ComputeDtype::F32 => "f32",
            ComputeDtype::Bf16 => "bf16",
        })
    }
}

#[derive(Debug)]
enum Storage {
    Mapped {
        map: Arc<Mmap>,
        range: Range<usize>,
        dtype: StoredDtype,
    },
    F32(Vec<f32>),
    Bf16(Vec<bf16>),
    F16(Vec<f16>),
    /// FP8 codes `[rows, cols]` (mapped) with one scale per row.
    Fp8 {
        map: Arc<Mmap>,
        range: Range<usize>,
        scales: F32Buf,
    },
    /// int4 nibbles `[rows, ceil(cols/2)]` (mapped) with `[rows, ceil(cols/128)]` scales.
    Int4 {
        map: Arc<Mmap>,
        range: Range<usize>,
        scales: F32Buf,
    },
}

/// f32 values borrowed from the map when stored as aligned F32, else converted once.
#[derive(Debug)]
enum F32Buf {
    Mapped { map: Arc<Mmap>, range: Range<usize> },
    Owned(Vec<f32>),
}

impl F32Buf {
    fn as_slice(&self) -> &[f32] {
        match self {
            F32Buf::Mapped { map, range } => bytemuck::cast_slice(&map[range.clone()]),
            F32Buf::Owned(v) => v,
        }
    }
}

/// A weight tensor of rank 1–3.
#[derive(Debug)]
pub struct Weight {
    shape: Vec<usize>,
    storage: Storage,
}

impl Weight {
    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    /// The elements, row-major.
    pub fn elems(&self) -> Elems<'_> {
        match &self.storage {
            Storage::Mapped { map, range, dtype } => {
                let bytes = &map[range.clone()];
                // Alignment was checked when the weight was created (else it was copied).
                match dtype {
                    StoredDtype::F32 => Elems::F32(bytemuck::cast_slice(bytes)),
                    StoredDtype::Bf16 => Elems::Bf16(bytemuck::cast_slice(bytes)),
                    StoredDtype::F16 => Elems::F16(bytemuck::cast_slice(bytes)),
                    StoredDtype::F8E4M3 | StoredDtype::U8 | StoredDtype::Other(_) => {
                        unreachable!("only float dtypes are mapped as plain elements")
                    }
                }
            }
            Storage::F32(v) => Elems::F32(v),
            Storage::Bf16(v) => Elems::Bf16(v),
            Storage::F16(v) => Elems::F16(v),
            Storage::Fp8 { map, range, scales } => {
                Elems::F8E4M3 { codes: &map[range.clone()], scales: scales.as_slice(), row_len: self.shape[1] }
            }
            Storage::Int4 { map, range, scales } => {
                Elems::Int4 { packed: &map[range.clone()], scales: scales.as_slice(), row_len: self.shape[1] }
            }
        }
    }

    /// Whether the weight is FP8 or int4.
    pub fn is_quantized(&self) -> bool {
        matches!(self.storage, Storage::Fp8 { .. } | Storage::Int4 { .. })
    }

    /// A rank-2 weight as a matrix.
    pub fn matrix(&self) -> MatRef<'_> {
        assert_eq!(self.shape.len(), 2, "matrix() on a rank-{} weight", self.shape.len());
        MatRef::new(self.elems(), self.shape[0], self.shape[1])
    }

    /// Slice `i` of a rank-3 weight (`[n, rows, cols]`) as a matrix.
    pub fn slice3(&self, i: usize) -> MatRef<'_> {
        assert_eq!(self.shape.len(), 3, "slice3() on a rank-{} weight", self.shape.len());
        let (rows, cols) = (self.shape[1], self.shape[2]);
        MatRef::new(self.elems().slice(i * rows * cols, rows * cols), rows, cols)
    }

    /// Bytes as held in memory (mapped or owned).
    pub fn bytes(&self) -> usize {
        self.elems().stored_bytes()
    }

    /// Whether the bytes are borrowed from the checkpoint map (no copy).
    pub fn is_mapped(&self) -> bool {
        matches!(self.storage, Storage::Mapped { .. } | Storage::Fp8 { .. } | Storage::Int4 { .. })
    }
}

/// Reads named tensors from a checkpoint, checking shapes and applying the compute dtype.
///
/// A loader is scoped to a module of the checkpoint: [`pp`](Self::pp) descends into a child
/// (`w.pp("layers").pp(3).pp("self_attn")`), and every name a method takes is relative to the
/// scope, so each module's `load` reads the names of the Hugging Face modeling file without
/// knowing where it sits (candle's `VarBuilder::pp`).
#[derive(Clone)]
pub struct WeightLoader<'c> {
    ckpt: &'c Checkpoint,
    compute: ComputeDtype,
    /// Dotted path of this scope (`""` at the checkpoint's root).
    prefix: String,
}

impl<'c> WeightLoader<'c> {
    pub fn new(ckpt: &'c Checkpoint, compute: ComputeDtype) -> Self {
        Self { ckpt, compute, prefix: String::new() }
    }

    pub fn checkpoint(&self) -> &'c Checkpoint {
        self.ckpt
    }

    /// The child module `name` of this scope (dotted names descend several levels).
    pub fn pp(&self, name: impl std::fmt::Display) -> Self {
        Self { ckpt: self.ckpt, compute: self.compute, prefix: self.path(&name.to_string()) }
    }

    /// The full checkpoint name of `name` in this scope.
    pub fn path(&self, name: &str) -> String {
        match (self.prefix.is_empty(), name.is_empty()) {
            (true, _) => name.to_owned(),
            (false, true) => self.prefix.clone(),
            (false, false) => format!("{}.{name}", self.prefix),
        }
    }

    /// Whether the checkpoint holds tensor `name` of this scope.
    pub fn contains(&self, name: &str) -> bool {
        self.ckpt.contains(&self.path(name))
    }

    fn slice(&self, name: &str, shape: &[usize]) -> Result<TensorSlice, ModelError> {
        let name = &self.path(name);
        let t = self
            .ckpt
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.to_owned(), dir: self.ckpt.dir().to_path_buf() })?;
        if t.shape != shape {
            return Err(ModelError::ShapeMismatch { name: name.to_owned(), expected: shape.to_vec(), found: t.shape });
        }
        if !matches!(t.dtype, StoredDtype::F32 | StoredDtype::Bf16 | StoredDtype::F16) {
            return Err(ModelError::UnsupportedDtype { name: name.to_owned(), dtype: t.dtype.to_string() });
        }
        Ok(t)
    }

    /// Tensor `name` of this scope, of the given shape, in the compute dtype.
    pub fn weight(&self, name: &str, shape: &[usize]) -> Result<Weight, ModelError> {
        let t = self.slice(name, shape)?;
        self.load_range(&t, 0..t.byte_len(), shape.to_vec())
    }

    /// Slice `index` of a rank-3 tensor of shape `shape` (`[n, rows, cols]`), mapping only
    /// that slice's bytes: a worker loads just the routed experts it holds.
    pub fn slice3(&self, name: &str, shape: [usize; 3], index: usize) -> Result<Weight, ModelError> {
        let t = self.slice(name, &shape)?;
        let bytes = shape[1] * shape[2] * t.dtype.size();
        self.load_range(&t, index * bytes..(index + 1) * bytes, vec![shape[1], shape[2]])
    }

    fn load_range(&self, t: &TensorSlice, range: Range<usize>, shape: Vec<usize>) -> Result<Weight, ModelError> {
        let dtype = t.dtype;
        let (map, within) = t.map_range(range)?;
        let bytes = &map[within.clone()];
        let aligned = (bytes.as_ptr() as usize).is_multiple_of(dtype.size());
        let storage = match (dtype, self.compute) {
            (StoredDtype::F32, ComputeDtype::Bf16) => {
                Storage::Bf16(read_f32(bytes).into_iter().map(bf16::from_f32).collect())
            }
            _ if aligned => Storage::Mapped { map, range: within, dtype },
            // safetensors does not promise alignment; copy the rare misaligned tensor.
            (StoredDtype::F32, _) => Storage::F32(read_f32(bytes)),
            (StoredDtype::Bf16, _) => Storage::Bf16(read_u16(bytes).into_iter().map(bf16::from_bits).collect()),
            (StoredDtype::F16, _) => Storage::F16(read_u16(bytes).into_iter().map(f16::from_bits).collect()),
            (StoredDtype::F8E4M3 | StoredDtype::U8 | StoredDtype::Other(_), _) => unreachable!("rejected by slice()"),
        };
        Ok(Weight { shape, storage })
    }

    /// The nn.Linear weight `[out, inp]` of child module `module`, in whichever form is
    /// stored: float `weight` (compute-dtype rules), FP8 `weight` (F8_E4M3) with
    /// `weight_scale` (`[out, 1]` or `[out]`), or int4 `weight_packed` (U8
    /// `[out, ceil(inp/2)]`) with `weight_scale` (`[out, ceil(inp/128)]`).
    pub fn linear(&self, module: &str, out: usize, inp: usize) -> Result<Weight, ModelError> {
        let m = self.pp(module);
        let packed_name = m.path("weight_packed");
        let scale_name = m.path("weight_scale");
        if let Some(t) = self.ckpt.get(&m.path("weight")).filter(|t| t.dtype == StoredDtype::F8E4M3) {
            check_shape(&t, &[out, inp])?;
            let scales = self.f32_buf(&scale_name, &[vec![out, 1], vec![out]])?;
            let (map, range) = t.map()?;
            return Ok(Weight { shape: vec![out, inp], storage: Storage::Fp8 { map, range, scales } });
        }
        if let Some(t) = self.ckpt.get(&packed_name) {
            if t.dtype != StoredDtype::U8 {
                return Err(ModelError::UnsupportedDtype { name: packed_name, dtype: t.dtype.to_string() });
            }
            check_shape(&t, &[out, quant::int4_row_bytes(inp)])?;
            let scales = self.f32_buf(&scale_name, &[vec![out, quant::int4_row_groups(inp)]])?;
            let (map, range) = t.map()?;
            return Ok(Weight { shape: vec![out, inp], storage: Storage::Int4 { map, range, scales } });
        }
        m.weight("weight", &[out, inp])
    }

    /// A float tensor (full name) of one of `shapes` as f32: mapped when stored as aligned F32.
    fn f32_buf(&self, name: &str, shapes: &[Vec<usize>]) -> Result<F32Buf, ModelError> {
        let t = self
            .ckpt
            .get(name)
            .ok_or_else(|| ModelError::MissingTensor { name: name.to_owned(), dir: self.ckpt.dir().to_path_buf() })?;
        if !shapes.contains(&t.shape) {
            return Err(ModelError::ShapeMismatch {
                name: name.to_owned(),
                expected: shapes[0].clone(),
                found: t.shape,
            });
        }
        let (map, range) = t.map()?;
        let bytes = &map[range.clone()];
        Ok(match t.dtype {
            StoredDtype::F32 if (bytes.as_ptr() as usize).is_multiple_of(4) => F32Buf::Mapped { map, range },
            StoredDtype::F32 => F32Buf::Owned(read_f32(bytes)),
            StoredDtype::Bf16 => {
                F32Buf::Owned(read_u16(bytes).into_iter().map(|b| bf16::from_bits(b).to_f32()).collect())
            }
            StoredDtype::F16 => {
                F32Buf::Owned(read_u16(bytes).into_iter().map(|b| f16::from_bits(b).to_f32()).collect())
            }
            other => return Err(ModelError::UnsupportedDtype { name: name.to_owned(), dtype: other.to_string() }),
        })
    }

    /// A small tensor of this scope (norm weights) widened to an owned f32 vector.
    pub fn vector_f32(&self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let t = self.slice(name, &[len])?;
        let bytes = t.read()?;
        Ok(match t.dtype {
            StoredDtype::F32 => read_f32(&bytes),
            StoredDtype::Bf16 => read_u16(&bytes).into_iter().map(|b| bf16::from_bits(b).to_f32()).collect(),
            StoredDtype::F16 => read_u16(&bytes).into_iter().map(|b| f16::from_bits(b).to_f32()).collect(),
            StoredDtype::F8E4M3 | StoredDtype::U8 | StoredDtype::Other(_) => unreachable!("rejected by slice()"),
        })
    }
}

fn check_shape(t: &TensorSlice, shape: &[usize]) -> Result<(), ModelError> {
    if t.shape == shape {
        Ok(())
    } else {
        Err(ModelError::ShapeMismatch { name: t.name.clone(), expected: shape.to_vec(), found: t.shape.clone() })
    }
}

fn read_f32(bytes: &[u8]) -> Vec<f32> {
    bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
}

fn read_u16(bytes: &[u8]) -> Vec<u16> {
    bytes.chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
}
