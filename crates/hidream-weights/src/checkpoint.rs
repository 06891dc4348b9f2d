//! `Checkpoint`: one or more safetensors files behind one index from tensor name to bytes, with
//! lazy loading of single tensors and of units (every tensor under a prefix).
//!
//! The headers are parsed from a memory map of each file, once, at open. Tensor data is never read
//! through the map: every load is a positioned read (`pread`) into its destination (or, when it is
//! converted, through a 1 MiB scratch buffer), so a file truncated while it is open is a typed
//! `ShardChanged` error rather than a SIGBUS, and the page cache's pages are not mapped into the
//! process (its resident set is what it allocated). Against a copy out of the map, a warm-cache
//! read costs more CPU time (measured in `benches/read_into.rs`' terms: 1.4–1.6× for 200 MB), which
//! a streamed run overlaps with compute.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::ops::Bound;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use hidream_config::{SizeModel, TransformerConfig};
use serde::Deserialize;

use crate::convert::{ReadDType, bytes_mut, convert_into, element_bytes, zeroed_vec};
use crate::error::io_error;
use crate::header::{Entry, parse_header};
use crate::mmap::MappedFile;
use crate::{Result, WeightsError};

/// Bytes read at a time when a tensor is converted on its way in (1 MiB: in L2 while converted).
const READ_CHUNK_BYTES: usize = 1 << 20;

/// diffusers' shard index of a transformer saved in several files.
pub(crate) const INDEX_FILE: &str = "diffusion_pytorch_model.safetensors.index.json";
/// diffusers' name for a transformer saved in one file.
pub(crate) const SINGLE_FILE: &str = "diffusion_pytorch_model.safetensors";
/// The transformer config beside the weights.
pub(crate) const CONFIG_FILE: &str = "config.json";
/// The transformer subfolder of a diffusers pipeline root.
const TRANSFORMER_DIR: &str = "transformer";

/// An opened checkpoint: its safetensors files, open, and the index of their tensors.
///
/// Opening reads and checks every header but no tensor data; loading reads only the bytes of
/// the tensors asked for. Cloning is cheap (an `Arc`), and a `Checkpoint` is `Send + Sync`, so a
/// background thread can load units while another computes.
#[derive(Clone)]
pub struct Checkpoint {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    /// The file that names the tensors: the index, or the single safetensors file.
    source: PathBuf,
    files: Vec<Shard>,
    tensors: BTreeMap<String, Location>,
}

struct Shard {
    path: PathBuf,
    map: MappedFile,
}

struct Location {
    shard: usize,
    entry: Entry,
}

/// What the header says about one tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorInfo {
    /// The safetensors file that holds the tensor.
    pub file: PathBuf,
    /// The dtype it is stored in.
    pub dtype: safetensors::Dtype,
    pub shape: Vec<usize>,
}

#[derive(Deserialize)]
struct IndexFile {
    weight_map: BTreeMap<String, String>,
}

impl Checkpoint {
    /// Opens a checkpoint. `path` is one of:
    /// - a diffusers transformer folder, holding `diffusion_pytorch_model.safetensors.index.json`
    ///   and its shards, or `diffusion_pytorch_model.safetensors`, or exactly one `*.safetensors`;
    /// - a diffusers pipeline root whose `transformer/` subfolder is such a folder;
    /// - a `.safetensors` file, or a `*.safetensors.index.json` file.
    ///
    /// Every header is checked here, so a truncated or corrupt shard fails now rather than in the
    /// middle of a long run. A file truncated later, while the checkpoint (or a clone, or a
    /// `VarBuilder` made from it) is alive, makes the loads past its new end `ShardChanged`; one
    /// rewritten in place at the same length is not detected (replacing it by a rename, as the Hub
    /// client does, leaves the open file as it was).
    pub fn open(path: &Path) -> Result<Checkpoint> {
        let metadata = std::fs::metadata(path).map_err(io_error(path))?;
        if !metadata.is_dir() {
            let is_index = path.file_name().is_some_and(|name| name.to_string_lossy().ends_with(".index.json"));
            return if is_index { Self::open_index(path) } else { Self::open_file(path) };
        }
        if let Some(checkpoint) = Self::open_dir(path)? {
            return Ok(checkpoint);
        }
        let transformer = path.join(TRANSFORMER_DIR);
        if transformer.is_dir() {
            return Self::open_dir(&transformer)?.ok_or(WeightsError::NoWeights { dir: transformer });
        }
        Err(WeightsError::NoWeights { dir: path.to_owned() })
    }

