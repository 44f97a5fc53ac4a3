//! Byte-level BPE tokenizer (the LLaMA-3 tokenizer of BitNet b1.58 2B4T), loaded
//! from GGUF metadata or HF `tokenizer.json`, with the BitNet chat format and a
//! deterministic synthetic tokenizer for tests and synthetic models.
//!
//! Every source is first turned into one canonical description (token strings,
//! llama.cpp token types, merges, pre-tokenizer, special ids); the encoder is
//! then built from that description with HF's `tokenizers` crate. GGUF,
//! tokenizer.json and the synthetic generator therefore share one construction
//! path, and writing a tokenizer out is a plain dump of the description.
//!
//! Tokens are spelled in GPT-2's byte-to-unicode form (a space is `Ġ`), as both
//! file formats store them; control and user-defined tokens (`<|eot_id|>`) are
//! raw text and are recognised when they occur literally in the input.
//!
//! ```
//! use bitnet_models::tokenizer::{ChatMessage, Tokenizer};
//!
//! let tokenizer = Tokenizer::synthetic(512)?;
//! let prompt = tokenizer.chat_prompt(&[ChatMessage::user("What is 2 + 2?")])?;
//! assert_eq!(prompt, "<|begin_of_text|>User: What is 2 + 2?<|eot_id|>Assistant: ");
//! let ids = tokenizer.encode(&prompt, false)?;
//! assert_eq!(ids.first().copied(), tokenizer.bos_id());
//! assert_eq!(tokenizer.decode(&ids, false)?, prompt);
//! # Ok::<(), bitnet_models::tokenizer::TokenizerError>(())
//! ```

mod byte_level;
mod chat;
mod error;
mod gguf;
mod hf_json;
mod synthetic;
#[cfg(test)]
mod tests;

use std::collections::HashMap;
use std::fmt;

use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::pre_tokenizers::sequence::Sequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, PostProcessorWrapper, PreTokenizerWrapper, SplitDelimiterBehavior};

pub use byte_level::{byte_to_char, bytes_to_token, char_to_byte, token_to_bytes};
pub use chat::{ChatMessage, ChatRole, BITNET_CHAT_TEMPLATE};
pub use error::TokenizerError;
pub use gguf::keys as gguf_keys;
pub use synthetic::{SYNTHETIC_MIN_VOCAB_SIZE, SYNTHETIC_SPECIAL_TOKENS};

/// The LLaMA-3 pre-tokenizer split regex, exactly as in Meta's tokenizer.json
/// and llama.cpp's `llama-bpe` pre-tokenizer: contractions, letter runs with
/// one leading non-letter, digit groups of at most three, punctuation runs,
/// newlines and other whitespace.
pub const LLAMA3_SPLIT_REGEX: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

/// The text of the LLaMA-3 end-of-turn token, looked up by name when a file
/// does not give its id.
pub const EOT_TOKEN_TEXT: &str = "<|eot_id|>";

/// llama.cpp's token types (`tokenizer.ggml.token_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenType {
    Normal,
    Unknown,
    /// Special tokens such as `<|eot_id|>`: matched in text, skipped by `decode(.., true)`.
    Control,
    /// Tokens matched in text as a whole but decoded like ordinary text.
    UserDefined,
    Unused,
    Byte,
}

impl TokenType {
    /// Maps llama.cpp's numeric type (1 to 6) to a type.
    pub fn from_gguf(value: i64) -> Option<Self> {
        Some(match value {
            1 => Self::Normal,
            2 => Self::Unknown,
            3 => Self::Control,
            4 => Self::UserDefined,
            5 => Self::Unused,
            6 => Self::Byte,
            _ => return None,
        })
    }

    /// llama.cpp's numeric value of this type.
    pub fn to_gguf(self) -> i32 {
        match self {
            Self::Normal => 1,
            Self::Unknown => 2,
            Self::Control => 3,
            Self::UserDefined => 4,
            Self::Unused => 5,
            Self::Byte => 6,
        }
    }

    /// Tokens of these types are "added tokens": found in the raw text before
    /// pre-tokenization rather than produced by merges.
    fn is_added(self) -> bool {
        matches!(self, Self::Control | Self::UserDefined)
    }
}

