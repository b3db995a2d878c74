//! Safetensors checkpoints: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`.
//!
//! Opening reads only each file's header and validates it against the file length (a
//! truncated download fails here, naming the file). Tensor bytes are never read up front:
//! [`TensorSlice::map`] memory-maps exactly one tensor's bytes, and
//! [`TensorSlice::map_range`] a part of one (a worker maps only the routed experts it
//! holds), so the OS pages in nothing a worker does not use.

use memmap2::{Mmap, MmapOptions};
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{dir}: no model.safetensors or model.safetensors.index.json")]
    NoWeights { dir: PathBuf },
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("{path} is not a valid safetensors file (truncated or corrupt?): {message}")]
    Corrupt { path: PathBuf, message: String },
    #[error("{path}: {message}")]
    BadIndex { path: PathBuf, message: String },
    #[error("tensor {name} appears in both {first} and {second}")]
    Duplicate { name: String, first: PathBuf, second: PathBuf },
    #[error("cannot map {name} from {path}: {source}")]
    Map { name: String, path: PathBuf, source: std::io::Error },
}

/// Element types herd reads from checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    Bf16,
    F16,
    /// FP8 e4m3fn codes (quantized routed experts).
    F8E4M3,
    /// Raw bytes (herd's packed int4 experts).
    U8,
    /// Any other safetensors dtype, kept for error messages.
    Other(Dtype),
}

impl StoredDtype {
    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "F32" => StoredDtype::F32,
            "BF16" => StoredDtype::Bf16,
            "F16" => StoredDtype::F16,
            "F8_E4M3" => StoredDtype::F8E4M3,
            "U8" => StoredDtype::U8,
            other => StoredDtype::Other(serde_json::from_value(serde_json::Value::String(other.to_owned())).ok()?),
        })
    }

    pub fn size(self) -> usize {
        match self {
            StoredDtype::F32 => 4,
            StoredDtype::Bf16 | StoredDtype::F16 => 2,
            StoredDtype::F8E4M3 | StoredDtype::U8 => 1,
            StoredDtype::Other(d) => d.bitsize().div_ceil(8),
        }
    }
}

impl std::fmt::Display for StoredDtype {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoredDtype::F32 => f.write_str("F32"),
            StoredDtype::Bf16 => f.write_str("BF16"),
            StoredDtype::F16 => f.write_str("F16"),
            StoredDtype::F8E4M3 => f.write_str("F8_E4M3"),
            StoredDtype::U8 => f.write_str("U8"),
            StoredDtype::Other(d) => write!(f, "{d:?}"),
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    file: usize,
    dtype: StoredDtype,
    shape: Vec<usize>,
    /// Absolute byte offsets in the file.
    start: u64,
    end: u64,
}

#[derive(Debug)]
struct ShardFile {
    path: PathBuf,
    file: Arc<File>,
}

/// The tensors of a checkpoint directory (headers only; bytes are mapped on demand).
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<ShardFile>,
    tensors: HashMap<String, Entry>,
}

/// A tensor's metadata and where its bytes are; nothing is read or mapped yet.
#[derive(Clone, Debug)]
pub struct TensorSlice {
    pub name: String,
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
    pub path: PathBuf,
    file: Arc<File>,
    start: u64,
    end: u64,
}

impl TensorSlice {
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn byte_len(&self) -> usize {
        (self.end - self.start) as usize
    }

    /// Map the whole tensor; returns the map and the tensor's bytes within it.
    pub fn map(&self) -> Result<(Arc<Mmap>, Range<usize>), CheckpointError> {
        self.map_range(0..self.byte_len())
    }

    /// Map bytes `range` of the tensor (e.g. one expert of a fused expert tensor).
    pub fn map_range(&self, range: Range<usize>) -> Result<(Arc<Mmap>, Range<usize>), CheckpointError> {
        assert!(range.end <= self.byte_len(), "{}: byte range {range:?} beyond {}", self.name, self.byte_len());
        // SAFETY: the map is read-only and herd never writes checkpoint files it serves. A file
        // truncated underneath a running process would fault, as for any mmap-based loader
        // (llama.cpp, vLLM's safetensors path).
        let map = unsafe {
            MmapOptions::new().offset(self.start + range.start as u64).len(range.len()).map(self.file.as_ref())
        }
        .map_err(|source| CheckpointError::Map { name: self.name.clone(), path: self.path.clone(), source })?;
        let len = map.len();
        Ok((Arc::new(map), 0..len))
    }

    /// Read the whole tensor into memory (for small tensors such as norm weights).
    pub fn read(&self) -> Result<Vec<u8>, CheckpointError> {
        let mut buf = vec![0u8; self.byte_len()];
        self.file.read_exact_at(&mut buf, self.start).map_err(|source| CheckpointError::Map {
            name: self.name.clone(),
            path: self.path.clone(),
            source,
        })?;
        Ok(buf)
    }
}

