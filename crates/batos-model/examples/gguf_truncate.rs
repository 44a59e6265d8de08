//! Writes a copy of a Llama GGUF keeping only its first N decoder layers (embedding,
//! final norm, head, tokenizer and chat template unchanged, tensors copied byte for
//! byte). The GPU check uses it to carry real weights to a device machine whose
//! upload limit (64 MiB) is below the full SmolLM2 GGUF's 94 MB. With `--embedding-q4_1`
//! the token embedding (Q8_0 in SmolLM2's file, 29 MiB) is re-encoded as Q4_1 (15 MiB):
//! the result is then a different model, but one the CPU and the GPU both load the same.
//!
//!   cargo run -p batos-model --release --example gguf_truncate -- IN.gguf OUT.gguf LAYERS [--embedding-q4_1]

use anyhow::{bail, Context};
use batos_model::gguf::{GgmlType, GgufFile, GgufValue, GgufWriter, WriterTensor};
use half::f16;

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let (input, output, layers, requant) = match args.as_slice() {
        [_, i, o, l] => (i, o, l, false),
        [_, i, o, l, flag] if flag == "--embedding-q4_1" => (i, o, l, true),
        _ => bail!("usage: gguf_truncate IN.gguf OUT.gguf LAYERS [--embedding-q4_1]"),
    };
    let keep: u32 = layers.parse().context("LAYERS must be a number")?;
    let f = GgufFile::open(input)?;
    let arch = f
        .metadata()
        .get("general.architecture")
        .and_then(GgufValue::as_str)
        .context("no general.architecture")?
        .to_owned();
    let count_key = format!("{arch}.block_count");
    let total = f
        .metadata()
        .get(&count_key)
        .and_then(GgufValue::as_u64)
        .context("no block_count")?;
    if keep == 0 || u64::from(keep) > total {
        bail!("LAYERS must be in 1..={total}");
    }
    let mut w = GgufWriter::new();
    for (k, v) in f.metadata().iter() {
        if k == count_key {
            w.metadata(k, GgufValue::U32(keep));
        } else {
            w.metadata(k, v.clone());
        }
    }
    let mut kept = 0usize;
    for t in f.tensors() {
        let layer = t
            .name
            .strip_prefix("blk.")
            .and_then(|r| r.split('.').next())
            .and_then(|n| n.parse::<u32>().ok());
        if layer.is_some_and(|l| l >= keep) {
            continue;
        }
        if requant && t.name == "token_embd.weight" {
            let values = f.tensor_f32(t)?;
            w.tensor(WriterTensor::raw(
                t.name.clone(),
                &t.shape(),
                GgmlType::Q4_1,
                q4_1(&values),
            ));
        } else {
            w.tensor(WriterTensor::raw(
                t.name.clone(),
                &t.shape(),
                t.ggml_type,
                f.tensor_bytes(t).to_vec(),
            ));
        }
        kept += 1;
    }
    w.write_to(output)?;
    println!("{output}: {kept} tensors, {keep} of {total} layers");
    Ok(())
}

/// ggml's Q4_1: per 32 values `{ f16 d; f16 m; u8 qs[16]; }`, x = d·q + m, value j in
/// the low nibble of byte j and value j + 16 in its high nibble.
fn q4_1(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::with_capacity(values.len() / 32 * 20);
    for block in values.chunks(32) {
        let min = block.iter().copied().fold(f32::INFINITY, f32::min);
        let max = block.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let d = f16::from_f32((max - min) / 15.0);
        let m = f16::from_f32(min);
        let inv = if d.to_f32() > 0.0 {
            1.0 / d.to_f32()
        } else {
            0.0
        };
        let q = |x: f32| ((x - m.to_f32()) * inv).round().clamp(0.0, 15.0) as u8;
        out.extend_from_slice(&d.to_le_bytes());
        out.extend_from_slice(&m.to_le_bytes());
        for j in 0..16 {
            let lo = block.get(j).map_or(0, |&x| q(x));
            let hi = block.get(j + 16).map_or(0, |&x| q(x));
            out.push(lo | (hi << 4));
        }
    }
    out
}
