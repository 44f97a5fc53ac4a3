//! The tokenizer as HF stores it: `tokenizer.json` (the `tokenizers` library's
//! format) plus the special-token settings of `tokenizer_config.json`.

use serde_json::{json, Value};

use super::gguf::parse_merge;
use super::{
    find_token, PreTokenizerKind, TokenType, Tokenizer, TokenizerError, Vocabulary, EOT_TOKEN_TEXT, LLAMA3_SPLIT_REGEX,
};

impl Tokenizer {
    /// Builds the tokenizer from HF `tokenizer.json` text, plus optionally
    /// `tokenizer_config.json` text for `bos_token`, `eos_token`,
    /// `add_bos_token` and `chat_template`.
    ///
    /// Supported is what byte-level BPE files use: a `BPE` model without
    /// byte fallback or subword affixes, no normalizer, a `ByteLevel` decoder,
    /// and either LLaMA-3's pre-tokenizer (split regex + byte level) or
    /// GPT-2's (byte level with its regex). Token ids must be dense. Added
    /// tokens become control tokens if `special`, user-defined otherwise.
    /// Without a config, BOS and `add_bos` come from a BOS-first
    /// `TemplateProcessing` post-processor; EOS stays unknown.
    pub fn from_tokenizer_json(
        tokenizer_json: &str,
        tokenizer_config_json: Option<&str>,
    ) -> Result<Self, TokenizerError> {
        let root: Value = serde_json::from_str(tokenizer_json)
            .map_err(|source| TokenizerError::Json { file: "tokenizer.json", source })?;
        let config = match tokenizer_config_json {
            Some(text) => Config::parse(text)?,
            None => Config::default(),
        };

        let model = root.get("model").ok_or_else(|| invalid("there is no `model`"))?;
        let model_type = model.get("type").and_then(Value::as_str).ok_or_else(|| invalid("`model.type` is missing"))?;
        if model_type != "BPE" {
            return Err(TokenizerError::UnsupportedModel { model: model_type.to_owned() });
        }
        check_bpe_options(model)?;
        if !is_null(root.get("normalizer")) {
            return Err(invalid("normalizers are not supported (byte-level BPE files have none)"));
        }
        let pre_tokenizer = detect_pre_tokenizer(root.get("pre_tokenizer"))?;
        check_decoder(root.get("decoder"))?;

        let (tokens, token_types) = read_tokens(model, root.get("added_tokens"))?;
        let merges = read_merges(model.get("merges"))?;
        let ignore_merges = match model.get("ignore_merges") {
            None | Some(Value::Null) => false,
            Some(value) => value.as_bool().ok_or_else(|| invalid("`model.ignore_merges` is not a bool"))?,
        };

        let template_bos = template_bos_token(root.get("post_processor"));
        let bos_text = config.bos_token.clone().or_else(|| template_bos.clone());
        let lookup = |role: &str, text: Option<String>| -> Result<Option<u32>, TokenizerError> {
            let Some(text) = text else { return Ok(None) };
            find_token(&tokens, &text).map(Some).ok_or_else(|| TokenizerError::InvalidTokenizerConfig {
                reason: format!("the {role} token `{text}` is not in the vocabulary"),
            })
        };
        let vocab = Vocabulary {
            bos_id: lookup("bos", bos_text)?,
            eos_id: lookup("eos", config.eos_token.clone())?,
            eot_id: find_token(&tokens, EOT_TOKEN_TEXT),
            add_bos: config.add_bos_token.unwrap_or(template_bos.is_some()),
            chat_template: config.chat_template,
            pre_tokenizer,
            ignore_merges,
            tokens,
            token_types,
            merges,
        };
        Self::from_vocabulary(vocab)
    }

    /// The tokenizer as HF `tokenizer.json` text, loadable by the `tokenizers`
    /// library and by transformers' `PreTrainedTokenizerFast`.
    ///
    /// All tokens, special ones included, are in `model.vocab` (so ids are the
    /// list positions); control and user-defined tokens are also listed in
    /// `added_tokens`. llama.cpp's `unknown`, `unused` and `byte` types have
    /// no tokenizer.json equivalent and read back as normal.
    pub fn to_tokenizer_json(&self) -> Result<String, TokenizerError> {
        self.inner.to_string(true).map_err(|e| TokenizerError::library("serializing tokenizer.json", e))
    }

    /// `tokenizer_config.json` text with the special tokens, `add_bos_token`,
    /// the chat template and `tokenizer_class: PreTrainedTokenizerFast`.
    pub fn to_tokenizer_config_json(&self) -> String {
        let token_text = |id: Option<u32>| id.and_then(|id| self.id_to_token(id));
        let mut config = json!({
            "add_bos_token": self.vocab.add_bos,
            "add_eos_token": false,
            "bos_token": token_text(self.vocab.bos_id),
            "eos_token": token_text(self.vocab.eos_id),
            "clean_up_tokenization_spaces": false,
            "tokenizer_class": "PreTrainedTokenizerFast",
        });
        if let (Some(template), Some(object)) = (&self.vocab.chat_template, config.as_object_mut()) {
            object.insert("chat_template".to_owned(), Value::String(template.clone()));
        }
        // Serializing a `Value` built from strings and bools cannot fail; the
        // fallback keeps this function total.
        serde_json::to_string_pretty(&config).unwrap_or_else(|_| config.to_string())
    }
}