    /// The folder of the checkpoint, where `config.json` is looked for.
    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    /// The safetensors files of the checkpoint, in index order.
    pub fn files(&self) -> impl Iterator<Item = &Path> {
        self.inner.files.iter().map(|shard| shard.path.as_path())
    }

    /// Reads and validates the `config.json` beside the weights.
    pub fn config(&self) -> Result<TransformerConfig> {
        let path = self.inner.dir.join(CONFIG_FILE);
        if !path.is_file() {
            return Err(WeightsError::MissingConfig { path });
        }
        Ok(TransformerConfig::from_json_file(&path)?)
    }

    /// Every tensor name, sorted.
    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.inner.tensors.keys().map(String::as_str)
    }

    /// The file, stored dtype and shape of a tensor, or `None` if the checkpoint lacks it.
    pub fn tensor_info(&self, name: &str) -> Option<TensorInfo> {
        let location = self.inner.tensors.get(name)?;
        Some(TensorInfo {
            file: self.inner.files[location.shard].path.clone(),
            dtype: location.entry.dtype,
            shape: location.entry.shape.clone(),
        })
    }

    /// [`Checkpoint::tensor_info`], or `MissingTensor` naming the checkpoint when it lacks `name`.
    pub fn require_tensor(&self, name: &str) -> Result<TensorInfo> {
        self.locate(name)?;
        self.tensor_info(name)
            .ok_or_else(|| WeightsError::MissingTensor { file: self.inner.source.clone(), tensor: name.to_owned() })
    }

    /// The number of elements of a tensor: the length of the buffer [`Checkpoint::read_into`]
    /// fills.
    pub fn tensor_numel(&self, name: &str) -> Result<usize> {
        Ok(self.locate(name)?.entry.shape.iter().product())
    }

    /// Converts the stored tensor `name` into the caller's `dst`, in one pass over its bytes and
    /// with no allocation: the primitive for loading into a buffer that is reused from load to
    /// load. `T` is `f32`, `f64`, `half::f16` or `half::bf16`; the tensor may be stored as F32,
    /// F16, BF16 or F64, at any alignment. The values are bit-identical to those of
    /// [`Checkpoint::load`] into `T::DTYPE` (the same conversion, NaN payloads included).
    ///
    /// Errors: `MissingTensor`, `UnsupportedDtype` (an integer or 8-bit tensor), and
    /// `LengthMismatch` when `dst` does not hold exactly [`Checkpoint::tensor_numel`] elements.
    pub fn read_into<T: ReadDType>(&self, name: &str, dst: &mut [T]) -> Result<()> {
        let location = self.locate(name)?;
        self.read_located(name, location, dst)
    }

    fn read_located<T: ReadDType>(&self, name: &str, location: &Location, dst: &mut [T]) -> Result<()> {
        let path = self.shard_path(location);
        let entry = &location.entry;
        let stored = stored_dtype(path, name, entry.dtype)?;
        let expected: usize = entry.shape.iter().product();
        if dst.len() != expected {
            return Err(WeightsError::LengthMismatch {
                file: path.to_owned(),
                tensor: name.to_owned(),
                shape: entry.shape.clone(),
                expected,
                actual: dst.len(),
            });
        }
        let range = &entry.range;
        // The header check makes the range exactly `expected` elements of the stored dtype.
        let size = match element_bytes(entry.dtype) {
            Some(size) if size * expected == range.len() => size,
            _ => {
                let problem = format!("{} bytes are not {expected} {} elements", range.len(), entry.dtype);
                return Err(WeightsError::BadOffsets { file: path.to_owned(), tensor: name.to_owned(), problem });
            }
        };
        // Positioned reads, never the map: a shard truncated under the run is `ShardChanged` here,
        // where touching the map past its new end would kill the process with SIGBUS.
        let start = range.start as u64;
        if cfg!(target_endian = "little") && stored == T::DTYPE {
            return self.pread(location, name, start, bytes_mut(dst));
        }
        // Converted on the way in: each chunk is read into a small aligned scratch buffer, that
        // stays in the cache while it is converted into `dst`.
        let chunk_elements = (READ_CHUNK_BYTES / size).min(expected).max(1);
        let mut scratch = vec![0u64; (chunk_elements * size).div_ceil(8)];
        let scratch: &mut [u8] = bytemuck::cast_slice_mut(&mut scratch);
        for (chunk_idx, out) in dst.chunks_mut(chunk_elements).enumerate() {
            let bytes = &mut scratch[..out.len() * size];
            self.pread(location, name, start + (chunk_idx * chunk_elements * size) as u64, bytes)?;
            convert_into(entry.dtype, bytes, out);
        }
        Ok(())
    }

    /// Fills `out` from the bytes at `offset` of `location`'s shard with a positioned read.
    fn pread(&self, location: &Location, name: &str, offset: u64, out: &mut [u8]) -> Result<()> {
        let shard = &self.inner.files[location.shard];
        shard.map.read_at(offset, out).map_err(|source| match source.kind() {
            std::io::ErrorKind::UnexpectedEof => WeightsError::ShardChanged {
                file: shard.path.clone(),
                tensor: name.to_owned(),
                needed: offset + out.len() as u64,
            },
            _ => WeightsError::Io { path: shard.path.clone(), source },
        })
    }

    /// Reads the stored bytes `offset..offset + out.len()` of tensor `name` into `out`, as they are
    /// in the file (little-endian, in the stored dtype), with a positioned read (`pread`) rather
    /// than through the map: the path of a staging buffer that the bytes go to the GPU from. A shard
    /// truncated since it was opened is `ShardChanged`, not a fault.
    ///
    /// Errors: `MissingTensor`, `BadOffsets` for a range past the tensor's end, `ShardChanged`, and
    /// `Io` for any other read error.
    pub fn read_stored(&self, name: &str, offset: u64, out: &mut [u8]) -> Result<()> {
        let location = self.locate(name)?;
        let shard = &self.inner.files[location.shard];
        let range = &location.entry.range;
        let start = range.start as u64 + offset;
        let end = start + out.len() as u64;
        if end > range.end as u64 {
            let problem = format!("bytes {offset}..{} of a tensor of {} bytes", offset + out.len() as u64, range.len());
            return Err(WeightsError::BadOffsets { file: shard.path.clone(), tensor: name.to_owned(), problem });
        }
        self.pread(location, name, start, out)
    }

    /// Rows `rows` of the 2-D tensor `name` (`[n_rows, width]`), converted to `dtype` on `device`:
    /// `[rows.len(), width]`. Only those rows' bytes are read, so an embedding table need not be
    /// loaded to embed a few tokens; the values are those of [`Checkpoint::load`] followed by
    /// `index_select`, bit for bit.
    ///
    /// Errors: `MissingTensor`, `UnsupportedDtype`, `ShapeMismatch` for a tensor that is not 2-D,
    /// and `RowOutOfRange` for a row past the end.
    pub fn load_rows(&self, name: &str, rows: &[u32], dtype: DType, device: &Device) -> Result<Tensor> {
        let location = self.locate(name)?;
        let path = self.shard_path(location);
        let entry = &location.entry;
        stored_dtype(path, name, entry.dtype)?;
        let &[n_rows, width] = entry.shape.as_slice() else {
            return Err(WeightsError::ShapeMismatch {
                file: path.to_owned(),
                tensor: name.to_owned(),
                expected: vec![entry.shape.first().copied().unwrap_or(0), entry.shape.iter().skip(1).product()],
                actual: entry.shape.clone(),
            });
        };
        if let Some(&row) = rows.iter().find(|&&row| row as usize >= n_rows) {
            return Err(WeightsError::RowOutOfRange { file: path.to_owned(), tensor: name.to_owned(), row, n_rows });
        }
        let row_bytes = element_bytes(entry.dtype).unwrap_or(0) * width;
        let tensor = match dtype {
            DType::F32 => self.gather_rows::<f32>(name, location, rows, row_bytes, width),
            DType::F64 => self.gather_rows::<f64>(name, location, rows, row_bytes, width),
            DType::F16 => self.gather_rows::<half::f16>(name, location, rows, row_bytes, width),
            DType::BF16 => self.gather_rows::<half::bf16>(name, location, rows, row_bytes, width),
            other => {
                return Err(WeightsError::BufferDtype { dtype: other });
            }
        }?;
        let candle_error =
            |source| WeightsError::Candle { file: path.to_owned(), tensor: name.to_owned(), source: Box::new(source) };
        tensor.to_device(device).map_err(candle_error)
    }

    /// The rows, each read by a positioned read of its bytes and converted.
    fn gather_rows<T: ReadDType>(
        &self,
        name: &str,
        location: &Location,
        rows: &[u32],
        row_bytes: usize,
        width: usize,
    ) -> Result<Tensor> {
        let stored = location.entry.dtype;
        let mut values = zeroed_vec::<T>(rows.len() * width);
        let mut scratch = vec![0u64; row_bytes.div_ceil(8)];
        let scratch: &mut [u8] = &mut bytemuck::cast_slice_mut(&mut scratch)[..row_bytes];
        for (out, &row) in values.chunks_exact_mut(width.max(1)).zip(rows) {
            // The row was checked against the shape, and the header check makes the data exactly
            // `n_rows * row_bytes` long.
            let start = location.entry.range.start as u64 + u64::from(row) * row_bytes as u64;
            self.pread(location, name, start, scratch)?;
            convert_into(stored, scratch, out);
        }
        Tensor::from_vec(values, (rows.len(), width), &Device::Cpu).map_err(|source| WeightsError::Candle {
            file: self.shard_path(location).to_owned(),
            tensor: name.to_owned(),
            source: Box::new(source),
        })
    }

    /// Reads one tensor and converts it to `dtype` on `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor> {
        let location = self.locate(name)?;
        self.read(name, location, Some(dtype), device)
    }

    /// Reads every tensor whose name starts with one of `prefixes` (the prefixes of a unit, such as
    /// `double_stream_blocks.7.`), converted to `dtype` on `device`. A prefix that matches no
    /// tensor is an error: it means the checkpoint and the model disagree.
    pub fn load_prefixes(&self, prefixes: &[String], dtype: DType, device: &Device) -> Result<HashMap<String, Tensor>> {
        let mut tensors = HashMap::new();
        for prefix in prefixes {
            let mut matched = false;
            for (name, location) in self.under_prefix(prefix) {
                matched = true;
                if !tensors.contains_key(name) {
                    tensors.insert(name.clone(), self.read(name, location, Some(dtype), device)?);
                }
            }
            if !matched {
                return Err(WeightsError::NoTensorUnderPrefix {
                    file: self.inner.source.clone(),
                    prefix: prefix.clone(),
                });
            }
        }
        Ok(tensors)
    }

    /// Checks, before any long work, that every tensor of `sizes` is present with its shape and a
    /// supported dtype. Returns the first problem found, in forward order.
    pub fn validate(&self, sizes: &SizeModel) -> Result<()> {
        for spec in sizes.all_tensors() {
            let location = self.locate(&spec.name)?;
            self.check_shape(&spec.name, location, &spec.shape)?;
            stored_dtype(self.shard_path(location), &spec.name, location.entry.dtype)?;
        }
        Ok(())
    }

    /// Loads a tensor after checking that it has `shape`; the check reads no data.
    pub(crate) fn load_with_shape(&self, name: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let location = self.locate(name)?;
        self.check_shape(name, location, shape)?;
        self.read(name, location, Some(dtype), device)
    }

    /// Loads a tensor in the dtype it is stored in.
    pub(crate) fn load_as_stored(&self, name: &str, device: &Device) -> Result<Tensor> {
        let location = self.locate(name)?;
        self.read(name, location, None, device)
    }

    pub(crate) fn contains(&self, name: &str) -> bool {
        self.inner.tensors.contains_key(name)
    }

    /// Opens one safetensors file.
    pub(crate) fn open_file(path: &Path) -> Result<Checkpoint> {
        let map = MappedFile::open(path)?;
        let entries = parse_header(path, map.bytes())?;
        let tensors = entries.into_iter().map(|(name, entry)| (name, Location { shard: 0, entry })).collect();
        let dir = parent_dir(path);
        let files = vec![Shard { path: path.to_owned(), map }];
        Ok(Checkpoint { inner: Arc::new(Inner { dir, source: path.to_owned(), files, tensors }) })
    }

    /// Opens a diffusers shard index and every shard it names.
    fn open_index(index: &Path) -> Result<Checkpoint> {
        let malformed = |problem: String| WeightsError::MalformedIndex { file: index.to_owned(), problem };
        let text = std::fs::read_to_string(index).map_err(io_error(index))?;
        let parsed: IndexFile = serde_json::from_str(&text).map_err(|err| malformed(err.to_string()))?;
        if parsed.weight_map.is_empty() {
            return Err(malformed("its weight_map names no tensor".into()));
        }
        let dir = parent_dir(index);
        let mut shard_of_name: HashMap<&str, usize> = HashMap::new();
        let mut files = Vec::new();
        let mut headers = Vec::new();
        let mut tensors = BTreeMap::new();
        for (tensor, shard_name) in &parsed.weight_map {
            let shard = match shard_of_name.get(shard_name.as_str()) {
                Some(shard) => *shard,
                None => {
                    let path = shard_path(&dir, shard_name).ok_or_else(|| {
                        malformed(format!("shard `{shard_name}` of `{tensor}` is not a file name in {}", dir.display()))
                    })?;
                    if !path.is_file() {
                        let tensor = tensor.clone();
                        return Err(WeightsError::MissingShard { index: index.to_owned(), shard: path, tensor });
                    }
                    let map = MappedFile::open(&path)?;
                    headers.push(parse_header(&path, map.bytes())?);
                    files.push(Shard { path, map });
                    shard_of_name.insert(shard_name, files.len() - 1);
                    files.len() - 1
                }
            };
            let Some(entry) = headers[shard].remove(tensor) else {
                let shard = files[shard].path.clone();
                return Err(WeightsError::NotInShard { index: index.to_owned(), shard, tensor: tensor.clone() });
            };
            tensors.insert(tensor.clone(), Location { shard, entry });
        }
        Ok(Checkpoint { inner: Arc::new(Inner { dir, source: index.to_owned(), files, tensors }) })
    }

    /// Opens the weights of a transformer folder, or returns `None` if it holds no safetensors.
    fn open_dir(dir: &Path) -> Result<Option<Checkpoint>> {
        let index = dir.join(INDEX_FILE);
        if index.is_file() {
            return Self::open_index(&index).map(Some);
        }
        let single = dir.join(SINGLE_FILE);
        if single.is_file() {
            return Self::open_file(&single).map(Some);
        }
        let mut files = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_error(dir))? {
            let path = entry.map_err(io_error(dir))?.path();
            if path.extension().is_some_and(|ext| ext == "safetensors") && path.is_file() {
                files.push(path);
            }
        }
        files.sort();
        match files.as_slice() {
            [] => Ok(None),
            [file] => Self::open_file(file).map(Some),
            _ => Err(WeightsError::AmbiguousWeights { dir: dir.to_owned(), files }),
        }
    }

    fn locate(&self, name: &str) -> Result<&Location> {
        self.inner
            .tensors
            .get(name)
            .ok_or_else(|| WeightsError::MissingTensor { file: self.inner.source.clone(), tensor: name.to_owned() })
    }

    fn under_prefix<'a>(&'a self, prefix: &'a str) -> impl Iterator<Item = (&'a String, &'a Location)> + 'a {
        let from: (Bound<&str>, Bound<&str>) = (Bound::Included(prefix), Bound::Unbounded);
        self.inner.tensors.range::<str, _>(from).take_while(move |(name, _)| name.starts_with(prefix))
    }

    fn shard_path(&self, location: &Location) -> &Path {
        &self.inner.files[location.shard].path
    }

    fn check_shape(&self, name: &str, location: &Location, expected: &[usize]) -> Result<()> {
        if location.entry.shape == expected {
            return Ok(());
        }
        Err(WeightsError::ShapeMismatch {
            file: self.shard_path(location).to_owned(),
            tensor: name.to_owned(),
            expected: expected.to_vec(),
            actual: location.entry.shape.clone(),
        })
    }

    /// Builds a CPU tensor from the stored little-endian bytes (copying them, which also takes
    /// care of alignment), then converts it to `dtype` (if any) and moves it to `device`.
    fn read(&self, name: &str, location: &Location, dtype: Option<DType>, device: &Device) -> Result<Tensor> {
        let shard = &self.inner.files[location.shard];
        let entry = &location.entry;
        // Weights (converted to a compute dtype) must be floats; plain tensor files read as stored
        // may also hold integers (token ids, u8 pixels).
        let stored = match dtype {
            Some(_) => stored_dtype(&shard.path, name, entry.dtype)?,
            None => plain_dtype(&shard.path, name, entry.dtype)?,
        };
        let candle_error = |source| WeightsError::Candle {
            file: shard.path.clone(),
            tensor: name.to_owned(),
            source: Box::new(source),
        };
        let shape = entry.shape.as_slice();
        let float = element_bytes(entry.dtype).is_some();
        // A float goes from the file into the tensor's one allocation by positioned reads
        // (`read_into`, bit-identical to `to_dtype`); an integer tensor is read whole, and an
        // integer target is candle's conversion.
        let tensor = match dtype.unwrap_or(stored) {
            DType::F32 if float => self.read_vec::<f32>(name, location, shape),
            DType::F64 if float => self.read_vec::<f64>(name, location, shape),
            DType::F16 if float => self.read_vec::<half::f16>(name, location, shape),
            DType::BF16 if float => self.read_vec::<half::bf16>(name, location, shape),
            target => {
                let mut bytes = vec![0u8; entry.range.len()];
                self.pread(location, name, entry.range.start as u64, &mut bytes)?;
                Tensor::from_raw_buffer(&bytes, stored, shape, &Device::Cpu)
                    .and_then(|tensor| if target == stored { Ok(tensor) } else { tensor.to_dtype(target) })
                    .map_err(candle_error)
            }
        }?;
        tensor.to_device(device).map_err(candle_error)
    }

    /// A float tensor converted into a new `Vec<T>`, on the CPU.
    fn read_vec<T: ReadDType>(&self, name: &str, location: &Location, shape: &[usize]) -> Result<Tensor> {
        let mut values = zeroed_vec::<T>(shape.iter().product());
        self.read_located(name, location, &mut values)?;
        Tensor::from_vec(values, shape, &Device::Cpu).map_err(|source| WeightsError::Candle {
            file: self.shard_path(location).to_owned(),
            tensor: name.to_owned(),
            source: Box::new(source),
        })
    }
}

