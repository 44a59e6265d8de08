//! The crate's one error enum, and the expected outcomes kept apart from it.

use batos_kv::KvError;
use batos_model::forward::ForwardError;
use batos_types::RequestId;

/// Everything `batos-engine` can fail with. Expected outcomes of scheduling (a full KV
/// pool, busy adapter slots) never show up here: the scheduler waits or preempts on them.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum EngineError {
    /// A configuration field is out of range.
    #[error("invalid engine config: {field} = {value}: {reason}")]
    InvalidConfig {
        /// The offending field.
        field: &'static str,
        /// Its value, as given.
        value: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A request was refused before it was queued.
    #[error("invalid request: {field}: {reason}")]
    InvalidRequest {
        /// The offending field of the request.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },
    /// The request names an adapter the engine does not know.
    #[error("unknown adapter '{name}'")]
    UnknownAdapter {
        /// The name asked for.
        name: String,
    },
    /// Loading a name that is already loaded (use replace).
    #[error("adapter '{name}' is already loaded (replace it to load a new version)")]
    AdapterExists {
        /// The name.
        name: String,
    },
    /// This engine serves the base model only: it was built without an adapter manager.
    #[error("adapter '{name}': this engine serves the base model only (no adapter manager)")]
    AdaptersUnsupported {
        /// The name asked for.
        name: String,
    },
    /// The adapter manager failed (audit rejection, I/O, the image, a full budget).
    #[error("adapter '{name}': {op} failed: {source}")]
    Adapter {
        /// The adapter name.
        name: String,
        /// What was being done (`load`, `acquire`, `pin_hot` …).
        op: &'static str,
        /// The manager's error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The KV cache failed (a bug or a corrupt state, never "out of blocks").
    #[error("KV cache: {0}")]
    Kv(#[from] KvError),
    /// The forward pass failed.
    #[error("forward pass: {0}")]
    Forward(#[from] ForwardError),
    /// Sampling failed (a bug: parameters are validated on submission).
    #[error("sampling request {request:?}: {source}")]
    Sampling {
        /// The request being sampled.
        request: RequestId,
        /// The kernel's error.
        #[source]
        source: batos_kernels::KernelError,
    },
    /// Loading or preparing the model failed.
    #[error("model: {0}")]
    Model(#[from] batos_model::ModelError),
    /// Text in or out needs a tokenizer, and the engine was built without one.
    #[error("{what} needs a tokenizer; the engine was built from a model without one")]
    NoTokenizer {
        /// What needed it.
        what: &'static str,
    },
    /// The engine is shutting down or has stopped; nothing new is accepted.
    #[error("the engine is shut down")]
    ShutDown,
    /// The device asked for cannot be used: a build without the `cuda` feature, no
    /// driver library, no such device, or kernels that would not load.
    #[error("device {device}: {source}")]
    Device {
        /// The device, e.g. `cuda:0`.
        device: String,
        /// Why (`KernelError::Cuda` carries the driver's or NVRTC's reason).
        #[source]
        source: batos_kernels::KernelError,
    },
    /// The engine thread could not be started or died.
    #[error("engine thread: {reason}")]
    Thread {
        /// What happened.
        reason: String,
    },
}

/// Result alias of this crate.
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// The expected outcome "every hot adapter slot is pinned by running requests": the
/// scheduler leaves the request waiting and admits it once a slot frees.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("all {slots} hot adapter slots are pinned; '{name}' waits")]
pub struct SlotsBusy {
    /// The adapter that waits.
    pub name: String,
    /// Hot slots in all.
    pub slots: usize,
}
