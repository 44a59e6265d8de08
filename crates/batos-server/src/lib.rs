//! batos-server: the HTTP face of the engine, speaking the API vLLM users and their
//! LoRA-aware routers already use.
//!
//! - `POST /v1/completions`, `POST /v1/chat/completions`: OpenAI's shapes, streamed as
//!   server-sent events (`data: {chunk}` … `data: [DONE]`) or not; the request's
//!   `model` picks the base model or a served adapter.
//! - `GET /v1/models`: the base model, then every served adapter (`parent` = base).
//! - `POST /v1/load_lora_adapter`, `POST /v1/unload_lora_adapter`: vLLM's runtime
//!   adapter routes (off unless enabled; admin key; paths confined to a directory).
//! - `GET /health`, `GET /metrics` (Prometheus text, vLLM's metric names).
//!
//! Errors leave as vLLM's envelope `{"error": {"message", "type", "param", "code"}}`.
//! `docs/server.md` lists the endpoints, the configuration, the security model and the
//! differences from vLLM.
//!
//! ```no_run
//! # async fn demo() -> Result<(), batos_server::ServerError> {
//! use batos_server::{shutdown_signal, ServedModel, Server, ServerConfig};
//! let config = ServerConfig { port: 0, ..ServerConfig::default() };
//! let settings = config.validate()?;
//! let model = ServedModel::from_image(
//!     std::path::Path::new("my.image"),
//!     settings.engine(),
//!     settings.served_model_name(),
//!     batos_model::Progress::Hidden,
//! )?;
//! let server = Server::bind(settings, model).await?;
//! println!("listening on {}", server.local_addr()?);
//! server.run(shutdown_signal()).await
//! # }
//! ```
//!
//! Invariant: the HTTP layer never blocks an async worker on the engine — submission
//! (tokenising, a cold adapter load), metrics snapshots and adapter loads run on
//! blocking threads; a stream is polled by its connection's task alone.

mod admin;
mod config;
mod error;
mod inference;
mod metrics;
mod model;
mod protocol;
mod server;

pub use config::{
    BaseNameCheck, DeviceSetting, EngineSettings, ImageAdapters, LoraDTypeSetting, LoraUpdates,
    ServerConfig, Settings, WeightsSetting,
};
pub use error::{Result, ServerError};
pub use model::ServedModel;
pub use server::{shutdown_signal, Server};
