//! GGUF metadata values and typed access to them.

use std::collections::BTreeMap;
use std::fmt;

use crate::error::{ModelError, Result};

/// The type tag of a metadata value (the `u32` stored before it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GgufValueType {
    /// `u8`
    U8,
    /// `i8`
    I8,
    /// `u16`
    U16,
    /// `i16`
    I16,
    /// `u32`
    U32,
    /// `i32`
    I32,
    /// `f32`
    F32,
    /// one byte, 0 or 1
    Bool,
    /// `u64` length + UTF-8 bytes
    String,
    /// element type + `u64` count + elements
    Array,
    /// `u64`
    U64,
    /// `i64`
    I64,
    /// `f64`
    F64,
}

impl GgufValueType {
    /// Maps the tag stored in the file.
    pub fn from_id(id: u32) -> Option<Self> {
        Some(match id {
            0 => Self::U8,
            1 => Self::I8,
            2 => Self::U16,
            3 => Self::I16,
            4 => Self::U32,
            5 => Self::I32,
            6 => Self::F32,
            7 => Self::Bool,
            8 => Self::String,
            9 => Self::Array,
            10 => Self::U64,
            11 => Self::I64,
            12 => Self::F64,
            _ => return None,
        })
    }

    /// The tag stored in the file.
    pub fn id(self) -> u32 {
        match self {
            Self::U8 => 0,
            Self::I8 => 1,
            Self::U16 => 2,
            Self::I16 => 3,
            Self::U32 => 4,
            Self::I32 => 5,
            Self::F32 => 6,
            Self::Bool => 7,
            Self::String => 8,
            Self::Array => 9,
            Self::U64 => 10,
            Self::I64 => 11,
            Self::F64 => 12,
        }
    }

    /// Encoded size of a scalar of this type; `None` for strings and arrays.
    pub(crate) fn scalar_size(self) -> Option<usize> {
        match self {
            Self::U8 | Self::I8 | Self::Bool => Some(1),
            Self::U16 | Self::I16 => Some(2),
            Self::U32 | Self::I32 | Self::F32 => Some(4),
            Self::U64 | Self::I64 | Self::F64 => Some(8),
            Self::String | Self::Array => None,
        }
    }
}

/// One metadata value.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum GgufValue {
    /// `u8`
    U8(u8),
    /// `i8`
    I8(i8),
    /// `u16`
    U16(u16),
    /// `i16`
    I16(i16),
    /// `u32`
    U32(u32),
    /// `i32`
    I32(i32),
    /// `f32`
    F32(f32),
    /// bool
    Bool(bool),
    /// UTF-8 string
    String(String),
    /// Homogeneous array (the element type is kept so an empty array round-trips).
    Array(GgufValueType, Vec<GgufValue>),
    /// `u64`
    U64(u64),
    /// `i64`
    I64(i64),
    /// `f64`
    F64(f64),
}

impl GgufValue {
    /// This value's type tag.
    pub fn value_type(&self) -> GgufValueType {
        match self {
            GgufValue::U8(_) => GgufValueType::U8,
            GgufValue::I8(_) => GgufValueType::I8,
            GgufValue::U16(_) => GgufValueType::U16,
            GgufValue::I16(_) => GgufValueType::I16,
            GgufValue::U32(_) => GgufValueType::U32,
            GgufValue::I32(_) => GgufValueType::I32,
            GgufValue::F32(_) => GgufValueType::F32,
            GgufValue::Bool(_) => GgufValueType::Bool,
            GgufValue::String(_) => GgufValueType::String,
            GgufValue::Array(..) => GgufValueType::Array,
            GgufValue::U64(_) => GgufValueType::U64,
            GgufValue::I64(_) => GgufValueType::I64,
            GgufValue::F64(_) => GgufValueType::F64,
        }
    }

    /// The value as an unsigned integer, if it is a non-negative integer of any width.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, if it is an integer that fits `i64`.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float (f32 or f64; integers are not converted).
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => None,
        }
    }

    /// The string, if this is one.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    fn describe(&self) -> String {
        match self {
            GgufValue::String(s) if s.chars().count() > 40 => {
                format!("string \"{}…\"", s.chars().take(40).collect::<String>())
            }
            other => other.to_string(),
        }
    }
}

impl fmt::Display for GgufValue {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            GgufValue::U8(v) => write!(f, "u8 {v}"),
            GgufValue::I8(v) => write!(f, "i8 {v}"),
            GgufValue::U16(v) => write!(f, "u16 {v}"),
            GgufValue::I16(v) => write!(f, "i16 {v}"),
            GgufValue::U32(v) => write!(f, "u32 {v}"),
            GgufValue::I32(v) => write!(f, "i32 {v}"),
            GgufValue::F32(v) => write!(f, "f32 {v}"),
            GgufValue::Bool(v) => write!(f, "bool {v}"),
            GgufValue::String(s) => write!(f, "string {s:?}"),
            GgufValue::Array(t, v) => write!(f, "array of {} {t:?}", v.len()),
            GgufValue::U64(v) => write!(f, "u64 {v}"),
            GgufValue::I64(v) => write!(f, "i64 {v}"),
            GgufValue::F64(v) => write!(f, "f64 {v}"),
        }
    }
}

