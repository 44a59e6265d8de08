//! The server's configuration: a plain struct read from TOML (every field optional,
//! unknown fields refused) and overridden by flags, then checked once by
//! [`ServerConfig::validate`] into the [`Settings`] the server runs with.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use batos_kernels::Device;
use batos_lora::{BaseModelCheck, HotFormat};
use batos_model::forward::WeightDType;
use serde::{Deserialize, Serialize};

use crate::error::{Result, ServerError};

/// Which adapters already in the living image are served from startup.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageAdapters {
    /// Every adapter stored in the image is listed and servable at once (vLLM's
    /// `--lora-modules` with the image as the list).
    #[default]
    All,
    /// None: adapters are served once `/v1/load_lora_adapter` names them.
    None,
}

/// Element type of the runtime weights.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WeightsSetting {
    /// 32-bit floats.
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl WeightsSetting {
    /// The model crate's dtype.
    pub fn weight_dtype(self) -> WeightDType {
        match self {
            WeightsSetting::F32 => WeightDType::F32,
            WeightsSetting::F16 => WeightDType::F16,
            WeightsSetting::Bf16 => WeightDType::BF16,
        }
    }
}

impl FromStr for WeightsSetting {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(WeightsSetting::F32),
            "f16" => Ok(WeightsSetting::F16),
            "bf16" => Ok(WeightsSetting::Bf16),
            other => Err(format!("unknown weights dtype '{other}' (f32, f16, bf16)")),
        }
    }
}

/// Element type of the hot adapter slots (vLLM's `--lora-dtype`): what the batched
/// LoRA kernels read. Activations and accumulation stay f32.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LoraDTypeSetting {
    /// 32-bit floats: the decoded adapter as it is.
    F32,
    /// IEEE half: half the bytes, within f32's tolerance of the PEFT reference.
    #[default]
    F16,
    /// bfloat16: half the bytes, 8 significant bits.
    Bf16,
    /// Symmetric int8 per rank row: a quarter of f32's bytes, the integer-dot kernels
    /// where the CPU has AVX-512 VNNI (the fastest decode over many distinct adapters
    /// on the CPU; logits within 5·10⁻² of the reference, see `docs/perf/lora.md`).
    Int8,
}

impl LoraDTypeSetting {
    /// The adapter manager's hot format.
    pub fn hot_format(self) -> HotFormat {
        match self {
            LoraDTypeSetting::F32 => HotFormat::F32,
            LoraDTypeSetting::F16 => HotFormat::F16,
            LoraDTypeSetting::Bf16 => HotFormat::BF16,
            LoraDTypeSetting::Int8 => HotFormat::I8,
        }
    }
}

impl FromStr for LoraDTypeSetting {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "f32" => Ok(LoraDTypeSetting::F32),
            "f16" => Ok(LoraDTypeSetting::F16),
            "bf16" => Ok(LoraDTypeSetting::Bf16),
            "int8" => Ok(LoraDTypeSetting::Int8),
            other => Err(format!(
                "unknown adapter dtype '{other}' (f32, f16, bf16, int8)"
            )),
        }
    }
}

/// Where the kernels run: `"cpu"`, `"cuda"` (device 0) or `"cuda:N"`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum DeviceSetting {
    /// The host CPU.
    #[default]
    Cpu,
    /// An NVIDIA GPU by ordinal (needs the `cuda` feature).
    Cuda(usize),
}

impl DeviceSetting {
    /// The kernels' device.
    pub fn device(self) -> Device {
        match self {
            DeviceSetting::Cpu => Device::Cpu,
            DeviceSetting::Cuda(i) => Device::Cuda(i),
        }
    }
}

impl FromStr for DeviceSetting {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "cpu" => Ok(DeviceSetting::Cpu),
            "cuda" => Ok(DeviceSetting::Cuda(0)),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse().ok())
                .map(DeviceSetting::Cuda)
                .ok_or_else(|| format!("unknown device '{other}' (cpu, cuda, cuda:N)")),
        }
    }
}

impl TryFrom<String> for DeviceSetting {
    type Error = String;

