//! The model's tokenizer: built from GGUF metadata (or loaded from an HF `tokenizer.json`)
//! into a `tokenizers::Tokenizer`.

use std::path::Path;

use serde::{Deserialize, Serialize};
use tokenizers::decoders::byte_level::ByteLevel as ByteLevelDecoder;
use tokenizers::models::bpe::{Vocab, BPE};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::digits::Digits;
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::PreTokenizerWrapper;
use tokenizers::AddedToken;

use crate::error::{ModelError, Result};
use crate::gguf::GgufMetadata;

/// GGUF `tokenizer.ggml.token_type` values (llama.cpp's `llama_token_type`).
const TOKEN_TYPE_CONTROL: i64 = 3;
const TOKEN_TYPE_USER_DEFINED: i64 = 4;

/// The special token ids of a model and whether a prompt starts with BOS / ends with EOS.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[non_exhaustive]
pub struct SpecialTokens {
    /// Beginning of sequence.
    pub bos: Option<u32>,
    /// End of sequence (generation stops here).
    pub eos: Option<u32>,
    /// Padding.
    pub pad: Option<u32>,
    /// Unknown token.
    pub unk: Option<u32>,
    /// Whether [`ModelTokenizer::encode_prompt`] prepends BOS.
    pub add_bos: bool,
    /// Whether [`ModelTokenizer::encode_prompt`] appends EOS.
    pub add_eos: bool,
}

/// How [`ModelTokenizer::decode`] treats special tokens.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SpecialTokenText {
    /// Render them (`<|im_end|>`).
    Keep,
    /// Leave them out.
    Skip,
}

/// A model's tokenizer: a `tokenizers::Tokenizer` plus its special tokens.
///
/// Text is encoded without adding special tokens; special-token *text* inside the input
/// (e.g. `<|im_start|>`) is recognised as the special token, as HF tokenizers do.
#[derive(Clone, Debug)]
pub struct ModelTokenizer {
    inner: tokenizers::Tokenizer,
    special: SpecialTokens,
}

/// Serialized form for storage: the HF tokenizer JSON plus the special tokens.
#[derive(Serialize, Deserialize)]
struct Stored {
    special_tokens: SpecialTokens,
    tokenizer: serde_json::Value,
}