/// The metadata key/value pairs of a GGUF file, with typed getters that turn a missing key
/// or a wrong type into a [`ModelError`] naming the key.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct GgufMetadata {
    entries: BTreeMap<String, GgufValue>,
}

impl GgufMetadata {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// Inserts or replaces a value.
    pub fn insert(&mut self, key: impl Into<String>, value: GgufValue) -> Option<GgufValue> {
        self.entries.insert(key.into(), value)
    }

    /// The raw value, if present.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.entries.get(key)
    }

    /// Whether `key` is present.
    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// All entries in key order.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &GgufValue)> {
        self.entries.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are no entries.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn required(&self, key: &str) -> Result<&GgufValue> {
        self.get(key).ok_or_else(|| ModelError::MetadataMissing {
            key: key.to_owned(),
        })
    }

    fn type_error(key: &str, expected: &'static str, found: &GgufValue) -> ModelError {
        ModelError::MetadataType {
            key: key.to_owned(),
            expected,
            found: found.describe(),
        }
    }

    /// A non-negative integer of any width that fits `usize`.
    pub fn get_usize(&self, key: &str) -> Result<usize> {
        let v = self.required(key)?;
        v.as_u64()
            .and_then(|x| usize::try_from(x).ok())
            .ok_or_else(|| Self::type_error(key, "a non-negative integer", v))
    }

    /// [`Self::get_usize`] for an optional key.
    pub fn opt_usize(&self, key: &str) -> Result<Option<usize>> {
        if self.contains(key) {
            self.get_usize(key).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A non-negative integer that fits `u32`.
    pub fn get_u32(&self, key: &str) -> Result<u32> {
        let v = self.required(key)?;
        v.as_u64()
            .and_then(|x| u32::try_from(x).ok())
            .ok_or_else(|| Self::type_error(key, "an integer in u32 range", v))
    }

    /// [`Self::get_u32`] for an optional key.
    pub fn opt_u32(&self, key: &str) -> Result<Option<u32>> {
        if self.contains(key) {
            self.get_u32(key).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A float (f32 or f64 in the file).
    pub fn get_f64(&self, key: &str) -> Result<f64> {
        let v = self.required(key)?;
        v.as_f64()
            .ok_or_else(|| Self::type_error(key, "a float", v))
    }

    /// [`Self::get_f64`] for an optional key.
    pub fn opt_f64(&self, key: &str) -> Result<Option<f64>> {
        if self.contains(key) {
            self.get_f64(key).map(Some)
        } else {
            Ok(None)
        }
    }

    /// A boolean.
    pub fn opt_bool(&self, key: &str) -> Result<Option<bool>> {
        match self.get(key) {
            None => Ok(None),
            Some(GgufValue::Bool(b)) => Ok(Some(*b)),
            Some(v) => Err(Self::type_error(key, "a bool", v)),
        }
    }

    /// A string.
    pub fn get_str(&self, key: &str) -> Result<&str> {
        let v = self.required(key)?;
        v.as_str()
            .ok_or_else(|| Self::type_error(key, "a string", v))
    }

    /// [`Self::get_str`] for an optional key.
    pub fn opt_str(&self, key: &str) -> Result<Option<&str>> {
        if self.contains(key) {
            self.get_str(key).map(Some)
        } else {
            Ok(None)
        }
    }

    fn array(&self, key: &str) -> Result<(&GgufValueType, &[GgufValue])> {
        match self.required(key)? {
            GgufValue::Array(t, v) => Ok((t, v)),
            other => Err(Self::type_error(key, "an array", other)),
        }
    }

    /// An array of strings.
    pub fn get_str_array(&self, key: &str) -> Result<Vec<&str>> {
        let (_, items) = self.array(key)?;
        items
            .iter()
            .map(|v| {
                v.as_str()
                    .ok_or_else(|| Self::type_error(key, "an array of strings", v))
            })
            .collect()
    }

    /// An array of integers (any width) that fit `i64`.
    pub fn get_int_array(&self, key: &str) -> Result<Vec<i64>> {
        let (_, items) = self.array(key)?;
        items
            .iter()
            .map(|v| {
                v.as_i64()
                    .ok_or_else(|| Self::type_error(key, "an array of integers", v))
            })
            .collect()
    }
}
