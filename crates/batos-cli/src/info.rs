//! `batos info`.

use batos::model::image::{model_summary, StoredDType};
use batos::model::RopeScaling;
use batos::store::OpenMode;

use crate::{runtime, ImageArg};

#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    #[command(flatten)]
    image: ImageArg,
}

pub fn run(args: &InfoArgs) -> anyhow::Result<()> {
    let db = runtime::open_image(&args.image.image, OpenMode::OpenExisting)?;
    let s = model_summary(&db)?;
    let c = &s.config;
    let dtypes: Vec<&str> = s
        .dtypes
        .iter()
        .map(|d| match d {
            StoredDType::F32 => "f32",
            StoredDType::F16 => "f16",
            StoredDType::BF16 => "bf16",
            StoredDType::I32 => "int4 (AWQ)",
            _ => "other",
        })
        .collect();
    println!("image          {}", db.path().display());
    println!("last commit    {}", db.last_tid());
    println!("model record   {:?}", s.record.oid());
    println!("source         {}", s.provenance.source);
    println!(
        "imported       {} (unix seconds) by batos-model {}",
        s.provenance.imported_at_unix_s, s.provenance.importer_version
    );
    println!(
        "architecture   {:?}: {} layers, hidden {}, MLP {}, {} heads ({} KV, head_dim {})",
        c.family,
        c.num_hidden_layers,
        c.hidden_size,
        c.intermediate_size,
        c.num_attention_heads,
        c.num_key_value_heads,
        c.head_dim
    );
    println!(
        "vocabulary     {} (tokenizer {}), context {}, rope theta {}{}",
        c.vocab_size,
        s.vocab_size,
        c.max_position_embeddings,
        c.rope_theta,
        match c.rope_scaling {
            None => String::new(),
            Some(RopeScaling::Linear { factor }) => format!(", linear scaling x{factor}"),
            Some(RopeScaling::Llama3 { factor, .. }) => format!(", llama3 scaling x{factor}"),
            Some(_) => ", scaled".into(),
        }
    );
    println!(
        "weights        {} tensors, {:.1} MiB, {}{}",
        s.tensors,
        s.bytes as f64 / (1 << 20) as f64,
        dtypes.join("+"),
        if c.tie_word_embeddings {
            ", LM head tied to the embedding"
        } else {
            ""
        }
    );
    println!(
        "special tokens bos {:?}, eos {:?}",
        c.bos_token_id, c.eos_token_ids
    );
    println!(
        "chat template  {}",
        if s.has_chat_template { "yes" } else { "no" }
    );
    println!(
        "root history   {} commit(s): {}",
        s.root_history.len(),
        s.root_history
            .iter()
            .map(|t| t.to_string())
            .collect::<Vec<_>>()
            .join(", ")
    );
    Ok(())
}
