//! The audit: nothing reaches a tier without passing it. It reads a PEFT adapter
//! (`adapter_config.json` + `adapter_model.safetensors`), checks it against the base
//! model and the configured limits, and either returns the decoded [`LoraAdapter`] or
//! an [`AuditReport`] naming every problem found (not only the first).

use crate::adapter::{LoraAdapter, LoraPair, LoraWeights};
use crate::config::{self, ConfigMatcher, LoraConfig, EMBED_OR_HEAD};
use crate::error::{LoraError, Result};
use crate::shapes::{BaseShapes, Projection};
use safetensors::{Dtype, SafeTensors};
use std::collections::BTreeMap;
use std::fmt;
use std::io::Read;
use std::path::Path;

/// PEFT's file names inside an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// See [`CONFIG_FILE`].
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// How strictly an adapter's `base_model_name_or_path` must name the base model.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum BaseModelCheck {
    /// Do not compare.
    Ignore,
    /// A mismatch is reported as a warning; the adapter is accepted.
    Warn,
    /// A mismatch rejects the adapter. Names are compared by their last path segment,
    /// case-insensitively (`HuggingFaceTB/SmolLM2-135M-Instruct` names
    /// `SmolLM2-135M-Instruct`).
    #[default]
    Require,
}

/// Limits the audit enforces.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AuditPolicy {
    /// Largest rank accepted for any module.
    pub max_rank: usize,
    /// Largest `adapter_config.json` accepted, in bytes.
    pub max_config_bytes: u64,
    /// Largest `adapter_model.safetensors` accepted, in bytes.
    pub max_weights_bytes: u64,
    pub base_model: BaseModelCheck,
}

impl Default for AuditPolicy {
    fn default() -> Self {
        AuditPolicy {
            max_rank: 64,
            max_config_bytes: 1 << 20,
            max_weights_bytes: 512 << 20,
            base_model: BaseModelCheck::Require,
        }
    }
}

/// Which half of a LoRA pair.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PairHalf {
    A,
    B,
}

impl fmt::Display for PairHalf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PairHalf::A => "lora_A",
            PairHalf::B => "lora_B",
        })
    }
}

/// One thing wrong with an adapter.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum AuditProblem {
    /// A required file is absent.
    MissingFile { file: String },
    /// A file is larger than the policy allows (it was not read).
    FileTooLarge {
        file: String,
        bytes: u64,
        limit: u64,
    },
    /// `adapter_config.json` is not valid JSON or a field has the wrong type.
    ConfigMalformed { field: String, reason: String },
    /// `peft_type` is not `LORA`.
    NotLora { peft_type: String },
    /// The adapter touches the token embedding or the output head.
    TargetsEmbeddingOrHead { module: String, evidence: String },
    /// `modules_to_save`: full copies of base modules, which batos does not serve.
    ModulesToSave { modules: Vec<String> },
    /// DoRA (`use_dora`), which needs a magnitude vector per module.
    Dora,
    /// Trained biases (`bias` other than `none`, or `lora_bias`).
    Bias { field: &'static str, value: String },
    /// A PEFT feature that changes the computation and that batos does not implement.
    UnsupportedFeature { field: String, value: String },
    /// `target_modules` names a module that is not one of the seven projections.
    UnsupportedTarget { module: String },
    /// A module's rank exceeds `max_rank`.
    RankTooLarge {
        module: String,
        rank: usize,
        max: usize,
    },
    /// A tensor's shape does not fit the base model.
    ShapeMismatch {
        key: String,
        expected: Vec<usize>,
        got: Vec<usize>,
    },
    /// One half of a pair has no partner.
    MissingPair { module: String, missing: PairHalf },
    /// A tensor key batos does not recognise.
    UnknownKey { key: String },
    /// A LoRA pair for a module the config does not target.
    UntargetedWeights { key: String },
    /// A target module of the config has no weights in any layer.
    TargetWithoutWeights { module: String },
    /// A layer index beyond the base model's layers.
    LayerOutOfRange {
        key: String,
        layer: usize,
        num_layers: usize,
    },
    /// NaN or infinite values.
    NonFinite { key: String, count: usize },
    /// A tensor in a dtype other than f32/f16/bf16.
    UnsupportedDType { key: String, dtype: String },
    /// The safetensors file is truncated or malformed.
    WeightsMalformed { reason: String },
    /// The adapter contains no LoRA pair at all.
    NoWeights,
    /// The adapter was trained for another base model.
    BaseModelMismatch { adapter: String, base: String },
}

