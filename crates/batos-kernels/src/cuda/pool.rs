//! Device buffers and a simple caching memory pool.
//!
//! Freed buffers go back to a per-size-class free list instead of the driver,
//! so the steady state of a serving loop (same shapes every step) allocates
//! nothing. Buffers are stream-ordered on the device's compute stream: a buffer
//! dropped while kernels that use it are still queued may be handed out again
//! at once, which is safe because every later use is queued on that same stream.

use std::collections::HashMap;
use std::marker::PhantomData;
use std::sync::{Arc, Mutex};

use cudarc::driver::{CudaSlice, CudaStream, CudaView, CudaViewMut, DeviceRepr};

use super::error::{CudaError, CudaResult};

mod sealed {
    pub trait Sealed {}
}

/// Element types a [`DeviceBuffer`] may hold: plain data for which every bit
/// pattern is a valid value, so reinterpreting pooled bytes is sound.
pub trait CudaElem: DeviceRepr + Copy + Default + sealed::Sealed + 'static {}

macro_rules! elem {
    ($($t:ty),*) => {$(
        impl sealed::Sealed for $t {}
        impl CudaElem for $t {}
    )*};
}
elem!(f32, half::f16, half::bf16, u8, u32, i32, i64, u64);

/// Smallest size class; everything is rounded up to a power of two from here
/// until [`LARGE_CLASS`], then to a multiple of it.
const MIN_CLASS: usize = 512;
const LARGE_CLASS: usize = 32 << 20;

pub(crate) fn size_class(bytes: usize) -> usize {
    let b = bytes.max(MIN_CLASS);
    if b <= LARGE_CLASS {
        b.next_power_of_two()
    } else {
        b.div_ceil(LARGE_CLASS) * LARGE_CLASS
    }
}

/// Counters of a [`MemoryPool`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Bytes currently handed out (by size class).
    pub in_use_bytes: usize,
    /// Bytes held in free lists.
    pub cached_bytes: usize,
    /// Allocations served from a free list.
    pub hits: u64,
    /// Allocations that went to the driver.
    pub misses: u64,
}

struct PoolInner {
    free: HashMap<usize, Vec<CudaSlice<u8>>>,
    stats: PoolStats,
    max_cached_bytes: usize,
}

/// A caching allocator over one stream. Cheap to clone (shared state).
#[derive(Clone)]
pub struct MemoryPool {
    stream: Arc<CudaStream>,
    inner: Arc<Mutex<PoolInner>>,
}

impl std::fmt::Debug for MemoryPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryPool")
            .field("stats", &self.stats())
            .finish()
    }
}

impl MemoryPool {
    /// A pool allocating on `stream` that keeps at most `max_cached_bytes` in free lists.
    pub fn new(stream: Arc<CudaStream>, max_cached_bytes: usize) -> Self {
        MemoryPool {
            stream,
            inner: Arc::new(Mutex::new(PoolInner {
                free: HashMap::new(),
                stats: PoolStats::default(),
                max_cached_bytes,
            })),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, PoolInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Current counters.
    pub fn stats(&self) -> PoolStats {
        self.lock().stats
    }

    /// Returns every cached buffer to the driver.
    pub fn trim(&self) {
        let mut g = self.lock();
        g.free.clear();
        g.stats.cached_bytes = 0;
    }

    /// A buffer of `len` elements with unspecified contents.
    pub fn alloc<T: CudaElem>(&self, len: usize) -> CudaResult<DeviceBuffer<T>> {
        let bytes = len
            .checked_mul(std::mem::size_of::<T>())
            .ok_or_else(|| CudaError::invalid("alloc", format!("{len} elements overflow")))?;
        let class = size_class(bytes);
        let cached = {
            let mut g = self.lock();
            let hit = g.free.get_mut(&class).and_then(|v| v.pop());
            if hit.is_some() {
                g.stats.hits += 1;
                g.stats.cached_bytes -= class;
            } else {
                g.stats.misses += 1;
            }
            g.stats.in_use_bytes += class;
            hit
        };
        let raw = match cached {
            Some(raw) => raw,
            None => {
                // SAFETY: the bytes are uninitialised; `DeviceBuffer` is only read by
                // kernels or copies after the caller fills it (or `alloc_zeros` zeroes it),
                // and every `CudaElem` accepts any bit pattern.
                match unsafe { self.stream.alloc::<u8>(class) } {
                    Ok(raw) => raw,
                    Err(e) => {
                        self.lock().stats.in_use_bytes -= class;
                        return Err(CudaError::Driver {
                            op: "alloc",
                            source: e,
                        });
                    }
                }
            }
        };
        Ok(DeviceBuffer {
            raw: Some(raw),
            len,
            class,
            pool: self.clone(),
            _t: PhantomData,
        })
    }

    /// A zero-filled buffer of `len` elements.
    pub fn alloc_zeros<T: CudaElem>(&self, len: usize) -> CudaResult<DeviceBuffer<T>> {
        let mut b = self.alloc::<T>(len)?;
        b.fill_zero()?;
        Ok(b)
    }

    /// A buffer holding a copy of `host`.
    pub fn upload<T: CudaElem>(&self, host: &[T]) -> CudaResult<DeviceBuffer<T>> {
        let mut b = self.alloc::<T>(host.len())?;
        b.copy_from_host(host)?;
        Ok(b)
    }

    fn give_back(&self, raw: CudaSlice<u8>, class: usize) {
        let mut g = self.lock();
        g.stats.in_use_bytes -= class;
        if g.stats.cached_bytes + class <= g.max_cached_bytes {
            g.stats.cached_bytes += class;
            g.free.entry(class).or_default().push(raw);
        }
        // Otherwise `raw` drops here and goes back to the driver.
    }
}

/// A typed device buffer from a [`MemoryPool`]; returns to the pool on drop.
pub struct DeviceBuffer<T: CudaElem> {
    raw: Option<CudaSlice<u8>>,
    len: usize,
    class: usize,
    pool: MemoryPool,
    _t: PhantomData<T>,
}

impl<T: CudaElem> std::fmt::Debug for DeviceBuffer<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceBuffer")
            .field("elem", &std::any::type_name::<T>())
            .field("len", &self.len)
            .finish()
    }
}