impl ModelTokenizer {
    /// Builds the tokenizer from GGUF metadata (`tokenizer.ggml.*`).
    ///
    /// Supported: `tokenizer.ggml.model = gpt2` (byte-level BPE) with pre-tokenizer
    /// (`tokenizer.ggml.pre`) `smollm` (digits split one by one, then the GPT-2 byte-level
    /// split — the same as SmolLM2's HF `tokenizer.json`) or `default`/`gpt-2`/absent
    /// (byte-level split only). Tokens of type CONTROL become special added tokens,
    /// USER_DEFINED ones plain added tokens.
    pub fn from_gguf(meta: &GgufMetadata) -> Result<Self> {
        let model = meta.get_str("tokenizer.ggml.model")?;
        if model != "gpt2" {
            return Err(ModelError::tokenizer(format!(
                "tokenizer.ggml.model '{model}' is not supported (supported: gpt2, i.e. byte-level BPE)"
            )));
        }
        let pre = meta.opt_str("tokenizer.ggml.pre")?.unwrap_or("default");
        let pre_tokenizer: PreTokenizerWrapper = match pre {
            "smollm" => Sequence::new(vec![
                Digits::new(true).into(),
                ByteLevel::new(false, true, true).into(),
            ])
            .into(),
            "default" | "gpt-2" | "gpt2" => ByteLevel::new(false, true, true).into(),
            other => {
                return Err(ModelError::tokenizer(format!(
                "tokenizer.ggml.pre '{other}' is not supported (supported: smollm, gpt-2, default)"
            )))
            }
        };
        let tokens = meta.get_str_array("tokenizer.ggml.tokens")?;
        let merges_raw = meta.get_str_array("tokenizer.ggml.merges")?;
        let types = if meta.contains("tokenizer.ggml.token_type") {
            let t = meta.get_int_array("tokenizer.ggml.token_type")?;
            if t.len() != tokens.len() {
                return Err(ModelError::tokenizer(format!(
                    "tokenizer.ggml.token_type has {} entries for {} tokens",
                    t.len(),
                    tokens.len()
                )));
            }
            t
        } else {
            vec![1; tokens.len()]
        };
        let mut vocab = Vocab::default();
        for (id, tok) in tokens.iter().enumerate() {
            if vocab.insert((*tok).to_owned(), id as u32).is_some() {
                return Err(ModelError::tokenizer(format!(
                    "token {tok:?} appears twice in tokenizer.ggml.tokens"
                )));
            }
        }
        let merges = merges_raw
            .iter()
            .enumerate()
            .map(|(i, m)| {
                m.split_once(' ')
                    .map(|(a, b)| (a.to_owned(), b.to_owned()))
                    .ok_or_else(|| {
                        ModelError::tokenizer(format!(
                            "merge {i} {m:?} is not two tokens separated by a space"
                        ))
                    })
            })
            .collect::<Result<Vec<_>>>()?;
        let bpe = BPE::builder()
            .vocab_and_merges(vocab, merges)
            .build()
            .map_err(|e| {
                ModelError::tokenizer(format!("building BPE from GGUF vocab/merges: {e}"))
            })?;
        let mut inner = tokenizers::Tokenizer::new(bpe);
        inner.with_pre_tokenizer(Some(pre_tokenizer));
        inner.with_decoder(Some(ByteLevelDecoder::default()));
        let added: Vec<AddedToken> = tokens
            .iter()
            .zip(&types)
            .filter(|(_, &ty)| ty == TOKEN_TYPE_CONTROL || ty == TOKEN_TYPE_USER_DEFINED)
            .map(|(tok, &ty)| {
                AddedToken::from((*tok).to_owned(), ty == TOKEN_TYPE_CONTROL).normalized(false)
            })
            .collect();
        inner.add_special_tokens(&added);

        let id = |key: &str| -> Result<Option<u32>> {
            match meta.opt_u32(key)? {
                Some(i) if i as usize >= tokens.len() => Err(ModelError::tokenizer(format!(
                    "{key} = {i} is outside the vocabulary ({} tokens)",
                    tokens.len()
                ))),
                other => Ok(other),
            }
        };
        let special = SpecialTokens {
            bos: id("tokenizer.ggml.bos_token_id")?,
            eos: id("tokenizer.ggml.eos_token_id")?,
            pad: id("tokenizer.ggml.padding_token_id")?,
            unk: id("tokenizer.ggml.unknown_token_id")?,
            // llama.cpp's default for BPE vocabularies when the key is absent is no BOS.
            add_bos: meta
                .opt_bool("tokenizer.ggml.add_bos_token")?
                .unwrap_or(false),
            add_eos: meta
                .opt_bool("tokenizer.ggml.add_eos_token")?
                .unwrap_or(false),
        };
        tracing::debug!(
            vocab = tokens.len(),
            merges = merges_raw.len(),
            pre,
            "built tokenizer from GGUF"
        );
        Ok(ModelTokenizer { inner, special })
    }

    /// Loads an HF `tokenizer.json`; special tokens are given by the caller (see
    /// [`ModelTokenizer::from_hf_dir`] to read them from the model directory).
    pub fn from_hf_file(path: impl AsRef<Path>, special: SpecialTokens) -> Result<Self> {
        let path = path.as_ref();
        if !path.is_file() {
            return Err(ModelError::NotFound {
                path: path.to_path_buf(),
                what: "tokenizer.json",
            });
        }
        let inner = tokenizers::Tokenizer::from_file(path)
            .map_err(|e| ModelError::tokenizer(format!("{}: {e}", path.display())))?;
        Ok(ModelTokenizer { inner, special })
    }

