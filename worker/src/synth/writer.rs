//! A streaming safetensors writer for generated tensors.
//!
//! The safetensors format is: a u64 little-endian header length `N`, `N` bytes of JSON
//! (`{"__metadata__": {..}, "name": {"dtype", "shape", "data_offsets": [begin, end]}, ..}`,
//! padded with spaces so the data starts 8-byte aligned), then the raw little-endian data of
//! every tensor back to back. All offsets follow from the shapes, so the header is written
//! first and the data is then generated tensor by tensor in bounded windows (two recycled
//! buffers; a scoped thread writes one while rayon fills the other): memory stays at a few
//! tens of MB whatever the model size.
//!
//! Random values are reproducible and independent of threading: tensor `name` reads the
//! ChaCha8 stream keyed by the seed (key = seed as u64 LE ‖ [`KEY_TAG`]) with stream id
//! FNV-1a-64(`name`); element `i` uses 32-bit word `i` of that stream. Windows are split into
//! chunks filled in parallel by rayon, each chunk seeking to its first word.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::sync::mpsc;
use std::thread;

use rand_chacha::ChaCha8Rng;
use rand_chacha::rand_core::{RngCore, SeedableRng};
use rayon::prelude::*;

use super::{SynthError, partial_path};

/// The last 24 bytes of every ChaCha8 key (the first 8 are the seed).
const KEY_TAG: &[u8; 24] = b"herd-synth-weights-v1\0\0\0";
/// Elements generated and written per window (bounds memory use).
const WINDOW_ELEMS: usize = 1 << 22;
/// Elements per parallel task inside a window.
const CHUNK_ELEMS: usize = 1 << 16;

/// Storage dtype of one tensor in the file.
///
/// A new format (e.g. FP8 e4m3 experts) adds a variant here with its element size and
/// encoding; the header and streaming code are generic over it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TensorDtype {
    Bf16,
    F32,
    /// FP8 e4m3fn codes (values are encoded round-to-nearest-even, saturating at ±448).
    F8E4M3,
}

impl TensorDtype {
    /// The dtype string in the safetensors header.
    pub fn safetensors_name(self) -> &'static str {
        match self {
            TensorDtype::Bf16 => "BF16",
            TensorDtype::F32 => "F32",
            TensorDtype::F8E4M3 => "F8_E4M3",
        }
    }

    /// The matching `safetensors` crate dtype.
    pub fn safetensors_dtype(self) -> safetensors::Dtype {
        match self {
            TensorDtype::Bf16 => safetensors::Dtype::BF16,
            TensorDtype::F32 => safetensors::Dtype::F32,
            TensorDtype::F8E4M3 => safetensors::Dtype::F8_E4M3,
        }
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            TensorDtype::Bf16 => 2,
            TensorDtype::F32 => 4,
            TensorDtype::F8E4M3 => 1,
        }
    }

    /// Encodes `values` little-endian into `out` (`out.len() == values.len() * size`).
    fn encode(self, values: &[f32], out: &mut [u8]) {
        match self {
            TensorDtype::Bf16 => {
                for (v, o) in values.iter().zip(out.chunks_exact_mut(2)) {
                    o.copy_from_slice(&half::bf16::from_f32(*v).to_le_bytes());
                }
            }
            TensorDtype::F32 => {
                for (v, o) in values.iter().zip(out.chunks_exact_mut(4)) {
                    o.copy_from_slice(&v.to_le_bytes());
                }
            }
            TensorDtype::F8E4M3 => {
                for (v, o) in values.iter().zip(out.iter_mut()) {
                    *o = herd_kernels::quant::f32_to_e4m3(*v);
                }
            }
        }
    }
}

/// How a tensor's values are made.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Init {
    /// Every element 1.0 (norm weights).
    Ones,
    /// Every element the given value (FP8 scales).
    Const(f32),
    /// Uniform in (-√3·std, √3·std), i.e. zero mean and standard deviation `std`.
    Uniform { std: f32 },
}

/// One tensor of a checkpoint: its name, shape, storage dtype and initialisation.
#[derive(Clone, Debug, PartialEq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub dtype: TensorDtype,
    pub init: Init,
}

impl TensorSpec {
    /// Number of elements.
    pub fn numel(&self) -> u64 {
        self.shape.iter().map(|&d| d as u64).product()
    }

    /// Size of the data in bytes.
    pub fn nbytes(&self) -> u64 {
        self.numel() * self.dtype.size() as u64
    }
}

