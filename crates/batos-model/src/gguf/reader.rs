//! Parsing a GGUF file: header, metadata, tensor infos, data section.

use std::path::{Path, PathBuf};

use memmap2::Mmap;

use super::metadata::{GgufMetadata, GgufValue, GgufValueType};
use super::types::GgmlType;
use super::DEFAULT_ALIGNMENT;
use crate::error::{ModelError, Result};

/// Nesting limit for arrays of arrays; real files use one level.
const MAX_ARRAY_DEPTH: usize = 4;
/// ggml tensors have at most four dimensions.
const MAX_DIMS: u32 = 4;

/// One tensor's entry in the file's tensor table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GgufTensorInfo {
    /// The tensor's GGUF name (e.g. `blk.0.attn_q.weight`).
    pub name: String,
    /// Dimensions in ggml order: `dims[0]` varies fastest (the row length).
    pub dims: Vec<u64>,
    /// Element type.
    pub ggml_type: GgmlType,
    /// Offset of the data relative to the start of the data section.
    pub offset: u64,
    /// Size of the data in bytes.
    pub byte_len: u64,
}

impl GgufTensorInfo {
    /// The shape in row-major (PyTorch/HF) order: the reverse of [`Self::dims`].
    pub fn shape(&self) -> Vec<usize> {
        self.dims.iter().rev().map(|&d| d as usize).collect()
    }

    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }
}

/// A GGUF file opened with a read-only memory map. Parsing validates every structure and
/// every tensor's data range up front, so later access cannot read out of bounds.
///
/// ```no_run
/// use batos_model::gguf::GgufFile;
/// let gguf = GgufFile::open("SmolLM2-135M-Instruct.Q4_1.gguf")?;
/// println!("{} tensors, arch {}", gguf.tensors().len(), gguf.metadata().get_str("general.architecture")?);
/// # Ok::<(), batos_model::ModelError>(())
/// ```
#[derive(Debug)]
pub struct GgufFile {
    path: PathBuf,
    map: Mmap,
    version: u32,
    metadata: GgufMetadata,
    tensors: Vec<GgufTensorInfo>,
    data_offset: u64,
    alignment: u64,
}