fn invalid(reason: impl Into<String>) -> TokenizerError {
    TokenizerError::InvalidTokenizerJson { reason: reason.into() }
}

fn is_null(value: Option<&Value>) -> bool {
    matches!(value, None | Some(Value::Null))
}

/// Rejects BPE options that change the algorithm into something this module
/// does not write back (byte fallback, subword prefixes/suffixes, dropout).
fn check_bpe_options(model: &Value) -> Result<(), TokenizerError> {
    if model.get("byte_fallback").and_then(Value::as_bool) == Some(true) {
        return Err(invalid("`model.byte_fallback` is not supported (byte-level BPE needs no fallback)"));
    }
    for key in ["continuing_subword_prefix", "end_of_word_suffix"] {
        match model.get(key) {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s.is_empty() => {}
            Some(_) => return Err(invalid(format!("`model.{key}` is not supported"))),
        }
    }
    if !is_null(model.get("dropout")) {
        return Err(invalid("`model.dropout` is not supported (encoding must be deterministic)"));
    }
    Ok(())
}

/// Recognises LLaMA-3's and GPT-2's pre-tokenizers; anything else is reported
/// with its JSON so the message shows what the file has.
fn detect_pre_tokenizer(value: Option<&Value>) -> Result<PreTokenizerKind, TokenizerError> {
    let unsupported = || TokenizerError::UnsupportedPreTokenizer {
        pre: value.map_or_else(|| "null".to_owned(), |v| v.to_string().chars().take(300).collect()),
    };
    let Some(value) = value else { return Err(unsupported()) };
    let is_byte_level = |v: &Value, use_regex: bool| {
        v.get("type").and_then(Value::as_str) == Some("ByteLevel")
            && v.get("add_prefix_space").and_then(Value::as_bool) != Some(true)
            && v.get("use_regex").and_then(Value::as_bool).unwrap_or(true) == use_regex
    };
    if is_byte_level(value, true) {
        return Ok(PreTokenizerKind::Gpt2);
    }
    let is_llama3_split = |v: &Value| {
        v.get("type").and_then(Value::as_str) == Some("Split")
            && v.get("pattern").and_then(|p| p.get("Regex")).and_then(Value::as_str) == Some(LLAMA3_SPLIT_REGEX)
            && v.get("behavior").and_then(Value::as_str) == Some("Isolated")
            && v.get("invert").and_then(Value::as_bool) != Some(true)
    };
    let parts = (value.get("type").and_then(Value::as_str) == Some("Sequence"))
        .then(|| value.get("pretokenizers").and_then(Value::as_array))
        .flatten();
    match parts.map(Vec::as_slice) {
        Some([split, byte_level]) if is_llama3_split(split) && is_byte_level(byte_level, false) => {
            Ok(PreTokenizerKind::Llama3)
        }
        _ => Err(unsupported()),
    }
}

fn check_decoder(value: Option<&Value>) -> Result<(), TokenizerError> {
    match value.and_then(|v| v.get("type")).and_then(Value::as_str) {
        Some("ByteLevel") => Ok(()),
        other => Err(invalid(format!("the decoder must be `ByteLevel`, found {}", other.unwrap_or("none")))),
    }
}

/// Merges as `["a b", ...]` (older files) or `[["a", "b"], ...]` (tokenizers >= 0.20).
fn read_merges(value: Option<&Value>) -> Result<Vec<(String, String)>, TokenizerError> {
    let Some(value) = value else { return Ok(Vec::new()) };
    let merges = value.as_array().ok_or_else(|| invalid("`model.merges` is not an array"))?;
    merges
        .iter()
        .enumerate()
        .map(|(index, merge)| match merge {
            Value::String(text) => parse_merge(index, text),
            Value::Array(pair) => match pair.as_slice() {
                [Value::String(left), Value::String(right)] => Ok((left.clone(), right.clone())),
                _ => Err(TokenizerError::BadMerge {
                    index,
                    merge: merge.to_string(),
                    reason: "a merge must be two strings".to_owned(),
                }),
            },
            _ => Err(TokenizerError::BadMerge {
                index,
                merge: merge.to_string(),
                reason: "a merge must be a string or a pair of strings".to_owned(),
            }),
        })
        .collect()
}

