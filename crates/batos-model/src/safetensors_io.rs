//! HF safetensors checkpoints: single-file or sharded (`model.safetensors.index.json`),
//! memory-mapped, mapped to the internal tensor naming.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use serde::Deserialize;

use crate::config::LlamaConfig;
use crate::error::{ModelError, Result};
use crate::tensor::Tensor;
use crate::weights::{check_shape, progress_bar, LoadOptions, ModelWeights, TensorRole};

/// Single-file checkpoint name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// Shard index name.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

#[derive(Deserialize)]
struct Index {
    weight_map: BTreeMap<String, String>,
}

/// The checkpoint files of an HF model directory: the shards named by
/// `model.safetensors.index.json` if present, else `model.safetensors`.
pub fn checkpoint_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let index = dir.join(INDEX_FILE);
    if index.is_file() {
        let text =
            std::fs::read_to_string(&index).map_err(|e| ModelError::io("read", &index, e))?;
        let idx: Index = serde_json::from_str(&text).map_err(|source| ModelError::Json {
            path: index.clone(),
            source,
        })?;
        let shards: BTreeSet<&String> = idx.weight_map.values().collect();
        let mut files = Vec::with_capacity(shards.len());
        for s in shards {
            // Shard names are plain file names beside the index; refuse anything else.
            if Path::new(s).components().count() != 1 || s.contains("..") {
                return Err(ModelError::Safetensors {
                    path: index.clone(),
                    reason: format!("shard name {s:?} is not a file name in the model directory"),
                });
            }
            let p = dir.join(s);
            if !p.is_file() {
                return Err(ModelError::NotFound {
                    path: p,
                    what: "safetensors shard listed in model.safetensors.index.json",
                });
            }
            files.push(p);
        }
        return Ok(files);
    }
    let single = dir.join(SINGLE_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    Err(ModelError::NotFound {
        path: single,
        what: "model.safetensors or model.safetensors.index.json",
    })
}

fn dtype_name(d: Dtype) -> String {
    format!("{d:?}")
}

impl ModelWeights {
    /// Loads the weights of an HF model directory (see [`checkpoint_files`]).
    pub fn from_safetensors_dir(
        dir: impl AsRef<Path>,
        cfg: &LlamaConfig,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let dir = dir.as_ref();
        let files = checkpoint_files(dir)?;
        Self::from_safetensors_files(&files, cfg, opts)
    }

    /// Loads weights from safetensors files (f32, f16 or bf16 tensors with HF Llama names),
    /// converting each to `opts.dtype`.
    pub fn from_safetensors_files(
        files: &[PathBuf],
        cfg: &LlamaConfig,
        opts: &LoadOptions,
    ) -> Result<Self> {
        let started = std::time::Instant::now();
        let bar = progress_bar(opts.progress, files.len() as u64, "load safetensors");
        let mut tensors: Vec<(TensorRole, Tensor)> = Vec::new();
        let mut origin: HashMap<TensorRole, PathBuf> = HashMap::new();
        for path in files {
            let map = crate::mmap::map_file(path)?;
            let st = SafeTensors::deserialize(&map).map_err(|e| ModelError::Safetensors {
                path: path.clone(),
                reason: e.to_string(),
            })?;
            let mut names = st.names();
            names.sort();
            for name in names {
                // Some exports keep RoPE's inverse frequencies as a buffer; they are derived
                // from the config, not weights.
                if name.ends_with("rotary_emb.inv_freq") {
                    continue;
                }
                let role =
                    TensorRole::from_hf_name(name).ok_or_else(|| ModelError::UnexpectedTensor {
                        name: name.to_string(),
                        source_desc: path.display().to_string(),
                    })?;
                if let Some(first) = origin.insert(role, path.clone()) {
                    return Err(ModelError::Safetensors {
                        path: path.clone(),
                        reason: format!("tensor '{name}' is also in {}", first.display()),
                    });
                }
                let view = st.tensor(name).map_err(|e| ModelError::Safetensors {
                    path: path.clone(),
                    reason: format!("tensor '{name}': {e}"),
                })?;
                let dtype = match view.dtype() {
                    Dtype::F32 => batos_types::DType::F32,
                    Dtype::F16 => batos_types::DType::F16,
                    Dtype::BF16 => batos_types::DType::BF16,
                    other => {
                        return Err(ModelError::UnsupportedDType {
                            name: name.to_string(),
                            dtype: dtype_name(other),
                        })
                    }
                };
                if let TensorRole::Layer { layer, .. } = role {
                    if layer >= cfg.num_hidden_layers {
                        return Err(ModelError::UnexpectedTensor {
                            name: name.to_string(),
                            source_desc: format!(
                                "{} (config has {} layers)",
                                path.display(),
                                cfg.num_hidden_layers
                            ),
                        });
                    }
                }
                check_shape(cfg, role, view.shape())?;
                let t = Tensor::from_le_bytes(view.shape().to_vec(), dtype, view.data()).map_err(
                    |e| match e {
                        ModelError::TensorDataLength { expected, got, .. } => {
                            ModelError::TensorDataLength {
                                name: name.to_string(),
                                expected,
                                got,
                            }
                        }
                        other => other,
                    },
                )?;
                tensors.push((role, t.to_dtype(opts.dtype)?));
            }
            bar.inc(1);
        }
        bar.finish_and_clear();
        let source = match files {
            [one] => one.display().to_string(),
            _ => format!("{} safetensors shards", files.len()),
        };
        tracing::info!(source = %source, tensors = tensors.len(), dtype = %opts.dtype, secs = started.elapsed().as_secs_f32(), "loaded safetensors weights");
        Self::from_tensors(cfg, tensors, &source)
    }
}
