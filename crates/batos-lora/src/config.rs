//! `adapter_config.json`: PEFT's LoRA configuration, parsed leniently so that the audit
//! can report every problem instead of stopping at the first.

use crate::audit::AuditProblem;
use serde::de::{Deserializer, MapAccess, Visitor};
use serde::Deserialize;
use serde_json::Value;
use std::fmt;

/// Which modules a PEFT config adapts.
#[derive(Clone, Debug, PartialEq)]
pub enum TargetModules {
    /// A list of names; a module matches when its path equals a name or ends in
    /// `.name` (PEFT's rule).
    Names(Vec<String>),
    /// A regular expression that must match a module's whole path (PEFT's rule for a
    /// string `target_modules`).
    Regex(String),
    /// PEFT's `"all-linear"`: every linear layer but the output head.
    AllLinear,
}

/// A validated LoRA configuration: the fields that change what the adapter computes.
///
/// Cosmetic fields (`peft_version`, `inference_mode`, `lora_dropout`, …) are ignored;
/// fields whose semantics batos does not implement are audit problems, not ignored.
#[derive(Clone, Debug, PartialEq)]
pub struct LoraConfig {
    /// Default rank.
    pub r: u32,
    /// Default alpha.
    pub lora_alpha: f64,
    /// rsLoRA: scale = alpha / sqrt(r) instead of alpha / r.
    pub use_rslora: bool,
    pub target_modules: TargetModules,
    /// Per-module rank overrides, in file order (the first matching key wins, as PEFT).
    pub rank_pattern: Vec<(String, u32)>,
    /// Per-module alpha overrides, in file order.
    pub alpha_pattern: Vec<(String, f64)>,
    /// Only these layers are adapted, when set.
    pub layers_to_transform: Option<Vec<usize>>,
    pub base_model_name_or_path: Option<String>,
    /// Meaningless for Llama's `nn.Linear` projections; kept to warn about it.
    pub fan_in_fan_out: bool,
}

/// A compiled view of a config, for matching module paths.
pub(crate) struct ConfigMatcher<'c> {
    config: &'c LoraConfig,
    target_regex: Option<regex::Regex>,
    rank_res: Vec<(regex::Regex, u32)>,
    alpha_res: Vec<(regex::Regex, f64)>,
}

fn pattern_regex(key: &str) -> Result<regex::Regex, regex::Error> {
    // PEFT: re.match(rf"(.*\.)?({key})$", module_path).
    regex::Regex::new(&format!(r"^(?:.*\.)?(?:{key})$"))
}

impl<'c> ConfigMatcher<'c> {
    pub(crate) fn new(config: &'c LoraConfig, problems: &mut Vec<AuditProblem>) -> Self {
        let target_regex = match &config.target_modules {
            TargetModules::Regex(re) => match regex::Regex::new(&format!("^(?:{re})$")) {
                Ok(r) => Some(r),
                Err(e) => {
                    problems.push(AuditProblem::ConfigMalformed {
                        field: "target_modules".into(),
                        reason: format!("invalid regular expression: {e}"),
                    });
                    None
                }
            },
            _ => None,
        };
        let mut compile = |field: &str, key: &str| match pattern_regex(key) {
            Ok(r) => Some(r),
            Err(e) => {
                problems.push(AuditProblem::ConfigMalformed {
                    field: field.into(),
                    reason: format!("key '{key}' is not a valid pattern: {e}"),
                });
                None
            }
        };
        let rank_res = config
            .rank_pattern
            .iter()
            .filter_map(|(k, v)| compile("rank_pattern", k).map(|r| (r, *v)))
            .collect();
        let alpha_res = config
            .alpha_pattern
            .iter()
            .filter_map(|(k, v)| compile("alpha_pattern", k).map(|r| (r, *v)))
            .collect();
        ConfigMatcher {
            config,
            target_regex,
            rank_res,
            alpha_res,
        }
    }

