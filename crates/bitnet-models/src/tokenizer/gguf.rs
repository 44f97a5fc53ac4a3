//! The tokenizer as llama.cpp stores it in GGUF metadata (`tokenizer.ggml.*`).

use super::{find_token, PreTokenizerKind, TokenType, Tokenizer, TokenizerError, Vocabulary, EOT_TOKEN_TEXT};
use crate::gguf::MetadataValue;

/// The metadata keys, as llama.cpp names them.
pub mod keys {
    pub const MODEL: &str = "tokenizer.ggml.model";
    pub const PRE: &str = "tokenizer.ggml.pre";
    pub const TOKENS: &str = "tokenizer.ggml.tokens";
    pub const TOKEN_TYPE: &str = "tokenizer.ggml.token_type";
    pub const MERGES: &str = "tokenizer.ggml.merges";
    pub const BOS_ID: &str = "tokenizer.ggml.bos_token_id";
    pub const EOS_ID: &str = "tokenizer.ggml.eos_token_id";
    pub const EOT_ID: &str = "tokenizer.ggml.eot_token_id";
    pub const ADD_BOS: &str = "tokenizer.ggml.add_bos_token";
    pub const CHAT_TEMPLATE: &str = "tokenizer.chat_template";
}

/// The only `tokenizer.ggml.model` supported: byte-level BPE.
const BYTE_LEVEL_BPE_MODEL: &str = "gpt2";