    fn try_from(s: String) -> std::result::Result<Self, String> {
        s.parse()
    }
}

impl From<DeviceSetting> for String {
    fn from(d: DeviceSetting) -> String {
        match d {
            DeviceSetting::Cpu => "cpu".into(),
            DeviceSetting::Cuda(i) => format!("cuda:{i}"),
        }
    }
}

/// How strictly an adapter's `base_model_name_or_path` must match the served model's
/// name.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseNameCheck {
    /// Do not compare.
    Ignore,
    /// Log a mismatch and accept the adapter (its shapes are still checked).
    #[default]
    Warn,
    /// Refuse an adapter made for another base model.
    Require,
}

impl BaseNameCheck {
    pub(crate) fn lora(self) -> BaseModelCheck {
        match self {
            BaseNameCheck::Ignore => BaseModelCheck::Ignore,
            BaseNameCheck::Warn => BaseModelCheck::Warn,
            BaseNameCheck::Require => BaseModelCheck::Require,
        }
    }
}

/// How the engine is built from the living image.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineSettings {
    /// Element type of the runtime weights (default: as stored in the image).
    pub weights: Option<WeightsSetting>,
    /// Where the kernels run.
    pub device: DeviceSetting,
    /// Bytes of the paged KV cache.
    pub kv_cache_bytes: u64,
    /// Tokens per KV block.
    pub block_size: usize,
    /// Requests running at once at most.
    pub max_num_seqs: usize,
    /// New tokens per engine step at most.
    pub max_batch_tokens: usize,
    /// Prompt tokens of one request per step at most.
    pub prefill_chunk: usize,
    /// Hot adapter slots: distinct adapters one step can use (vLLM's `--max-loras`).
    pub max_loras: usize,
    /// Adapters kept decoded in host memory (vLLM's `--max-cpu-loras`, at least
    /// `max_loras`).
    pub max_cpu_loras: usize,
    /// Bytes of decoded adapters kept in host memory.
    pub max_cpu_lora_bytes: u64,
    /// Largest adapter rank accepted (vLLM's `--max-lora-rank`).
    pub max_lora_rank: usize,
    /// Element type of the hot adapter slots (vLLM's `--lora-dtype`).
    pub lora_dtype: LoraDTypeSetting,
    /// How an adapter's declared base model is checked against the served name.
    pub adapter_base_check: BaseNameCheck,
}

impl Default for EngineSettings {
    fn default() -> Self {
        EngineSettings {
            weights: None,
            device: DeviceSetting::Cpu,
            kv_cache_bytes: 512 << 20,
            block_size: 16,
            max_num_seqs: 64,
            max_batch_tokens: 2048,
            prefill_chunk: 512,
            max_loras: 4,
            max_cpu_loras: 32,
            max_cpu_lora_bytes: 2 << 30,
            max_lora_rank: 64,
            lora_dtype: LoraDTypeSetting::F16,
            adapter_base_check: BaseNameCheck::Warn,
        }
    }
}

/// The server's configuration as written (TOML file, then flags). Check it with
/// [`ServerConfig::validate`].
///
/// ```
/// let config: batos_server::ServerConfig = toml::from_str(r#"
///     port = 8080
///     api_key = "sk-inference"
///     enable_lora_loading = true
///     admin_api_key = "sk-admin"
///     lora_dir = "/"
///     [engine]
///     max_loras = 2
/// "#)?;
/// let settings = config.validate()?;
/// assert_eq!(settings.addr().port(), 8080);
/// # Ok::<(), Box<dyn std::error::Error>>(())
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Address to listen on.
    pub host: IpAddr,
    /// Port to listen on (0: any free port; the bound address is logged and printed).
    pub port: u16,
    /// The base model's name in `/v1/models` and the `model` field (default: from the
    /// image's provenance).
    pub served_model_name: Option<String>,
    /// Bearer key required on `/v1/*` inference and listing routes, if set.
    pub api_key: Option<String>,
    /// Register `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`.
    pub enable_lora_loading: bool,
    /// Bearer key the adapter routes require (mandatory when they are enabled).
    pub admin_api_key: Option<String>,
    /// The directory every `lora_path` must resolve into (after symlinks); without it
    /// adapters can be loaded only by name from the image.
    pub lora_dir: Option<PathBuf>,
    /// Which of the image's adapters are served from startup.
    pub image_adapters: ImageAdapters,
    /// Largest request body accepted, in bytes.
    pub max_body_bytes: usize,
    /// Largest `max_tokens` a request may ask for (and the default cap for chat).
    pub max_tokens: usize,
    /// Longest prompt accepted, in tokens (default: the model's context less one).
    pub max_prompt_tokens: Option<usize>,
    /// How the engine is built.
    pub engine: EngineSettings,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            host: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 8000,
            served_model_name: None,
            api_key: None,
            enable_lora_loading: false,
            admin_api_key: None,
            lora_dir: None,
            image_adapters: ImageAdapters::All,
            max_body_bytes: 1 << 20,
            max_tokens: 4096,
            max_prompt_tokens: None,
            engine: EngineSettings::default(),
        }
    }
}

