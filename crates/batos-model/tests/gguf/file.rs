//! GGUF file structure: round trips through the writer, and malformed or truncated files
//! that must fail with a typed error naming the problem (never a panic).

use std::path::Path;

use batos_model::gguf::{GgmlType, GgufFile, GgufValue, GgufValueType, GgufWriter, WriterTensor};
use batos_model::ModelError;

fn sample_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.metadata("general.architecture", GgufValue::String("llama".into()))
        .metadata("k.u8", GgufValue::U8(200))
        .metadata("k.i8", GgufValue::I8(-5))
        .metadata("k.u16", GgufValue::U16(60000))
        .metadata("k.i16", GgufValue::I16(-30000))
        .metadata("k.u32", GgufValue::U32(4_000_000_000))
        .metadata("k.i32", GgufValue::I32(-7))
        .metadata("k.f32", GgufValue::F32(0.5))
        .metadata("k.bool", GgufValue::Bool(true))
        .metadata("k.u64", GgufValue::U64(1 << 40))
        .metadata("k.i64", GgufValue::I64(-(1 << 40)))
        .metadata("k.f64", GgufValue::F64(1e-5))
        .metadata("k.str", GgufValue::String("héllo".into()))
        .metadata(
            "k.strs",
            GgufValue::Array(
                GgufValueType::String,
                vec![
                    GgufValue::String("a b".into()),
                    GgufValue::String("".into()),
                ],
            ),
        )
        .metadata(
            "k.ints",
            GgufValue::Array(
                GgufValueType::I32,
                vec![GgufValue::I32(1), GgufValue::I32(-2)],
            ),
        )
        .metadata("k.empty", GgufValue::Array(GgufValueType::F32, vec![]))
        .metadata(
            "k.nested",
            GgufValue::Array(
                GgufValueType::Array,
                vec![GgufValue::Array(
                    GgufValueType::U8,
                    vec![GgufValue::U8(1), GgufValue::U8(2)],
                )],
            ),
        );
    w.tensor(WriterTensor::f32(
        "a",
        &[2, 3],
        &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
    ))
    .tensor(WriterTensor::f16("b", &[3], &[0.5, -1.0, 2.0]))
    .tensor(WriterTensor::bf16("c", &[1, 1, 2], &[1.0, -3.0]));
    let mut q8 = half::f16::from_f32(0.5).to_le_bytes().to_vec();
    q8.extend((0..32).map(|i| i as u8));
    w.tensor(WriterTensor::raw("q", &[1, 32], GgmlType::Q8_0, q8));
    w
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn round_trip_metadata_and_tensors() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    sample_writer().write_to(&path).unwrap();
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.alignment(), 32);
    assert_eq!(g.data_offset() % 32, 0);
    let m = g.metadata();
    assert_eq!(m.len(), 17);
    assert_eq!(m.get_str("general.architecture").unwrap(), "llama");
    assert_eq!(m.get_u32("k.u8").unwrap(), 200);
    assert_eq!(m.get("k.i8"), Some(&GgufValue::I8(-5)));
    assert_eq!(m.get_usize("k.u16").unwrap(), 60000);
    assert_eq!(m.get("k.i16"), Some(&GgufValue::I16(-30000)));
    assert_eq!(m.get_u32("k.u32").unwrap(), 4_000_000_000);
    assert_eq!(m.get("k.i32"), Some(&GgufValue::I32(-7)));
    assert_eq!(m.get_f64("k.f32").unwrap(), 0.5);
    assert_eq!(m.opt_bool("k.bool").unwrap(), Some(true));
    assert_eq!(m.get_usize("k.u64").unwrap(), 1 << 40);
    assert_eq!(m.get("k.i64"), Some(&GgufValue::I64(-(1 << 40))));
    assert_eq!(m.get_f64("k.f64").unwrap(), 1e-5);
    assert_eq!(m.get_str("k.str").unwrap(), "héllo");
    assert_eq!(m.get_str_array("k.strs").unwrap(), vec!["a b", ""]);
    assert_eq!(m.get_int_array("k.ints").unwrap(), vec![1, -2]);
    assert_eq!(
        m.get("k.empty"),
        Some(&GgufValue::Array(GgufValueType::F32, vec![]))
    );
    assert!(
        matches!(m.get("k.nested"), Some(GgufValue::Array(GgufValueType::Array, v)) if v.len() == 1)
    );

    let a = g.tensor("a").unwrap();
    assert_eq!(a.dims, vec![3, 2]);
    assert_eq!(a.shape(), vec![2, 3]);
    assert_eq!(g.tensor_f32(a).unwrap(), vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
    assert_eq!(
        g.tensor_f32(g.tensor("b").unwrap()).unwrap(),
        vec![0.5, -1.0, 2.0]
    );
    assert_eq!(
        g.tensor_f32(g.tensor("c").unwrap()).unwrap(),
        vec![1.0, -3.0]
    );
    let q = g.tensor("q").unwrap();
    assert_eq!((q.ggml_type, q.byte_len), (GgmlType::Q8_0, 34));
    let qv = g.tensor_f32(q).unwrap();
    assert_eq!(qv[31], 15.5);
    for t in g.tensors() {
        assert_eq!(t.offset % 32, 0, "{} aligned", t.name);
    }
}

