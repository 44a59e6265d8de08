//! Scalar dequantization of ggml block formats to f32.
//!
//! Layouts follow ggml's `block_*` structs (little-endian, packed). Values are exact
//! conversions: every format here decodes to `scale * q (+ or - min)` with f16 scales, so the
//! f32 result is what llama.cpp's own dequantization gives bit for bit.

use half::{bf16, f16};

use super::types::GgmlType;
use crate::error::{ModelError, Result};

/// Decodes `data` (whole blocks of `ty`) into `out`, whose length is the element count.
///
/// Errors: [`ModelError::UnsupportedGgmlType`] for types without a decoder here,
/// [`ModelError::TensorDataLength`] when `data` is not exactly the size `out.len()` elements
/// need. (The tensor name in those errors is filled in by the caller that knows it.)
pub fn dequantize(ty: GgmlType, data: &[u8], out: &mut [f32]) -> Result<()> {
    let unsupported = || ModelError::UnsupportedGgmlType {
        tensor: String::new(),
        ggml_type: ty.to_string(),
    };
    if !ty.can_dequantize() {
        return Err(unsupported());
    }
    let expected = ty
        .bytes_for(out.len() as u64)
        .ok_or_else(|| ModelError::TensorDataLength {
            name: String::new(),
            expected: 0,
            got: data.len(),
        })? as usize;
    if data.len() != expected {
        return Err(ModelError::TensorDataLength {
            name: String::new(),
            expected,
            got: data.len(),
        });
    }
    let bb = ty.block_bytes();
    let be = ty.block_elems();
    let blocks = data.chunks_exact(bb).zip(out.chunks_exact_mut(be));
    match ty {
        GgmlType::F32 => {
            blocks.for_each(|(b, o)| o[0] = f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
        }
        GgmlType::F16 => blocks.for_each(|(b, o)| o[0] = f16::from_le_bytes([b[0], b[1]]).to_f32()),
        GgmlType::BF16 => {
            blocks.for_each(|(b, o)| o[0] = bf16::from_le_bytes([b[0], b[1]]).to_f32())
        }
        GgmlType::Q8_0 => blocks.for_each(|(b, o)| q8_0(b, o)),
        GgmlType::Q4_0 => blocks.for_each(|(b, o)| q4_0(b, o)),
        GgmlType::Q4_1 => blocks.for_each(|(b, o)| q4_1(b, o)),
        GgmlType::Q4K => blocks.for_each(|(b, o)| q4_k(b, o)),
        GgmlType::Q6K => blocks.for_each(|(b, o)| q6_k(b, o)),
        _ => return Err(unsupported()),
    }
    Ok(())
}

fn f16_at(b: &[u8], i: usize) -> f32 {
    f16::from_le_bytes([b[i], b[i + 1]]).to_f32()
}

/// `{ f16 d; i8 qs[32]; }`: x = d * q.
fn q8_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    for (x, &q) in o.iter_mut().zip(&b[2..34]) {
        *x = d * f32::from(q as i8);
    }
}

/// `{ f16 d; u8 qs[16]; }`: element j in the low nibble of qs[j], element j+16 in the high
/// nibble; x = d * (q - 8).
fn q4_0(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let (lo, hi) = o.split_at_mut(16);
    for (j, &q) in b[2..18].iter().enumerate() {
        lo[j] = d * (f32::from(q & 0x0F) - 8.0);
        hi[j] = d * (f32::from(q >> 4) - 8.0);
    }
}

/// `{ f16 d; f16 m; u8 qs[16]; }`: nibbles as in Q4_0; x = d * q + m.
fn q4_1(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let m = f16_at(b, 2);
    let (lo, hi) = o.split_at_mut(16);
    for (j, &q) in b[4..20].iter().enumerate() {
        lo[j] = d * f32::from(q & 0x0F) + m;
        hi[j] = d * f32::from(q >> 4) + m;
    }
}

/// The 6-bit scale and minimum of sub-block `j` (0..8) from Q4_K's packed 12-byte table:
/// sub-blocks 0..4 keep them in the low 6 bits of bytes j and j+4; sub-blocks 4..8 put their
/// low 4 bits in byte j+4 and their top 2 bits in the spare high bits of bytes j-4 and j.
fn k4_scale_min(j: usize, s: &[u8]) -> (u8, u8) {
    if j < 4 {
        (s[j] & 63, s[j + 4] & 63)
    } else {
        let sc = (s[j + 4] & 0x0F) | ((s[j - 4] >> 6) << 4);
        let mn = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
        (sc, mn)
    }
}

/// `{ f16 d; f16 dmin; u8 scales[12]; u8 qs[128]; }`, 256 weights in 8 sub-blocks of 32.
/// Each 32 bytes of `qs` hold two sub-blocks (low nibbles, then high nibbles);
/// x = d * sc * q - dmin * m.
fn q4_k(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 0);
    let dmin = f16_at(b, 2);
    let scales = &b[4..16];
    let qs = &b[16..144];
    for (pair, (q, out)) in qs.chunks_exact(32).zip(o.chunks_exact_mut(64)).enumerate() {
        let (sc1, m1) = k4_scale_min(2 * pair, scales);
        let (sc2, m2) = k4_scale_min(2 * pair + 1, scales);
        let (d1, mn1) = (d * f32::from(sc1), dmin * f32::from(m1));
        let (d2, mn2) = (d * f32::from(sc2), dmin * f32::from(m2));
        let (lo, hi) = out.split_at_mut(32);
        for l in 0..32 {
            lo[l] = d1 * f32::from(q[l] & 0x0F) - mn1;
            hi[l] = d2 * f32::from(q[l] >> 4) - mn2;
        }
    }
}

/// `{ u8 ql[128]; u8 qh[64]; i8 scales[16]; f16 d; }`, 256 weights in two halves of 128.
/// In each half, weight l + 32k (k = 0..4) takes 4 low bits from `ql` (low nibble for k even,
/// high for k odd, bytes l or l+32) and 2 high bits from `qh[l]` (bits 2k..2k+2); the 6-bit
/// value is offset by 32 and scaled by `d * scales[l/16 + 2k]` (16-weight sub-blocks).
fn q6_k(b: &[u8], o: &mut [f32]) {
    let d = f16_at(b, 208);
    for half in 0..2 {
        let ql = &b[64 * half..64 * half + 64];
        let qh = &b[128 + 32 * half..128 + 32 * half + 32];
        let sc = &b[192 + 8 * half..192 + 8 * half + 8];
        let out = &mut o[128 * half..128 * half + 128];
        for l in 0..32 {
            let is = l / 16;
            let q1 = i32::from((ql[l] & 0x0F) | ((qh[l] & 3) << 4)) - 32;
            let q2 = i32::from((ql[l + 32] & 0x0F) | (((qh[l] >> 2) & 3) << 4)) - 32;
            let q3 = i32::from((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
            let q4 = i32::from((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            let s = |k: usize| d * f32::from(sc[is + 2 * k] as i8);
            out[l] = s(0) * q1 as f32;
            out[l + 32] = s(1) * q2 as f32;
            out[l + 64] = s(2) * q3 as f32;
            out[l + 96] = s(3) * q4 as f32;
        }
    }
}
