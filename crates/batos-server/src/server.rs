//! The server: shared state, the router, authentication, the JSON body extractor, and
//! binding / serving with graceful shutdown.

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard};
use std::time::{SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use batos_engine::{Engine, ShutdownMode};
use batos_lora::AdapterRepository;
use batos_model::ChatTemplate;
use batos_store::LivingImage;
use serde::de::DeserializeOwned;

use crate::config::{ImageAdapters, LoraUpdates, Settings};
use crate::error::{Result, ServerError};
use crate::metrics::Stats;
use crate::model::ServedModel;
use crate::{admin, inference, metrics};

/// Seconds since the Unix epoch.
pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// One adapter the server serves by name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ServedAdapter {
    /// Where it came from: the `lora_path` given, or the image's record of its source.
    pub root: String,
    /// When it was made servable (Unix seconds).
    pub created: u64,
}

/// What every handler shares.
pub(crate) struct AppState {
    pub engine: Engine,
    pub model_name: Arc<str>,
    pub created: u64,
    pub max_model_len: usize,
    pub vocab_size: usize,
    pub chat_template: Option<ChatTemplate>,
    pub eos_token_ids: Vec<u32>,
    /// The text of each end-of-sequence token, cut from answers.
    pub eos_texts: Vec<(u32, String)>,
    pub repository: Option<AdapterRepository>,
    adapters: RwLock<BTreeMap<String, ServedAdapter>>,
    /// Serialises adapter loads and unloads (vLLM takes a per-name lock; one lock is
    /// simpler and these calls are rare).
    pub admin: tokio::sync::Mutex<()>,
    pub settings: Settings,
    pub stats: Stats,
    next_id: AtomicU64,
    id_nonce: u64,
    /// Keeps the living image open while the adapter repository uses it.
    _image: Option<LivingImage>,
}

impl AppState {
    pub(crate) fn adapters(&self) -> RwLockReadGuard<'_, BTreeMap<String, ServedAdapter>> {
        // Entries are inserted or removed whole: a panic elsewhere leaves them valid.
        self.adapters.read().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn adapters_mut(&self) -> RwLockWriteGuard<'_, BTreeMap<String, ServedAdapter>> {
        self.adapters.write().unwrap_or_else(|p| p.into_inner())
    }

    /// A fresh response id with `prefix` (`cmpl`, `chatcmpl`).
    pub(crate) fn response_id(&self, prefix: &str) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{prefix}-{:08x}{n:016x}", self.id_nonce)
    }

    /// Where an image adapter came from, as its record says.
    pub(crate) fn image_root(&self, name: &str) -> String {
        self.repository
            .as_ref()
            .and_then(|r| r.get(name).ok().flatten())
            .map(|r| r.lineage.source)
            .filter(|s| !s.is_empty())
            .unwrap_or_else(|| format!("image:{name}"))
    }
}

/// A bound, not yet serving, server. See the crate docs for an example.
pub struct Server {
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    router: Router,
}

impl std::fmt::Debug for Server {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("addr", &self.listener.local_addr().ok())
            .field("model", &self.state.model_name)
            .finish_non_exhaustive()
    }
}

impl Server {
    /// Binds `settings.addr()` and prepares to serve `model`: the adapters the image
    /// holds are registered as `settings` says.
    pub async fn bind(settings: Settings, model: ServedModel) -> Result<Server> {
        let state = Arc::new(build_state(settings, model)?);
        let addr = state.settings.addr();
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .map_err(|source| ServerError::Io {
                op: "binding",
                addr: addr.to_string(),
                source,
            })?;
        let router = router(state.clone());
        Ok(Server {
            listener,
            state,
            router,
        })
    }