/// Tokens by id from `model.vocab` and `added_tokens`, with their types.
fn read_tokens(model: &Value, added_tokens: Option<&Value>) -> Result<(Vec<String>, Vec<TokenType>), TokenizerError> {
    let vocab =
        model.get("vocab").and_then(Value::as_object).ok_or_else(|| invalid("`model.vocab` is not an object"))?;
    let mut by_id: Vec<Option<(String, TokenType)>> = Vec::new();
    let mut place = |id: &Value, token: &str, token_type: TokenType| -> Result<(), TokenizerError> {
        let id = id
            .as_u64()
            .and_then(|id| u32::try_from(id).ok())
            .ok_or_else(|| invalid(format!("token `{token}` has id {id}, which is not a u32")))?;
        let index = usize::try_from(id).map_err(|_| invalid(format!("token id {id} does not fit in memory")))?;
        if by_id.len() <= index {
            by_id.resize(index + 1, None);
        }
        match &mut by_id[index] {
            slot @ None => *slot = Some((token.to_owned(), token_type)),
            Some((existing, existing_type)) if existing == token => *existing_type = token_type,
            Some((existing, _)) => {
                return Err(invalid(format!("id {id} is given to both `{existing}` and `{token}`")));
            }
        }
        Ok(())
    };

    for (token, id) in vocab {
        place(id, token, TokenType::Normal)?;
    }
    if let Some(added_tokens) = added_tokens.filter(|v| !v.is_null()) {
        let added_tokens = added_tokens.as_array().ok_or_else(|| invalid("`added_tokens` is not an array"))?;
        for (index, added) in added_tokens.iter().enumerate() {
            let content = added
                .get("content")
                .and_then(Value::as_str)
                .ok_or_else(|| invalid(format!("added token {index} has no `content`")))?;
            let id = added.get("id").ok_or_else(|| invalid(format!("added token {index} has no `id`")))?;
            let special = added.get("special").and_then(Value::as_bool).unwrap_or(false);
            place(id, content, if special { TokenType::Control } else { TokenType::UserDefined })?;
        }
    }

    let mut tokens = Vec::with_capacity(by_id.len());
    let mut token_types = Vec::with_capacity(by_id.len());
    for (id, slot) in by_id.into_iter().enumerate() {
        let (token, token_type) =
            slot.ok_or_else(|| invalid(format!("token id {id} has no token (ids must be dense)")))?;
        tokens.push(token);
        token_types.push(token_type);
    }
    Ok((tokens, token_types))
}

/// The first special token of a `TemplateProcessing` (alone or inside a
/// `Sequence`) whose single-sequence template starts with one: LLaMA-3's BOS.
fn template_bos_token(value: Option<&Value>) -> Option<String> {
    let value = value?;
    match value.get("type").and_then(Value::as_str)? {
        "TemplateProcessing" => {
            value.get("single")?.as_array()?.first()?.get("SpecialToken")?.get("id")?.as_str().map(str::to_owned)
        }
        "Sequence" => value.get("processors")?.as_array()?.iter().find_map(|p| template_bos_token(Some(p))),
        _ => None,
    }
}

/// What this module reads from `tokenizer_config.json`.
#[derive(Debug, Default)]
struct Config {
    bos_token: Option<String>,
    eos_token: Option<String>,
    add_bos_token: Option<bool>,
    chat_template: Option<String>,
}

impl Config {
    fn parse(text: &str) -> Result<Self, TokenizerError> {
        let root: Value = serde_json::from_str(text)
            .map_err(|source| TokenizerError::Json { file: "tokenizer_config.json", source })?;
        let bad = |reason: String| TokenizerError::InvalidTokenizerConfig { reason };
        // A special token is a string or an AddedToken object with `content`.
        let token = |key: &str| -> Result<Option<String>, TokenizerError> {
            match root.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(text)) => Ok(Some(text.clone())),
                Some(object) => object
                    .get("content")
                    .and_then(Value::as_str)
                    .map(|text| Some(text.to_owned()))
                    .ok_or_else(|| bad(format!("`{key}` is neither a string nor an object with `content`"))),
            }
        };
        let add_bos_token = match root.get("add_bos_token") {
            None | Some(Value::Null) => None,
            Some(value) => Some(value.as_bool().ok_or_else(|| bad("`add_bos_token` is not a bool".to_owned()))?),
        };
        // `chat_template` is a string, or a list of named templates of which
        // the one named `default` is the chat template.
        let chat_template = match root.get("chat_template") {
            None | Some(Value::Null) => None,
            Some(Value::String(template)) => Some(template.clone()),
            Some(Value::Array(named)) => named
                .iter()
                .find(|entry| entry.get("name").and_then(Value::as_str) == Some("default"))
                .and_then(|entry| entry.get("template"))
                .and_then(Value::as_str)
                .map(str::to_owned),
            Some(_) => return Err(bad("`chat_template` is neither a string nor a list".to_owned())),
        };
        Ok(Self { bos_token: token("bos_token")?, eos_token: token("eos_token")?, add_bos_token, chat_template })
    }
}
