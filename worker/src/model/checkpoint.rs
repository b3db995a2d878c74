//! Safetensors checkpoints: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`.
//!
//! Opening reads only each file's header and validates it against the file length (a
//! truncated download fails here, naming the file). Tensor bytes are never read up front:
//! each file is memory-mapped once, whole, on first use, and [`TensorSlice::map`] /
//! [`TensorSlice::map_range`] hand out ranges of that one map (a worker touches only the
//! routed experts it holds, so the OS pages in nothing a worker does not use).
//!
//! One map per file rather than one per tensor is what lets the kernel back the weights
//! with 2 MiB pages: a huge page mapping needs a 2 MiB-aligned virtual range over a 2 MiB
//! folio of the page cache, and most tensors (an expert, a norm) are smaller than that or
//! start mid-page. The map asks for huge pages (`MADV_HUGEPAGE`), so page-cache readahead
//! allocates 2 MiB folios and decode's weight stream misses the TLB 512× less often
//! (docs/performance.md measures the difference).

use memmap2::{Mmap, MmapOptions};
use safetensors::Dtype;
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::io::Read;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

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
    file: File,
    /// The whole file, mapped on first use and shared by every tensor in it.
    map: OnceLock<Arc<Mmap>>,
}

impl ShardFile {
    fn map(&self, tensor: &str) -> Result<Arc<Mmap>, CheckpointError> {
        if let Some(map) = self.map.get() {
            return Ok(Arc::clone(map));
        }
        // SAFETY: the map is read-only and herd never writes checkpoint files it serves. A file
        // truncated underneath a running process would fault, as for any mmap-based loader
        // (llama.cpp, vLLM's safetensors path).
        let map = unsafe { MmapOptions::new().map(&self.file) }.map_err(|source| CheckpointError::Map {
            name: tensor.to_owned(),
            path: self.path.clone(),
            source,
        })?;
        // Only a hint: kernels without file THP (or with THP off) keep 4 KiB pages.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        // A racing thread may have mapped it too; either map serves, the loser is unmapped.
        Ok(Arc::clone(self.map.get_or_init(|| Arc::new(map))))
    }
}

/// The tensors of a checkpoint directory (headers only; bytes are mapped on demand).
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<Arc<ShardFile>>,
    tensors: HashMap<String, Entry>,
}

/// A tensor's metadata and where its bytes are; nothing is read or mapped yet.
#[derive(Clone, Debug)]
pub struct TensorSlice {
    pub name: String,
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
    pub path: PathBuf,
    shard: Arc<ShardFile>,
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

    /// Bytes `range` of the tensor (e.g. one expert of a fused expert tensor): the file's map
    /// and where those bytes are within it.
    pub fn map_range(&self, range: Range<usize>) -> Result<(Arc<Mmap>, Range<usize>), CheckpointError> {
        assert!(range.end <= self.byte_len(), "{}: byte range {range:?} beyond {}", self.name, self.byte_len());
        let map = self.shard.map(&self.name)?;
        let start = self.start as usize + range.start;
        Ok((map, start..start + range.len()))
    }

    /// Read the whole tensor into memory (for small tensors such as norm weights).
    pub fn read(&self) -> Result<Vec<u8>, CheckpointError> {
        let mut buf = vec![0u8; self.byte_len()];
        self.shard.file.read_exact_at(&mut buf, self.start).map_err(|source| CheckpointError::Map {
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
                    let first = files.get(prev.file).map_or_else(|| path.clone(), |f: &Arc<ShardFile>| f.path.clone());
                    return Err(CheckpointError::Duplicate { name, first, second: path.clone() });
                }
                tensors.insert(name, entry);
            }
            files.push(Arc::new(ShardFile { path, file, map: OnceLock::new() }));
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
            shard: Arc::clone(f),
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

/// Drop a just-written (and synced) weight file from the page cache.
///
/// The write path leaves the file cached in small folios, and a later map would be served
/// from them with 4 KiB pages; evicted, the file is read back on first use through the
/// huge-page map (see the module doc) in 2 MiB folios. Only a hint: failure changes nothing
/// but speed.
pub fn evict_from_page_cache(file: &File) {
    let _ = rustix::fs::fadvise(file, 0, None, rustix::fs::Advice::DontNeed);
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