impl Checkpoint {
    /// Read and validate the headers of every weight file of `dir`.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let paths: Vec<PathBuf> = if index.is_file() {
            shard_files(dir, &index)?
        } else if single.is_file() {
            vec![single]
        } else {
            return Err(CheckpointError::NoWeights { dir: dir.to_path_buf() });
        };
        let mut files = Vec::with_capacity(paths.len());
        let mut tensors: HashMap<String, Entry> = HashMap::new();
        for (fi, path) in paths.into_iter().enumerate() {
            let mut file = File::open(&path).map_err(|source| CheckpointError::Open { path: path.clone(), source })?;
            for (name, entry) in read_header(&mut file, &path, fi)? {
                if let Some(prev) = tensors.get(&name) {
                    let first = files.get(prev.file).map_or_else(|| path.clone(), |f: &ShardFile| f.path.clone());
                    return Err(CheckpointError::Duplicate { name, first, second: path.clone() });
                }
                tensors.insert(name, entry);
            }
            files.push(ShardFile { path, file: Arc::new(file) });
        }
        Ok(Self { dir: dir.to_path_buf(), files, tensors })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn get(&self, name: &str) -> Option<TensorSlice> {
        let e = self.tensors.get(name)?;
        let f = &self.files[e.file];
        Some(TensorSlice {
            name: name.to_owned(),
            dtype: e.dtype,
            shape: e.shape.clone(),
            path: f.path.clone(),
            file: Arc::clone(&f.file),
            start: e.start,
            end: e.end,
        })
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Total bytes of tensor data.
    pub fn data_bytes(&self) -> u64 {
        self.tensors.values().map(|e| e.end - e.start).sum()
    }
}

/// Safetensors headers are JSON and tiny next to the data; anything larger is not a header.
const MAX_HEADER_BYTES: u64 = 100 << 20;

/// Parse one file's header: `u64` length, JSON `{name: {dtype, shape, data_offsets}}`, then
/// the data, which must fill the rest of the file exactly.
fn read_header(file: &mut File, path: &Path, fi: usize) -> Result<Vec<(String, Entry)>, CheckpointError> {
    let corrupt = |message: String| CheckpointError::Corrupt { path: path.to_path_buf(), message };
    let file_len = file.metadata().map_err(|source| CheckpointError::Open { path: path.to_path_buf(), source })?.len();
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes).map_err(|_| corrupt(format!("{file_len} bytes is too short for a header")))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_HEADER_BYTES || 8 + header_len > file_len {
        return Err(corrupt(format!("header length {header_len} does not fit in a {file_len}-byte file")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header).map_err(|e| corrupt(format!("reading the header: {e}")))?;
    let json: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&header).map_err(|e| corrupt(format!("header is not a JSON object: {e}")))?;
    let data_start = 8 + header_len;
    let data_len = file_len - data_start;
    let mut entries = Vec::with_capacity(json.len());
    let mut covered: Vec<(u64, u64)> = Vec::with_capacity(json.len());
    for (name, info) in json {
        if name == "__metadata__" {
            continue;
        }
        let bad = |what: &str| corrupt(format!("tensor {name}: {what}"));
        let dtype = info
            .get("dtype")
            .and_then(|d| d.as_str())
            .and_then(StoredDtype::parse)
            .ok_or_else(|| bad("missing or unknown dtype"))?;
        let shape: Vec<usize> = info
            .get("shape")
            .and_then(|s| serde_json::from_value(s.clone()).ok())
            .ok_or_else(|| bad("missing or invalid shape"))?;
        let offsets: [u64; 2] = info
            .get("data_offsets")
            .and_then(|o| serde_json::from_value(o.clone()).ok())
            .ok_or_else(|| bad("missing or invalid data_offsets"))?;
        let [s, e] = offsets;
        let want = shape.iter().try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64));
        if s > e || Some(e - s) != want {
            return Err(bad(&format!("data_offsets {offsets:?} do not hold shape {shape:?} of {dtype}")));
        }
        if e > data_len {
            return Err(bad(&format!("data ends at byte {e}, but the file has only {data_len} data bytes")));
        }
        covered.push((s, e));
        entries.push((name, Entry { file: fi, dtype, shape, start: data_start + s, end: data_start + e }));
    }
    // Like the reference loader: the tensors must tile the data section exactly.
    covered.sort_unstable();
    let mut at = 0;
    for (s, e) in covered {
        if s != at {
            return Err(corrupt(format!("data is not contiguous at byte {at} (next tensor starts at {s})")));
        }
        at = e;
    }
    if at != data_len {
        return Err(corrupt(format!("tensors cover {at} data bytes, the file has {data_len}")));
    }
    Ok(entries)
}

