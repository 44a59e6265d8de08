//! The crate's one error type.

use std::path::PathBuf;

/// Everything that can go wrong while reading a model: files, metadata, tensors, tokenizer,
/// template and the model fetch. Every variant names the thing at fault (a path, a tensor,
/// a metadata key, a byte offset) so a user can act on the message alone.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ModelError {
    /// An I/O operation on a file failed.
    #[error("{op} {}: {source}", path.display())]
    Io {
        /// What was being done ("open", "map", "read", ...).
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The file does not start with the GGUF magic.
    #[error("{}: not a GGUF file (magic {found:02x?}, expected \"GGUF\")", path.display())]
    GgufMagic {
        /// The file.
        path: PathBuf,
        /// The first bytes found.
        found: Vec<u8>,
    },

    /// A GGUF version this reader does not understand.
    #[error("{}: unsupported GGUF version {version} (supported: 2 and 3, little-endian)", path.display())]
    GgufVersion {
        /// The file.
        path: PathBuf,
        /// The version field as read (little-endian).
        version: u32,
    },

    /// The GGUF file ends before a structure it declares.
    #[error("{}: truncated while reading {what} at byte offset {offset}: need {needed} bytes, file has {file_len}", path.display())]
    GgufTruncated {
        /// The file.
        path: PathBuf,
        /// What was being read.
        what: String,
        /// Where the read started.
        offset: u64,
        /// How many bytes it needed from `offset`.
        needed: u64,
        /// The file's length.
        file_len: u64,
    },

    /// A GGUF structure holds a value that cannot be right.
    #[error("{}: malformed GGUF at byte offset {offset}: {reason}", path.display())]
    GgufMalformed {
        /// The file.
        path: PathBuf,
        /// Where the bad value was read.
        offset: u64,
        /// What is wrong.
        reason: String,
    },

    /// A tensor's data range lies (partly) outside the file.
    #[error("{}: tensor '{tensor}' data [{start}, {end}) lies outside the file ({file_len} bytes)", path.display())]
    GgufTensorOutOfBounds {
        /// The file.
        path: PathBuf,
        /// The tensor.
        tensor: String,
        /// Absolute start offset of its data.
        start: u64,
        /// Absolute end offset of its data.
        end: u64,
        /// The file's length.
        file_len: u64,
    },

    /// A tensor is stored in a ggml type this crate cannot dequantize.
    #[error("tensor '{tensor}': ggml type {ggml_type} is not supported (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K)")]
    UnsupportedGgmlType {
        /// The tensor.
        tensor: String,
        /// The type's name (or numeric id).
        ggml_type: String,
    },

    /// A required metadata key is absent.
    #[error("metadata key '{key}' is missing")]
    MetadataMissing {
        /// The key.
        key: String,
    },

    /// A metadata value has the wrong type or an out-of-range value.
    #[error("metadata key '{key}': expected {expected}, found {found}")]
    MetadataType {
        /// The key.
        key: String,
        /// What the reader wanted.
        expected: &'static str,
        /// What the file holds.
        found: String,
    },

    /// The model is not a Llama-family architecture.
    #[error("unknown or unsupported architecture '{found}' (supported: {supported})")]
    UnknownArchitecture {
        /// The architecture string found (GGUF `general.architecture`, HF `architectures`/`model_type`).
        found: String,
        /// What this crate supports.
        supported: &'static str,
    },

    /// A config value is out of range or inconsistent with another.
    #[error("invalid model config: {field}: {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// Why it is rejected.
        reason: String,
    },

    /// A RoPE scaling type this crate does not implement.
    #[error("unsupported rope scaling type '{kind}' (supported: default, linear, llama3)")]
    UnsupportedRopeScaling {
        /// The type as written in the config.
        kind: String,
    },

    /// A tensor the config requires is not in the checkpoint.
    #[error("tensor '{name}' is missing from {source_desc}")]
    MissingTensor {
        /// Internal (HF-style) name of the tensor.
        name: String,
        /// Where it was looked for.
        source_desc: String,
    },

    /// A tensor has a shape other than the config implies.
    #[error("tensor '{name}' has shape {got:?}, config implies {expected:?}")]
    ShapeMismatch {
        /// Internal (HF-style) name of the tensor.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        got: Vec<usize>,
    },

    /// A tensor that no Llama weight maps to (for example a bias this model family lacks).
    #[error("unexpected tensor '{name}' in {source_desc}: no Llama weight maps to it")]
    UnexpectedTensor {
        /// The tensor's name in the file.
        name: String,
        /// Where it was found.
        source_desc: String,
    },

    /// A tensor's element type is not one batos loads.
    #[error("tensor '{name}': element type {dtype} is not supported (supported: f32, f16, bf16)")]
    UnsupportedDType {
        /// The tensor.
        name: String,
        /// The type as named by the file format.
        dtype: String,
    },

    /// A tensor's data length does not match its shape and type.
    #[error("tensor '{name}': {got} bytes of data, shape and type need {expected}")]
    TensorDataLength {
        /// The tensor.
        name: String,
        /// Bytes needed.
        expected: usize,
        /// Bytes present.
        got: usize,
    },

    /// A safetensors file is malformed or truncated.
    #[error("{}: malformed safetensors file: {reason}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What the parser reported.
        reason: String,
    },

    /// A JSON file (config.json, model.safetensors.index.json, tokenizer.json) failed to parse.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The file (or a description of the in-memory source).
        path: PathBuf,
        /// The parser error.
        #[source]
        source: serde_json::Error,
    },

    /// Building or running the tokenizer failed.
    #[error("tokenizer: {reason}")]
    Tokenizer {
        /// What failed.
        reason: String,
    },

    /// The chat template failed to compile or render.
    #[error("chat template: {source}")]
    ChatTemplate {
        /// The template engine's error (with line information).
        #[source]
        source: minijinja::Error,
    },

    /// A directory or file the loader expected is not there.
    #[error("{}: not found ({what})", path.display())]
    NotFound {
        /// The missing path.
        path: PathBuf,
        /// What it should have been.
        what: &'static str,
    },

    /// An external tool the model fetch needs is not installed.
    #[error("model fetch: '{tool}' could not be started ({source}); install it or place the model at {}", expected.display())]
    FetchToolMissing {
        /// The program.
        tool: String,
        /// Where the model file would have to be.
        expected: PathBuf,
        /// The spawn error.
        #[source]
        source: std::io::Error,
    },

    /// An external command of the model fetch exited unsuccessfully.
    #[error("model fetch: `{command}` failed ({status}){hint}\n{stderr_tail}")]
    FetchCommandFailed {
        /// The command line.
        command: String,
        /// Its exit status.
        status: String,
        /// A likely cause, when recognisable (e.g. no network).
        hint: String,
        /// The end of its standard error.
        stderr_tail: String,
    },

    /// The fetch ran but the expected file did not appear.
    #[error("model fetch: {} is missing after {step}", path.display())]
    FetchedFileMissing {
        /// The file that should exist.
        path: PathBuf,
        /// The step after which it was expected.
        step: &'static str,
    },
}

/// Result alias for this crate.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

impl ModelError {
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        ModelError::Io {
            op,
            path: path.into(),
            source,
        }
    }

    pub(crate) fn tokenizer(reason: impl std::fmt::Display) -> Self {
        ModelError::Tokenizer {
            reason: reason.to_string(),
        }
    }
}