impl fmt::Debug for Checkpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Checkpoint")
            .field("source", &self.inner.source)
            .field("n_files", &self.inner.files.len())
            .field("n_tensors", &self.inner.tensors.len())
            .finish()
    }
}

/// The candle dtype of a stored dtype, for the float dtypes this crate converts.
pub(crate) fn stored_dtype(file: &Path, tensor: &str, dtype: safetensors::Dtype) -> Result<DType> {
    match dtype {
        safetensors::Dtype::F32 => Ok(DType::F32),
        safetensors::Dtype::F16 => Ok(DType::F16),
        safetensors::Dtype::BF16 => Ok(DType::BF16),
        safetensors::Dtype::F64 => Ok(DType::F64),
        _ => Err(WeightsError::UnsupportedDtype { file: file.to_owned(), tensor: tensor.to_owned(), dtype }),
    }
}

/// The candle dtype of a tensor in a plain tensor file: the float dtypes, and u8, u32 and i64.
fn plain_dtype(file: &Path, tensor: &str, dtype: safetensors::Dtype) -> Result<DType> {
    match dtype {
        safetensors::Dtype::U8 => Ok(DType::U8),
        safetensors::Dtype::U32 => Ok(DType::U32),
        safetensors::Dtype::I64 => Ok(DType::I64),
        _ => stored_dtype(file, tensor, dtype),
    }
}

/// The folder of a file; `.` for a bare file name.
fn parent_dir(path: &Path) -> PathBuf {
    match path.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    }
}

/// The path of a shard named in an index, if the name is a plain file name (no folders, no `..`).
fn shard_path(dir: &Path, shard_name: &str) -> Option<PathBuf> {
    let mut components = Path::new(shard_name).components();
    match (components.next(), components.next()) {
        (Some(Component::Normal(_)), None) => Some(dir.join(shard_name)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checkpoint_is_send_sync_and_cheap_to_share() {
        fn assert_send_sync<T: Send + Sync + Clone + 'static>() {}
        assert_send_sync::<Checkpoint>();
    }

    #[test]
    fn shard_names_must_be_plain_file_names() {
        let dir = Path::new("ckpt");
        assert_eq!(shard_path(dir, "a-00001.safetensors"), Some(dir.join("a-00001.safetensors")));
        for bad in ["", "../a.safetensors", "sub/a.safetensors", "/etc/passwd", ".", ".."] {
            assert_eq!(shard_path(dir, bad), None, "{bad}");
        }
    }
}