impl Tokenizer {
    /// Builds the tokenizer from GGUF metadata (llama.cpp keys).
    ///
    /// `tokenizer.ggml.model` must be `gpt2` (byte-level BPE). `tokenizer.ggml.pre`
    /// `llama-bpe`/`llama3`/`llama-v3` selects the LLaMA-3 split regex (with
    /// llama.cpp's `ignore_merges`), `gpt2`/`default`/absent the GPT-2 regex.
    /// Tokens and merges are required; a missing `token_type` means all
    /// tokens are normal. The EOT id is `tokenizer.ggml.eot_token_id`, else the
    /// id of `<|eot_id|>` if the vocabulary has it. `add_bos_token` defaults as
    /// in llama.cpp: on for LLaMA-3, off for GPT-2.
    pub fn from_gguf_metadata<'a>(get: impl Fn(&str) -> Option<&'a MetadataValue>) -> Result<Self, TokenizerError> {
        let model = string(&get, keys::MODEL)?.ok_or(TokenizerError::MissingKey { key: keys::MODEL })?;
        if model != BYTE_LEVEL_BPE_MODEL {
            return Err(TokenizerError::UnsupportedModel { model: model.to_owned() });
        }
        let pre_tokenizer = match string(&get, keys::PRE)? {
            None | Some("default" | "gpt2") => PreTokenizerKind::Gpt2,
            Some("llama-bpe" | "llama3" | "llama-v3") => PreTokenizerKind::Llama3,
            Some(other) => return Err(TokenizerError::UnsupportedPreTokenizer { pre: other.to_owned() }),
        };

        let tokens: Vec<String> = get(keys::TOKENS)
            .ok_or(TokenizerError::MissingKey { key: keys::TOKENS })?
            .as_str_array()
            .ok_or(TokenizerError::WrongType { key: keys::TOKENS, expected: "an array of strings" })?
            .into_iter()
            .map(str::to_owned)
            .collect();

        let token_types = match get(keys::TOKEN_TYPE) {
            None => vec![TokenType::Normal; tokens.len()],
            Some(value) => {
                let raw = value
                    .as_i64_array()
                    .ok_or(TokenizerError::WrongType { key: keys::TOKEN_TYPE, expected: "an array of integers" })?;
                if raw.len() != tokens.len() {
                    return Err(TokenizerError::TokenTypeLengthMismatch {
                        n_tokens: tokens.len(),
                        n_token_types: raw.len(),
                    });
                }
                (0u32..)
                    .zip(raw)
                    .map(|(id, value)| {
                        TokenType::from_gguf(value).ok_or(TokenizerError::InvalidTokenType { id, value })
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
        };

        let merges = get(keys::MERGES)
            .ok_or(TokenizerError::MissingKey { key: keys::MERGES })?
            .as_str_array()
            .ok_or(TokenizerError::WrongType { key: keys::MERGES, expected: "an array of strings" })?
            .into_iter()
            .enumerate()
            .map(|(index, merge)| parse_merge(index, merge))
            .collect::<Result<Vec<_>, _>>()?;

        let n_tokens = tokens.len();
        let eot_id = match token_id(&get, keys::EOT_ID, "eot", n_tokens)? {
            Some(id) => Some(id),
            None => find_token(&tokens, EOT_TOKEN_TEXT),
        };
        let vocab = Vocabulary {
            bos_id: token_id(&get, keys::BOS_ID, "bos", n_tokens)?,
            eos_id: token_id(&get, keys::EOS_ID, "eos", n_tokens)?,
            eot_id,
            add_bos: boolean(&get, keys::ADD_BOS)?.unwrap_or(pre_tokenizer.default_add_bos()),
            chat_template: string(&get, keys::CHAT_TEMPLATE)?.map(str::to_owned),
            ignore_merges: pre_tokenizer.default_ignore_merges(),
            pre_tokenizer,
            tokens,
            token_types,
            merges,
        };
        Self::from_vocabulary(vocab)
    }

    /// Metadata entries that [`Tokenizer::from_gguf_metadata`] reads back to an
    /// identical tokenizer. (GGUF has no key for `ignore_merges`; it is implied
    /// by the pre-tokenizer, as in llama.cpp.)
    pub fn to_gguf_metadata(&self) -> Vec<(String, MetadataValue)> {
        let vocab = &self.vocab;
        let mut entries = vec![
            (keys::MODEL, MetadataValue::String(BYTE_LEVEL_BPE_MODEL.to_owned())),
            (keys::PRE, MetadataValue::String(vocab.pre_tokenizer.gguf_name().to_owned())),
            (keys::TOKENS, MetadataValue::string_array(vocab.tokens.iter().cloned())),
            (keys::TOKEN_TYPE, MetadataValue::i32_array(vocab.token_types.iter().map(|t| t.to_gguf()))),
            (
                keys::MERGES,
                MetadataValue::string_array(vocab.merges.iter().map(|(left, right)| format!("{left} {right}"))),
            ),
        ];
        for (key, id) in [(keys::BOS_ID, vocab.bos_id), (keys::EOS_ID, vocab.eos_id), (keys::EOT_ID, vocab.eot_id)] {
            if let Some(id) = id {
                entries.push((key, MetadataValue::U32(id)));
            }
        }
        entries.push((keys::ADD_BOS, MetadataValue::Bool(vocab.add_bos)));
        if let Some(template) = &vocab.chat_template {
            entries.push((keys::CHAT_TEMPLATE, MetadataValue::String(template.clone())));
        }
        entries.into_iter().map(|(key, value)| (key.to_owned(), value)).collect()
    }
}

/// Splits a `"left right"` merge the way llama.cpp does: at the first space
/// after the first character (byte-level tokens never contain a space).
pub(super) fn parse_merge(index: usize, merge: &str) -> Result<(String, String), TokenizerError> {
    let bad = |reason: &str| TokenizerError::BadMerge { index, merge: merge.to_owned(), reason: reason.to_owned() };
    let first_len = merge.chars().next().map(char::len_utf8).ok_or_else(|| bad("it is empty"))?;
    let space = merge[first_len..]
        .find(' ')
        .map(|offset| first_len + offset)
        .ok_or_else(|| bad("there is no space between the two tokens"))?;
    let (left, right) = (&merge[..space], &merge[space + 1..]);
    if right.is_empty() {
        return Err(bad("the right-hand token is empty"));
    }
    Ok((left.to_owned(), right.to_owned()))
}

fn string<'a>(
    get: &impl Fn(&str) -> Option<&'a MetadataValue>,
    key: &'static str,
) -> Result<Option<&'a str>, TokenizerError> {
    get(key).map(|value| value.as_str().ok_or(TokenizerError::WrongType { key, expected: "a string" })).transpose()
}

fn boolean<'a>(
    get: &impl Fn(&str) -> Option<&'a MetadataValue>,
    key: &'static str,
) -> Result<Option<bool>, TokenizerError> {
    get(key).map(|value| value.as_bool().ok_or(TokenizerError::WrongType { key, expected: "a bool" })).transpose()
}

/// A token id (ids too large for u32 are reported against the vocabulary size;
/// smaller ones are range-checked when the tokenizer is built).
fn token_id<'a>(
    get: &impl Fn(&str) -> Option<&'a MetadataValue>,
    key: &'static str,
    role: &'static str,
    vocab_size: usize,
) -> Result<Option<u32>, TokenizerError> {
    let Some(value) = get(key) else { return Ok(None) };
    let id = value.as_u64().ok_or(TokenizerError::WrongType { key, expected: "a non-negative integer" })?;
    u32::try_from(id).map(Some).map_err(|_| TokenizerError::SpecialTokenOutOfRange { role, id, vocab_size })
}
