//! The one error type of hidream-weights: every way a checkpoint or a weights operation can fail,
//! each naming the file (and the tensor where there is one) and saying what to do about it.

use std::path::PathBuf;

use hidream_config::ConfigError;

/// Everything that can be wrong with a checkpoint, a tensor file or a synthetic-data request.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WeightsError {
    /// A file or folder could not be read or written.
    #[error("cannot access {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },

    /// A folder holds no weights this crate recognises.
    #[error(
        "no transformer weights in {dir}: expected `diffusion_pytorch_model.safetensors.index.json` with its shards, \
         `diffusion_pytorch_model.safetensors`, or exactly one `*.safetensors` file; pass the `transformer` folder \
         of a diffusers HiDream-I1 checkpoint, its root, or a `.safetensors` file"
    )]
    NoWeights { dir: PathBuf },

    /// A folder holds several `.safetensors` files and no index that says how they fit together.
    #[error(
        "{dir} holds {n} `*.safetensors` files and no `diffusion_pytorch_model.safetensors.index.json`, so it is \
         not clear which is the transformer; pass one file, or restore the index",
        n = files.len()
    )]
    AmbiguousWeights { dir: PathBuf, files: Vec<PathBuf> },

    /// The shard index is not diffusers' `{"metadata": ..., "weight_map": {tensor: shard}}`.
    #[error("malformed shard index {file}: {problem}; re-download `diffusion_pytorch_model.safetensors.index.json`")]
    MalformedIndex { file: PathBuf, problem: String },

    /// The index maps a tensor to a shard file that is not there.
    #[error(
        "the index {index} maps tensor `{tensor}` to the shard {shard}, which does not exist; re-download the shard"
    )]
    MissingShard { index: PathBuf, shard: PathBuf, tensor: String },

    /// The index maps a tensor to a shard that does not hold it.
    #[error(
        "the index {index} maps tensor `{tensor}` to the shard {shard}, which does not hold it; the index and the \
         shards come from different downloads: re-download both"
    )]
    NotInShard { index: PathBuf, shard: PathBuf, tensor: String },

    /// The 8-byte header length is larger than the file, or than safetensors' 100 MB limit.
    #[error(
        "{file}: the safetensors header claims {declared} bytes, but at most {available} are possible (the rest of \
         the file, capped at safetensors' 100 MB limit); the file is corrupt or not a safetensors file: re-download it"
    )]
    HeaderTooLarge { file: PathBuf, declared: u64, available: u64 },

    /// The header is not the JSON that safetensors writes.
    #[error(
        "malformed safetensors header in {file}: {problem}; the file is corrupt or not a safetensors file: re-download it"
    )]
    MalformedHeader { file: PathBuf, problem: String },

    /// The header's data offsets are inconsistent: overlapping, out of order, or of the wrong size.
    #[error("tensor `{tensor}` in {file} has invalid data offsets: {problem}; the file is corrupt: re-download it")]
    BadOffsets { file: PathBuf, tensor: String, problem: String },

    /// The data section is shorter than the header says.
    #[error(
        "{file} is truncated: tensor `{tensor}` ends at data byte {needed}, but the file holds only {actual} data \
         bytes; the download was interrupted: re-download the shard"
    )]
    Truncated { file: PathBuf, tensor: String, needed: u64, actual: u64 },

    /// A tensor is stored in a dtype this crate does not convert.
    #[error(
        "tensor `{tensor}` in {file} is stored as {dtype}, but only F32, F16, BF16 and F64 weights are supported; \
         use the original bf16 checkpoint (quantised or integer tensors are not a HiDream-I1 transformer)"
    )]
    UnsupportedDtype { file: PathBuf, tensor: String, dtype: safetensors::Dtype },

    /// A caller's buffer does not hold exactly the elements of the tensor read into it.
    #[error(
        "cannot read tensor `{tensor}` of {file} into a buffer of {actual} elements: it has {expected} (shape \
         {shape:?}); size the buffer with `Checkpoint::tensor_numel`"
    )]
    LengthMismatch { file: PathBuf, tensor: String, shape: Vec<usize>, expected: usize, actual: usize },

    /// A tensor the model needs is not in the checkpoint.
    #[error(
        "tensor `{tensor}` is missing from the checkpoint {file}; the checkpoint is incomplete, does not match its \
         config.json, or is not a HiDream-I1 transformer: check the config and re-download"
    )]
    MissingTensor { file: PathBuf, tensor: String },

    /// No tensor of the checkpoint starts with a unit prefix.
    #[error(
        "no tensor of the checkpoint {file} starts with `{prefix}`; the checkpoint does not match its config.json \
         or is not a HiDream-I1 transformer"
    )]
    NoTensorUnderPrefix { file: PathBuf, prefix: String },

    /// A tensor has another shape than the one the model expects.
    #[error(
        "tensor `{tensor}` in {file} has shape {actual:?}, but the model expects {expected:?}; the checkpoint does \
         not match its config.json or is not a HiDream-I1 transformer"
    )]
    ShapeMismatch { file: PathBuf, tensor: String, expected: Vec<usize>, actual: Vec<usize> },

    /// The checkpoint folder has no `config.json`.
    #[error(
        "no config.json at {path}; a diffusers HiDream-I1 `transformer` folder has one beside the weights: \
         re-download it, or pass the folder that holds it"
    )]
    MissingConfig { path: PathBuf },

    /// `config.json` is there but is not a valid HiDream transformer config.
    #[error(transparent)]
    Config(#[from] ConfigError),

    /// candle could not build or convert a tensor.
    #[error("cannot convert tensor `{tensor}` of {file}: {source}")]
    Candle { file: PathBuf, tensor: String, source: Box<candle_core::Error> },

    /// A row past the end of a 2-D tensor, such as a token id past an embedding table.
    #[error(
        "row {row} of tensor `{tensor}` in {file} does not exist: it has {n_rows} rows (a token id past the \
         vocabulary? check that the tokenizer belongs to this model)"
    )]
    RowOutOfRange { file: PathBuf, tensor: String, row: u32, n_rows: usize },

    /// A unit's tensors do not fit the buffer they are loaded into.
    #[error(
        "tensor `{tensor}` of {file} does not fit its unit buffer: it needs {needed} more bytes at byte {offset}, \
         the buffer holds {capacity}; the buffer was sized from a different size model than the checkpoint"
    )]
    BufferTooSmall { file: PathBuf, tensor: String, offset: u64, needed: u64, capacity: u64 },

    /// A shard is shorter now than when the checkpoint was opened: it was truncated or replaced
    /// under the run.
    #[error(
        "{file} changed while it was in use: tensor `{tensor}` ends at byte {needed}, but the file now ends before it; do not modify a checkpoint while it runs, and run again"
    )]
    ShardChanged { file: PathBuf, tensor: String, needed: u64 },

    /// The CUDA driver failed while the weights moved to the GPU.
    #[error("CUDA failed while {doing}: {message}")]
    Cuda { doing: String, message: String },

    /// A CUDA device was asked of a build without the `cuda` feature.
    #[error(
        "{device} was asked for, but this hidream was built without the `cuda` feature; build it with \
         `eval \"$(scripts/cuda-setup.sh)\" && cargo build --release -p hidream-cli --features cuda` (see docs/cuda.md)"
    )]
    NoCudaBuild { device: String },

    /// A buffer or target of a dtype weights cannot be converted to.
    #[error("weights cannot be converted to {dtype:?}: use f32, f16 or bf16")]
    BufferDtype { dtype: candle_core::DType },

    /// The safetensors crate rejected a file this crate reads or writes.
    #[error("safetensors rejected {file}: {source}; if reading, the file is corrupt: re-download it")]
    Safetensors { file: PathBuf, source: safetensors::SafeTensorError },

    /// The synthetic writer was asked to write into a folder that holds something else.
    #[error(
        "{dir} exists and is not empty, and is not a synthetic checkpoint written by hidream-rs; refusing to \
         overwrite it: choose another folder or remove it first"
    )]
    WouldOverwrite { dir: PathBuf },

    /// An option of a synthetic-data request is out of range.
    #[error("invalid {what}: {problem}")]
    InvalidOption { what: &'static str, problem: String },
}

