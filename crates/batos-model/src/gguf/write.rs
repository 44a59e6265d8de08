//! A small GGUF writer: builds files in code for tests and tools (synthetic models, broken
//! files), and lets the reader be tested on round trips.

use std::path::Path;

use half::{bf16, f16};

use super::metadata::{GgufMetadata, GgufValue};
use super::types::GgmlType;
use super::DEFAULT_ALIGNMENT;
use crate::error::{ModelError, Result};

/// One tensor to write: its name, row-major shape, type and raw (already encoded) bytes.
#[derive(Clone, Debug)]
pub struct WriterTensor {
    /// GGUF tensor name.
    pub name: String,
    /// Row-major shape (reversed into ggml dims on write).
    pub shape: Vec<usize>,
    /// Element type of `data`.
    pub ggml_type: GgmlType,
    /// Encoded data.
    pub data: Vec<u8>,
}

impl WriterTensor {
    /// An F32 tensor.
    pub fn f32(name: impl Into<String>, shape: &[usize], values: &[f32]) -> Self {
        Self::raw(
            name,
            shape,
            GgmlType::F32,
            values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        )
    }

    /// An F16 tensor (values rounded to f16).
    pub fn f16(name: impl Into<String>, shape: &[usize], values: &[f32]) -> Self {
        let data = values
            .iter()
            .flat_map(|&v| f16::from_f32(v).to_le_bytes())
            .collect();
        Self::raw(name, shape, GgmlType::F16, data)
    }

    /// A BF16 tensor (values rounded to bf16).
    pub fn bf16(name: impl Into<String>, shape: &[usize], values: &[f32]) -> Self {
        let data = values
            .iter()
            .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
            .collect();
        Self::raw(name, shape, GgmlType::BF16, data)
    }

    /// A tensor from already-encoded bytes (e.g. hand-built quantized blocks).
    pub fn raw(
        name: impl Into<String>,
        shape: &[usize],
        ggml_type: GgmlType,
        data: Vec<u8>,
    ) -> Self {
        WriterTensor {
            name: name.into(),
            shape: shape.to_vec(),
            ggml_type,
            data,
        }
    }
}

/// Builds a GGUF v3 file.
///
/// ```
/// use batos_model::gguf::{GgufFile, GgufValue, GgufWriter, WriterTensor};
/// let dir = tempfile::tempdir()?;
/// let path = dir.path().join("tiny.gguf");
/// let mut w = GgufWriter::new();
/// w.metadata("general.architecture", GgufValue::String("llama".into()));
/// w.tensor(WriterTensor::f32("output_norm.weight", &[4], &[1.0, 2.0, 3.0, 4.0]));
/// w.write_to(&path)?;
/// let g = GgufFile::open(&path)?;
/// let t = g.tensor("output_norm.weight").unwrap();
/// assert_eq!(g.tensor_f32(t)?, vec![1.0, 2.0, 3.0, 4.0]);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct GgufWriter {
    metadata: GgufMetadata,
    tensors: Vec<WriterTensor>,
}

impl GgufWriter {
    /// An empty file.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a metadata entry.
    pub fn metadata(&mut self, key: impl Into<String>, value: GgufValue) -> &mut Self {
        self.metadata.insert(key, value);
        self
    }

    /// Adds a tensor.
    pub fn tensor(&mut self, t: WriterTensor) -> &mut Self {
        self.tensors.push(t);
        self
    }

    /// Encodes the file into memory.
    pub fn to_bytes(&self) -> Vec<u8> {
        let alignment = self
            .metadata
            .get("general.alignment")
            .and_then(GgufValue::as_u64)
            .filter(|a| *a > 0)
            .unwrap_or(DEFAULT_ALIGNMENT) as usize;
        let mut out = Vec::new();
        out.extend_from_slice(b"GGUF");
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.metadata.len() as u64).to_le_bytes());
        for (k, v) in self.metadata.iter() {
            put_str(&mut out, k);
            out.extend_from_slice(&v.value_type().id().to_le_bytes());
            put_value(&mut out, v);
        }
        let mut offset = 0usize;
        let mut offsets = Vec::with_capacity(self.tensors.len());
        for t in &self.tensors {
            put_str(&mut out, &t.name);
            out.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
            for &d in t.shape.iter().rev() {
                out.extend_from_slice(&(d as u64).to_le_bytes());
            }
            out.extend_from_slice(&t.ggml_type.id().to_le_bytes());
            out.extend_from_slice(&(offset as u64).to_le_bytes());
            offsets.push(offset);
            offset = (offset + t.data.len()).div_ceil(alignment) * alignment;
        }
        let data_start = out.len().div_ceil(alignment) * alignment;
        out.resize(data_start, 0);
        for (t, off) in self.tensors.iter().zip(offsets) {
            out.resize(data_start + off, 0);
            out.extend_from_slice(&t.data);
        }
        out
    }

    /// Writes the file to `path`.
    pub fn write_to(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        std::fs::write(path, self.to_bytes()).map_err(|e| ModelError::io("write", path, e))
    }
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(s) => put_str(out, s),
        GgufValue::Array(t, items) => {
            out.extend_from_slice(&t.id().to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}