/// How text is split into words before BPE runs on each word.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PreTokenizerKind {
    /// [`LLAMA3_SPLIT_REGEX`] then byte-level mapping (GGUF `llama-bpe`).
    Llama3,
    /// GPT-2's byte-level regex (GGUF `gpt2` or `default`).
    Gpt2,
}

impl PreTokenizerKind {
    /// The value of `tokenizer.ggml.pre` this kind is written as.
    pub fn gguf_name(self) -> &'static str {
        match self {
            Self::Llama3 => "llama-bpe",
            Self::Gpt2 => "gpt2",
        }
    }

    /// llama.cpp turns `ignore_merges` on for LLaMA-3 only: a word that is
    /// itself a token is emitted whole, whatever the merges would produce.
    fn default_ignore_merges(self) -> bool {
        matches!(self, Self::Llama3)
    }

    /// llama.cpp's default for `add_bos_token` when the key is absent.
    fn default_add_bos(self) -> bool {
        matches!(self, Self::Llama3)
    }
}

/// The canonical description every tokenizer is built from and written back as.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Vocabulary {
    /// Token strings by id, in byte-level spelling (special tokens raw).
    tokens: Vec<String>,
    token_types: Vec<TokenType>,
    /// Merge rules in priority order (index 0 is applied first).
    merges: Vec<(String, String)>,
    pre_tokenizer: PreTokenizerKind,
    ignore_merges: bool,
    bos_id: Option<u32>,
    eos_id: Option<u32>,
    eot_id: Option<u32>,
    add_bos: bool,
    chat_template: Option<String>,
}

/// A byte-level BPE tokenizer. See the module documentation.
#[derive(Clone)]
pub struct Tokenizer {
    inner: tokenizers::Tokenizer,
    vocab: Vocabulary,
    token_ids: HashMap<String, u32>,
}

impl fmt::Debug for Tokenizer {
    /// Summarises instead of printing a vocabulary of 128k tokens.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Tokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("n_merges", &self.vocab.merges.len())
            .field("pre_tokenizer", &self.vocab.pre_tokenizer)
            .field("ignore_merges", &self.vocab.ignore_merges)
            .field("bos_id", &self.vocab.bos_id)
            .field("eos_id", &self.vocab.eos_id)
            .field("eot_id", &self.vocab.eot_id)
            .field("add_bos", &self.vocab.add_bos)
            .finish_non_exhaustive()
    }
}

impl Tokenizer {
    /// Validates a description and builds the encoder from it.
    fn from_vocabulary(vocab: Vocabulary) -> Result<Self, TokenizerError> {
        let token_ids = validate(&vocab)?;
        let inner = build_inner(&vocab)?;
        Ok(Self { inner, vocab, token_ids })
    }

    /// Encodes `text`. Control and user-defined tokens written in the text
    /// (e.g. `<|eot_id|>`) become their ids; with `add_bos` the BOS id is
    /// prepended, and it is an error to ask for it when there is none.
    pub fn encode(&self, text: &str, add_bos: bool) -> Result<Vec<u32>, TokenizerError> {
        let bos = if add_bos { Some(self.vocab.bos_id.ok_or(TokenizerError::NoBosToken)?) } else { None };
        // The post-processor (which may add BOS) is bypassed on purpose: BOS is
        // the caller's explicit choice here, not the file's default.
        let encoding = self.inner.encode_fast(text, false).map_err(|e| TokenizerError::library("encoding text", e))?;
        let mut ids = Vec::with_capacity(encoding.len() + 1);
        ids.extend(bos);
        ids.extend_from_slice(encoding.get_ids());
        Ok(ids)
    }

