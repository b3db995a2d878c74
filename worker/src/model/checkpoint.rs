//! Memory-mapped safetensors checkpoints: `model.safetensors`, or shards listed by
//! `model.safetensors.index.json`.
//!
//! Opening validates every file's header against its length (a truncated download fails
//! here, naming the file) and builds a name → location table. Tensor bytes are never copied:
//! [`TensorSlice`] borrows straight from the map, and the OS pages weights in on first use.

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
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
}

/// Element types herd reads from checkpoints.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoredDtype {
    F32,
    Bf16,
    F16,
    /// Any other safetensors dtype, kept for error messages.
    Other(Dtype),
}

impl StoredDtype {
    fn from_safetensors(d: Dtype) -> Self {
        match d {
            Dtype::F32 => StoredDtype::F32,
            Dtype::BF16 => StoredDtype::Bf16,
            Dtype::F16 => StoredDtype::F16,
            other => StoredDtype::Other(other),
        }
    }

    pub fn size(self) -> usize {
        match self {
            StoredDtype::F32 => 4,
            StoredDtype::Bf16 | StoredDtype::F16 => 2,
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
            StoredDtype::Other(d) => write!(f, "{d:?}"),
        }
    }
}

#[derive(Clone, Debug)]
struct Entry {
    file: usize,
    dtype: StoredDtype,
    shape: Vec<usize>,
    /// Byte range within the mapped file.
    start: usize,
    end: usize,
}

/// One mapped file.
#[derive(Debug)]
struct MappedFile {
    path: PathBuf,
    map: Arc<Mmap>,
}

/// The tensors of a checkpoint directory.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<MappedFile>,
    tensors: HashMap<String, Entry>,
}

/// A tensor's metadata and its bytes inside the shared map.
#[derive(Clone, Debug)]
pub struct TensorSlice {
    pub name: String,
    pub dtype: StoredDtype,
    pub shape: Vec<usize>,
    pub path: PathBuf,
    map: Arc<Mmap>,
    start: usize,
    end: usize,
}

impl TensorSlice {
    pub fn bytes(&self) -> &[u8] {
        &self.map[self.start..self.end]
    }

    /// The map and byte range, for callers that keep the tensor alive beyond the checkpoint.
    pub fn into_mapped(self) -> (Arc<Mmap>, std::ops::Range<usize>) {
        (self.map, self.start..self.end)
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }
}

impl Checkpoint {
    /// Map every weight file of `dir`.
    pub fn open(dir: &Path) -> Result<Self, CheckpointError> {
        let single = dir.join("model.safetensors");
        let index = dir.join("model.safetensors.index.json");
        let files: Vec<PathBuf> = if index.is_file() {
            shard_files(dir, &index)?
        } else if single.is_file() {
            vec![single]
        } else {
            return Err(CheckpointError::NoWeights { dir: dir.to_path_buf() });
        };
        let mut mapped = Vec::with_capacity(files.len());
        let mut tensors: HashMap<String, Entry> = HashMap::new();
        for (fi, path) in files.into_iter().enumerate() {
            let file = File::open(&path).map_err(|source| CheckpointError::Open { path: path.clone(), source })?;
            // SAFETY: the map is read-only; herd never writes checkpoint files while serving
            // them. A file truncated underneath a running process would fault, as it would
            // for any mmap-based loader (llama.cpp, vLLM's safetensors path).
            let map =
                unsafe { Mmap::map(&file) }.map_err(|source| CheckpointError::Open { path: path.clone(), source })?;
            let corrupt = |message: String| CheckpointError::Corrupt { path: path.clone(), message };
            let st = SafeTensors::deserialize(&map).map_err(|e| corrupt(e.to_string()))?;
            let base = map.as_ptr() as usize;
            for (name, view) in st.tensors() {
                let start = view.data().as_ptr() as usize - base;
                let end = start + view.data().len();
                if let Some(prev) = tensors.get(&name) {
                    return Err(CheckpointError::Duplicate {
                        name,
                        first: mapped_path(&mapped, prev.file, &path),
                        second: path.clone(),
                    });
                }
                let entry = Entry {
                    file: fi,
                    dtype: StoredDtype::from_safetensors(view.dtype()),
                    shape: view.shape().to_vec(),
                    start,
                    end,
                };
                tensors.insert(name, entry);
            }
            mapped.push(MappedFile { path, map: Arc::new(map) });
        }
        Ok(Self { dir: dir.to_path_buf(), files: mapped, tensors })
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
            map: Arc::clone(&f.map),
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
        self.tensors.values().map(|e| (e.end - e.start) as u64).sum()
    }
}

fn mapped_path(mapped: &[MappedFile], idx: usize, current: &Path) -> PathBuf {
    mapped.get(idx).map(|m| m.path.clone()).unwrap_or_else(|| current.to_path_buf())
}

/// The distinct shard files of an index, in first-appearance order of the sorted weight map.
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
        assert_eq!(bytemuck::cast_slice::<u8, f32>(b.bytes()), &[3.0; 6]);

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
        assert_eq!(s.get("b").expect("b").bytes(), c.get("b").expect("b").bytes());
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