impl fmt::Display for AuditProblem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        use AuditProblem::*;
        match self {
            MissingFile { file } => write!(f, "missing file {file}"),
            FileTooLarge { file, bytes, limit } => {
                write!(f, "{file} is {bytes} bytes, above the limit of {limit}")
            }
            ConfigMalformed { field, reason } => {
                write!(f, "adapter_config.json field {field}: {reason}")
            }
            NotLora { peft_type } => write!(f, "peft_type is {peft_type}, not LORA"),
            TargetsEmbeddingOrHead { module, evidence } => {
                write!(
                    f,
                    "targets {module} ({evidence}); embeddings and the output head are not served"
                )
            }
            ModulesToSave { modules } => write!(
                f,
                "modules_to_save [{}] (full module copies) is not supported",
                modules.join(", ")
            ),
            Dora => f.write_str("DoRA (use_dora) is not supported"),
            Bias { field, value } => {
                write!(f, "{field} = {value}: trained biases are not supported")
            }
            UnsupportedFeature { field, value } => {
                write!(f, "{field} = {value} is not supported")
            }
            UnsupportedTarget { module } => {
                write!(
                    f,
                    "target module {module} is not one of q/k/v/o/gate/up/down_proj"
                )
            }
            RankTooLarge { module, rank, max } => {
                write!(f, "{module} has rank {rank}, above the maximum {max}")
            }
            ShapeMismatch { key, expected, got } => {
                write!(
                    f,
                    "{key} has shape {got:?}, the base model needs {expected:?}"
                )
            }
            MissingPair { module, missing } => write!(f, "{module} has no {missing} tensor"),
            UnknownKey { key } => write!(f, "unknown tensor {key}"),
            UntargetedWeights { key } => {
                write!(f, "{key} adapts a module that target_modules does not name")
            }
            TargetWithoutWeights { module } => {
                write!(f, "target module {module} has no weights in any layer")
            }
            LayerOutOfRange {
                key,
                layer,
                num_layers,
            } => write!(
                f,
                "{key}: layer {layer} but the base model has {num_layers} layers"
            ),
            NonFinite { key, count } => write!(f, "{key} has {count} non-finite values"),
            UnsupportedDType { key, dtype } => {
                write!(f, "{key} is {dtype}; only F32, F16 and BF16 are supported")
            }
            WeightsMalformed { reason } => {
                write!(f, "adapter_model.safetensors is malformed: {reason}")
            }
            NoWeights => f.write_str("no LoRA weights found"),
            BaseModelMismatch { adapter, base } => write!(
                f,
                "trained for base model '{adapter}', but the base model is '{base}'"
            ),
        }
    }
}

/// Everything the audit found. An adapter is accepted only when `problems` is empty;
/// `warnings` never reject.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct AuditReport {
    pub problems: Vec<AuditProblem>,
    pub warnings: Vec<String>,
}

impl AuditReport {
    /// Whether nothing rejects the adapter.
    pub fn is_clean(&self) -> bool {
        self.problems.is_empty()
    }

    /// Whether some problem's text mentions `needle` (for tests and log filters).
    pub fn mentions(&self, needle: &str) -> bool {
        self.problems.iter().any(|p| p.to_string().contains(needle))
    }
}

impl fmt::Display for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} problem(s)", self.problems.len())?;
        for (i, p) in self.problems.iter().enumerate() {
            write!(f, "{}{p}", if i == 0 { ": " } else { "; " })?;
        }
        Ok(())
    }
}