#[test]
fn version_2_files_are_read() {
    // v2 and v3 share the little-endian layout (v3 only added big-endian files).
    let dir = tempfile::tempdir().unwrap();
    let mut b = sample_writer().to_bytes();
    b[4..8].copy_from_slice(&2u32.to_le_bytes());
    let g = GgufFile::open(write(dir.path(), "v2.gguf", &b)).unwrap();
    assert_eq!(g.version(), 2);
    assert_eq!(
        g.tensor_f32(g.tensor("b").unwrap()).unwrap(),
        vec![0.5, -1.0, 2.0]
    );
}

#[test]
fn custom_alignment_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    let mut w = sample_writer();
    w.metadata("general.alignment", GgufValue::U32(64));
    w.write_to(&path).unwrap();
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.alignment(), 64);
    assert_eq!(g.data_offset() % 64, 0);
    assert_eq!(
        g.tensor_f32(g.tensor("c").unwrap()).unwrap(),
        vec![1.0, -3.0]
    );
}

#[test]
fn typed_getters_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.gguf");
    sample_writer().write_to(&path).unwrap();
    let g = GgufFile::open(&path).unwrap();
    let m = g.metadata();
    let err = m.get_u32("nope").unwrap_err();
    assert!(
        matches!(&err, ModelError::MetadataMissing { key } if key == "nope"),
        "{err}"
    );
    let err = m.get_u32("k.i32").unwrap_err();
    assert!(
        matches!(&err, ModelError::MetadataType { key, .. } if key == "k.i32"),
        "{err}"
    );
    let err = m.get_str("k.f32").unwrap_err();
    assert!(
        err.to_string().contains("k.f32") && err.to_string().contains("string"),
        "{err}"
    );
    assert!(m.get_str_array("k.ints").is_err());
}

#[test]
fn every_truncation_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let full = sample_writer().to_bytes();
    // Every prefix short of the last tensor's end must be rejected (the last tensor's data
    // ends the file, so any cut loses part of it or a structure before it).
    for len in 0..full.len() {
        let p = write(dir.path(), "cut.gguf", &full[..len]);
        match GgufFile::open(&p) {
            Err(ModelError::GgufTruncated { .. })
            | Err(ModelError::GgufMagic { .. })
            | Err(ModelError::GgufTensorOutOfBounds { .. }) => {}
            Err(other) => panic!("cut at {len}: unexpected error kind: {other}"),
            Ok(_) => panic!("cut at {len} of {} was accepted", full.len()),
        }
    }
    let p = write(dir.path(), "cut.gguf", &full[..full.len() - 1]);
    let err = GgufFile::open(&p).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("'q'") && msg.contains("cut.gguf"), "{msg}");
}

/// Byte offset of the first occurrence of `needle`.
fn find(hay: &[u8], needle: &[u8]) -> usize {
    hay.windows(needle.len()).position(|w| w == needle).unwrap()
}