    /// Whether the module at `path` (e.g. `model.layers.3.mlp.up_proj`) is targeted.
    /// `layer` is its decoder layer, if it is inside one.
    pub(crate) fn targets(&self, path: &str, layer: Option<usize>) -> bool {
        if let (Some(only), Some(l)) = (&self.config.layers_to_transform, layer) {
            if !only.contains(&l) {
                return false;
            }
        }
        match &self.config.target_modules {
            TargetModules::Names(names) => names
                .iter()
                .any(|n| path == n || path.ends_with(&format!(".{n}"))),
            TargetModules::Regex(_) => self.target_regex.as_ref().is_some_and(|r| r.is_match(path)),
            TargetModules::AllLinear => layer.is_some(),
        }
    }

    /// The rank the config declares for the module at `path`.
    pub(crate) fn rank(&self, path: &str) -> u32 {
        self.rank_res
            .iter()
            .find(|(r, _)| r.is_match(path))
            .map_or(self.config.r, |(_, v)| *v)
    }

    /// The alpha the config declares for the module at `path`.
    pub(crate) fn alpha(&self, path: &str) -> f64 {
        self.alpha_res
            .iter()
            .find(|(r, _)| r.is_match(path))
            .map_or(self.config.lora_alpha, |(_, v)| *v)
    }

    /// `alpha / r`, or `alpha / sqrt(r)` with rsLoRA, for the module at `path`.
    pub(crate) fn scale(&self, path: &str) -> f32 {
        let (r, alpha) = (self.rank(path) as f64, self.alpha(path));
        let s = if self.config.use_rslora {
            alpha / r.sqrt()
        } else {
            alpha / r
        };
        s as f32
    }
}

/// Map entries in file order (serde_json's default map is sorted; PEFT's pattern
/// precedence is the first match in file order).
#[derive(Debug, Default)]
struct Ordered<T>(Vec<(String, T)>);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Ordered<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Ordered<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_unit<E>(self) -> Result<Self::Value, E> {
                Ok(Ordered(Vec::new()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut m: A) -> Result<Self::Value, A::Error> {
                let mut out = Vec::new();
                while let Some((k, v)) = m.next_entry::<String, T>()? {
                    out.push((k, v));
                }
                Ok(Ordered(out))
            }
        }
        d.deserialize_any(V(std::marker::PhantomData))
    }
}

#[derive(Deserialize)]
struct Patterns {
    #[serde(default)]
    rank_pattern: Option<Ordered<Value>>,
    #[serde(default)]
    alpha_pattern: Option<Ordered<Value>>,
}

/// Fields whose presence (with a non-empty, non-false value) means a feature batos
/// does not implement.
const UNSUPPORTED: [&str; 7] = [
    "layer_replication",
    "alora_invocation_tokens",
    "target_parameters",
    "exclude_modules",
    "use_qalora",
    "layers_pattern",
    "megatron_config",
];

/// Embedding or output-head modules an adapter must not touch.
pub(crate) const EMBED_OR_HEAD: [&str; 2] = ["embed_tokens", "lm_head"];

fn is_set(v: &Value) -> bool {
    match v {
        Value::Null => false,
        Value::Bool(b) => *b,
        Value::String(s) => !s.is_empty(),
        Value::Array(a) => !a.is_empty(),
        Value::Object(o) => !o.is_empty(),
        Value::Number(_) => true,
    }
}