/// FNV-1a, 64 bit: a stable hash (unlike `std`'s) for naming ChaCha streams.
fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3))
}

/// The random stream of tensor `name`, positioned at element `start`.
fn tensor_rng(seed: u64, name: &str, start: u64) -> ChaCha8Rng {
    let mut key = [0u8; 32];
    key[..8].copy_from_slice(&seed.to_le_bytes());
    key[8..].copy_from_slice(KEY_TAG);
    let mut rng = ChaCha8Rng::from_seed(key);
    rng.set_stream(fnv1a64(name.as_bytes()));
    rng.set_word_pos(u128::from(start));
    rng
}

/// Fills `values` with elements `start..start + values.len()` of `spec` as f32.
pub fn generate_values(spec: &TensorSpec, seed: u64, start: u64, values: &mut [f32]) {
    match spec.init {
        Init::Ones => values.fill(1.0),
        Init::Const(v) => values.fill(v),
        Init::Uniform { std } => {
            let bound = std * 3f32.sqrt();
            let mut rng = tensor_rng(seed, &spec.name, start);
            for v in values.iter_mut() {
                // 24 random bits → the open interval (-1, 1), symmetric around 0.
                let unit = ((rng.next_u32() >> 8) as f32 + 0.5) * (2.0 / 16_777_216.0) - 1.0;
                *v = unit * bound;
            }
        }
    }
}

/// Encodes elements `start..` of `spec` into `out` (a whole number of elements), in parallel.
fn fill_bytes(spec: &TensorSpec, seed: u64, start: u64, out: &mut [u8]) {
    let size = spec.dtype.size();
    out.par_chunks_mut(CHUNK_ELEMS * size).enumerate().for_each(|(i, chunk)| {
        let mut values = vec![0f32; chunk.len() / size];
        generate_values(spec, seed, start + (i * CHUNK_ELEMS) as u64, &mut values);
        spec.dtype.encode(&values, chunk);
    });
}

