//! Encoding of object state (bincode 2 over serde) and type fingerprints.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::{Result, StoreError};
use crate::ids::{collecting, Oid, Refs};

fn config() -> bincode::config::Configuration {
    bincode::config::standard()
}

/// An encoded object revision, ready to go into a commit record.
#[derive(Debug, Clone)]
pub(crate) struct Encoded {
    pub type_fp: u64,
    pub refs: Refs,
    pub data: Vec<u8>,
}

/// 64-bit FNV-1a of the Rust type name. It catches "decoded as the wrong type"; it is not
/// a schema (renaming or moving a type changes it, like moving a class under ZODB).
pub(crate) fn type_fingerprint<T: ?Sized>() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in std::any::type_name::<T>().bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

pub(crate) fn encode<T: Serialize>(value: &T) -> Result<Encoded> {
    let (res, refs) = collecting(|| bincode::serde::encode_to_vec(value, config()));
    let data = res.map_err(|e| StoreError::Encode {
        type_name: std::any::type_name::<T>(),
        detail: e.to_string(),
    })?;
    Ok(Encoded {
        type_fp: type_fingerprint::<T>(),
        refs,
        data,
    })
}

pub(crate) fn decode<T: DeserializeOwned>(oid: Oid, type_fp: u64, data: &[u8]) -> Result<T> {
    let expected = std::any::type_name::<T>();
    if type_fp != type_fingerprint::<T>() {
        return Err(StoreError::WrongType {
            oid,
            expected,
            stored: type_fp,
        });
    }
    let (v, used) = bincode::serde::decode_from_slice::<T, _>(data, config()).map_err(|e| {
        StoreError::Decode {
            oid,
            expected,
            detail: e.to_string(),
        }
    })?;
    if used != data.len() {
        return Err(StoreError::Decode {
            oid,
            expected,
            detail: format!("{} trailing bytes after the value", data.len() - used),
        });
    }
    Ok(v)
}
