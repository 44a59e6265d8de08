//! AutoAWQ checkpoints: an HF model directory whose `config.json` carries a
//! `quantization_config` (`quant_method` "awq", `bits` 4, `group_size`, `zero_point`
//! true, `version` "gemm") and whose safetensors hold, per projection,
//! `<name>.qweight` (I32 `[in, out/8]`), `<name>.qzeros` (I32 `[in/group, out/8]`) and
//! `<name>.scales` (F16 `[in/group, out]`) instead of `<name>.weight`. Older exports
//! put the settings in `quant_config.json` (`w_bit`, `q_group_size`); both are read.
//!
//! batos writes the same layout, so its quantised models load where AutoAWQ's do
//! (transformers, vLLM) and the other way round. Dense tensors (embedding, norms, head)
//! are written in the dtype they are held in.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use batos_kernels::Int4Layout;
use batos_types::DType;
use half::f16;
use safetensors::{tensor::TensorView, Dtype, SafeTensors};

use crate::chat_template::ChatTemplate;
use crate::config::LlamaConfig;
use crate::safetensors_io::checkpoint_files;
use crate::tensor::Tensor;
use crate::tokenizer::{ModelTokenizer, SpecialTokenText};
use crate::weights::{LayerTensor, TensorRole};

use super::error::QuantError;
use super::int4::Int4Weight;
use super::model::{QuantizedEmbedding, QuantizedLayer, QuantizedModel, QuantizedWeights, LINEARS};

/// The `quantization_config` of an AutoAWQ int4 GEMM checkpoint.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AwqCheckpointConfig {
    /// Inputs sharing one scale and zero point.
    pub group_size: usize,
}

impl AwqCheckpointConfig {
    /// The JSON object written as `config.json`'s `quantization_config`.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::json!({
            "quant_method": "awq",
            "bits": 4,
            "group_size": self.group_size,
            "zero_point": true,
            "version": "gemm",
            "modules_to_not_convert": null,
        })
    }

    /// Reads and checks the settings of the checkpoint in `dir`.
    pub fn from_dir(dir: &Path) -> Result<Self, QuantError> {
        let cfg_path = dir.join("config.json");
        let read_json = |path: &Path| -> Result<serde_json::Value, QuantError> {
            let text =
                std::fs::read_to_string(path).map_err(|e| QuantError::io("read", path, e))?;
            serde_json::from_str(&text).map_err(|e| QuantError::UnsupportedCheckpoint {
                path: path.to_owned(),
                reason: format!("invalid JSON: {e}"),
            })
        };
        let cfg = read_json(&cfg_path)?;
        let legacy = dir.join("quant_config.json");
        let (q, path) = match cfg.get("quantization_config") {
            Some(q) => (q.clone(), cfg_path),
            None if legacy.is_file() => (read_json(&legacy)?, legacy),
            None => {
                return Err(QuantError::UnsupportedCheckpoint {
                    path: cfg_path,
                    reason: "no quantization_config (not an AutoAWQ checkpoint)".into(),
                })
            }
        };
        let bad = |reason: String| QuantError::UnsupportedCheckpoint {
            path: path.clone(),
            reason,
        };
        let field = |keys: &[&str]| keys.iter().find_map(|k| q.get(*k));
        if let Some(m) = field(&["quant_method"]).and_then(|m| m.as_str()) {
            if !m.eq_ignore_ascii_case("awq") {
                return Err(bad(format!("quant_method is {m:?}, expected \"awq\"")));
            }
        }
        let bits = field(&["bits", "w_bit"]).and_then(|b| b.as_u64());
        if bits != Some(4) {
            return Err(bad(format!("bits is {bits:?}, only 4 is supported")));
        }
        if let Some(z) = field(&["zero_point"]).and_then(|z| z.as_bool()) {
            if !z {
                return Err(bad(
                    "zero_point is false; only asymmetric AWQ is supported".into()
                ));
            }
        }
        if let Some(v) = field(&["version"]).and_then(|v| v.as_str()) {
            if !v.eq_ignore_ascii_case("gemm") {
                return Err(bad(format!(
                    "version is {v:?}; only the \"gemm\" packing is supported"
                )));
            }
        }
        let group_size = field(&["group_size", "q_group_size"])
            .and_then(|g| g.as_u64())
            .filter(|&g| g > 0)
            .ok_or_else(|| bad("group_size is missing or not a positive integer".into()))?;
        Ok(AwqCheckpointConfig {
            group_size: group_size as usize,
        })
    }
}

