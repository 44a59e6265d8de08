//! `/v1/models` and vLLM's runtime adapter routes: `/v1/load_lora_adapter` and
//! `/v1/unload_lora_adapter`.

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use axum::extract::State;
use axum::response::{IntoResponse, Response};
use axum::Json;
use batos_engine::{AdapterSource, EngineError};
use batos_lora::LoraError;

use crate::config::LoraUpdates;
use crate::error::{Result, ServerError};
use crate::protocol::{LoadLoraRequest, ModelCard, ModelList, ModelPermission, UnloadLoraRequest};
use crate::server::{unix_now, AppState, JsonBody, ServedAdapter};

fn permission(state: &AppState, created: u64) -> ModelPermission {
    ModelPermission {
        id: state.response_id("modelperm"),
        object: "model_permission",
        created,
        allow_create_engine: false,
        allow_sampling: true,
        allow_logprobs: true,
        allow_search_indices: false,
        allow_view: true,
        allow_fine_tuning: false,
        organization: "*",
        group: None,
        is_blocking: false,
    }
}

/// `GET /v1/models`: the base model first, then every served adapter (`parent` the
/// base, `root` where the adapter came from), as vLLM lists them.
pub(crate) async fn list_models(State(state): State<Arc<AppState>>) -> Json<ModelList> {
    let mut data = vec![ModelCard {
        id: state.model_name.to_string(),
        object: "model",
        created: state.created,
        owned_by: "batos",
        root: state.model_name.to_string(),
        parent: None,
        max_model_len: Some(state.max_model_len),
        permission: vec![permission(&state, state.created)],
    }];
    let adapters: Vec<(String, ServedAdapter)> = state
        .adapters()
        .iter()
        .map(|(n, a)| (n.clone(), a.clone()))
        .collect();
    for (name, a) in adapters {
        data.push(ModelCard {
            id: name,
            object: "model",
            created: a.created,
            owned_by: "batos",
            root: a.root,
            parent: Some(state.model_name.to_string()),
            max_model_len: None,
            permission: vec![permission(&state, a.created)],
        });
    }
    Json(ModelList {
        object: "list",
        data,
    })
}

/// Removes `.` and resolves `..` without touching the file system.
fn normalise(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            c => out.push(c),
        }
    }
    out
}

/// Resolves `given` (absolute, or relative to `root`) to a directory inside `root`
/// after every symlink, and checks that the files the loader reads in it resolve
/// inside `root` too (a symlinked `adapter_config.json` must not read elsewhere).
fn resolve_lora_path(name: &str, given: &str, root: &Path) -> Result<PathBuf> {
    let outside = || {
        ServerError::InvalidUserInput {
        message: format!(
            "Loading lora {name} failed: lora_path '{given}' is outside the directory adapters may be loaded from"
        ),
    }
    };
    let joined = normalise(&root.join(given));
    // Lexically outside: refused before any file system access, so the answer says
    // nothing about what exists out there.
    if !joined.starts_with(root) {
        return Err(outside());
    }
    let real = std::fs::canonicalize(&joined).map_err(|_| ServerError::NotFound {
        message: format!("Loading lora {name} failed: No adapter found for {given}"),
    })?;
    if !real.starts_with(root) {
        return Err(outside());
    }
    if !real.is_dir() {
        return Err(ServerError::NotFound {
            message: format!("Loading lora {name} failed: No adapter found for {given}"),
        });
    }
    for file in [
        batos_lora::audit::CONFIG_FILE,
        batos_lora::audit::WEIGHTS_FILE,
        "adapter_model.bin",
    ] {
        if let Ok(f) = std::fs::canonicalize(real.join(file)) {
            if !f.starts_with(root) {
                return Err(outside());
            }
        }
    }
    Ok(real)
}

/// How a failed engine load is answered: as vLLM does where it says (missing → 404,
/// rejected adapter → 400), 500 otherwise.
fn load_error(name: &str, given: &str, e: EngineError) -> ServerError {
    match &e {
        EngineError::UnknownAdapter { .. } => ServerError::NotFound {
            message: format!("Loading lora {name} failed: No adapter found for {given}"),
        },
        EngineError::Adapter { source, .. } => match source.downcast_ref::<LoraError>() {
            Some(LoraError::Io { source: io, .. }) if io.kind() == std::io::ErrorKind::NotFound => {
                ServerError::NotFound {
                    message: format!("Loading lora {name} failed: No adapter found for {given}"),
                }
            }
            Some(
                LoraError::Rejected { .. }
                | LoraError::RankAboveSlots { .. }
                | LoraError::InvalidConfig { .. },
            ) => ServerError::AdapterRejected {
                name: name.into(),
                reason: source.to_string(),
            },
            _ => ServerError::Engine(e),
        },
        _ => ServerError::Engine(e),
    }
}