    /// The address actually bound (with the port chosen when `port = 0`).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        self.listener
            .local_addr()
            .map_err(|source| ServerError::Io {
                op: "reading the address of",
                addr: self.state.settings.addr().to_string(),
                source,
            })
    }

    /// Serves until `shutdown` resolves, then drains: no new connections, in-flight
    /// requests (streams included) run to their end, then the engine stops.
    pub async fn run(self, shutdown: impl Future<Output = ()> + Send + 'static) -> Result<()> {
        let addr = self.local_addr()?;
        tracing::info!(%addr, model = %self.state.model_name, "serving");
        axum::serve(self.listener, self.router)
            .with_graceful_shutdown(shutdown)
            .await
            .map_err(|source| ServerError::Io {
                op: "serving",
                addr: addr.to_string(),
                source,
            })?;
        tracing::info!("connections drained; stopping the engine");
        let state = self.state;
        // Blocking: the engine joins its step loop.
        tokio::task::spawn_blocking(move || match Arc::try_unwrap(state) {
            Ok(state) => state.engine.shutdown(ShutdownMode::Drain),
            // A handler still holds the state (a detached blocking task): dropping
            // the last reference cancels what is left.
            Err(_) => Ok(()),
        })
        .await
        .map_err(|e| ServerError::Task(e.to_string()))?
        .map_err(ServerError::Engine)?;
        tracing::info!("stopped");
        Ok(())
    }
}

/// Resolves on ctrl-c or SIGTERM (the signals a supervisor sends to stop a server).
pub async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!("cannot listen for ctrl-c: {e}");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!("cannot listen for SIGTERM: {e}");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => tracing::info!("ctrl-c: draining"),
        _ = term => tracing::info!("SIGTERM: draining"),
    }
}

fn build_state(settings: Settings, model: ServedModel) -> Result<AppState> {
    let limits = model.engine.limits();
    let eos_texts = model
        .eos_token_ids
        .iter()
        .filter_map(|&id| model.token_text(id).map(|t| (id, t)))
        .collect();
    let created = unix_now();
    let mut adapters = BTreeMap::new();
    if settings.image_adapters == ImageAdapters::All {
        for a in model.engine.list_adapters()? {
            adapters.insert(
                a.name,
                ServedAdapter {
                    root: String::new(),
                    created,
                },
            );
        }
    }
    let name: Arc<str> = Arc::from(settings.served_model_name().unwrap_or(&model.name));
    let ServedModel {
        engine,
        chat_template,
        eos_token_ids,
        repository,
        image,
        ..
    } = model;
    let nonce = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.subsec_nanos() ^ (d.as_secs() as u32))
        .unwrap_or(0) as u64;
    let state = AppState {
        engine,
        model_name: name,
        created,
        max_model_len: limits.max_position,
        vocab_size: limits.vocab_size,
        chat_template,
        eos_token_ids,
        eos_texts,
        repository,
        adapters: RwLock::new(adapters),
        admin: tokio::sync::Mutex::new(()),
        settings,
        stats: Stats::default(),
        next_id: AtomicU64::new(1),
        id_nonce: nonce,
        _image: image,
    };
    // Image adapters served from startup: their roots come from their records.
    let names: Vec<String> = state.adapters().keys().cloned().collect();
    for n in names {
        let root = state.image_root(&n);
        if let Some(a) = state.adapters_mut().get_mut(&n) {
            a.root = root;
        }
    }
    tracing::info!(
        adapters = state.adapters().len(),
        lora_loading = matches!(state.settings.lora_updates, LoraUpdates::Enabled { .. }),
        "server state ready"
    );
    Ok(state)
}

/// The routes, with authentication and the body limit, over `state`.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    let inference = Router::new()
        .route("/v1/completions", post(inference::completions))
        .route("/v1/chat/completions", post(inference::chat_completions))
        .route("/v1/models", get(admin::list_models))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            require_api_key,
        ));
    let mut app = Router::new()
        .merge(inference)
        .route("/health", get(health))
        .route("/metrics", get(metrics::metrics));
    if matches!(state.settings.lora_updates, LoraUpdates::Enabled { .. }) {
        let lora = Router::new()
            .route("/v1/load_lora_adapter", post(admin::load_lora_adapter))
            .route("/v1/unload_lora_adapter", post(admin::unload_lora_adapter))
            .route_layer(middleware::from_fn_with_state(
                state.clone(),
                require_admin_key,
            ));
        app = app.merge(lora);
    }
    let limit = state.settings.max_body_bytes;
    app.fallback(not_found)
        .layer(DefaultBodyLimit::max(limit))
        .with_state(state)
}