/// The three tensor names of projection `t` of block `layer`.
fn linear_prefix(layer: usize, t: LayerTensor) -> String {
    let name = TensorRole::Layer { layer, tensor: t }.hf_name();
    name.strip_suffix(".weight").unwrap_or(&name).to_owned()
}

/// Where an int4 embedding's tensors live (`model.embed_tokens.qweight` ...).
const EMBED_PREFIX: &str = "model.embed_tokens";

/// A safetensors entry to write: name, dtype, shape, bytes.
type Owned = (String, Dtype, Vec<usize>, Vec<u8>);

/// AutoAWQ's three tensors of one int4 layer.
fn push_int4(owned: &mut Vec<Owned>, prefix: &str, q: &Int4Weight) {
    let lay = q.layout();
    let wpr = lay.words_per_row();
    owned.push((
        format!("{prefix}.qweight"),
        Dtype::I32,
        vec![lay.in_features(), wpr],
        bytemuck::cast_slice(q.qweight()).to_vec(),
    ));
    owned.push((
        format!("{prefix}.qzeros"),
        Dtype::I32,
        vec![lay.groups(), wpr],
        bytemuck::cast_slice(q.qzeros()).to_vec(),
    ));
    owned.push((
        format!("{prefix}.scales"),
        Dtype::F16,
        vec![lay.groups(), lay.out_features()],
        bytemuck::cast_slice(q.scales()).to_vec(),
    ));
    // batos's own extension (GGUF Q4_1 minima); AutoAWQ checkpoints never get it, see
    // `save_autoawq`.
    if let Some(off) = q.offsets() {
        owned.push((
            format!("{prefix}.{OFFSETS_SUFFIX}"),
            Dtype::F16,
            vec![lay.groups(), lay.out_features()],
            bytemuck::cast_slice(off).to_vec(),
        ));
    }
}

/// The stored name suffix of an int4 layer's group offsets (`<proj>.qoffsets`, F16
/// `[in/group, out]`).
pub const OFFSETS_SUFFIX: &str = "qoffsets";

fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F16 => Dtype::F16,
        DType::BF16 => Dtype::BF16,
        _ => Dtype::F32,
    }
}

/// The HF `config.json` object for `config`.
fn hf_config_json(config: &LlamaConfig) -> serde_json::Value {
    let mut v = serde_json::json!({
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_hidden_layers,
        "num_attention_heads": config.num_attention_heads,
        "num_key_value_heads": config.num_key_value_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_position_embeddings,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "float16",
    });
    let obj = v.as_object_mut().expect("a JSON object");
    if let Some(b) = config.bos_token_id {
        obj.insert("bos_token_id".into(), b.into());
    }
    match config.eos_token_ids.as_slice() {
        [] => {}
        [one] => {
            obj.insert("eos_token_id".into(), (*one).into());
        }
        many => {
            obj.insert("eos_token_id".into(), many.to_vec().into());
        }
    }
    if let Some(s) = config.rope_scaling {
        if let Ok(mut s) = serde_json::to_value(s) {
            if let Some(m) = s.as_object_mut() {
                if let Some(t) = m.remove("type") {
                    m.insert("rope_type".into(), t);
                }
            }
            obj.insert("rope_scaling".into(), s);
        }
    }
    if let Some(w) = config.sliding_window {
        obj.insert("sliding_window".into(), w.into());
    }
    v
}

