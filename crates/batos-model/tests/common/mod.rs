//! Helpers shared by the integration tests: where the reference outputs and the real model
//! are, with loud skips when they cannot be had.

#![allow(dead_code)] // each test binary uses a subset

use std::path::PathBuf;

/// `$BATOS_REFERENCE_DIR`, else the first `shared/reference` found walking up from this
/// crate (the project keeps it at `../shared/reference` beside the repository).
pub fn reference_dir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("BATOS_REFERENCE_DIR") {
        return Some(PathBuf::from(dir));
    }
    let here = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    here.ancestors()
        .map(|a| a.join("shared").join("reference"))
        .find(|p| p.join("tokenize.json").is_file())
}

/// Parsed reference file `name`, or `None` after printing a SKIP line.
pub fn reference_json(test: &str, name: &str) -> Option<serde_json::Value> {
    let Some(dir) = reference_dir() else {
        println!("SKIP {test}: reference outputs not found (set BATOS_REFERENCE_DIR or keep ../shared/reference)");
        eprintln!("SKIP {test}: reference outputs not found (set BATOS_REFERENCE_DIR or keep ../shared/reference)");
        return None;
    };
    let text = std::fs::read_to_string(dir.join(name)).expect("reference file readable");
    Some(serde_json::from_str(&text).expect("reference file is JSON"))
}

/// The real model's GGUF (fetched into the cache if missing), or `None` after printing a
/// SKIP line that says why.
pub fn real_model(test: &str) -> Option<PathBuf> {
    match batos_model::fetch::smollm2_gguf() {
        Ok(p) => Some(p),
        Err(e) => {
            println!("SKIP {test}: real model unavailable: {e}");
            eprintln!("SKIP {test}: real model unavailable: {e}");
            None
        }
    }
}

/// The ids in a JSON array.
pub fn ids(v: &serde_json::Value) -> Vec<u32> {
    v.as_array()
        .expect("array of ids")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}