#[test]
fn malformed_headers_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = sample_writer().to_bytes();

    let mut b = good.clone();
    b[..4].copy_from_slice(b"GGML");
    let err = GgufFile::open(write(dir.path(), "magic.gguf", &b)).unwrap_err();
    assert!(matches!(err, ModelError::GgufMagic { .. }), "{err}");

    for v in [1u32, 4, 0x0300_0000] {
        let mut b = good.clone();
        b[4..8].copy_from_slice(&v.to_le_bytes());
        let err = GgufFile::open(write(dir.path(), "ver.gguf", &b)).unwrap_err();
        assert!(
            matches!(err, ModelError::GgufVersion { version, .. } if version == v),
            "{err}"
        );
    }

    // A tensor count far beyond what the file could hold.
    let mut b = good.clone();
    b[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
    let err = GgufFile::open(write(dir.path(), "count.gguf", &b)).unwrap_err();
    assert!(matches!(err, ModelError::GgufTruncated { .. }), "{err}");

    // The bool value byte (key "k.bool", type 7) set to 2.
    let mut b = good.clone();
    let at = find(&b, b"k.bool") + 6 + 4;
    assert_eq!(b[at], 1);
    b[at] = 2;
    let err = GgufFile::open(write(dir.path(), "bool.gguf", &b)).unwrap_err();
    assert!(
        matches!(&err, ModelError::GgufMalformed { offset, .. } if *offset == at as u64),
        "{err}"
    );
    assert!(err.to_string().contains("k.bool"), "{err}");

    // An unknown value type for "k.u8".
    let mut b = good.clone();
    let at = find(&b, b"k.u8") + 4;
    b[at..at + 4].copy_from_slice(&99u32.to_le_bytes());
    let err = GgufFile::open(write(dir.path(), "vtype.gguf", &b)).unwrap_err();
    assert!(err.to_string().contains("unknown value type 99"), "{err}");

    // An array count larger than the rest of the file ("k.ints": type 9, elem type, count).
    let mut b = good.clone();
    let at = find(&b, b"k.ints") + 6 + 4 + 4;
    b[at..at + 8].copy_from_slice(&(1u64 << 60).to_le_bytes());
    let err = GgufFile::open(write(dir.path(), "arr.gguf", &b)).unwrap_err();
    assert!(matches!(err, ModelError::GgufTruncated { .. }), "{err}");
    assert!(err.to_string().contains("k.ints"), "{err}");

    // Invalid UTF-8 in a string value.
    let mut b = good.clone();
    let at = find(&b, "héllo".as_bytes());
    b[at + 1] = 0xFF;
    let err = GgufFile::open(write(dir.path(), "utf8.gguf", &b)).unwrap_err();
    assert!(err.to_string().contains("UTF-8"), "{err}");
}

#[test]
fn malformed_tensor_infos_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    let good = sample_writer().to_bytes();
    // Tensor info of "a": name (len 1 + "a"), n_dims u32, dims 2 x u64, type u32, offset u64.
    let name_at = find(&good, &[1, 0, 0, 0, 0, 0, 0, 0, b'a', 2, 0, 0, 0]);
    let ndims_at = name_at + 9;
    let type_at = ndims_at + 4 + 16;
    let off_at = type_at + 4;

    let mut b = good.clone();
    b[type_at..type_at + 4].copy_from_slice(&77u32.to_le_bytes());
    let err = GgufFile::open(write(dir.path(), "type.gguf", &b)).unwrap_err();
    assert!(
        err.to_string()
            .contains("tensor 'a' has unknown ggml type id 77"),
        "{err}"
    );

    let mut b = good.clone();
    b[ndims_at..ndims_at + 4].copy_from_slice(&9u32.to_le_bytes());
    let err = GgufFile::open(write(dir.path(), "dims.gguf", &b)).unwrap_err();
    assert!(err.to_string().contains("9 dimensions"), "{err}");

    let mut b = good.clone();
    b[off_at..off_at + 8].copy_from_slice(&8u64.to_le_bytes());
    let err = GgufFile::open(write(dir.path(), "align.gguf", &b)).unwrap_err();
    assert!(
        err.to_string().contains("not a multiple of the alignment"),
        "{err}"
    );

    let mut b = good.clone();
    b[off_at..off_at + 8].copy_from_slice(&(1u64 << 40).to_le_bytes());
    let err = GgufFile::open(write(dir.path(), "oob.gguf", &b)).unwrap_err();
    assert!(
        matches!(&err, ModelError::GgufTensorOutOfBounds { tensor, .. } if tensor == "a"),
        "{err}"
    );

    // Q8_0 rows must be whole blocks: make "q" 1 x 31.
    let q_at = find(&good, &[1, 0, 0, 0, 0, 0, 0, 0, b'q', 2, 0, 0, 0]);
    let mut b = good.clone();
    b[q_at + 13..q_at + 21].copy_from_slice(&31u64.to_le_bytes());
    let err = GgufFile::open(write(dir.path(), "block.gguf", &b)).unwrap_err();
    assert!(err.to_string().contains("block size 32"), "{err}");
}

#[test]
fn non_gguf_and_missing_files() {
    let dir = tempfile::tempdir().unwrap();
    let err = GgufFile::open(dir.path().join("absent.gguf")).unwrap_err();
    assert!(matches!(err, ModelError::Io { op: "open", .. }), "{err}");
    let err = GgufFile::open(write(dir.path(), "text.gguf", b"{\"not\": \"gguf\"}")).unwrap_err();
    assert!(matches!(err, ModelError::GgufMagic { .. }), "{err}");
    let err = GgufFile::open(write(dir.path(), "empty.gguf", b"")).unwrap_err();
    assert!(matches!(err, ModelError::GgufMagic { .. }), "{err}");
}