/// `GET /health`: 200 with an empty body while the engine's step loop answers, 503
/// once it has stopped.
async fn health(State(state): State<Arc<AppState>>) -> StatusCode {
    let alive = tokio::task::spawn_blocking(move || state.engine.metrics().is_ok()).await;
    if alive.unwrap_or(false) {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// FastAPI's answer to an unknown route (vLLM's routes that are switched off look
/// exactly like this).
async fn not_found() -> Response {
    (
        StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({"detail": "Not Found"})),
    )
        .into_response()
}

/// Compares keys in time independent of where they differ.
fn same_key(given: &[u8], want: &[u8]) -> bool {
    given.len() == want.len() && given.iter().zip(want).fold(0u8, |d, (a, b)| d | (a ^ b)) == 0
}

fn bearer(headers: &HeaderMap) -> Option<&[u8]> {
    let v = headers.get(header::AUTHORIZATION)?.as_bytes();
    let (scheme, token) = v.split_at(v.iter().position(|&b| b == b' ')?);
    scheme
        .eq_ignore_ascii_case(b"bearer")
        .then(|| token.trim_ascii())
}

/// The inference key, when configured (the admin key is accepted too).
async fn require_api_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    if let Some(key) = &state.settings.api_key {
        let given = bearer(request.headers());
        let admin = match &state.settings.lora_updates {
            LoraUpdates::Enabled { admin_api_key, .. } => Some(admin_api_key.as_bytes()),
            LoraUpdates::Disabled => None,
        };
        let ok = given
            .is_some_and(|g| same_key(g, key.as_bytes()) || admin.is_some_and(|a| same_key(g, a)));
        if !ok {
            return ServerError::Unauthorized.into_response();
        }
    }
    next.run(request).await
}

/// The admin key, always (the adapter routes exist only when it is configured).
async fn require_admin_key(
    State(state): State<Arc<AppState>>,
    request: Request,
    next: Next,
) -> Response {
    let ok = match &state.settings.lora_updates {
        LoraUpdates::Enabled { admin_api_key, .. } => {
            bearer(request.headers()).is_some_and(|g| same_key(g, admin_api_key.as_bytes()))
        }
        LoraUpdates::Disabled => false,
    };
    if !ok {
        return ServerError::Unauthorized.into_response();
    }
    next.run(request).await
}

/// A JSON request body: `Content-Type: application/json` required (as vLLM), the
/// size limit enforced, every failure answered with the error envelope.
pub(crate) struct JsonBody<T>(pub T);

impl<T: DeserializeOwned> FromRequest<Arc<AppState>> for JsonBody<T> {
    type Rejection = ServerError;

    async fn from_request(
        req: Request,
        state: &Arc<AppState>,
    ) -> std::result::Result<Self, ServerError> {
        let media = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| {
                v.split(';')
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_ascii_lowercase()
            });
        if media.as_deref() != Some("application/json") {
            return Err(ServerError::bad_request(
                "Unsupported Media Type: Only 'application/json' is allowed",
                None,
            ));
        }
        let bytes = Bytes::from_request(req, state).await.map_err(|r| {
            if r.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ServerError::BodyTooLarge {
                    limit: state.settings.max_body_bytes,
                }
            } else {
                ServerError::bad_request(format!("cannot read the request body: {r}"), None)
            }
        })?;
        serde_json::from_slice(&bytes)
            .map(JsonBody)
            .map_err(|e| ServerError::bad_request(format!("invalid JSON body: {e}"), None))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_keys_are_parsed_and_compared_whole() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(header::AUTHORIZATION, "Bearer  sk-1 ".parse().unwrap());
        assert_eq!(bearer(&h), Some(&b"sk-1"[..]));
        h.insert(header::AUTHORIZATION, "bearer sk-1".parse().unwrap());
        assert_eq!(bearer(&h), Some(&b"sk-1"[..]));
        h.insert(header::AUTHORIZATION, "Basic sk-1".parse().unwrap());
        assert_eq!(bearer(&h), None);
        assert!(same_key(b"sk-1", b"sk-1"));
        assert!(!same_key(b"sk-1", b"sk-2"));
        assert!(!same_key(b"sk-1", b"sk-10"));
        assert!(!same_key(b"", b"sk"));
    }
}