/// `POST /v1/load_lora_adapter`. With `lora_path`: a PEFT directory inside the
/// configured `lora_dir`, audited and stored in the image under `lora_name` (a name
/// the image already holds gets a new version; history keeps the old one). Without
/// it: the adapter the image holds under `lora_name`.
pub(crate) async fn load_lora_adapter(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<LoadLoraRequest>,
) -> Result<Response> {
    let LoraUpdates::Enabled { lora_dir, .. } = &state.settings.lora_updates else {
        return Err(ServerError::NotFound {
            message: "Not Found".into(),
        });
    };
    let name = req.lora_name.trim().to_owned();
    if name.is_empty()
        || req
            .lora_path
            .as_deref()
            .is_some_and(|p| p.trim().is_empty())
    {
        return Err(ServerError::InvalidUserInput {
            message: "Both 'lora_name' and 'lora_path' must be provided.".into(),
        });
    }
    if *name == *state.model_name {
        return Err(ServerError::InvalidUserInput {
            message: format!("The lora adapter '{name}' has the base model's name."),
        });
    }
    let _admin = state.admin.lock().await;
    if state.adapters().contains_key(&name) && !req.load_inplace {
        return Err(ServerError::InvalidUserInput {
            message: format!(
                "The lora adapter '{name}' has already been loaded. If you want to load the adapter in place, set 'load_inplace' to True."
            ),
        });
    }
    let (source, root, given) = match &req.lora_path {
        None => (
            AdapterSource::Image,
            None,
            format!("'{name}' in the living image"),
        ),
        Some(p) => {
            let Some(dir) = lora_dir else {
                return Err(ServerError::InvalidUserInput {
                    message: format!(
                        "Loading lora {name} failed: loading from a path is disabled (no lora_dir is configured); omit lora_path to load '{name}' from the living image"
                    ),
                });
            };
            let real = resolve_lora_path(&name, p, dir)?;
            (AdapterSource::PeftDir(real), Some(p.clone()), p.clone())
        }
    };
    let st = state.clone();
    let n = name.clone();
    let g = given.clone();
    let info = tokio::task::spawn_blocking(move || {
        st.engine
            .replace_adapter(&n, &source)
            .map_err(|e| load_error(&n, &g, e))
    })
    .await
    .map_err(|e| ServerError::Task(e.to_string()))??;
    let root = match root {
        Some(r) => r,
        None => {
            let st = state.clone();
            let n = name.clone();
            tokio::task::spawn_blocking(move || st.image_root(&n))
                .await
                .map_err(|e| ServerError::Task(e.to_string()))?
        }
    };
    tracing::info!(adapter = %name, generation = %info.generation.short(), %root, "adapter loaded");
    state.adapters_mut().insert(
        name.clone(),
        ServedAdapter {
            root,
            created: unix_now(),
        },
    );
    Ok(format!("Success: LoRA adapter '{name}' added successfully.").into_response())
}

/// `POST /v1/unload_lora_adapter`: the name stops being served and leaves host and
/// slot memory; requests already running finish on the version they hold. The
/// adapter stays in the living image (load it again by name).
pub(crate) async fn unload_lora_adapter(
    State(state): State<Arc<AppState>>,
    JsonBody(req): JsonBody<UnloadLoraRequest>,
) -> Result<Response> {
    // vLLM accepts and ignores the internal id.
    let _ = req.lora_int_id;
    let name = req.lora_name.trim().to_owned();
    if name.is_empty() {
        return Err(ServerError::InvalidUserInput {
            message: "'lora_name' needs to be provided to unload a LoRA adapter.".into(),
        });
    }
    let _admin = state.admin.lock().await;
    if !state.adapters().contains_key(&name) {
        return Err(ServerError::NotFound {
            message: format!("The lora adapter '{name}' cannot be found."),
        });
    }
    state.adapters_mut().remove(&name);
    let st = state.clone();
    let n = name.clone();
    let unloaded = tokio::task::spawn_blocking(move || st.engine.unload_adapter(&n))
        .await
        .map_err(|e| ServerError::Task(e.to_string()))?;
    match unloaded {
        // Not in the image any more: it is not served either way.
        Ok(()) | Err(EngineError::UnknownAdapter { .. }) => {}
        Err(e) => {
            return Err(ServerError::UnloadFailed {
                name,
                reason: e.to_string(),
            })
        }
    }
    tracing::info!(adapter = %name, "adapter unloaded");
    Ok(format!("Success: LoRA adapter '{name}' removed successfully.").into_response())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalise_resolves_dots_without_the_file_system() {
        let root = Path::new("/srv/loras");
        assert_eq!(
            normalise(&root.join("a/./b/../c")),
            PathBuf::from("/srv/loras/a/c")
        );
        assert!(!normalise(&root.join("../etc")).starts_with(root));
        assert!(!normalise(Path::new("/srv/loras/../etc/passwd")).starts_with(root));
        assert!(!normalise(&root.join("a/../../loras2")).starts_with(root));
    }

    #[test]
    fn paths_outside_are_refused_before_any_lookup() {
        let dir = tempfile::tempdir().unwrap();
        let root = std::fs::canonicalize(dir.path()).unwrap();
        for p in ["../x", "/nonexistent/anywhere", "a/../../b"] {
            let e = resolve_lora_path("n", p, &root).unwrap_err();
            assert!(
                matches!(e, ServerError::InvalidUserInput { .. }),
                "{p}: {e}"
            );
        }
        let e = resolve_lora_path("n", "missing", &root).unwrap_err();
        assert!(matches!(e, ServerError::NotFound { .. }), "{e}");
        std::fs::create_dir(root.join("ok")).unwrap();
        assert_eq!(
            resolve_lora_path("n", "ok", &root).unwrap(),
            root.join("ok")
        );
    }
}