impl QuantizedWeights {
    /// Every tensor under its AutoAWQ name (`….qweight` / `….qzeros` as I32, `….scales`
    /// F16, dense tensors in their own type), as little-endian bytes.
    pub(crate) fn stored_tensors(&self) -> Vec<Owned> {
        let w = self;
        let mut owned: Vec<Owned> = Vec::new();
        let dense = |owned: &mut Vec<Owned>, role: TensorRole, t: &Tensor| {
            owned.push((
                role.hf_name(),
                st_dtype(t.dtype()),
                t.shape().to_vec(),
                t.as_bytes().to_vec(),
            ))
        };
        match &w.embed_tokens {
            QuantizedEmbedding::Dense(t) => dense(&mut owned, TensorRole::TokenEmbedding, t),
            // Not something AutoAWQ writes; batos reads it back (same three tensors).
            QuantizedEmbedding::Int4(q) => push_int4(&mut owned, EMBED_PREFIX, q),
        }
        dense(&mut owned, TensorRole::FinalNorm, &w.norm);
        if let Some(h) = &w.lm_head {
            dense(&mut owned, TensorRole::LmHead, h);
        }
        for (layer, l) in w.layers.iter().enumerate() {
            for (t, norm) in [
                (LayerTensor::AttnNorm, &l.attn_norm),
                (LayerTensor::MlpNorm, &l.mlp_norm),
            ] {
                owned.push((
                    TensorRole::Layer { layer, tensor: t }.hf_name(),
                    Dtype::F32,
                    vec![norm.len()],
                    bytemuck::cast_slice(norm).to_vec(),
                ));
            }
            for t in LINEARS {
                let q = l.linear(t).expect("LINEARS are projections");
                push_int4(&mut owned, &linear_prefix(layer, t), q);
            }
        }
        owned
    }