    /// Decodes ids to text. Byte sequences that are not valid UTF-8 (e.g. a
    /// multi-byte character cut in half) become U+FFFD. With `skip_special`,
    /// control tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special: bool) -> Result<String, TokenizerError> {
        self.check_ids(ids)?;
        self.inner.decode(ids, skip_special).map_err(|e| TokenizerError::library("decoding ids", e))
    }

    /// The raw bytes token `id` stands for (its text for special tokens), for
    /// streaming output where a character may span several tokens.
    pub fn token_bytes(&self, id: u32) -> Option<Vec<u8>> {
        let token = self.vocab.tokens.get(usize::try_from(id).ok()?)?;
        // Same rule as the byte-level decoder: a token whose characters are
        // not all byte-level characters is raw text.
        Some(token_to_bytes(token).unwrap_or_else(|| token.as_bytes().to_vec()))
    }

    fn check_ids(&self, ids: &[u32]) -> Result<(), TokenizerError> {
        let vocab_size = self.vocab_size();
        match ids.iter().position(|&id| usize::try_from(id).map_or(true, |i| i >= vocab_size)) {
            Some(position) => Err(TokenizerError::TokenIdOutOfRange { id: ids[position], position, vocab_size }),
            None => Ok(()),
        }
    }

    /// Number of tokens, including special and reserved ones.
    pub fn vocab_size(&self) -> usize {
        self.vocab.tokens.len()
    }

    pub fn bos_id(&self) -> Option<u32> {
        self.vocab.bos_id
    }

    pub fn eos_id(&self) -> Option<u32> {
        self.vocab.eos_id
    }

    /// The end-of-turn token (`<|eot_id|>` in LLaMA-3 vocabularies).
    pub fn eot_id(&self) -> Option<u32> {
        self.vocab.eot_id
    }

    /// Whether the model file asks for BOS at the start of a prompt.
    pub fn add_bos(&self) -> bool {
        self.vocab.add_bos
    }

    /// Is this id a stop token (eos or eot)?
    pub fn is_stop(&self, id: u32) -> bool {
        self.vocab.eos_id == Some(id) || self.vocab.eot_id == Some(id)
    }

    /// The id of a token given in its stored (byte-level) spelling.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.token_ids.get(token).copied()
    }

    /// The stored (byte-level) spelling of a token.
    pub fn id_to_token(&self, id: u32) -> Option<String> {
        self.vocab.tokens.get(usize::try_from(id).ok()?).cloned()
    }

    pub fn token_type(&self, id: u32) -> Option<TokenType> {
        self.vocab.token_types.get(usize::try_from(id).ok()?).copied()
    }

    /// All tokens by id, in stored spelling.
    pub fn tokens(&self) -> &[String] {
        &self.vocab.tokens
    }

    /// The merge rules in priority order.
    pub fn merges(&self) -> &[(String, String)] {
        &self.vocab.merges
    }

    pub fn pre_tokenizer(&self) -> PreTokenizerKind {
        self.vocab.pre_tokenizer
    }

    /// The Jinja chat template carried by the file, if any (informational:
    /// [`Tokenizer::chat_prompt`] implements the BitNet format directly).
    pub fn chat_template(&self) -> Option<&str> {
        self.vocab.chat_template.as_deref()
    }
}

/// The id of the token spelled `text`, if any.
fn find_token(tokens: &[String], text: &str) -> Option<u32> {
    tokens.iter().position(|t| t == text).and_then(|i| u32::try_from(i).ok())
}

/// Checks the invariants the encoder relies on and returns the token-to-id map.
fn validate(vocab: &Vocabulary) -> Result<HashMap<String, u32>, TokenizerError> {
    let n_tokens = vocab.tokens.len();
    if n_tokens == 0 {
        return Err(TokenizerError::EmptyVocabulary);
    }
    if u32::try_from(n_tokens).is_err() {
        return Err(TokenizerError::VocabularyTooLarge { n_tokens });
    }
    if vocab.token_types.len() != n_tokens {
        return Err(TokenizerError::TokenTypeLengthMismatch { n_tokens, n_token_types: vocab.token_types.len() });
    }

    let mut token_ids = HashMap::with_capacity(n_tokens);
    for (id, token) in (0u32..).zip(&vocab.tokens) {
        if token.is_empty() {
            return Err(TokenizerError::EmptyToken { id });
        }
        if let Some(&first_id) = token_ids.get(token.as_str()) {
            return Err(TokenizerError::DuplicateToken { token: token.clone(), id, first_id });
        }
        token_ids.insert(token.clone(), id);
    }

    for (index, (left, right)) in vocab.merges.iter().enumerate() {
        let bad = |reason: String| TokenizerError::BadMerge { index, merge: format!("{left} {right}"), reason };
        for part in [left, right] {
            if !token_ids.contains_key(part.as_str()) {
                return Err(bad(format!("`{part}` is not in the vocabulary")));
            }
        }
        let merged = format!("{left}{right}");
        if !token_ids.contains_key(&merged) {
            return Err(bad(format!("the merged token `{merged}` is not in the vocabulary")));
        }
    }

    for (role, id) in [("bos", vocab.bos_id), ("eos", vocab.eos_id), ("eot", vocab.eot_id)] {
        if let Some(id) = id {
            if usize::try_from(id).map_or(true, |i| i >= n_tokens) {
                return Err(TokenizerError::SpecialTokenOutOfRange { role, id: id.into(), vocab_size: n_tokens });
            }
        }
    }
    Ok(token_ids)
}