/// The distinct shard files of an index, in sorted order.
fn shard_files(dir: &Path, index: &Path) -> Result<Vec<PathBuf>, CheckpointError> {
    let bad = |message: String| CheckpointError::BadIndex { path: index.to_path_buf(), message };
    let text =
        std::fs::read_to_string(index).map_err(|source| CheckpointError::Open { path: index.to_path_buf(), source })?;
    let value: serde_json::Value = serde_json::from_str(&text).map_err(|e| bad(format!("not valid JSON: {e}")))?;
    let map =
        value.get("weight_map").and_then(|m| m.as_object()).ok_or_else(|| bad("no \"weight_map\" object".into()))?;
    let mut files: BTreeMap<String, ()> = BTreeMap::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| bad(format!("weight_map[{tensor:?}] is not a file name")))?;
        if file.contains('/') || file.contains('\\') || file == ".." {
            return Err(bad(format!("shard name {file:?} must be a plain file name")));
        }
        files.insert(file.to_owned(), ());
    }
    if files.is_empty() {
        return Err(bad("weight_map is empty".into()));
    }
    Ok(files.into_keys().map(|f| dir.join(f)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use safetensors::tensor::TensorView;

    fn write_st(path: &Path, tensors: &[(&str, Vec<f32>, Vec<usize>)]) {
        let bytes: Vec<Vec<u8>> = tensors.iter().map(|(_, d, _)| bytemuck::cast_slice(d).to_vec()).collect();
        let views: Vec<(String, TensorView<'_>)> = tensors
            .iter()
            .zip(&bytes)
            .map(|((n, _, s), b)| (n.to_string(), TensorView::new(Dtype::F32, s.clone(), b).expect("view")))
            .collect();
        safetensors::serialize_to_file(views, None, path).expect("write");
    }

    #[test]
    fn single_file_and_shards_give_the_same_tensors() {
        let dir = tempfile::tempdir().expect("tmp");
        write_st(
            &dir.path().join("model.safetensors"),
            &[("a", vec![1.0, 2.0], vec![2]), ("b", vec![3.0; 6], vec![2, 3])],
        );
        let c = Checkpoint::open(dir.path()).expect("open");
        assert_eq!(c.names(), ["a", "b"]);
        let b = c.get("b").expect("b");
        assert_eq!(b.shape, [2, 3]);
        assert_eq!(b.dtype, StoredDtype::F32);
        assert_eq!(bytemuck::cast_slice::<u8, f32>(&b.read().expect("read")), &[3.0; 6]);
        let (map, range) = b.map_range(8..16).expect("map part");
        assert_eq!(bytemuck::cast_slice::<u8, f32>(&map[range]), &[3.0; 2]);

        let sharded = tempfile::tempdir().expect("tmp");
        write_st(&sharded.path().join("model-00001-of-00002.safetensors"), &[("a", vec![1.0, 2.0], vec![2])]);
        write_st(&sharded.path().join("model-00002-of-00002.safetensors"), &[("b", vec![3.0; 6], vec![2, 3])]);
        std::fs::write(
            sharded.path().join("model.safetensors.index.json"),
            r#"{"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}"#,
        )
        .expect("index");
        let s = Checkpoint::open(sharded.path()).expect("open shards");
        assert_eq!(s.names(), ["a", "b"]);
        assert_eq!(s.get("b").expect("b").read().expect("read"), c.get("b").expect("b").read().expect("read"));
    }

    #[test]
    fn truncated_and_missing_files_are_errors() {
        let dir = tempfile::tempdir().expect("tmp");
        let e = Checkpoint::open(dir.path()).expect_err("empty dir");
        assert!(e.to_string().contains("no model.safetensors"), "{e}");
        let path = dir.path().join("model.safetensors");
        write_st(&path, &[("a", vec![1.0; 100], vec![100])]);
        let len = std::fs::metadata(&path).expect("meta").len();
        let f = std::fs::OpenOptions::new().write(true).open(&path).expect("open");
        f.set_len(len - 10).expect("truncate");
        let e = Checkpoint::open(dir.path()).expect_err("truncated");
        assert!(e.to_string().contains("not a valid safetensors file"), "{e}");
        std::fs::write(&path, b"garbage").expect("write");
        assert!(Checkpoint::open(dir.path()).is_err());
    }

    #[test]
    fn index_naming_a_missing_shard_is_an_error() {
        let dir = tempfile::tempdir().expect("tmp");
        std::fs::write(dir.path().join("model.safetensors.index.json"), r#"{"weight_map": {"a": "nope.safetensors"}}"#)
            .expect("index");
        let e = Checkpoint::open(dir.path()).expect_err("missing shard");
        assert!(e.to_string().contains("nope.safetensors"), "{e}");
    }
}