    /// Rebuilds the weights from named tensors (as [`QuantizedWeights::stored_tensors`]
    /// names them), checking every name, type and shape; `source` is for errors.
    pub(crate) fn from_stored(
        source: &Path,
        config: &LlamaConfig,
        group_size: usize,
        tensors: Vec<Owned>,
    ) -> Result<QuantizedWeights, QuantError> {
        let path = source.to_path_buf();
        let mut dense: HashMap<TensorRole, Tensor> = HashMap::new();
        let mut packed: Packed = BTreeMap::new();
        for (name, dt, shape, bytes) in tensors {
            if name.ends_with("rotary_emb.inv_freq") {
                continue;
            }
            if [".qweight", ".qzeros", ".scales", ".qoffsets"]
                .iter()
                .any(|s| name.ends_with(s))
            {
                packed.insert(name, (path.clone(), dt, shape, bytes));
                continue;
            }
            let role = TensorRole::from_hf_name(&name).ok_or_else(|| QuantError::BadTensor {
                path: path.clone(),
                name: name.clone(),
                reason: "no Llama weight maps to this name".into(),
            })?;
            let dtype = match dt {
                Dtype::F32 => DType::F32,
                Dtype::F16 => DType::F16,
                Dtype::BF16 => DType::BF16,
                other => {
                    return Err(QuantError::BadTensor {
                        path: path.clone(),
                        name,
                        reason: format!("dtype {other:?} (expected F32, F16 or BF16)"),
                    })
                }
            };
            dense.insert(role, Tensor::from_le_bytes(shape, dtype, &bytes)?);
        }
        let qc = AwqCheckpointConfig { group_size };
        let dir = source;
        let source = dir.to_path_buf();
        let mut take_dense = |role: TensorRole| {
            dense
                .remove(&role)
                .ok_or_else(|| QuantError::MissingTensor {
                    path: source.clone(),
                    name: role.hf_name(),
                })
        };
        let embed_tokens = if packed.contains_key(&format!("{EMBED_PREFIX}.qweight")) {
            QuantizedEmbedding::Int4(take_linear(
                &mut packed,
                dir,
                EMBED_PREFIX,
                vec![config.vocab_size, config.hidden_size],
                qc,
            )?)
        } else {
            QuantizedEmbedding::Dense(take_dense(TensorRole::TokenEmbedding)?)
        };
        let norm = take_dense(TensorRole::FinalNorm)?;
        let lm_head = if config.tie_word_embeddings {
            None
        } else {
            Some(take_dense(TensorRole::LmHead)?)
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        for layer in 0..config.num_hidden_layers {
            let mut norm_of = |t: LayerTensor| -> Result<Vec<f32>, QuantError> {
                Ok(take_dense(TensorRole::Layer { layer, tensor: t })?.to_f32_vec())
            };
            let attn_norm = norm_of(LayerTensor::AttnNorm)?;
            let mlp_norm = norm_of(LayerTensor::MlpNorm)?;
            let mut lin = |t: LayerTensor| -> Result<Int4Weight, QuantError> {
                let role = TensorRole::Layer { layer, tensor: t };
                let shape = role.expected_shape(config);
                take_linear(&mut packed, dir, &linear_prefix(layer, t), shape, qc)
            };
            layers.push(QuantizedLayer {
                attn_norm,
                q_proj: lin(LayerTensor::Q)?,
                k_proj: lin(LayerTensor::K)?,
                v_proj: lin(LayerTensor::V)?,
                o_proj: lin(LayerTensor::O)?,
                mlp_norm,
                gate_proj: lin(LayerTensor::Gate)?,
                up_proj: lin(LayerTensor::Up)?,
                down_proj: lin(LayerTensor::Down)?,
            });
        }
        let leftover = dense
            .keys()
            .map(|r| r.hf_name())
            .chain(packed.keys().cloned())
            .next();
        if let Some(name) = leftover {
            return Err(QuantError::BadTensor {
                path: dir.to_path_buf(),
                name,
                reason: "not used by a model with this config".into(),
            });
        }
        let weights = QuantizedWeights {
            embed_tokens,
            layers,
            norm,
            lm_head,
            group_size: qc.group_size,
        };
        weights.validate(config)?;
        Ok(weights)
    }
}

impl QuantizedModel {
    /// Writes an AutoAWQ checkpoint into `dir` (created if needed): `config.json` with
    /// its `quantization_config`, `model.safetensors`, `tokenizer.json` and
    /// `tokenizer_config.json` (special tokens and chat template).
    pub fn save_autoawq(&self, dir: impl AsRef<Path>) -> Result<(), QuantError> {
        let dir = dir.as_ref();
        self.weights.validate(&self.config)?;
        if let Some(name) = self.weights.first_with_offsets() {
            return Err(QuantError::OffsetsUnsupported {
                name,
                target: "an AutoAWQ checkpoint",
            });
        }
        std::fs::create_dir_all(dir).map_err(|e| QuantError::io("create", dir, e))?;
        let mut cfg = hf_config_json(&self.config);
        cfg["quantization_config"] = AwqCheckpointConfig {
            group_size: self.weights.group_size,
        }
        .to_json();
        write_json(&dir.join("config.json"), &cfg)?;

        let owned = self.weights.stored_tensors();
        let path = dir.join("model.safetensors");
        let views = owned
            .iter()
            .map(|(name, dt, shape, bytes)| {
                TensorView::new(*dt, shape.clone(), bytes)
                    .map(|v| (name.clone(), v))
                    .map_err(|e| QuantError::BadTensor {
                        path: path.clone(),
                        name: name.clone(),
                        reason: e.to_string(),
                    })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let meta = HashMap::from([("format".to_owned(), "pt".to_owned())]);
        safetensors::serialize_to_file(views, Some(meta), &path).map_err(|e| {
            QuantError::BadTensor {
                path: path.clone(),
                name: "<file>".into(),
                reason: e.to_string(),
            }
        })?;

        let tok_path = dir.join("tokenizer.json");
        let text =
            self.tokenizer
                .inner()
                .to_string(false)
                .map_err(|e| QuantError::Calibration {
                    reason: format!("serialising the tokenizer: {e}"),
                })?;
        std::fs::write(&tok_path, text).map_err(|e| QuantError::io("write", &tok_path, e))?;
        let special = self.tokenizer.special_tokens();
        let text_of = |id: Option<u32>| -> Option<String> {
            id.and_then(|i| self.tokenizer.decode(&[i], SpecialTokenText::Keep).ok())
        };
        let mut tc = serde_json::json!({
            "add_bos_token": special.add_bos,
            "add_eos_token": special.add_eos,
        });
        for (key, id) in [
            ("bos_token", special.bos),
            ("eos_token", special.eos),
            ("pad_token", special.pad),
            ("unk_token", special.unk),
        ] {
            if let Some(t) = text_of(id) {
                tc[key] = t.into();
            }
        }
        if let Some(t) = &self.chat_template {
            tc["chat_template"] = t.source().into();
        }
        write_json(&dir.join("tokenizer_config.json"), &tc)
    }

    /// Loads an AutoAWQ int4 GEMM checkpoint directory (the layout is documented in
    /// `src/quant/checkpoint.rs`).
    pub fn load_autoawq(dir: impl AsRef<Path>) -> Result<Self, QuantError> {
        let dir = dir.as_ref();
        let qc = AwqCheckpointConfig::from_dir(dir)?;
        let config = LlamaConfig::from_hf_file(dir.join("config.json"))?;
        let tokenizer = ModelTokenizer::from_hf_dir(dir)?;
        let chat_template = ChatTemplate::from_hf_dir(dir)?;
        let files = checkpoint_files(dir)?;
        let mut tensors: Vec<Owned> = Vec::new();
        for path in &files {
            let bytes = std::fs::read(path).map_err(|e| QuantError::io("read", path, e))?;
            let st = SafeTensors::deserialize(&bytes).map_err(|e| QuantError::BadTensor {
                path: path.clone(),
                name: "<header>".into(),
                reason: e.to_string(),
            })?;
            for (name, view) in st.iter() {
                tensors.push((
                    name.to_owned(),
                    view.dtype(),
                    view.shape().to_vec(),
                    view.data().to_vec(),
                ));
            }
        }
        let weights = QuantizedWeights::from_stored(dir, &config, qc.group_size, tensors)?;
        tracing::info!(dir = %dir.display(), group_size = qc.group_size, "loaded AutoAWQ checkpoint");
        Ok(QuantizedModel {
            config,
            weights,
            tokenizer,
            chat_template,
        })
    }
}

type Packed = BTreeMap<String, (PathBuf, Dtype, Vec<usize>, Vec<u8>)>;

/// Takes `<prefix>.qweight/.qzeros/.scales` out of `packed` for a `[out, in]` layer.
fn take_linear(
    packed: &mut Packed,
    dir: &Path,
    prefix: &str,
    shape: Vec<usize>,
    qc: AwqCheckpointConfig,
) -> Result<Int4Weight, QuantError> {
    let (out, inp) = (shape[0], shape[1]);
    let layout =
        Int4Layout::new(inp, out, qc.group_size).map_err(|source| QuantError::BadInt4 {
            name: prefix.to_owned(),
            source,
        })?;
    let mut take = |suffix: &str, dtype: Dtype, dims: [usize; 2]| {
        let name = format!("{prefix}.{suffix}");
        let (path, dt, sh, bytes) =
            packed
                .remove(&name)
                .ok_or_else(|| QuantError::MissingTensor {
                    path: dir.to_path_buf(),
                    name: name.clone(),
                })?;
        if dt != dtype || sh != dims {
            return Err(QuantError::BadTensor {
                path,
                name,
                reason: format!("{dt:?} {sh:?}, expected {dtype:?} {dims:?}"),
            });
        }
        Ok(bytes)
    };
    let wpr = layout.words_per_row();
    let words = |b: Vec<u8>| -> Vec<u32> {
        b.chunks_exact(4)
            .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
            .collect()
    };
    let qweight = words(take("qweight", Dtype::I32, [inp, wpr])?);
    let qzeros = words(take("qzeros", Dtype::I32, [layout.groups(), wpr])?);
    let scales: Vec<f16> = take("scales", Dtype::F16, [layout.groups(), out])?
        .chunks_exact(2)
        .map(|c| f16::from_le_bytes([c[0], c[1]]))
        .collect();
    let w = Int4Weight::from_parts(prefix, layout, qweight, qzeros, scales)?;
    let name = format!("{prefix}.{OFFSETS_SUFFIX}");
    match packed.remove(&name) {
        None => Ok(w),
        Some((path, dt, sh, bytes)) => {
            let dims = [layout.groups(), out];
            if dt != Dtype::F16 || sh != dims {
                return Err(QuantError::BadTensor {
                    path,
                    name,
                    reason: format!("{dt:?} {sh:?}, expected F16 {dims:?}"),
                });
            }
            let offsets = bytes
                .chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]))
                .collect();
            w.with_offsets(prefix, offsets)
        }
    }
}

fn write_json(path: &Path, v: &serde_json::Value) -> Result<(), QuantError> {
    let text = serde_json::to_string_pretty(v).map_err(|e| QuantError::BadTensor {
        path: path.to_owned(),
        name: "<json>".into(),
        reason: e.to_string(),
    })?;
    std::fs::write(path, text).map_err(|e| QuantError::io("write", path, e))
}
