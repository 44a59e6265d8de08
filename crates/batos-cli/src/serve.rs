//! `batos serve`: the OpenAI/vLLM-compatible HTTP server over a living image.
//!
//! Settings come from `--config FILE.toml` (see `docs/server.md`), then flags, which
//! override the file. The bound address is printed to stdout once the server listens
//! (`listening on http://ADDR`), so scripts can start it on port 0 and read the port.
//! Ctrl-C or SIGTERM drains (in-flight requests finish); a second one exits at once.

use std::io::Write;
use std::net::IpAddr;
use std::path::PathBuf;

use anyhow::Context;
use batos_server::{
    DeviceSetting, ImageAdapters, LoraDTypeSetting, ServedModel, Server, ServerConfig,
    WeightsSetting,
};

use crate::runtime;

#[derive(Debug, clap::Args)]
pub struct ServeArgs {
    /// The living image directory (model and adapters).
    #[arg(long, value_name = "DIR")]
    image: PathBuf,
    /// A TOML config file; flags override its values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1].
    #[arg(long)]
    host: Option<IpAddr>,
    /// Port to listen on; 0 picks a free one [default: 8000].
    #[arg(long)]
    port: Option<u16>,
    /// The base model's name in /v1/models [default: from the image].
    #[arg(long)]
    served_model_name: Option<String>,
    /// Require `Authorization: Bearer KEY` on /v1 inference and listing routes.
    #[arg(long, value_name = "KEY")]
    api_key: Option<String>,
    /// Register /v1/load_lora_adapter and /v1/unload_lora_adapter (needs --admin-api-key).
    #[arg(long)]
    enable_lora_loading: bool,
    /// The Bearer key the adapter routes require.
    #[arg(long, value_name = "KEY")]
    admin_api_key: Option<String>,
    /// The directory every lora_path must resolve into (after symlinks).
    #[arg(long, value_name = "DIR")]
    lora_dir: Option<PathBuf>,
    /// Serve the image's adapters from startup (all) or only once loaded (none).
    #[arg(long, value_name = "all|none")]
    image_adapters: Option<String>,
    /// Distinct adapters one engine step can use (hot slots).
    #[arg(long)]
    max_loras: Option<usize>,
    /// Adapters kept decoded in host memory.
    #[arg(long)]
    max_cpu_loras: Option<usize>,
    /// Largest adapter rank accepted.
    #[arg(long)]
    max_lora_rank: Option<usize>,
    /// Element type of the hot adapter slots [default: f16]; int8 is the fastest decode
    /// over many distinct adapters on a CPU with AVX-512 VNNI.
    #[arg(long, value_name = "f32|f16|bf16|int8")]
    lora_dtype: Option<LoraDTypeSetting>,
    /// KV cache size in MiB.
    #[arg(long, value_name = "MIB")]
    kv_cache_mib: Option<u64>,
    /// Requests running at once at most.
    #[arg(long)]
    max_num_seqs: Option<usize>,
    /// New tokens per engine step at most.
    #[arg(long)]
    max_batch_tokens: Option<usize>,
    /// Prompt tokens of one request per step at most.
    #[arg(long)]
    prefill_chunk: Option<usize>,
    /// Largest max_tokens a request may ask for.
    #[arg(long)]
    max_tokens: Option<usize>,
    /// Longest prompt accepted, in tokens.
    #[arg(long)]
    max_prompt_tokens: Option<usize>,
    /// Largest request body, in bytes.
    #[arg(long)]
    max_body_bytes: Option<usize>,
    /// Runtime weights: f32, f16 or bf16 [default: as stored].
    #[arg(long, value_name = "f32|f16|bf16")]
    weights: Option<WeightsSetting>,
    /// Where the kernels run: cpu, cuda or cuda:N.
    #[arg(long, value_name = "cpu|cuda:N")]
    device: Option<DeviceSetting>,
    /// Kernel threads (default: one per core).
    #[arg(long)]
    threads: Option<usize>,
}

impl ServeArgs {
    /// The config file (or the defaults) with the flags applied.
    fn config(&self) -> anyhow::Result<ServerConfig> {
        let mut c = match &self.config {
            Some(path) => ServerConfig::from_file(path)?,
            None => ServerConfig::default(),
        };
        macro_rules! set {
            ($($flag:ident => $($field:ident).+),* $(,)?) => {
                $(if let Some(v) = &self.$flag { c.$($field).+ = v.clone().into(); })*
            };
        }
        set!(
            host => host,
            port => port,
            max_loras => engine.max_loras,
            max_cpu_loras => engine.max_cpu_loras,
            max_lora_rank => engine.max_lora_rank,
            lora_dtype => engine.lora_dtype,
            max_num_seqs => engine.max_num_seqs,
            max_batch_tokens => engine.max_batch_tokens,
            prefill_chunk => engine.prefill_chunk,
            max_tokens => max_tokens,
            max_body_bytes => max_body_bytes,
            device => engine.device,
        );
        if let Some(v) = &self.served_model_name {
            c.served_model_name = Some(v.clone());
        }
        if let Some(v) = &self.api_key {
            c.api_key = Some(v.clone());
        }
        if let Some(v) = &self.admin_api_key {
            c.admin_api_key = Some(v.clone());
        }
        if let Some(v) = &self.lora_dir {
            c.lora_dir = Some(v.clone());
        }
        if let Some(v) = self.max_prompt_tokens {
            c.max_prompt_tokens = Some(v);
        }
        if let Some(v) = self.weights {
            c.engine.weights = Some(v);
        }
        if let Some(mib) = self.kv_cache_mib {
            c.engine.kv_cache_bytes = mib
                .checked_mul(1 << 20)
                .context("--kv-cache-mib is too large")?;
        }
        if let Some(v) = &self.image_adapters {
            c.image_adapters = match v.as_str() {
                "all" => ImageAdapters::All,
                "none" => ImageAdapters::None,
                other => anyhow::bail!("--image-adapters: '{other}' is not all or none"),
            };
        }
        if self.enable_lora_loading {
            c.enable_lora_loading = true;
        }
        Ok(c)
    }
}

pub fn run(args: &ServeArgs) -> anyhow::Result<()> {
    let settings = args.config()?.validate()?;
    runtime::set_threads(args.threads)?;
    let model = ServedModel::from_image(
        &args.image,
        settings.engine(),
        settings.served_model_name(),
        batos::model::Progress::Bar,
    )
    .with_context(|| format!("cannot serve the image {}", args.image.display()))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("batos-http")
        .build()
        .context("cannot start the async runtime")?;
    rt.block_on(async move {
        let server = Server::bind(settings, model).await?;
        let addr = server.local_addr()?;
        println!("listening on http://{addr}");
        std::io::stdout().flush().ok();
        server
            .run(async {
                batos_server::shutdown_signal().await;
                // Draining waits for every stream to end; a second signal stops now.
                tokio::spawn(async {
                    batos_server::shutdown_signal().await;
                    eprintln!("second signal: exiting without draining");
                    std::process::exit(130);
                });
            })
            .await
    })?;
    Ok(())
}