/// Whether the adapter routes exist, and what guards them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LoraUpdates {
    /// The routes are not registered (they answer 404 like any unknown path).
    Disabled,
    /// The routes exist and need the admin key.
    Enabled {
        /// The admin Bearer key.
        admin_api_key: String,
        /// Canonical directory `lora_path`s must resolve into; `None`: loads by image
        /// name only.
        lora_dir: Option<PathBuf>,
    },
}

/// A checked [`ServerConfig`]: what the server runs with.
#[derive(Clone, Debug)]
pub struct Settings {
    pub(crate) addr: SocketAddr,
    pub(crate) served_model_name: Option<String>,
    pub(crate) api_key: Option<String>,
    pub(crate) lora_updates: LoraUpdates,
    pub(crate) image_adapters: ImageAdapters,
    pub(crate) max_body_bytes: usize,
    pub(crate) max_tokens: usize,
    pub(crate) max_prompt_tokens: Option<usize>,
    pub(crate) engine: EngineSettings,
}

impl Settings {
    /// The address to bind.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The engine settings.
    pub fn engine(&self) -> &EngineSettings {
        &self.engine
    }

    /// The configured served model name, if any.
    pub fn served_model_name(&self) -> Option<&str> {
        self.served_model_name.as_deref()
    }

    /// Whether and how adapters can be loaded at run time.
    pub fn lora_updates(&self) -> &LoraUpdates {
        &self.lora_updates
    }
}

fn invalid(field: &'static str, value: impl ToString, reason: impl Into<String>) -> ServerError {
    ServerError::InvalidConfig {
        field,
        value: value.to_string(),
        reason: reason.into(),
    }
}

fn key(field: &'static str, k: &Option<String>) -> Result<Option<String>> {
    match k {
        Some(k) if k.trim().is_empty() => Err(invalid(field, "\"\"", "an API key cannot be empty")),
        Some(k) if k.chars().any(|c| c.is_whitespace() || c.is_control()) => Err(invalid(
            field,
            "<redacted>",
            "an API key cannot contain whitespace or control characters",
        )),
        k => Ok(k.clone()),
    }
}

