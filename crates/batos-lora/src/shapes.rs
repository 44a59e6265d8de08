//! The base model's geometry as far as adapters care, and the seven projections a
//! Llama adapter may target.

use std::fmt;

/// One of the seven linear projections of a Llama decoder layer that batos adapts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Projection {
    Q,
    K,
    V,
    O,
    Gate,
    Up,
    Down,
}

impl Projection {
    /// Every projection, in the fixed order used for layouts and hashing.
    pub const ALL: [Projection; 7] = [
        Projection::Q,
        Projection::K,
        Projection::V,
        Projection::O,
        Projection::Gate,
        Projection::Up,
        Projection::Down,
    ];

    /// Position in [`Projection::ALL`].
    pub fn index(self) -> usize {
        self as usize
    }

    /// The module's leaf name as PEFT and transformers spell it (`q_proj`, …).
    pub fn module_name(self) -> &'static str {
        match self {
            Projection::Q => "q_proj",
            Projection::K => "k_proj",
            Projection::V => "v_proj",
            Projection::O => "o_proj",
            Projection::Gate => "gate_proj",
            Projection::Up => "up_proj",
            Projection::Down => "down_proj",
        }
    }

    /// The parent module inside a decoder layer (`self_attn` or `mlp`).
    pub fn parent(self) -> &'static str {
        match self {
            Projection::Q | Projection::K | Projection::V | Projection::O => "self_attn",
            Projection::Gate | Projection::Up | Projection::Down => "mlp",
        }
    }

    /// Parses a leaf module name.
    pub fn from_module_name(name: &str) -> Option<Projection> {
        Projection::ALL
            .into_iter()
            .find(|p| p.module_name() == name)
    }

    /// The module path inside the model, as transformers names it:
    /// `model.layers.{layer}.self_attn.q_proj`.
    pub fn module_path(self, layer: usize) -> String {
        format!(
            "model.layers.{layer}.{}.{}",
            self.parent(),
            self.module_name()
        )
    }
}

impl fmt::Display for Projection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.module_name())
    }
}

/// The base model's geometry an adapter must fit: defined here so that this crate does
/// not depend on `batos-model` (which depends on it). `batos-model` fills it from its
/// Llama config.
///
/// ```
/// use batos_lora::{BaseShapes, Projection};
/// let base = BaseShapes::smollm2_135m();
/// base.validate().unwrap();
/// assert_eq!(base.dims(Projection::Down), (1536, 576)); // (in, out)
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BaseShapes {
    /// The base model's name; compared with an adapter's `base_model_name_or_path`.
    pub model_name: String,
    pub num_layers: usize,
    /// Hidden size.
    pub hidden: usize,
    /// MLP intermediate size.
    pub intermediate: usize,
    /// `num_heads * head_dim`: the width of `q_proj`'s output and `o_proj`'s input.
    pub q_dim: usize,
    /// `num_kv_heads * head_dim`: the width of `k_proj`'s and `v_proj`'s outputs.
    pub kv_dim: usize,
}

impl BaseShapes {
    /// SmolLM2-135M-Instruct: 30 layers, hidden 576, 9×64 query, 3×64 KV, MLP 1536.
    pub fn smollm2_135m() -> Self {
        BaseShapes {
            model_name: "SmolLM2-135M-Instruct".into(),
            num_layers: 30,
            hidden: 576,
            intermediate: 1536,
            q_dim: 576,
            kv_dim: 192,
        }
    }

    /// `(in_features, out_features)` of a projection.
    pub fn dims(&self, p: Projection) -> (usize, usize) {
        match p {
            Projection::Q => (self.hidden, self.q_dim),
            Projection::K | Projection::V => (self.hidden, self.kv_dim),
            Projection::O => (self.q_dim, self.hidden),
            Projection::Gate | Projection::Up => (self.hidden, self.intermediate),
            Projection::Down => (self.intermediate, self.hidden),
        }
    }

    /// Rejects zero sizes.
    pub fn validate(&self) -> Result<(), crate::LoraError> {
        let fields = [
            ("num_layers", self.num_layers),
            ("hidden", self.hidden),
            ("intermediate", self.intermediate),
            ("q_dim", self.q_dim),
            ("kv_dim", self.kv_dim),
        ];
        for (field, v) in fields {
            if v == 0 {
                return Err(crate::LoraError::InvalidConfig {
                    what: "BaseShapes",
                    reason: format!("{field} is zero"),
                });
            }
        }
        Ok(())
    }
}
