//! Dequantization of ggml block formats, on hand-built blocks.
//!
//! Two kinds of checks: readable blocks whose values follow from the format by hand, and
//! pseudo-random blocks whose expected values were produced by llama.cpp's own
//! `dequantize_row_*` (libggml-base 0.25.3, via llama-cpp-python 0.3.36) from exactly the
//! bytes `xorshift_bytes` generates here.

use batos_model::gguf::{dequantize, GgmlType};
use batos_model::ModelError;
use half::{bf16, f16};

fn dq(ty: GgmlType, data: &[u8], n: usize) -> Vec<f32> {
    let mut out = vec![f32::NAN; n];
    dequantize(ty, data, &mut out).unwrap();
    out
}

fn h(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

#[test]
fn plain_float_types() {
    let vals = [0.0f32, 1.5, -2.25, 65504.0, 1e-3];
    let f32_bytes: Vec<u8> = vals.iter().flat_map(|v| v.to_le_bytes()).collect();
    assert_eq!(dq(GgmlType::F32, &f32_bytes, 5), vals);
    let f16_bytes: Vec<u8> = vals.iter().flat_map(|&v| h(v)).collect();
    let want: Vec<f32> = vals.iter().map(|&v| f16::from_f32(v).to_f32()).collect();
    assert_eq!(dq(GgmlType::F16, &f16_bytes, 5), want);
    let bf_bytes: Vec<u8> = vals
        .iter()
        .flat_map(|&v| bf16::from_f32(v).to_le_bytes())
        .collect();
    let want: Vec<f32> = vals.iter().map(|&v| bf16::from_f32(v).to_f32()).collect();
    assert_eq!(dq(GgmlType::BF16, &bf_bytes, 5), want);
}

#[test]
fn q8_0_by_hand() {
    let mut b = h(0.5).to_vec();
    b.extend((0..32).map(|i| (i as i8 - 16) as u8));
    let got = dq(GgmlType::Q8_0, &b, 32);
    let want: Vec<f32> = (0..32).map(|i| 0.5 * (i as f32 - 16.0)).collect();
    assert_eq!(got, want);
}

#[test]
fn q4_0_and_q4_1_by_hand() {
    // Byte j holds element j (low nibble) and element j + 16 (high nibble).
    let qs: Vec<u8> = (0..16u8).map(|j| j | ((15 - j) << 4)).collect();
    let mut b = h(2.0).to_vec();
    b.extend(&qs);
    let got = dq(GgmlType::Q4_0, &b, 32);
    for j in 0..16 {
        assert_eq!(got[j], 2.0 * (j as f32 - 8.0), "element {j}");
        assert_eq!(
            got[j + 16],
            2.0 * ((15 - j) as f32 - 8.0),
            "element {}",
            j + 16
        );
    }
    let mut b = h(0.25).to_vec();
    b.extend(h(-1.0));
    b.extend(&qs);
    let got = dq(GgmlType::Q4_1, &b, 32);
    for j in 0..16 {
        assert_eq!(got[j], 0.25 * j as f32 - 1.0);
        assert_eq!(got[j + 16], 0.25 * (15 - j) as f32 - 1.0);
    }
}

/// Packs eight 6-bit (scale, min) pairs the way Q4_K stores them.
fn pack_k4_scales(sc: [u8; 8], mn: [u8; 8]) -> [u8; 12] {
    let mut s = [0u8; 12];
    for j in 0..4 {
        s[j] = sc[j] | ((sc[j + 4] >> 4) << 6);
        s[j + 4] = mn[j] | ((mn[j + 4] >> 4) << 6);
        s[j + 8] = (sc[j + 4] & 0x0F) | ((mn[j + 4] & 0x0F) << 4);
    }
    s
}

#[test]
fn q4_k_by_hand() {
    let sc = [1, 2, 3, 4, 17, 33, 50, 63];
    let mn = [0, 5, 10, 15, 20, 40, 48, 62];
    let (d, dmin) = (0.5f32, 0.25f32);
    let mut b = Vec::new();
    b.extend(h(d));
    b.extend(h(dmin));
    b.extend(pack_k4_scales(sc, mn));
    // 4 chunks of 32 bytes; chunk c holds sub-block 2c in low nibbles, 2c+1 in high ones.
    let q = |e: usize| ((e * 7 + 3) % 16) as u8;
    for c in 0..4 {
        for l in 0..32 {
            b.push(q(64 * c + l) | (q(64 * c + 32 + l) << 4));
        }
    }
    assert_eq!(b.len(), 144);
    let got = dq(GgmlType::Q4K, &b, 256);
    for (e, &g) in got.iter().enumerate() {
        let sb = e / 32;
        let want = d * sc[sb] as f32 * q(e) as f32 - dmin * mn[sb] as f32;
        assert_eq!(g, want, "element {e} (sub-block {sb})");
    }
}

#[test]
fn q6_k_by_hand() {
    // All 6-bit values equal 5 (low 4 bits 5, high 2 bits 0) → q = 5 - 32 = -27;
    // sub-block scales 1..=16 (signed), d = 0.5.
    let mut b = vec![0x55u8; 128];
    b.extend([0u8; 64]);
    b.extend((1..=16i8).map(|s| if s % 2 == 0 { (-s) as u8 } else { s as u8 }));
    b.extend(h(0.5));
    assert_eq!(b.len(), 210);
    let got = dq(GgmlType::Q6K, &b, 256);
    for (e, &g) in got.iter().enumerate() {
        let s = (e / 16 + 1) as f32;
        let s = if (e / 16 + 1) % 2 == 0 { -s } else { s };
        assert_eq!(g, 0.5 * s * -27.0, "element {e}");
    }
}

/// The same generator as the script that produced the llama.cpp values.
fn xorshift_bytes(n: usize, mut s: u32) -> Vec<u8> {
    (0..n)
        .map(|_| {
            s ^= s << 13;
            s ^= s >> 17;
            s ^= s << 5;
            (s & 0xFF) as u8
        })
        .collect()
}

struct Known {
    ty: GgmlType,
    /// (offset in block, f16 value) written over the random bytes in every block.
    fixed: &'static [(usize, f32)],
    sum: f64,
    weighted_sum: f64,
    samples: &'static [(usize, f32)],
}

const KNOWN: &[Known] = &[
    Known {
        ty: GgmlType::Q8_0,
        fixed: &[(0, 0.25)],
        sum: 44.75,
        weighted_sum: 3283.5,
        samples: &[
            (0, 14.5),
            (1, -18.75),
            (5, -16.25),
            (16, 31.25),
            (17, 15.75),
            (31, 16.25),
            (32, 31.5),
            (40, 29.5),
            (63, -5.0),
        ],
    },
    Known {
        ty: GgmlType::Q4_0,
        fixed: &[(0, 0.5)],
        sum: 24.0,
        weighted_sum: 704.0,
        samples: &[
            (0, 1.0),
            (1, -1.5),
            (5, 3.5),
            (16, -2.5),
            (17, 1.5),
            (31, 2.5),
            (32, 3.5),
            (40, -3.5),
            (63, -0.5),
        ],
    },
    Known {
        ty: GgmlType::Q4_1,
        fixed: &[(0, 0.5), (2, -1.5)],
        sum: 192.5,
        weighted_sum: 6147.5,
        samples: &[
            (0, 6.0),
            (1, 2.0),
            (5, 2.5),
            (16, -1.0),
            (17, 0.0),
            (31, 0.0),
            (32, 4.5),
            (40, 4.0),
            (63, 5.0),
        ],
    },
    Known {
        ty: GgmlType::Q4K,
        fixed: &[(0, 0.5), (2, 0.25)],
        sum: 67319.5,
        weighted_sum: 16205362.0,
        samples: &[
            (0, 140.75),
            (1, 202.75),
            (5, 202.75),
            (16, 156.25),
            (17, 1.25),
            (31, 78.75),
            (32, 206.0),
            (33, 343.5),
            (63, 261.0),
            (64, 76.5),
            (100, 207.5),
            (127, -13.0),
            (128, 4.25),
            (150, 16.25),
            (200, 153.25),
            (255, 155.25),
            (256, 236.75),
            (300, 321.25),
            (511, 172.5),
        ],
    },
    Known {
        ty: GgmlType::Q6K,
        fixed: &[(208, 0.125)],
        sum: 1128.0,
        weighted_sum: 31198.875,
        samples: &[
            (0, 1.75),
            (1, 4.5),
            (5, 6.25),
            (16, -148.5),
            (17, -13.5),
            (31, 67.5),
            (32, 52.5),
            (33, -10.5),
            (63, 204.0),
            (64, -3.125),
            (100, 20.25),
            (127, 36.0),
            (128, 136.5),
            (150, 4.5),
            (200, -4.5),
            (255, -177.0),
            (256, 61.5),
            (300, -54.75),
            (511, 50.625),
        ],
    },
];

#[test]
fn pseudo_random_blocks_match_llama_cpp() {
    for k in KNOWN {
        let (bb, be) = (k.ty.block_bytes(), k.ty.block_elems());
        let blocks = 2;
        let mut data = xorshift_bytes(bb * blocks, 0x9E37_79B9);
        for b in 0..blocks {
            for &(off, v) in k.fixed {
                data[b * bb + off..b * bb + off + 2].copy_from_slice(&h(v));
            }
        }
        let got = dq(k.ty, &data, be * blocks);
        for &(i, want) in k.samples {
            assert_eq!(got[i], want, "{} element {i}", k.ty);
        }
        let sum: f64 = got.iter().map(|&x| x as f64).sum();
        let wsum: f64 = got
            .iter()
            .enumerate()
            .map(|(i, &x)| (i + 1) as f64 * x as f64)
            .sum();
        assert_eq!(sum, k.sum, "{} sum", k.ty);
        assert_eq!(wsum, k.weighted_sum, "{} weighted sum", k.ty);
    }
}

#[test]
fn wrong_length_and_unsupported_types_are_errors() {
    let mut out = vec![0.0f32; 32];
    let err = dequantize(GgmlType::Q4_1, &[0u8; 19], &mut out).unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::TensorDataLength {
                expected: 20,
                got: 19,
                ..
            }
        ),
        "{err}"
    );
    let mut out = vec![0.0f32; 31];
    let err = dequantize(GgmlType::Q8_0, &[0u8; 34], &mut out).unwrap_err();
    assert!(matches!(err, ModelError::TensorDataLength { .. }), "{err}");
    let mut out = vec![0.0f32; 32];
    let err = dequantize(GgmlType::Q5_0, &[0u8; 22], &mut out).unwrap_err();
    assert!(
        matches!(err, ModelError::UnsupportedGgmlType { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("Q5_0"), "{err}");
}