/// The two files of a PEFT adapter, as bytes; `None` where a file was absent or too
/// large to read (the reason is in `problems`).
#[derive(Debug, Default)]
pub struct AdapterFiles {
    pub config: Option<Vec<u8>>,
    pub weights: Option<Vec<u8>>,
    problems: Vec<AuditProblem>,
}

impl AdapterFiles {
    /// In-memory files (e.g. from the living image).
    pub fn from_bytes(config: Vec<u8>, weights: Vec<u8>) -> Self {
        AdapterFiles {
            config: Some(config),
            weights: Some(weights),
            problems: Vec::new(),
        }
    }

    /// Reads a PEFT directory, refusing to read files above the policy's limits (the
    /// size is checked before reading, and reading stops at the limit in case the file
    /// grows meanwhile).
    pub fn read_dir(dir: &Path, policy: &AuditPolicy) -> Result<Self> {
        let meta = std::fs::metadata(dir).map_err(|source| LoraError::Io {
            op: "reading adapter directory",
            path: dir.to_path_buf(),
            source,
        })?;
        if !meta.is_dir() {
            return Err(LoraError::Io {
                op: "reading adapter directory",
                path: dir.to_path_buf(),
                source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        let mut out = AdapterFiles::default();
        out.config = read_limited(dir, CONFIG_FILE, policy.max_config_bytes, &mut out.problems)?;
        out.weights = read_limited(
            dir,
            WEIGHTS_FILE,
            policy.max_weights_bytes,
            &mut out.problems,
        )?;
        if out.weights.is_none() && dir.join("adapter_model.bin").exists() {
            out.problems.push(AuditProblem::UnsupportedFeature {
                field: "adapter_model.bin".into(),
                value: "pickle weights; convert to safetensors".into(),
            });
        }
        Ok(out)
    }
}

fn read_limited(
    dir: &Path,
    file: &str,
    limit: u64,
    problems: &mut Vec<AuditProblem>,
) -> Result<Option<Vec<u8>>> {
    let path = dir.join(file);
    let io = |source| LoraError::Io {
        op: "reading",
        path: path.clone(),
        source,
    };
    let f = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            problems.push(AuditProblem::MissingFile { file: file.into() });
            return Ok(None);
        }
        Err(e) => return Err(io(e)),
    };
    let len = f.metadata().map_err(io)?.len();
    if len > limit {
        problems.push(AuditProblem::FileTooLarge {
            file: file.into(),
            bytes: len,
            limit,
        });
        return Ok(None);
    }
    let mut buf = Vec::with_capacity(len as usize);
    f.take(limit + 1).read_to_end(&mut buf).map_err(io)?;
    if buf.len() as u64 > limit {
        problems.push(AuditProblem::FileTooLarge {
            file: file.into(),
            bytes: buf.len() as u64,
            limit,
        });
        return Ok(None);
    }
    Ok(Some(buf))
}

/// What a safetensors key names.
enum KeyKind {
    Pair {
        layer: usize,
        proj: Projection,
        half: PairHalf,
    },
    EmbedOrHead(&'static str),
    Dora,
    Bias,
    Unknown,
}

fn classify(key: &str) -> KeyKind {
    let Some(rest) = key.strip_prefix("base_model.model.") else {
        return KeyKind::Unknown;
    };
    for m in EMBED_OR_HEAD {
        if rest.split('.').any(|seg| seg == m) {
            return KeyKind::EmbedOrHead(m);
        }
    }
    if rest.contains(".lora_magnitude_vector") {
        return KeyKind::Dora;
    }
    let (module, half) = if let Some(m) = rest.strip_suffix(".lora_A.weight") {
        (m, PairHalf::A)
    } else if let Some(m) = rest.strip_suffix(".lora_B.weight") {
        (m, PairHalf::B)
    } else if rest.ends_with(".bias") {
        return KeyKind::Bias;
    } else {
        return KeyKind::Unknown;
    };
    match parse_module(module) {
        Some((layer, proj)) => KeyKind::Pair { layer, proj, half },
        None => KeyKind::Unknown,
    }
}

/// `model.layers.{i}.{self_attn|mlp}.{proj}` → (i, proj).
fn parse_module(path: &str) -> Option<(usize, Projection)> {
    let mut it = path.split('.');
    let (m, l, i, parent, name) = (it.next()?, it.next()?, it.next()?, it.next()?, it.next()?);
    if it.next().is_some() || m != "model" || l != "layers" {
        return None;
    }
    let layer = i.parse().ok()?;
    let proj = Projection::from_module_name(name)?;
    (proj.parent() == parent).then_some((layer, proj))
}

fn last_segment(s: &str) -> String {
    s.trim_end_matches('/')
        .rsplit(['/', '\\'])
        .next()
        .unwrap_or(s)
        .to_ascii_lowercase()
}

/// Decodes an f32/f16/bf16 little-endian tensor to f32, counting non-finite values
/// in the same pass.
fn decode(dtype: Dtype, data: &[u8]) -> Option<(Vec<f32>, usize)> {
    let mut bad = 0usize;
    let mut check = |v: f32| {
        bad += usize::from(!v.is_finite());
        v
    };
    let values: Vec<f32> = match dtype {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|c| check(f32::from_le_bytes([c[0], c[1], c[2], c[3]])))
            .collect(),
        Dtype::F16 => data
            .chunks_exact(2)
            .map(|c| check(half::f16::from_le_bytes([c[0], c[1]]).to_f32()))
            .collect(),
        Dtype::BF16 => data
            .chunks_exact(2)
            .map(|c| check(half::bf16::from_le_bytes([c[0], c[1]]).to_f32()))
            .collect(),
        _ => return None,
    };
    Some((values, bad))
}

struct HalfTensor {
    key: String,
    shape: Vec<usize>,
    values: Vec<f32>,
}

/// Audits an adapter's files against `base` and `policy`. On success returns the
/// decoded adapter; otherwise a report with every problem found.
pub fn audit(
    files: &AdapterFiles,
    base: &BaseShapes,
    policy: &AuditPolicy,
) -> std::result::Result<(LoraAdapter, AuditReport), AuditReport> {
    let (config, weights, report) = audit_parts(files, base, policy)?;
    Ok((LoraAdapter::new(config, weights), report))
}

/// The audit without the generation hash: for the cold tier, whose blob's content hash
/// the store has already checked against the record.
pub(crate) fn audit_parts(
    files: &AdapterFiles,
    base: &BaseShapes,
    policy: &AuditPolicy,
) -> std::result::Result<(LoraConfig, LoraWeights, AuditReport), AuditReport> {
    let mut problems = files.problems.clone();
    let mut warnings = Vec::new();

    // --- config
    let config = match &files.config {
        Some(c) if c.len() as u64 > policy.max_config_bytes => {
            problems.push(AuditProblem::FileTooLarge {
                file: CONFIG_FILE.into(),
                bytes: c.len() as u64,
                limit: policy.max_config_bytes,
            });
            None
        }
        Some(c) => config::parse(c, &mut problems),
        None => None,
    };
    let matcher = config
        .as_ref()
        .map(|c| ConfigMatcher::new(c, &mut problems));
    if let Some(c) = &config {
        check_config(c, base, policy, &mut problems, &mut warnings);
    }

    // --- weights
    let mut halves: BTreeMap<(usize, Projection), [Option<HalfTensor>; 2]> = BTreeMap::new();
    // Modules with a half in an unsupported dtype: already reported, not "missing".
    let mut undecodable = std::collections::BTreeSet::new();
    match &files.weights {
        Some(w) if w.len() as u64 > policy.max_weights_bytes => {
            problems.push(AuditProblem::FileTooLarge {
                file: WEIGHTS_FILE.into(),
                bytes: w.len() as u64,
                limit: policy.max_weights_bytes,
            })
        }
        Some(w) => match SafeTensors::deserialize(w) {
            Err(e) => problems.push(AuditProblem::WeightsMalformed {
                reason: e.to_string(),
            }),
            Ok(st) => {
                let mut tensors = st.tensors();
                tensors.sort_by(|a, b| a.0.cmp(&b.0));
                for (key, view) in tensors {
                    match classify(&key) {
                        KeyKind::Unknown => problems.push(AuditProblem::UnknownKey { key }),
                        KeyKind::EmbedOrHead(m) => {
                            if !problems.iter().any(|p| matches!(p, AuditProblem::TargetsEmbeddingOrHead { module, evidence } if module == m && evidence.starts_with("tensor")))
                            {
                                problems.push(AuditProblem::TargetsEmbeddingOrHead {
                                    module: m.into(),
                                    evidence: format!("tensor {key}"),
                                });
                            }
                        }
                        KeyKind::Dora => {
                            if !problems.contains(&AuditProblem::Dora) {
                                problems.push(AuditProblem::Dora);
                            }
                        }
                        KeyKind::Bias => problems.push(AuditProblem::Bias {
                            field: "tensor",
                            value: key,
                        }),
                        KeyKind::Pair { layer, proj, half } => {
                            let Some((values, bad)) = decode(view.dtype(), view.data()) else {
                                undecodable.insert((layer, proj));
                                problems.push(AuditProblem::UnsupportedDType {
                                    key,
                                    dtype: format!("{:?}", view.dtype()),
                                });
                                continue;
                            };
                            if bad > 0 {
                                problems.push(AuditProblem::NonFinite {
                                    key: key.clone(),
                                    count: bad,
                                });
                            }
                            let slot = &mut halves.entry((layer, proj)).or_default()
                                [half as usize];
                            *slot = Some(HalfTensor {
                                key,
                                shape: view.shape().to_vec(),
                                values,
                            });
                        }
                    }
                }
            }
        },
        None => {}
    }

    // --- pairs against the base and the config
    let mut weights = LoraWeights::empty(base.num_layers);
    let mut over_rank: Vec<(String, usize)> = Vec::new();
    for (&(layer, proj), [a, b]) in &mut halves {
        let path = proj.module_path(layer);
        if layer >= base.num_layers {
            let key = a
                .as_ref()
                .or(b.as_ref())
                .map_or(path.clone(), |h| h.key.clone());
            problems.push(AuditProblem::LayerOutOfRange {
                key,
                layer,
                num_layers: base.num_layers,
            });
            continue;
        }
        if let Some(m) = &matcher {
            if !m.targets(&path, Some(layer)) {
                let key = a
                    .as_ref()
                    .or(b.as_ref())
                    .map_or(path.clone(), |h| h.key.clone());
                problems.push(AuditProblem::UntargetedWeights { key });
            }
        }
        let (a, b) = match (a.take(), b.take()) {
            (Some(a), Some(b)) => (a, b),
            (a, _) => {
                if !undecodable.contains(&(layer, proj)) {
                    problems.push(AuditProblem::MissingPair {
                        module: path,
                        missing: if a.is_none() {
                            PairHalf::A
                        } else {
                            PairHalf::B
                        },
                    });
                }
                continue;
            }
        };
        let (n_in, n_out) = base.dims(proj);
        // The config's rank for this module when there is a config, else A's rows.
        let rank = matcher
            .as_ref()
            .map_or(a.shape.first().copied().unwrap_or(0), |m| {
                m.rank(&path) as usize
            });
        let mut ok = true;
        for (h, expected) in [(&a, vec![rank, n_in]), (&b, vec![n_out, rank])] {
            if h.shape != expected {
                problems.push(AuditProblem::ShapeMismatch {
                    key: h.key.clone(),
                    expected,
                    got: h.shape.clone(),
                });
                ok = false;
            }
        }
        if rank > policy.max_rank {
            over_rank.push((path.clone(), rank));
            ok = false;
        }
        if ok {
            let scale = matcher.as_ref().map_or(1.0, |m| m.scale(&path));
            weights.set(
                layer,
                proj,
                LoraPair {
                    rank,
                    scale,
                    a: a.values,
                    b: b.values,
                },
            );
        }
    }
    // One problem per distinct rank (30 layers × 7 projections would drown the report).
    let mut seen = std::collections::BTreeSet::new();
    for (module, rank) in over_rank {
        if seen.insert(rank)
            && !problems
                .iter()
                .any(|p| matches!(p, AuditProblem::RankTooLarge { rank: r, .. } if *r == rank))
        {
            problems.push(AuditProblem::RankTooLarge {
                module,
                rank,
                max: policy.max_rank,
            });
        }
    }

    if files.weights.is_some()
        && halves.is_empty()
        && !problems.iter().any(|p| {
            matches!(
                p,
                AuditProblem::WeightsMalformed { .. } | AuditProblem::FileTooLarge { .. }
            )
        })
    {
        problems.push(AuditProblem::NoWeights);
    }
    if let Some(config::TargetModules::Names(names)) = config.as_ref().map(|c| &c.target_modules) {
        for n in names {
            let leaf = n.rsplit('.').next().unwrap_or(n);
            if let Some(p) = Projection::from_module_name(leaf) {
                if !halves.keys().any(|&(_, q)| q == p) && !halves.is_empty() {
                    problems.push(AuditProblem::TargetWithoutWeights { module: n.clone() });
                }
            }
        }
    }

    let report = AuditReport { problems, warnings };
    match config {
        Some(config) if report.is_clean() => Ok((config, weights, report)),
        _ => {
            let mut report = report;
            if report.problems.is_empty() {
                // Unreachable in practice: a missing config always records a problem.
                report.problems.push(AuditProblem::MissingFile {
                    file: CONFIG_FILE.into(),
                });
            }
            Err(report)
        }
    }
}

fn check_config(
    c: &LoraConfig,
    base: &BaseShapes,
    policy: &AuditPolicy,
    problems: &mut Vec<AuditProblem>,
    warnings: &mut Vec<String>,
) {
    if c.r as usize > policy.max_rank {
        problems.push(AuditProblem::RankTooLarge {
            module: "r (default rank)".into(),
            rank: c.r as usize,
            max: policy.max_rank,
        });
    }
    for (k, r) in &c.rank_pattern {
        if *r as usize > policy.max_rank {
            problems.push(AuditProblem::RankTooLarge {
                module: format!("rank_pattern '{k}'"),
                rank: *r as usize,
                max: policy.max_rank,
            });
        }
    }
    if c.fan_in_fan_out {
        warnings.push("fan_in_fan_out is set, but Llama projections are nn.Linear; ignored".into());
    }
    if let Some(only) = &c.layers_to_transform {
        if let Some(l) = only.iter().find(|&&l| l >= base.num_layers) {
            problems.push(AuditProblem::LayerOutOfRange {
                key: "layers_to_transform".into(),
                layer: *l,
                num_layers: base.num_layers,
            });
        }
    }
    match (&c.base_model_name_or_path, policy.base_model) {
        (_, BaseModelCheck::Ignore) => {}
        (None, _) => warnings.push("adapter does not name its base model".into()),
        (Some(name), check) => {
            if last_segment(name) != last_segment(&base.model_name) {
                let p = AuditProblem::BaseModelMismatch {
                    adapter: name.clone(),
                    base: base.model_name.clone(),
                };
                if check == BaseModelCheck::Require {
                    problems.push(p);
                } else {
                    warnings.push(p.to_string());
                }
            }
        }
    }
}

/// Reads and audits a PEFT directory; `name` is used in the error.
pub fn audit_dir(
    name: &str,
    dir: &Path,
    base: &BaseShapes,
    policy: &AuditPolicy,
) -> Result<(LoraAdapter, AuditReport)> {
    let files = AdapterFiles::read_dir(dir, policy)?;
    audit(&files, base, policy).map_err(|report| LoraError::Rejected {
        name: name.into(),
        report,
    })
}