/// Parses `adapter_config.json`, pushing every problem found; returns a config when
/// the fields needed to go on (rank, alpha, targets) could be read.
pub(crate) fn parse(bytes: &[u8], problems: &mut Vec<AuditProblem>) -> Option<LoraConfig> {
    let malformed = |field: &str, reason: String| AuditProblem::ConfigMalformed {
        field: field.into(),
        reason,
    };
    let doc: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => {
            problems.push(malformed("(document)", format!("not valid JSON: {e}")));
            return None;
        }
    };
    let Some(obj) = doc.as_object() else {
        problems.push(malformed("(document)", "not a JSON object".into()));
        return None;
    };
    let get = |k: &str| obj.get(k).filter(|v| !v.is_null());

    if let Some(t) = get("peft_type") {
        if t.as_str() != Some("LORA") {
            problems.push(AuditProblem::NotLora {
                peft_type: t.to_string(),
            });
        }
    }

    let r = match get("r").map(|v| v.as_u64()) {
        Some(Some(r)) if r > 0 && r <= u32::MAX as u64 => Some(r as u32),
        Some(_) => {
            problems.push(malformed(
                "r",
                format!("expected a positive integer, got {}", obj["r"]),
            ));
            None
        }
        None => {
            problems.push(malformed("r", "missing".into()));
            None
        }
    };
    let lora_alpha = match get("lora_alpha").map(|v| v.as_f64()) {
        Some(Some(a)) if a.is_finite() => Some(a),
        Some(_) => {
            problems.push(malformed(
                "lora_alpha",
                format!("expected a finite number, got {}", obj["lora_alpha"]),
            ));
            None
        }
        // PEFT's default.
        None => Some(8.0),
    };
    let flag = |k: &str, problems: &mut Vec<AuditProblem>| match get(k) {
        None => false,
        Some(Value::Bool(b)) => *b,
        Some(v) => {
            problems.push(malformed(k, format!("expected true or false, got {v}")));
            false
        }
    };
    let use_rslora = flag("use_rslora", problems);
    let fan_in_fan_out = flag("fan_in_fan_out", problems);
    if flag("use_dora", problems) {
        problems.push(AuditProblem::Dora);
    }
    if let Some(b) = get("bias") {
        if b.as_str() != Some("none") {
            problems.push(AuditProblem::Bias {
                field: "bias",
                value: b.to_string(),
            });
        }
    }
    if flag("lora_bias", problems) {
        problems.push(AuditProblem::Bias {
            field: "lora_bias",
            value: "true".into(),
        });
    }
    if let Some(m) = get("modules_to_save") {
        if is_set(m) {
            let modules = match m {
                Value::Array(a) => a
                    .iter()
                    .map(|v| v.as_str().map_or_else(|| v.to_string(), str::to_string))
                    .collect(),
                other => vec![other.to_string()],
            };
            problems.push(AuditProblem::ModulesToSave { modules });
        }
    }
    if let Some(v) = get("trainable_token_indices") {
        if is_set(v) {
            problems.push(AuditProblem::TargetsEmbeddingOrHead {
                module: "embed_tokens".into(),
                evidence: "trainable_token_indices in adapter_config.json".into(),
            });
        }
    }
    for field in UNSUPPORTED {
        if let Some(v) = get(field) {
            if is_set(v) {
                problems.push(AuditProblem::UnsupportedFeature {
                    field: field.into(),
                    value: v.to_string(),
                });
            }
        }
    }

    let target_modules = match get("target_modules") {
        Some(Value::String(s)) if s == "all-linear" => Some(TargetModules::AllLinear),
        Some(Value::String(s)) => {
            for m in EMBED_OR_HEAD {
                let path = if m == "lm_head" {
                    "lm_head".to_string()
                } else {
                    format!("model.{m}")
                };
                if regex::Regex::new(&format!("^(?:{s})$")).is_ok_and(|r| r.is_match(&path)) {
                    problems.push(AuditProblem::TargetsEmbeddingOrHead {
                        module: m.into(),
                        evidence: format!("target_modules regex '{s}' matches '{path}'"),
                    });
                }
            }
            Some(TargetModules::Regex(s.clone()))
        }
        Some(Value::Array(a)) => {
            let mut names = Vec::new();
            for v in a {
                match v.as_str() {
                    Some(n) => names.push(n.to_string()),
                    None => problems.push(malformed(
                        "target_modules",
                        format!("entry {v} is not a string"),
                    )),
                }
            }
            for n in &names {
                let leaf = n.rsplit('.').next().unwrap_or(n);
                if EMBED_OR_HEAD.contains(&leaf) {
                    problems.push(AuditProblem::TargetsEmbeddingOrHead {
                        module: leaf.into(),
                        evidence: "listed in target_modules".into(),
                    });
                } else if crate::Projection::from_module_name(leaf).is_none() {
                    problems.push(AuditProblem::UnsupportedTarget { module: n.clone() });
                }
            }
            Some(TargetModules::Names(names))
        }
        Some(v) => {
            problems.push(malformed(
                "target_modules",
                format!("expected a list or a string, got {v}"),
            ));
            None
        }
        None => {
            problems.push(malformed("target_modules", "missing".into()));
            None
        }
    };

    let layers_to_transform = match get("layers_to_transform") {
        None => None,
        Some(Value::Number(n)) => n.as_u64().map(|l| vec![l as usize]),
        Some(Value::Array(a)) => Some(
            a.iter()
                .filter_map(|v| {
                    let l = v.as_u64();
                    if l.is_none() {
                        problems.push(malformed(
                            "layers_to_transform",
                            format!("entry {v} is not a layer index"),
                        ));
                    }
                    l.map(|l| l as usize)
                })
                .collect(),
        ),
        Some(v) => {
            problems.push(malformed(
                "layers_to_transform",
                format!("expected a layer index or a list, got {v}"),
            ));
            None
        }
    };

    let (mut rank_pattern, mut alpha_pattern) = (Vec::new(), Vec::new());
    match serde_json::from_slice::<Patterns>(bytes) {
        Ok(p) => {
            for (k, v) in p.rank_pattern.unwrap_or_default().0 {
                match v.as_u64() {
                    Some(r) if r > 0 && r <= u32::MAX as u64 => rank_pattern.push((k, r as u32)),
                    _ => problems.push(malformed(
                        "rank_pattern",
                        format!("'{k}': expected a positive integer, got {v}"),
                    )),
                }
            }
            for (k, v) in p.alpha_pattern.unwrap_or_default().0 {
                match v.as_f64() {
                    Some(a) if a.is_finite() => alpha_pattern.push((k, a)),
                    _ => problems.push(malformed(
                        "alpha_pattern",
                        format!("'{k}': expected a finite number, got {v}"),
                    )),
                }
            }
        }
        Err(e) => problems.push(malformed("rank_pattern/alpha_pattern", e.to_string())),
    }

    let base_model_name_or_path = match get("base_model_name_or_path") {
        None => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            problems.push(malformed(
                "base_model_name_or_path",
                format!("expected a string, got {v}"),
            ));
            None
        }
    };

    Some(LoraConfig {
        r: r?,
        lora_alpha: lora_alpha?,
        use_rslora,
        target_modules: target_modules?,
        rank_pattern,
        alpha_pattern,
        layers_to_transform,
        base_model_name_or_path,
        fan_in_fan_out,
    })
}

