//! Writes a copy of a Llama GGUF keeping only its first N decoder layers (embedding,
//! final norm, head, tokenizer and chat template unchanged, tensors copied byte for
//! byte). The GPU check uses it to carry real weights to a device machine whose
//! upload limit (64 MiB) is below the full SmolLM2 GGUF's 94 MB.
//!
//!   cargo run -p batos-model --release --example gguf_truncate -- IN.gguf OUT.gguf LAYERS

use anyhow::{bail, Context};
use batos_model::gguf::{GgufFile, GgufValue, GgufWriter, WriterTensor};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let [_, input, output, layers] = args.as_slice() else {
        bail!("usage: gguf_truncate IN.gguf OUT.gguf LAYERS");
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
        w.tensor(WriterTensor::raw(
            t.name.clone(),
            &t.shape(),
            t.ggml_type,
            f.tensor_bytes(t).to_vec(),
        ));
        kept += 1;
    }
    w.write_to(output)?;
    println!("{output}: {kept} tensors, {keep} of {total} layers");
    Ok(())
}