    /// Loads `dir/tokenizer.json`, taking special tokens from `dir/tokenizer_config.json`
    /// (`bos_token`, `eos_token`, `pad_token`, `unk_token`, `add_bos_token`,
    /// `add_eos_token`) when present.
    pub fn from_hf_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let mut tok = Self::from_hf_file(dir.join("tokenizer.json"), SpecialTokens::default())?;
        let cfg_path = dir.join("tokenizer_config.json");
        if cfg_path.is_file() {
            let text = std::fs::read_to_string(&cfg_path)
                .map_err(|e| ModelError::io("read", &cfg_path, e))?;
            let v: serde_json::Value =
                serde_json::from_str(&text).map_err(|source| ModelError::Json {
                    path: cfg_path.clone(),
                    source,
                })?;
            let token_id = |key: &str| -> Option<u32> {
                let entry = v.get(key)?;
                // Either a plain string or an AddedToken-like object with "content".
                let text = entry
                    .as_str()
                    .or_else(|| entry.get("content").and_then(|c| c.as_str()))?;
                tok.inner.token_to_id(text)
            };
            let special = SpecialTokens {
                bos: token_id("bos_token"),
                eos: token_id("eos_token"),
                pad: token_id("pad_token"),
                unk: token_id("unk_token"),
                add_bos: v
                    .get("add_bos_token")
                    .and_then(|b| b.as_bool())
                    .unwrap_or(false),
                add_eos: v
                    .get("add_eos_token")
                    .and_then(|b| b.as_bool())
                    .unwrap_or(false),
            };
            tok.special = special;
        }
        Ok(tok)
    }

    /// Serializes the tokenizer and its special tokens into one JSON document (for storing
    /// in the living image).
    pub fn to_json(&self) -> Result<String> {
        let tokenizer_text = self.inner.to_string(false).map_err(ModelError::tokenizer)?;
        let tokenizer: serde_json::Value =
            serde_json::from_str(&tokenizer_text).map_err(|source| ModelError::Json {
                path: "<serialized tokenizer>".into(),
                source,
            })?;
        serde_json::to_string(&Stored {
            special_tokens: self.special.clone(),
            tokenizer,
        })
        .map_err(|source| ModelError::Json {
            path: "<serialized tokenizer>".into(),
            source,
        })
    }

    /// Reverses [`ModelTokenizer::to_json`].
    pub fn from_json(json: &str) -> Result<Self> {
        let stored: Stored = serde_json::from_str(json).map_err(|source| ModelError::Json {
            path: "<stored tokenizer>".into(),
            source,
        })?;
        let inner: tokenizers::Tokenizer =
            serde_json::from_value(stored.tokenizer).map_err(|source| ModelError::Json {
                path: "<stored tokenizer>".into(),
                source,
            })?;
        Ok(ModelTokenizer {
            inner,
            special: stored.special_tokens,
        })
    }

    /// Token ids of `text`, adding no special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        let enc = self
            .inner
            .encode(text, false)
            .map_err(ModelError::tokenizer)?;
        Ok(enc.get_ids().to_vec())
    }

    /// Token ids of a prompt: [`Self::encode`] plus BOS/EOS where the model asks for them
    /// ([`SpecialTokens::add_bos`], [`SpecialTokens::add_eos`]).
    pub fn encode_prompt(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids = Vec::new();
        if let (true, Some(bos)) = (self.special.add_bos, self.special.bos) {
            ids.push(bos);
        }
        ids.extend(self.encode(text)?);
        if let (true, Some(eos)) = (self.special.add_eos, self.special.eos) {
            ids.push(eos);
        }
        Ok(ids)
    }

    /// Text of `ids`.
    pub fn decode(&self, ids: &[u32], special: SpecialTokenText) -> Result<String> {
        self.inner
            .decode(ids, special == SpecialTokenText::Skip)
            .map_err(ModelError::tokenizer)
    }

    /// The special tokens.
    pub fn special_tokens(&self) -> &SpecialTokens {
        &self.special
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// Id of a token string.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Token string of an id.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.inner.id_to_token(id)
    }

    /// The underlying `tokenizers` tokenizer (e.g. for streaming decode).
    pub fn inner(&self) -> &tokenizers::Tokenizer {
        &self.inner
    }
}
