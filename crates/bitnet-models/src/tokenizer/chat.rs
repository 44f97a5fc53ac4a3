//! The BitNet b1.58 2B4T chat format.
//!
//! The `chat_template` of microsoft/bitnet-b1.58-2B-4T's tokenizer_config.json
//! ([`BITNET_CHAT_TEMPLATE`]) renders every message as
//! `{Role}: {content | trim}<|eot_id|>`, the role capitalised (`System`,
//! `User`, `Assistant`), and ends the prompt with `Assistant: ` (trailing
//! space included). The template itself has no BOS: HF adds
//! `<|begin_of_text|>` when the rendered text is tokenized (the LLaMA-3
//! post-processor) and bitnet.cpp prepends it as `add_bos_token` says.
//! [`Tokenizer::chat_prompt`] writes the BOS text at the front so that
//! `encode(prompt, false)` gives exactly the token sequence the model was
//! trained on:
//!
//! ```text
//! <|begin_of_text|>User: {msg}<|eot_id|>Assistant:
//! <|begin_of_text|>User: {q1}<|eot_id|>Assistant: {a1}<|eot_id|>User: {q2}<|eot_id|>Assistant:
//! ```

use serde::{Deserialize, Serialize};

use super::{Tokenizer, TokenizerError, EOT_TOKEN_TEXT};

/// The Jinja chat template of microsoft/bitnet-b1.58-2B-4T, written to files
/// this crate generates so that HF's `apply_chat_template` agrees with
/// [`Tokenizer::chat_prompt`].
pub const BITNET_CHAT_TEMPLATE: &str = "{% set loop_messages = messages %}{% for message in loop_messages %}\
{% set content = message['role'] | capitalize + ': '+ message['content'] | trim + '<|eot_id|>' %}\
{{ content }}{% endfor %}{% if add_generation_prompt %}{{ 'Assistant: ' }}{% endif %}";

/// Who wrote a chat message. Serialized in lower case, as in OpenAI's API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ChatRole {
    System,
    User,
    Assistant,
}

impl ChatRole {
    /// The label the template writes: the role name capitalised.
    pub fn label(self) -> &'static str {
        match self {
            Self::System => "System",
            Self::User => "User",
            Self::Assistant => "Assistant",
        }
    }
}

/// One message of a conversation.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct ChatMessage {
    pub role: ChatRole,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: ChatRole, content: impl Into<String>) -> Self {
        Self { role, content: content.into() }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new(ChatRole::System, content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new(ChatRole::User, content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(ChatRole::Assistant, content)
    }
}

impl Tokenizer {
    /// Renders `messages` in the BitNet b1.58 chat format (see the module
    /// docs), starting with the BOS token's text when the tokenizer has a BOS
    /// token and ending with the generation prompt `Assistant: `. Encode the
    /// result with `add_bos = false`.
    ///
    /// Errors if the vocabulary has no `<|eot_id|>` token, which ends every turn.
    pub fn chat_prompt(&self, messages: &[ChatMessage]) -> Result<String, TokenizerError> {
        if self.token_to_id(EOT_TOKEN_TEXT).is_none() {
            return Err(TokenizerError::MissingSpecialToken { token: EOT_TOKEN_TEXT, purpose: "the chat format" });
        }
        let mut prompt = String::new();
        if let Some(bos) = self.bos_id().and_then(|id| self.id_to_token(id)) {
            prompt.push_str(&bos);
        }
        for message in messages {
            prompt.push_str(message.role.label());
            prompt.push_str(": ");
            // Jinja's `trim` is Python's `str.strip()`: Unicode whitespace at both ends.
            prompt.push_str(message.content.trim());
            prompt.push_str(EOT_TOKEN_TEXT);
        }
        prompt.push_str("Assistant: ");
        Ok(prompt)
    }
}
