//! Chat templates (the Jinja text shipped with a model) rendered with minijinja.

use std::path::Path;

use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};
use crate::gguf::GgufMetadata;

const TEMPLATE_NAME: &str = "chat";

/// Who speaks a chat message.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
#[non_exhaustive]
pub enum Role {
    /// Instructions for the assistant.
    System,
    /// The human.
    User,
    /// The model.
    Assistant,
    /// A tool's result.
    Tool,
}

/// One message of a conversation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChatMessage {
    /// The speaker.
    pub role: Role,
    /// The text.
    pub content: String,
}

impl ChatMessage {
    /// A message from `role`.
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        ChatMessage {
            role,
            content: content.into(),
        }
    }

    /// A system message.
    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    /// A user message.
    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    /// An assistant message.
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }
}

/// Whether the rendered prompt ends by opening the assistant's turn
/// (the template variable `add_generation_prompt`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GenerationPrompt {
    /// Open the assistant's turn (what a prompt for generation wants).
    Add,
    /// Render the conversation only.
    Omit,
}

/// A compiled chat template.
///
/// Rendering follows HF transformers: Jinja with `trim_blocks` and `lstrip_blocks`, the
/// variables `messages`, `add_generation_prompt`, `bos_token`, `eos_token`, and a
/// `raise_exception(msg)` function.
///
/// ```
/// use batos_model::chat_template::{ChatMessage, ChatTemplate, GenerationPrompt};
/// let t = ChatTemplate::new(
///     "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}",
///     None, None)?;
/// let text = t.render(&[ChatMessage::user("Hi")], GenerationPrompt::Add)?;
/// assert_eq!(text, "<user>Hi\n<assistant>");
/// # Ok::<(), batos_model::ModelError>(())
/// ```
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    bos_token: Option<String>,
    eos_token: Option<String>,
    env: Environment<'static>,
}

impl ChatTemplate {
    /// Compiles `source`; `bos_token`/`eos_token` are the strings the template may insert.
    pub fn new(
        source: impl Into<String>,
        bos_token: Option<String>,
        eos_token: Option<String>,
    ) -> Result<Self> {
        let source = source.into();
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
            },
        );
        env.add_template_owned(TEMPLATE_NAME, source.clone())
            .map_err(|source| ModelError::ChatTemplate { source })?;
        Ok(ChatTemplate {
            source,
            bos_token,
            eos_token,
            env,
        })
    }

    /// The template from GGUF metadata (`tokenizer.chat_template`), with BOS/EOS strings
    /// from the token list; `None` when the file carries no template.
    pub fn from_gguf(meta: &GgufMetadata) -> Result<Option<Self>> {
        let Some(source) = meta.opt_str("tokenizer.chat_template")? else {
            return Ok(None);
        };
        let tokens = meta.get_str_array("tokenizer.ggml.tokens")?;
        let token = |key: &str| -> Result<Option<String>> {
            Ok(meta
                .opt_u32(key)?
                .and_then(|id| tokens.get(id as usize))
                .map(|s| (*s).to_owned()))
        };
        let bos = token("tokenizer.ggml.bos_token_id")?;
        let eos = token("tokenizer.ggml.eos_token_id")?;
        Self::new(source, bos, eos).map(Some)
    }

    /// The template of an HF model directory: `chat_template.jinja`, else the
    /// `chat_template` string of `tokenizer_config.json`; `None` when neither exists.
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Option<Self>> {
        let dir = dir.as_ref();
        let cfg_path = dir.join("tokenizer_config.json");
        let cfg: Option<serde_json::Value> = if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path)
                .map_err(|e| ModelError::io("read", &cfg_path, e))?;
            Some(
                serde_json::from_str(&text).map_err(|source| ModelError::Json {
                    path: cfg_path.clone(),
                    source,
                })?,
            )
        } else {
            None
        };
        let special = |key: &str| -> Option<String> {
            let v = cfg.as_ref()?.get(key)?;
            v.as_str()
                .or_else(|| v.get("content").and_then(|c| c.as_str()))
                .map(str::to_owned)
        };
        let jinja = dir.join("chat_template.jinja");
        let source = if jinja.is_file() {
            Some(std::fs::read_to_string(&jinja).map_err(|e| ModelError::io("read", &jinja, e))?)
        } else {
            cfg.as_ref()
                .and_then(|c| c.get("chat_template"))
                .and_then(|t| t.as_str())
                .map(str::to_owned)
        };
        match source {
            None => Ok(None),
            Some(s) => Self::new(s, special("bos_token"), special("eos_token")).map(Some),
        }
    }

    /// The template text.
    pub fn source(&self) -> &str {
        &self.source
    }

    /// The BOS string given to the template.
    pub fn bos_token(&self) -> Option<&str> {
        self.bos_token.as_deref()
    }

    /// The EOS string given to the template.
    pub fn eos_token(&self) -> Option<&str> {
        self.eos_token.as_deref()
    }

    /// Renders a conversation into prompt text.
    pub fn render(&self, messages: &[ChatMessage], generation: GenerationPrompt) -> Result<String> {
        let tmpl = self
            .env
            .get_template(TEMPLATE_NAME)
            .map_err(|source| ModelError::ChatTemplate { source })?;
        tmpl.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => generation == GenerationPrompt::Add,
            bos_token => self.bos_token.as_deref().unwrap_or(""),
            eos_token => self.eos_token.as_deref().unwrap_or(""),
        })
        .map_err(|source| ModelError::ChatTemplate { source })
    }
}