impl<T: CudaElem> Drop for DeviceBuffer<T> {
    fn drop(&mut self) {
        if let Some(raw) = self.raw.take() {
            self.pool.give_back(raw, self.class);
        }
    }
}

impl<T: CudaElem> DeviceBuffer<T> {
    /// Number of elements.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no elements.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn raw(&self) -> &CudaSlice<u8> {
        // Invariant: `raw` is `Some` until `drop`.
        self.raw.as_ref().expect("DeviceBuffer used after drop")
    }

    fn raw_mut(&mut self) -> &mut CudaSlice<u8> {
        self.raw.as_mut().expect("DeviceBuffer used after drop")
    }

    /// A typed read-only view for kernel arguments and copies.
    pub fn view(&self) -> CudaView<'_, T> {
        let len = self.len;
        // SAFETY: the allocation has `class >= len * size_of::<T>()` bytes, driver
        // allocations are 256-byte aligned (enough for every `CudaElem`), and every
        // bit pattern is a valid `T` (sealed `CudaElem`).
        unsafe { self.raw().transmute::<T>(len) }.expect("size class covers the buffer")
    }

    /// A typed mutable view for kernel arguments and copies.
    pub fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        let len = self.len;
        // SAFETY: as in `view`; the `&mut self` borrow makes the view exclusive.
        unsafe { self.raw_mut().transmute_mut::<T>(len) }.expect("size class covers the buffer")
    }

    /// Overwrites the buffer with `host` (same length).
    pub fn copy_from_host(&mut self, host: &[T]) -> CudaResult<()> {
        CudaError::check_len("copy_from_host", "host", self.len, host.len())?;
        if host.is_empty() {
            return Ok(());
        }
        let stream = self.pool.stream.clone();
        let mut v = self.view_mut();
        stream
            .memcpy_htod(host, &mut v)
            .map_err(CudaError::driver("memcpy_htod"))
    }

    /// Overwrites elements `offset..offset + host.len()` with `host`, queued on
    /// `stream` (which need not be the pool's compute stream: the caller orders it,
    /// see [`UploadStream`](super::UploadStream)). From pageable host memory the call
    /// returns once `host` has been staged, so `host` may be dropped afterwards.
    pub fn copy_from_host_at(
        &mut self,
        stream: &Arc<CudaStream>,
        offset: usize,
        host: &[T],
    ) -> CudaResult<()> {
        const OP: &str = "copy_from_host_at";
        let end = offset.checked_add(host.len()).filter(|&e| e <= self.len);
        let Some(end) = end else {
            return Err(CudaError::invalid(
                OP,
                format!(
                    "elements {offset}..{offset}+{} outside a buffer of {}",
                    host.len(),
                    self.len
                ),
            ));
        };
        if host.is_empty() {
            return Ok(());
        }
        let mut v = self.view_mut();
        let mut dst = v.slice_mut(offset..end);
        stream
            .memcpy_htod(host, &mut dst)
            .map_err(CudaError::driver("memcpy_htod"))
    }

    /// Copies the buffer to a new host vector (waits for the stream).
    pub fn to_host(&self) -> CudaResult<Vec<T>> {
        let mut out = vec![T::default(); self.len];
        if out.is_empty() {
            return Ok(out);
        }
        let stream = self.pool.stream.clone();
        stream
            .memcpy_dtoh(&self.view(), out.as_mut_slice())
            .map_err(CudaError::driver("memcpy_dtoh"))?;
        stream
            .synchronize()
            .map_err(CudaError::driver("synchronize"))?;
        Ok(out)
    }

    /// Sets every byte to zero.
    pub fn fill_zero(&mut self) -> CudaResult<()> {
        let stream = self.pool.stream.clone();
        stream
            .memset_zeros(self.raw_mut())
            .map_err(CudaError::driver("memset"))
    }
}

#[cfg(test)]
mod tests {
    use super::size_class;

    #[test]
    fn size_classes_round_up_and_cover() {
        assert_eq!(size_class(0), 512);
        assert_eq!(size_class(513), 1024);
        assert_eq!(size_class(32 << 20), 32 << 20);
        assert_eq!(size_class((32 << 20) + 1), 64 << 20);
        assert_eq!(size_class((100 << 20) + 7), 128 << 20);
        for b in [1usize, 777, 1 << 20, (1 << 20) + 3, 300 << 20] {
            assert!(size_class(b) >= b);
        }
    }
}