impl LoraConfig {
    /// A canonical, order-independent byte encoding of the fields that change what
    /// the adapter computes; part of the generation hash.
    pub fn canonical_bytes(&self) -> Vec<u8> {
        let targets = match &self.target_modules {
            TargetModules::Names(n) => {
                let mut n = n.clone();
                n.sort();
                n.dedup();
                serde_json::json!({ "names": n })
            }
            TargetModules::Regex(r) => serde_json::json!({ "regex": r }),
            TargetModules::AllLinear => serde_json::json!("all-linear"),
        };
        let mut layers = self.layers_to_transform.clone();
        if let Some(l) = &mut layers {
            l.sort_unstable();
            l.dedup();
        }
        // serde_json::Value objects serialise with sorted keys here: deterministic.
        let v = serde_json::json!({
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "target_modules": targets,
            "rank_pattern": self.rank_pattern,
            "alpha_pattern": self.alpha_pattern,
            "layers_to_transform": layers,
            "base_model_name_or_path": self.base_model_name_or_path,
        });
        serde_json::to_vec(&v).unwrap_or_default()
    }

    /// A minimal PEFT `adapter_config.json` for this config (used when materialising
    /// an adapter to a directory).
    pub fn to_peft_json(&self) -> serde_json::Value {
        let targets = match &self.target_modules {
            TargetModules::Names(n) => serde_json::json!(n),
            TargetModules::Regex(r) => serde_json::json!(r),
            TargetModules::AllLinear => serde_json::json!("all-linear"),
        };
        let obj = |pairs: serde_json::Map<String, Value>| Value::Object(pairs);
        serde_json::json!({
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.r,
            "lora_alpha": self.lora_alpha,
            "use_rslora": self.use_rslora,
            "target_modules": targets,
            "rank_pattern": obj(self.rank_pattern.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect()),
            "alpha_pattern": obj(self.alpha_pattern.iter().map(|(k, v)| (k.clone(), serde_json::json!(v))).collect()),
            "layers_to_transform": self.layers_to_transform,
            "base_model_name_or_path": self.base_model_name_or_path,
            "fan_in_fan_out": self.fan_in_fan_out,
            "bias": "none",
            "use_dora": false,
            "modules_to_save": null,
            "lora_dropout": 0.0,
            "inference_mode": true,
        })
    }
}