impl GgufFile {
    /// Maps and parses `path`.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let map = crate::mmap::map_file(&path)?;
        let parsed = parse(&path, &map)?;
        tracing::debug!(
            path = %path.display(),
            version = parsed.version,
            tensors = parsed.tensors.len(),
            metadata = parsed.metadata.len(),
            "opened GGUF"
        );
        Ok(GgufFile {
            path,
            map,
            version: parsed.version,
            metadata: parsed.metadata,
            tensors: parsed.tensors,
            data_offset: parsed.data_offset,
            alignment: parsed.alignment,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Format version (2 or 3).
    pub fn version(&self) -> u32 {
        self.version
    }

    /// The metadata key/value pairs.
    pub fn metadata(&self) -> &GgufMetadata {
        &self.metadata
    }

    /// The tensor table in file order.
    pub fn tensors(&self) -> &[GgufTensorInfo] {
        &self.tensors
    }

    /// The tensor named `name`, if any.
    pub fn tensor(&self, name: &str) -> Option<&GgufTensorInfo> {
        self.tensors.iter().find(|t| t.name == name)
    }

    /// Absolute offset of the data section.
    pub fn data_offset(&self) -> u64 {
        self.data_offset
    }

    /// Data alignment (`general.alignment`, default 32).
    pub fn alignment(&self) -> u64 {
        self.alignment
    }

    /// The raw bytes of a tensor (bounds were checked at open).
    pub fn tensor_bytes(&self, info: &GgufTensorInfo) -> &[u8] {
        let start = (self.data_offset + info.offset) as usize;
        &self.map[start..start + info.byte_len as usize]
    }

    /// Dequantizes a tensor to f32 (row-major, shape [`GgufTensorInfo::shape`]).
    pub fn tensor_f32(&self, info: &GgufTensorInfo) -> Result<Vec<f32>> {
        let n = usize::try_from(info.n_elements()).map_err(|_| ModelError::GgufMalformed {
            path: self.path.clone(),
            offset: 0,
            reason: format!(
                "tensor '{}' has too many elements for this platform",
                info.name
            ),
        })?;
        let mut out = vec![0.0f32; n];
        super::dequantize(info.ggml_type, self.tensor_bytes(info), &mut out).map_err(
            |e| match e {
                ModelError::UnsupportedGgmlType { ggml_type, .. } => {
                    ModelError::UnsupportedGgmlType {
                        tensor: info.name.clone(),
                        ggml_type,
                    }
                }
                ModelError::TensorDataLength { expected, got, .. } => {
                    ModelError::TensorDataLength {
                        name: info.name.clone(),
                        expected,
                        got,
                    }
                }
                other => other,
            },
        )?;
        Ok(out)
    }
}

struct Parsed {
    version: u32,
    metadata: GgufMetadata,
    tensors: Vec<GgufTensorInfo>,
    data_offset: u64,
    alignment: u64,
}

/// A bounds-checked little-endian reader that reports positions in errors.
struct Cursor<'a> {
    path: &'a Path,
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<&'a [u8]> {
        let remaining = (self.buf.len() - self.pos) as u64;
        if n > remaining {
            return Err(ModelError::GgufTruncated {
                path: self.path.to_path_buf(),
                what: what(),
                offset: self.pos as u64,
                needed: n,
                file_len: self.buf.len() as u64,
            });
        }
        let s = &self.buf[self.pos..self.pos + n as usize];
        self.pos += n as usize;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N]> {
        let s = self.take(N as u64, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32> {
        self.array::<4>(what).map(u32::from_le_bytes)
    }

    fn u64(&mut self, what: &dyn Fn() -> String) -> Result<u64> {
        self.array::<8>(what).map(u64::from_le_bytes)
    }

    fn malformed(&self, offset: usize, reason: String) -> ModelError {
        ModelError::GgufMalformed {
            path: self.path.to_path_buf(),
            offset: offset as u64,
            reason,
        }
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String> {
        let at = self.pos;
        let len = self.u64(what)?;
        let bytes = self.take(len, what)?;
        String::from_utf8(bytes.to_vec())
            .map_err(|e| self.malformed(at, format!("{} is not valid UTF-8: {e}", what())))
    }

    fn value(&mut self, ty: GgufValueType, key: &str, depth: usize) -> Result<GgufValue> {
        let what = || format!("value of metadata key '{key}'");
        Ok(match ty {
            GgufValueType::U8 => GgufValue::U8(self.array::<1>(&what)?[0]),
            GgufValueType::I8 => GgufValue::I8(i8::from_le_bytes(self.array::<1>(&what)?)),
            GgufValueType::U16 => GgufValue::U16(u16::from_le_bytes(self.array::<2>(&what)?)),
            GgufValueType::I16 => GgufValue::I16(i16::from_le_bytes(self.array::<2>(&what)?)),
            GgufValueType::U32 => GgufValue::U32(self.u32(&what)?),
            GgufValueType::I32 => GgufValue::I32(i32::from_le_bytes(self.array::<4>(&what)?)),
            GgufValueType::F32 => GgufValue::F32(f32::from_le_bytes(self.array::<4>(&what)?)),
            GgufValueType::U64 => GgufValue::U64(self.u64(&what)?),
            GgufValueType::I64 => GgufValue::I64(i64::from_le_bytes(self.array::<8>(&what)?)),
            GgufValueType::F64 => GgufValue::F64(f64::from_le_bytes(self.array::<8>(&what)?)),
            GgufValueType::Bool => {
                let at = self.pos;
                match self.array::<1>(&what)?[0] {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    b => {
                        return Err(self.malformed(
                            at,
                            format!("metadata key '{key}': bool byte {b} is neither 0 nor 1"),
                        ))
                    }
                }
            }
            GgufValueType::String => GgufValue::String(self.string(&what)?),
            GgufValueType::Array => {
                let at = self.pos;
                if depth >= MAX_ARRAY_DEPTH {
                    return Err(self.malformed(
                        at,
                        format!(
                            "metadata key '{key}': arrays nested deeper than {MAX_ARRAY_DEPTH}"
                        ),
                    ));
                }
                let elem_id = self.u32(&what)?;
                let elem = GgufValueType::from_id(elem_id).ok_or_else(|| {
                    self.malformed(
                        at,
                        format!("metadata key '{key}': unknown array element type {elem_id}"),
                    )
                })?;
                let count_at = self.pos;
                let count = self.u64(&what)?;
                // Every element takes at least one byte: a count beyond the remaining bytes is
                // corrupt, and checking it first keeps a bad count from allocating gigabytes.
                let min_elem = elem.scalar_size().unwrap_or(8) as u64;
                let remaining = (self.buf.len() - self.pos) as u64;
                if count.saturating_mul(min_elem) > remaining {
                    return Err(ModelError::GgufTruncated {
                        path: self.path.to_path_buf(),
                        what: format!("{count} array elements of metadata key '{key}'"),
                        offset: count_at as u64,
                        needed: count.saturating_mul(min_elem),
                        file_len: self.buf.len() as u64,
                    });
                }
                let mut items = Vec::with_capacity(count as usize);
                for _ in 0..count {
                    items.push(self.value(elem, key, depth + 1)?);
                }
                GgufValue::Array(elem, items)
            }
        })
    }
}

fn align_up(x: u64, a: u64) -> u64 {
    x.div_ceil(a) * a
}

fn parse(path: &Path, buf: &[u8]) -> Result<Parsed> {
    let mut c = Cursor { path, buf, pos: 0 };
    let magic = c
        .take(4, &|| "magic".into())
        .map_err(|_| ModelError::GgufMagic {
            path: path.to_path_buf(),
            found: buf[..buf.len().min(4)].to_vec(),
        })?;
    if magic != b"GGUF" {
        return Err(ModelError::GgufMagic {
            path: path.to_path_buf(),
            found: magic.to_vec(),
        });
    }
    let version = c.u32(&|| "version".into())?;
    if version != 2 && version != 3 {
        return Err(ModelError::GgufVersion {
            path: path.to_path_buf(),
            version,
        });
    }
    let n_tensors = c.u64(&|| "tensor count".into())?;
    let n_kv = c.u64(&|| "metadata count".into())?;
    let mut metadata = GgufMetadata::new();
    for i in 0..n_kv {
        let key = c.string(&|| format!("key of metadata entry {i}"))?;
        let at = c.pos;
        let ty_id = c.u32(&|| format!("type of metadata key '{key}'"))?;
        let ty = GgufValueType::from_id(ty_id).ok_or_else(|| {
            c.malformed(
                at,
                format!("metadata key '{key}': unknown value type {ty_id}"),
            )
        })?;
        let value = c.value(ty, &key, 0)?;
        if metadata.insert(key.clone(), value).is_some() {
            return Err(c.malformed(at, format!("metadata key '{key}' appears twice")));
        }
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => {
                return Err(ModelError::MetadataType {
                    key: "general.alignment".into(),
                    expected: "a power of two",
                    found: v.to_string(),
                })
            }
        },
    };

    // Each tensor info takes at least 8 (name length) + 4 + 4 + 8 bytes.
    if n_tensors.saturating_mul(24) > (buf.len() - c.pos) as u64 {
        return Err(ModelError::GgufTruncated {
            path: path.to_path_buf(),
            what: format!("{n_tensors} tensor infos"),
            offset: c.pos as u64,
            needed: n_tensors.saturating_mul(24),
            file_len: buf.len() as u64,
        });
    }
    let mut tensors = Vec::with_capacity(n_tensors as usize);
    let mut infos_at = Vec::with_capacity(n_tensors as usize);
    for i in 0..n_tensors {
        let at = c.pos;
        let name = c.string(&|| format!("name of tensor {i}"))?;
        let what = || format!("info of tensor '{name}'");
        let n_dims = c.u32(&what)?;
        if n_dims == 0 || n_dims > MAX_DIMS {
            return Err(c.malformed(
                at,
                format!("tensor '{name}' has {n_dims} dimensions (1..={MAX_DIMS} allowed)"),
            ));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&what)?);
        }
        let ty_at = c.pos;
        let ty_id = c.u32(&what)?;
        let ggml_type = GgmlType::from_id(ty_id).ok_or_else(|| {
            c.malformed(
                ty_at,
                format!("tensor '{name}' has unknown ggml type id {ty_id}"),
            )
        })?;
        let offset = c.u64(&what)?;
        let n_elems = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| c.malformed(at, format!("tensor '{name}' dims {dims:?} overflow")))?;
        if dims[0] % ggml_type.block_elems() as u64 != 0 {
            return Err(c.malformed(
                at,
                format!(
                    "tensor '{name}' row length {} is not a multiple of the {ggml_type} block size {}",
                    dims[0],
                    ggml_type.block_elems()
                ),
            ));
        }
        let byte_len = ggml_type
            .bytes_for(n_elems)
            .ok_or_else(|| c.malformed(at, format!("tensor '{name}' byte size overflows")))?;
        if offset % alignment != 0 {
            return Err(c.malformed(
                at,
                format!("tensor '{name}' data offset {offset} is not a multiple of the alignment {alignment}"),
            ));
        }
        infos_at.push(at);
        tensors.push(GgufTensorInfo {
            name,
            dims,
            ggml_type,
            offset,
            byte_len,
        });
    }
    let data_offset = align_up(c.pos as u64, alignment);
    let file_len = buf.len() as u64;
    let mut seen = std::collections::HashSet::with_capacity(tensors.len());
    for (t, &at) in tensors.iter().zip(&infos_at) {
        if !seen.insert(t.name.as_str()) {
            return Err(c.malformed(at, format!("tensor '{}' appears twice", t.name)));
        }
        let start = data_offset.checked_add(t.offset);
        let end = start.and_then(|s| s.checked_add(t.byte_len));
        match (start, end) {
            (Some(_), Some(end)) if end <= file_len => {}
            _ => {
                return Err(ModelError::GgufTensorOutOfBounds {
                    path: path.to_path_buf(),
                    tensor: t.name.clone(),
                    start: data_offset.saturating_add(t.offset),
                    end: data_offset
                        .saturating_add(t.offset)
                        .saturating_add(t.byte_len),
                    file_len,
                })
            }
        }
    }
    Ok(Parsed {
        version,
        metadata,
        tensors,
        data_offset,
        alignment,
    })
}
