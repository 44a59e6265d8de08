//! [`UploadStream`]: host → device copies on a stream of their own, so adapter
//! uploads overlap the compute stream's kernels.
//!
//! The device's pooled buffers are ordered on its compute stream (cross-stream event
//! tracking is off, see [`CudaDevice`]). Two events keep a copy on another stream
//! correct:
//!
//! - [`UploadStream::begin`] makes the upload stream wait for the work queued on the
//!   compute stream so far: a buffer just handed out by the pool (perhaps still in use
//!   by a queued kernel of an earlier step), or a slot the previous step still reads,
//!   is not overwritten early. Kernels queued *after* `begin` run concurrently with the
//!   copies.
//! - [`UploadStream::finish`] records an [`UploadFence`]; the compute stream waits on
//!   it ([`UploadFence::wait_on_compute`]) before the first kernel that reads what was
//!   copied. Steps that read none of it never wait.

use std::sync::Arc;

use cudarc::driver::{CudaEvent, CudaStream};

use super::device::CudaDevice;
use super::error::{CudaError, CudaResult};

/// A stream for host → device copies next to a device's compute stream.
#[derive(Debug)]
pub struct UploadStream {
    stream: Arc<CudaStream>,
}

impl UploadStream {
    /// A new upload stream on `dev`.
    pub fn new(dev: &CudaDevice) -> CudaResult<Self> {
        Ok(UploadStream {
            stream: dev.new_stream()?,
        })
    }

    /// The stream copies go on (for [`DeviceBuffer::copy_from_host_at`](super::DeviceBuffer::copy_from_host_at)).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Orders the copies queued next after everything queued on `dev`'s compute
    /// stream so far (allocations and the kernels of earlier steps).
    pub fn begin(&self, dev: &CudaDevice) -> CudaResult<()> {
        let done = dev
            .stream()
            .record_event(None)
            .map_err(CudaError::driver("cuEventRecord (compute)"))?;
        self.stream
            .wait(&done)
            .map_err(CudaError::driver("cuStreamWaitEvent (upload)"))
    }

    /// A fence after every copy queued so far.
    pub fn finish(&self) -> CudaResult<UploadFence> {
        let event = self
            .stream
            .record_event(None)
            .map_err(CudaError::driver("cuEventRecord (upload)"))?;
        Ok(UploadFence {
            event: Arc::new(event),
        })
    }

    /// Waits on the host for every copy queued so far (benches, tests).
    pub fn synchronize(&self) -> CudaResult<()> {
        self.stream
            .synchronize()
            .map_err(CudaError::driver("synchronize (upload)"))
    }
}

/// The end of a batch of copies on an [`UploadStream`]. Cheap to clone (one event).
#[derive(Clone, Debug)]
pub struct UploadFence {
    event: Arc<CudaEvent>,
}

impl UploadFence {
    /// Makes `dev`'s compute stream wait for the fenced copies before the kernels
    /// queued next (does not block the host).
    pub fn wait_on_compute(&self, dev: &CudaDevice) -> CudaResult<()> {
        dev.stream()
            .wait(&self.event)
            .map_err(CudaError::driver("cuStreamWaitEvent (compute)"))
    }

    /// Waits on the host for the fenced copies.
    pub fn synchronize(&self) -> CudaResult<()> {
        self.event
            .synchronize()
            .map_err(CudaError::driver("cuEventSynchronize"))
    }
}