/// The length prefix and padded JSON header for `specs`, in order.
pub fn header_bytes(specs: &[TensorSpec], metadata: &[(&str, String)]) -> Result<Vec<u8>, SynthError> {
    let mut header = serde_json::Map::new();
    if !metadata.is_empty() {
        let meta = metadata.iter().map(|(k, v)| (k.to_string(), serde_json::Value::from(v.as_str()))).collect();
        header.insert("__metadata__".into(), serde_json::Value::Object(meta));
    }
    let mut offset = 0u64;
    for spec in specs {
        let end = offset + spec.nbytes();
        let entry = serde_json::json!({
            "dtype": spec.dtype.safetensors_name(),
            "shape": spec.shape,
            "data_offsets": [offset, end],
        });
        if header.insert(spec.name.clone(), entry).is_some() || spec.name == "__metadata__" {
            return Err(SynthError::InvalidConfig(format!("duplicate tensor name {}", spec.name)));
        }
        offset = end;
    }
    let mut json =
        serde_json::to_vec(&header).map_err(|source| SynthError::Json { what: "the safetensors header", source })?;
    json.resize(json.len().next_multiple_of(8), b' ');
    let mut bytes = (json.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(&json);
    Ok(bytes)
}

/// Writes `specs` (in order) to `path` as safetensors and returns the file size in bytes.
///
/// The data goes to `<path>.partial`, is synced, and is renamed to `path` only when
/// complete; on error the partial file is removed.
pub fn write_safetensors(
    path: &Path,
    specs: &[TensorSpec],
    seed: u64,
    metadata: &[(&str, String)],
) -> Result<u64, SynthError> {
    let header = header_bytes(specs, metadata)?;
    let tmp = partial_path(path);
    let result = write_to(&tmp, &header, specs, seed).and_then(|size| {
        fs::rename(&tmp, path)
            .map(|()| size)
            .map_err(|e| SynthError::io(format!("renaming {} to {}", tmp.display(), path.display()), e))
    });
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Generates into two recycled window buffers while a scoped thread writes and syncs them,
/// so generation (CPU) and writing (I/O) overlap.
fn write_to(tmp: &Path, header: &[u8], specs: &[TensorSpec], seed: u64) -> Result<u64, SynthError> {
    let io_err = |e| SynthError::io(format!("writing {}", tmp.display()), e);
    let file = fs::File::create(tmp).map_err(io_err)?;
    let (full_tx, full_rx) = mpsc::sync_channel::<Vec<u8>>(1);
    let (empty_tx, empty_rx) = mpsc::sync_channel::<Vec<u8>>(2);
    let written = thread::scope(|scope| {
        let writer = scope.spawn(move || -> std::io::Result<()> {
            let mut file = file;
            file.write_all(header)?;
            for buf in full_rx {
                file.write_all(&buf)?;
                // The producer may have finished and dropped its receiver: nothing to recycle.
                let _ = empty_tx.send(buf);
            }
            file.sync_all()?;
            crate::model::checkpoint::evict_from_page_cache(&file);
            Ok(())
        });

        let mut buffers = 0;
        'specs: for spec in specs {
            let numel = spec.numel();
            let mut start = 0u64;
            while start < numel {
                let mut buf = match empty_rx.try_recv() {
                    Ok(buf) => buf,
                    Err(_) if buffers < 2 => {
                        buffers += 1;
                        Vec::new()
                    }
                    // Err: the writer stopped early; its result says why.
                    Err(_) => match empty_rx.recv() {
                        Ok(buf) => buf,
                        Err(_) => break 'specs,
                    },
                };
                let n = (numel - start).min(WINDOW_ELEMS as u64) as usize;
                buf.resize(n * spec.dtype.size(), 0);
                fill_bytes(spec, seed, start, &mut buf);
                if full_tx.send(buf).is_err() {
                    break 'specs;
                }
                start += n as u64;
            }
        }
        drop(full_tx);
        writer.join()
    });
    match written {
        Ok(result) => result.map_err(io_err)?,
        Err(_) => {
            return Err(io_err(std::io::Error::other("the writer thread panicked")));
        }
    }
    Ok(header.len() as u64 + specs.iter().map(TensorSpec::nbytes).sum::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, init: Init) -> TensorSpec {
        TensorSpec { name: name.into(), shape: vec![3, 70_000], dtype: TensorDtype::F32, init }
    }

    #[test]
    fn values_do_not_depend_on_chunking() {
        let s = spec("a.weight", Init::Uniform { std: 0.5 });
        let mut whole = vec![0f32; 210_000];
        generate_values(&s, 7, 0, &mut whole);
        let mut parts = vec![0f32; 210_000];
        let (a, b) = parts.split_at_mut(12_345);
        generate_values(&s, 7, 0, a);
        generate_values(&s, 7, 12_345, b);
        assert_eq!(whole, parts);

        let mut bytes = vec![0u8; 210_000 * 4];
        fill_bytes(&s, 7, 0, &mut bytes);
        let decoded: Vec<f32> = bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        assert_eq!(whole, decoded);
    }

    #[test]
    fn uniform_has_the_requested_moments() {
        let s = spec("b.weight", Init::Uniform { std: 0.25 });
        let mut v = vec![0f32; 210_000];
        generate_values(&s, 0, 0, &mut v);
        let n = v.len() as f64;
        let mean = v.iter().map(|&x| f64::from(x)).sum::<f64>() / n;
        let var = v.iter().map(|&x| (f64::from(x) - mean).powi(2)).sum::<f64>() / n;
        assert!(mean.abs() < 0.005, "mean {mean}");
        assert!((var.sqrt() - 0.25).abs() < 0.005, "std {}", var.sqrt());
        let bound = 0.25 * 3f32.sqrt();
        assert!(v.iter().all(|x| x.abs() < bound));
    }

    #[test]
    fn streams_differ_by_name_and_seed() {
        let mut a = vec![0f32; 64];
        let mut b = vec![0f32; 64];
        let mut c = vec![0f32; 64];
        generate_values(&spec("x", Init::Uniform { std: 1.0 }), 0, 0, &mut a);
        generate_values(&spec("y", Init::Uniform { std: 1.0 }), 0, 0, &mut b);
        generate_values(&spec("x", Init::Uniform { std: 1.0 }), 1, 0, &mut c);
        assert_ne!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn header_is_aligned_and_rejects_duplicates() {
        let specs = [spec("x", Init::Ones), spec("yy", Init::Ones)];
        let header = header_bytes(&specs, &[("format", "pt".into())]).expect("header");
        let n = u64::from_le_bytes(header[..8].try_into().expect("8 bytes")) as usize;
        assert_eq!(header.len(), 8 + n);
        assert_eq!(n % 8, 0);
        let dup = [spec("x", Init::Ones), spec("x", Init::Ones)];
        assert!(header_bytes(&dup, &[]).is_err());
    }
}