/// Result alias of this crate.
pub type Result<T, E = WeightsError> = std::result::Result<T, E>;

impl WeightsError {
    /// Finds the `WeightsError` inside an error that candle returned from a [`Checkpoint`]'s
    /// `VarBuilder`, looking through candle's backtrace, context and path wrappers.
    ///
    /// [`Checkpoint`]: crate::Checkpoint
    pub fn from_candle(err: &candle_core::Error) -> Option<&WeightsError> {
        match err {
            candle_core::Error::WrappedContext { wrapped, .. } => wrapped.downcast_ref(),
            candle_core::Error::WithBacktrace { inner, .. }
            | candle_core::Error::Context { inner, .. }
            | candle_core::Error::WithPath { inner, .. } => Self::from_candle(inner),
            _ => None,
        }
    }

    /// Wraps this error into candle's, so that it crosses `VarBuilder` and can be recovered with
    /// [`WeightsError::from_candle`].
    pub(crate) fn into_candle(self) -> candle_core::Error {
        let context = self.to_string();
        candle_core::Error::WrappedContext { wrapped: Box::new(self), context }
    }
}

pub(crate) fn io_error(path: impl Into<PathBuf>) -> impl FnOnce(std::io::Error) -> WeightsError {
    let path = path.into();
    move |source| WeightsError::Io { path, source }
}
