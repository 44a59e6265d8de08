//! The `batos` command-line tool.
//!
//! ```text
//! batos import gguf PATH --image DIR [--dtype f32|f16|bf16|int4]
//! batos import hf DIR --image DIR [--dtype f32|f16|bf16]
//! batos quantize --awq --image DIR [--group 64] [--calibration FILE] [--compensation gptq|off] [--embedding int4|dense]
//! batos info --image DIR
//! batos generate --image DIR --prompt TEXT [--chat] [--system TEXT] [sampling flags]
//! batos bench --image DIR [--prompt-lens 128,512] [--decode-tokens 128] [--concurrency 1,4,16]
//! batos serve --image DIR [--config FILE.toml] [--host H] [--port P] [--api-key K] [--enable-lora-loading --admin-api-key K --lora-dir DIR] ...
//! batos loadtest --url http://HOST:PORT --clients N --models a,b,c,d [--duration 60s] [--max-tokens N]
//! (generate and bench take --device cpu|cuda|cuda:N [--cuda-ptx-dir DIR])
//! ```
//!
//! Logs go to stderr, filtered by `RUST_LOG` (default `warn`, `info` for `serve`); generated text goes to
//! stdout as it is produced. Errors print their whole cause chain and exit with status 1.

mod bench;
mod device;
mod generate;
mod import;
mod info;
mod loadtest;
mod quantize;
mod runtime;
mod serve;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

/// batos: many LoRA personas over one base LLM, with all state in a living image.
#[derive(Debug, Parser)]
#[command(name = "batos", version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Import a model into a living image (created if missing); it becomes the image's
    /// current base model, the previous one stays in history.
    Import {
        #[command(subcommand)]
        source: import::ImportSource,
    },
    /// Quantize the image's base model to int4 (AWQ); the result becomes the image's
    /// current base in one commit, the earlier base stays in history until a pack.
    Quantize(quantize::QuantizeArgs),
    /// Describe the model stored in a living image.
    Info(info::InfoArgs),
    /// Generate text with the image's model, streaming it to stdout.
    Generate(generate::GenerateArgs),
    /// Measure prefill and decode throughput and peak memory end to end.
    Bench(bench::BenchArgs),
    /// Serve the image's model and adapters over an OpenAI/vLLM-compatible HTTP API.
    Serve(serve::ServeArgs),
    /// Drive an OpenAI-compatible server with concurrent streaming clients and report
    /// output tokens/s, time to first token and inter-token latency.
    Loadtest(loadtest::LoadtestArgs),
}

/// Element type for stored or runtime weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DTypeArg {
    /// 32-bit floats (exact against the reference).
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl DTypeArg {
    fn dtype(self) -> batos::types::DType {
        match self {
            DTypeArg::F32 => batos::types::DType::F32,
            DTypeArg::F16 => batos::types::DType::F16,
            DTypeArg::Bf16 => batos::types::DType::BF16,
        }
    }

    fn weight_dtype(self) -> batos::model::forward::WeightDType {
        use batos::model::forward::WeightDType;
        match self {
            DTypeArg::F32 => WeightDType::F32,
            DTypeArg::F16 => WeightDType::F16,
            DTypeArg::Bf16 => WeightDType::BF16,
        }
    }
}

/// How int4 projections take their activations on the CPU (`--int4-activations`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Int4ActivationsArg {
    /// f32 activations against int4 codes unpacked to f32.
    F32,
    /// int8 activations per weight group and integer dot products (CPU only).
    Int8,
}

impl Int4ActivationsArg {
    fn mode(self) -> batos::model::forward::Int4Activations {
        use batos::model::forward::Int4Activations;
        match self {
            Int4ActivationsArg::F32 => Int4Activations::F32,
            Int4ActivationsArg::Int8 => Int4Activations::Int8,
        }
    }
}

/// The `--image DIR` argument every command takes.
#[derive(Debug, Clone, clap::Args)]
pub struct ImageArg {
    /// The living image directory.
    #[arg(long, value_name = "DIR")]
    pub image: PathBuf,
}

fn init_tracing(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // A server's log is its record: say what it does unless told otherwise.
    init_tracing(match cli.command {
        Command::Serve(_) => "info",
        _ => "warn",
    });
    let result = match cli.command {
        Command::Import { source } => import::run(source),
        Command::Quantize(args) => quantize::run(&args),
        Command::Info(args) => info::run(&args),
        Command::Generate(args) => generate::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::Loadtest(args) => loadtest::run(&args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}