impl ServerConfig {
    /// Reads a TOML config file.
    pub fn from_file(path: &Path) -> Result<ServerConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| ServerError::ConfigFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| ServerError::ConfigFile {
            path: path.to_path_buf(),
            reason: e.to_string(),
        })
    }

    /// Checks every field and the fields against each other.
    pub fn validate(&self) -> Result<Settings> {
        let e = &self.engine;
        for (field, v) in [
            ("engine.block_size", e.block_size),
            ("engine.max_num_seqs", e.max_num_seqs),
            ("engine.max_batch_tokens", e.max_batch_tokens),
            ("engine.prefill_chunk", e.prefill_chunk),
            ("engine.max_loras", e.max_loras),
            ("engine.max_lora_rank", e.max_lora_rank),
            ("max_tokens", self.max_tokens),
            ("max_body_bytes", self.max_body_bytes),
        ] {
            if v == 0 {
                return Err(invalid(field, v, "must be at least 1"));
            }
        }
        if e.max_cpu_loras < e.max_loras {
            return Err(invalid(
                "engine.max_cpu_loras",
                e.max_cpu_loras,
                format!("must be at least engine.max_loras ({})", e.max_loras),
            ));
        }
        if e.kv_cache_bytes == 0 {
            return Err(invalid("engine.kv_cache_bytes", 0, "must be positive"));
        }
        if self.max_prompt_tokens == Some(0) {
            return Err(invalid("max_prompt_tokens", 0, "must be at least 1"));
        }
        if let Some(name) = &self.served_model_name {
            if name.trim().is_empty() {
                return Err(invalid("served_model_name", "\"\"", "cannot be empty"));
            }
        }
        let api_key = key("api_key", &self.api_key)?;
        let admin = key("admin_api_key", &self.admin_api_key)?;
        let lora_updates = if self.enable_lora_loading {
            let admin_api_key = admin.ok_or_else(|| {
                invalid(
                    "admin_api_key",
                    "none",
                    "enable_lora_loading needs an admin API key: the adapter routes are never open",
                )
            })?;
            let lora_dir = match &self.lora_dir {
                None => None,
                Some(d) => Some(std::fs::canonicalize(d).map_err(|err| {
                    invalid(
                        "lora_dir",
                        d.display(),
                        format!("cannot be resolved: {err}"),
                    )
                })?),
            };
            if let Some(d) = &lora_dir {
                if !d.is_dir() {
                    return Err(invalid("lora_dir", d.display(), "is not a directory"));
                }
            }
            LoraUpdates::Enabled {
                admin_api_key,
                lora_dir,
            }
        } else {
            LoraUpdates::Disabled
        };
        Ok(Settings {
            addr: SocketAddr::new(self.host, self.port),
            served_model_name: self.served_model_name.clone(),
            api_key,
            lora_updates,
            image_adapters: self.image_adapters,
            max_body_bytes: self.max_body_bytes,
            max_tokens: self.max_tokens,
            max_prompt_tokens: self.max_prompt_tokens,
            engine: self.engine.clone(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_validate_and_keep_loading_off() {
        let s = ServerConfig::default().validate().unwrap();
        assert_eq!(s.lora_updates, LoraUpdates::Disabled);
        assert_eq!(s.addr.to_string(), "127.0.0.1:8000");
    }

    #[test]
    fn loading_without_an_admin_key_is_refused() {
        let c = ServerConfig {
            enable_lora_loading: true,
            ..ServerConfig::default()
        };
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("admin_api_key"), "{e}");
    }

    #[test]
    fn bounds_are_checked() {
        let mut c = ServerConfig::default();
        c.engine.max_cpu_loras = 1;
        c.engine.max_loras = 2;
        assert!(c
            .validate()
            .unwrap_err()
            .to_string()
            .contains("max_cpu_loras"));
        let c = ServerConfig {
            api_key: Some("  ".into()),
            ..ServerConfig::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("api_key"));
        let c = ServerConfig {
            enable_lora_loading: true,
            admin_api_key: Some("k".into()),
            lora_dir: Some("/definitely/not/here".into()),
            ..ServerConfig::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("lora_dir"));
    }

    #[test]
    fn toml_fields_parse_and_unknown_ones_are_refused() {
        let c: ServerConfig = toml::from_str(
            "port = 9000\nimage_adapters = \"none\"\n[engine]\ndevice = \"cuda:1\"\nweights = \"bf16\"\nlora_dtype = \"int8\"\n",
        )
        .unwrap();
        assert_eq!(c.port, 9000);
        assert_eq!(c.image_adapters, ImageAdapters::None);
        assert_eq!(c.engine.device, DeviceSetting::Cuda(1));
        assert_eq!(c.engine.weights, Some(WeightsSetting::Bf16));
        assert_eq!(c.engine.lora_dtype, LoraDTypeSetting::Int8);
        assert_eq!(c.engine.lora_dtype.hot_format(), HotFormat::I8);
        assert!(toml::from_str::<ServerConfig>("prot = 1\n").is_err());
        assert!(toml::from_str::<ServerConfig>("[engine]\ndevice = \"tpu\"\n").is_err());
    }
}