/// The pre-tokenizer of each kind, as HF `tokenizers` spells it in tokenizer.json.
fn pre_tokenizer(kind: PreTokenizerKind) -> Result<PreTokenizerWrapper, TokenizerError> {
    Ok(match kind {
        PreTokenizerKind::Llama3 => {
            let split =
                Split::new(SplitPattern::Regex(LLAMA3_SPLIT_REGEX.to_owned()), SplitDelimiterBehavior::Isolated, false)
                    .map_err(|e| TokenizerError::library("compiling the LLaMA-3 split regex", e))?;
            Sequence::new(vec![split.into(), ByteLevel::new(false, true, false).into()]).into()
        }
        PreTokenizerKind::Gpt2 => ByteLevel::new(false, true, true).into(),
    })
}

/// The post-processor written to tokenizer.json: LLaMA-3's BOS template when
/// the tokenizer adds BOS, so that HF loaders agree with [`Tokenizer::add_bos`].
/// (Built from JSON because the typed template API cannot spell a special token
/// that contains a space or a colon.)
fn post_processor(vocab: &Vocabulary) -> Result<PostProcessorWrapper, TokenizerError> {
    let byte_level = serde_json::json!({
        "type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": true
    });
    let bos =
        vocab.bos_id.filter(|_| vocab.add_bos).and_then(|id| Some((id, vocab.tokens.get(usize::try_from(id).ok()?)?)));
    let value = match bos {
        None => byte_level,
        Some((bos_id, bos_text)) => {
            let bos_piece = serde_json::json!({ "SpecialToken": { "id": bos_text, "type_id": 0 } });
            let bos_piece_pair = serde_json::json!({ "SpecialToken": { "id": bos_text, "type_id": 1 } });
            serde_json::json!({
                "type": "Sequence",
                "processors": [
                    byte_level,
                    {
                        "type": "TemplateProcessing",
                        "single": [bos_piece, { "Sequence": { "id": "A", "type_id": 0 } }],
                        "pair": [
                            bos_piece, { "Sequence": { "id": "A", "type_id": 0 } },
                            bos_piece_pair, { "Sequence": { "id": "B", "type_id": 1 } }
                        ],
                        "special_tokens": { bos_text.as_str(): { "id": bos_text, "ids": [bos_id], "tokens": [bos_text] } }
                    }
                ]
            })
        }
    };
    serde_json::from_value(value).map_err(|e| TokenizerError::library("building the post-processor", e))
}

/// Builds the HF encoder: every token goes into the BPE vocabulary (so ids are
/// exactly the list positions), and control/user-defined tokens are also
/// registered as added tokens so that they are matched in raw text.
fn build_inner(vocab: &Vocabulary) -> Result<tokenizers::Tokenizer, TokenizerError> {
    let bpe_vocab: Vocab = vocab.tokens.iter().cloned().zip(0u32..).collect();
    let merges: Merges = vocab.merges.clone();
    let bpe = BPE::builder()
        .vocab_and_merges(bpe_vocab, merges)
        .ignore_merges(vocab.ignore_merges)
        .build()
        .map_err(|e| TokenizerError::library("building the BPE model", e))?;

    let mut inner = tokenizers::Tokenizer::new(bpe);
    inner.with_pre_tokenizer(Some(pre_tokenizer(vocab.pre_tokenizer)?));
    inner.with_decoder(Some(ByteLevel::default()));
    inner.with_post_processor(Some(post_processor(vocab)?));

    let added: Vec<AddedToken> = vocab
        .tokens
        .iter()
        .zip(&vocab.token_types)
        .filter(|(_, token_type)| token_type.is_added())
        .map(|(token, &token_type)| AddedToken::from(token.clone(), token_type == TokenType::Control).normalized(false))
        .collect();
    inner.add_tokens(&added);
    Ok(inner)
}
