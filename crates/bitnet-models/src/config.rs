//! `BitNetConfig`: the hyperparameters of a BitNet b1.58 model, read from GGUF
//! metadata or an HF `config.json`, validated before any weight is touched.

use serde_json::{json, Value};

use crate::gguf::{GgufFile, MetadataValue};

/// GGUF architecture names we accept. bitnet.cpp writes `bitnet-b1.58`,
/// upstream llama.cpp writes `bitnet`, and some converters write `bitnet-25`.
pub const SUPPORTED_ARCHITECTURES: [&str; 3] = ["bitnet-b1.58", "bitnet", "bitnet-25"];

/// The architecture name our writer uses (bitnet.cpp's, so its tools read our files).
pub const DEFAULT_ARCHITECTURE: &str = "bitnet-b1.58";

#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    #[error("unsupported architecture {found:?}; expected one of {SUPPORTED_ARCHITECTURES:?}")]
    UnsupportedArchitecture { found: String },
    #[error("missing required metadata key `{key}`")]
    MissingKey { key: String },
    #[error("metadata key `{key}` has the wrong type or value: expected {expected}, found {found}")]
    BadValue { key: String, expected: &'static str, found: String },
    #[error("invalid model config: {0}")]
    Invalid(String),
    #[error("invalid config.json: {0}")]
    Json(String),
}

/// Hyperparameters of a BitNet b1.58 transformer.
#[derive(Debug, Clone, PartialEq)]
pub struct BitNetConfig {
    /// GGUF architecture name (one of [`SUPPORTED_ARCHITECTURES`]).
    pub architecture: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub n_layers: usize,
    pub n_heads: usize,
    pub n_kv_heads: usize,
    pub head_dim: usize,
    /// Maximum number of positions (the context length).
    pub max_position_embeddings: usize,
    pub rope_theta: f32,
    pub rms_norm_eps: f32,
}

impl BitNetConfig {
    /// The hyperparameters of microsoft/bitnet-b1.58-2B-4T (FORMATS.md).
    pub fn bitnet_2b4t() -> Self {
        Self {
            architecture: DEFAULT_ARCHITECTURE.to_owned(),
            vocab_size: 128_256,
            hidden_size: 2560,
            intermediate_size: 6912,
            n_layers: 30,
            n_heads: 20,
            n_kv_heads: 5,
            head_dim: 128,
            max_position_embeddings: 4096,
            rope_theta: 500_000.0,
            rms_norm_eps: 1e-5,
        }
    }

    /// Width of the concatenated key (or value) heads.
    pub fn kv_dim(&self) -> usize {
        self.n_kv_heads * self.head_dim
    }

    /// Query heads per key/value head (GQA group size).
    pub fn group_size(&self) -> usize {
        self.n_heads / self.n_kv_heads
    }

    /// Checks every invariant the forward pass and the I2_S kernels rely on.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |msg: String| Err(ConfigError::Invalid(msg));
        let positive = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("n_layers", self.n_layers),
            ("n_heads", self.n_heads),
            ("n_kv_heads", self.n_kv_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ];
        for (name, value) in positive {
            if value == 0 {
                return invalid(format!("{name} must be positive"));
            }
        }
        // Sizes beyond these are not BitNet models but corrupt headers; the
        // bound keeps every later size computation far from overflow.
        const LIMIT: usize = 1 << 20;
        for (name, value) in positive {
            if value > LIMIT {
                return invalid(format!("{name} = {value} exceeds the sanity limit {LIMIT}"));
            }
        }
        if self.n_heads % self.n_kv_heads != 0 {
            return invalid(format!("n_heads {} is not a multiple of n_kv_heads {}", self.n_heads, self.n_kv_heads));
        }
        if self.n_heads * self.head_dim != self.hidden_size {
            return invalid(format!(
                "n_heads {} x head_dim {} != hidden_size {} (the attention sub-norm spans the concatenated heads)",
                self.n_heads, self.head_dim, self.hidden_size
            ));
        }
        if self.head_dim % 2 != 0 {
            return invalid(format!("head_dim {} must be even for rotary embeddings", self.head_dim));
        }
        // The I2_S layout packs rows in blocks of 128 input elements.
        for (name, k) in [("hidden_size", self.hidden_size), ("intermediate_size", self.intermediate_size)] {
            if k % 128 != 0 {
                return invalid(format!(
                    "{name} {k} is not a multiple of 128, which the I2_S layout requires for projection inputs"
                ));
            }
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return invalid(format!("rope_theta {} must be a positive number", self.rope_theta));
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0 && self.rms_norm_eps < 1.0) {
            return invalid(format!("rms_norm_eps {} must be in (0, 1)", self.rms_norm_eps));
        }
        if !SUPPORTED_ARCHITECTURES.contains(&self.architecture.as_str()) {
            return Err(ConfigError::UnsupportedArchitecture { found: self.architecture.clone() });
        }
        Ok(())
    }

    /// Reads the hyperparameters from GGUF metadata. Every key is required
    /// except `vocab_size` (falls back to the token list length) and
    /// `attention.key_length` (falls back to hidden / heads).
    pub fn from_gguf(file: &GgufFile) -> Result<Self, ConfigError> {
        let get = |key: &str| file.get(key);
        Self::from_gguf_metadata(get)
    }

    /// Like [`Self::from_gguf`], from any metadata lookup.
    pub fn from_gguf_metadata<'a>(get: impl Fn(&str) -> Option<&'a MetadataValue>) -> Result<Self, ConfigError> {
        let architecture = get("general.architecture")
            .ok_or_else(|| ConfigError::MissingKey { key: "general.architecture".into() })?
            .as_str()
            .ok_or_else(|| ConfigError::BadValue {
                key: "general.architecture".into(),
                expected: "string",
                found: "another type".into(),
            })?
            .to_owned();
        if !SUPPORTED_ARCHITECTURES.contains(&architecture.as_str()) {
            return Err(ConfigError::UnsupportedArchitecture { found: architecture });
        }
        let key = |suffix: &str| format!("{architecture}.{suffix}");
        let uint = |k: String| -> Result<usize, ConfigError> {
            let v = get(&k).ok_or_else(|| ConfigError::MissingKey { key: k.clone() })?;
            v.as_u64().and_then(|x| usize::try_from(x).ok()).ok_or_else(|| ConfigError::BadValue {
                key: k,
                expected: "non-negative integer",
                found: v.to_string(),
            })
        };
        let float = |k: String| -> Result<f32, ConfigError> {
            let v = get(&k).ok_or_else(|| ConfigError::MissingKey { key: k.clone() })?;
            v.as_f64().map(|x| x as f32).ok_or_else(|| ConfigError::BadValue {
                key: k,
                expected: "number",
                found: v.to_string(),
            })
        };
        let hidden_size = uint(key("embedding_length"))?;
        let n_heads = uint(key("attention.head_count"))?;
        let vocab_size = match get(&key("vocab_size")) {
            Some(_) => uint(key("vocab_size"))?,
            None => get("tokenizer.ggml.tokens").and_then(|v| v.as_array()).map(|(_, items)| items.len()).ok_or_else(
                || ConfigError::MissingKey { key: format!("{} (or tokenizer.ggml.tokens)", key("vocab_size")) },
            )?,
        };
        let head_dim = match get(&key("attention.key_length")) {
            Some(_) => uint(key("attention.key_length"))?,
            None if n_heads > 0 => hidden_size / n_heads,
            None => 0,
        };
        if get(&key("attention.value_length")).is_some() {
            let value_length = uint(key("attention.value_length"))?;
            if value_length != head_dim {
                return Err(ConfigError::Invalid(format!(
                    "attention.value_length {value_length} differs from key_length {head_dim}; not supported"
                )));
            }
        }
        if get(&key("rope.dimension_count")).is_some() {
            let rot = uint(key("rope.dimension_count"))?;
            if rot != head_dim {
                return Err(ConfigError::Invalid(format!(
                    "rope.dimension_count {rot} != head_dim {head_dim}: partial rotary embeddings are not BitNet b1.58"
                )));
            }
        }
        if let Some(scaling) = get(&key("rope.scaling.type")) {
            if scaling.as_str() != Some("none") {
                return Err(ConfigError::Invalid(format!(
                    "rope scaling {scaling} is not supported (BitNet b1.58 uses plain RoPE)"
                )));
            }
        }
        let config = Self {
            architecture: architecture.clone(),
            vocab_size,
            hidden_size,
            intermediate_size: uint(key("feed_forward_length"))?,
            n_layers: uint(key("block_count"))?,
            n_heads,
            n_kv_heads: uint(key("attention.head_count_kv"))?,
            head_dim,
            max_position_embeddings: uint(key("context_length"))?,
            rope_theta: float(key("rope.freq_base"))?,
            rms_norm_eps: float(key("attention.layer_norm_rms_epsilon"))?,
        };
        config.validate()?;
        Ok(config)
    }

    /// The metadata entries (without tokenizer keys) that describe this config.
    pub fn to_gguf_metadata(&self) -> Vec<(String, MetadataValue)> {
        let arch = &self.architecture;
        let u32v = |v: usize| MetadataValue::U32(u32::try_from(v).unwrap_or(u32::MAX));
        vec![
            ("general.architecture".into(), MetadataValue::String(arch.clone())),
            (format!("{arch}.vocab_size"), u32v(self.vocab_size)),
            (format!("{arch}.context_length"), u32v(self.max_position_embeddings)),
            (format!("{arch}.embedding_length"), u32v(self.hidden_size)),
            (format!("{arch}.feed_forward_length"), u32v(self.intermediate_size)),
            (format!("{arch}.block_count"), u32v(self.n_layers)),
            (format!("{arch}.attention.head_count"), u32v(self.n_heads)),
            (format!("{arch}.attention.head_count_kv"), u32v(self.n_kv_heads)),
            (format!("{arch}.attention.key_length"), u32v(self.head_dim)),
            (format!("{arch}.attention.value_length"), u32v(self.head_dim)),
            (format!("{arch}.rope.dimension_count"), u32v(self.head_dim)),
            (format!("{arch}.rope.freq_base"), MetadataValue::F32(self.rope_theta)),
            (format!("{arch}.attention.layer_norm_rms_epsilon"), MetadataValue::F32(self.rms_norm_eps)),
        ]
    }

    /// Reads an HF `config.json` of `model_type = "bitnet"`.
    pub fn from_hf_config_json(text: &str) -> Result<Self, ConfigError> {
        let root: Value = serde_json::from_str(text).map_err(|e| ConfigError::Json(e.to_string()))?;
        let field = |name: &str| -> Result<&Value, ConfigError> {
            root.get(name).ok_or_else(|| ConfigError::MissingKey { key: format!("config.json: {name}") })
        };
        let uint = |name: &str| -> Result<usize, ConfigError> {
            let v = field(name)?;
            v.as_u64().and_then(|x| usize::try_from(x).ok()).ok_or_else(|| ConfigError::BadValue {
                key: format!("config.json: {name}"),
                expected: "non-negative integer",
                found: v.to_string(),
            })
        };
        let float = |name: &str| -> Result<f32, ConfigError> {
            let v = field(name)?;
            v.as_f64().map(|x| x as f32).ok_or_else(|| ConfigError::BadValue {
                key: format!("config.json: {name}"),
                expected: "number",
                found: v.to_string(),
            })
        };
        let model_type = field("model_type")?.as_str().unwrap_or_default();
        if model_type != "bitnet" {
            return Err(ConfigError::UnsupportedArchitecture { found: format!("HF model_type {model_type:?}") });
        }
        let hidden_act = root.get("hidden_act").and_then(Value::as_str).unwrap_or("relu2");
        if hidden_act != "relu2" {
            return Err(ConfigError::Invalid(format!(
                "hidden_act {hidden_act:?} is not supported; BitNet b1.58 uses relu2"
            )));
        }
        if root.get("tie_word_embeddings").and_then(Value::as_bool) == Some(false) {
            return Err(ConfigError::Invalid(
                "tie_word_embeddings = false is not supported for HF folders (BitNet b1.58 ties the head)".into(),
            ));
        }
        if let Some(scaling) = root.get("rope_scaling").filter(|v| !v.is_null()) {
            return Err(ConfigError::Invalid(format!(
                "rope_scaling {scaling} is not supported (BitNet b1.58 uses plain RoPE)"
            )));
        }
        let hidden_size = uint("hidden_size")?;
        let n_heads = uint("num_attention_heads")?;
        let head_dim = match root.get("head_dim") {
            Some(v) if !v.is_null() => uint("head_dim")?,
            _ if n_heads > 0 => hidden_size / n_heads,
            _ => 0,
        };
        let rope_theta = match root.get("rope_theta") {
            Some(_) => float("rope_theta")?,
            // transformers 5 moved rope_theta into rope_parameters.
            None => root
                .get("rope_parameters")
                .and_then(|p| p.get("rope_theta"))
                .and_then(Value::as_f64)
                .map(|x| x as f32)
                .ok_or_else(|| ConfigError::MissingKey { key: "config.json: rope_theta".into() })?,
        };
        let config = Self {
            architecture: DEFAULT_ARCHITECTURE.to_owned(),
            vocab_size: uint("vocab_size")?,
            hidden_size,
            intermediate_size: uint("intermediate_size")?,
            n_layers: uint("num_hidden_layers")?,
            n_heads,
            n_kv_heads: uint("num_key_value_heads")?,
            head_dim,
            max_position_embeddings: uint("max_position_embeddings")?,
            rope_theta,
            rms_norm_eps: float("rms_norm_eps")?,
        };
        config.validate()?;
        Ok(config)
    }

    /// An HF `config.json` (as a JSON value) in the layout of
    /// microsoft/bitnet-b1.58-2B-4T, loadable by transformers' `BitNetForCausalLM`
    /// as an offline-quantized `autobitlinear` model (tools/hf_reference/hf_layout.md).
    /// `head_dim` is not written: transformers derives it as hidden / heads,
    /// which `validate` guarantees.
    pub fn to_hf_config_json(&self, bos_token_id: Option<u32>, eos_token_id: Option<u32>) -> Value {
        json!({
            "architectures": ["BitNetForCausalLM"],
            "model_type": "bitnet",
            "attention_bias": false,
            "attention_dropout": 0.0,
            "hidden_act": "relu2",
            "hidden_size": self.hidden_size,
            "initializer_range": 0.02,
            "intermediate_size": self.intermediate_size,
            "max_position_embeddings": self.max_position_embeddings,
            "num_attention_heads": self.n_heads,
            "num_hidden_layers": self.n_layers,
            "num_key_value_heads": self.n_kv_heads,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "tie_word_embeddings": true,
            "torch_dtype": "bfloat16",
            "use_cache": true,
            "vocab_size": self.vocab_size,
            "bos_token_id": bos_token_id,
            "eos_token_id": eos_token_id,
            "quantization_config": {
                "quant_method": "bitnet",
                "linear_class": "autobitlinear",
                "quantization_mode": "offline"
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn metadata(config: &BitNetConfig) -> HashMap<String, MetadataValue> {
        config.to_gguf_metadata().into_iter().collect()
    }

    #[test]
    fn gguf_metadata_round_trips() {
        let config = BitNetConfig::bitnet_2b4t();
        let md = metadata(&config);
        let back = BitNetConfig::from_gguf_metadata(|k| md.get(k)).unwrap();
        assert_eq!(back, config);
    }

    #[test]
    fn every_required_key_is_required() {
        let config = BitNetConfig::bitnet_2b4t();
        let required = [
            "general.architecture",
            "bitnet-b1.58.context_length",
            "bitnet-b1.58.embedding_length",
            "bitnet-b1.58.feed_forward_length",
            "bitnet-b1.58.block_count",
            "bitnet-b1.58.attention.head_count",
            "bitnet-b1.58.attention.head_count_kv",
            "bitnet-b1.58.rope.freq_base",
            "bitnet-b1.58.attention.layer_norm_rms_epsilon",
        ];
        for key in required {
            let mut md = metadata(&config);
            md.remove(key);
            let err = BitNetConfig::from_gguf_metadata(|k| md.get(k)).unwrap_err();
            assert!(matches!(&err, ConfigError::MissingKey { key: k } if k == key), "removing {key} gave {err}");
        }
    }

    #[test]
    fn vocab_size_falls_back_to_token_list() {
        let config = BitNetConfig::bitnet_2b4t();
        let mut md = metadata(&config);
        md.remove("bitnet-b1.58.vocab_size");
        md.insert("tokenizer.ggml.tokens".into(), MetadataValue::string_array((0..128_256).map(|i| format!("t{i}"))));
        let back = BitNetConfig::from_gguf_metadata(|k| md.get(k)).unwrap();
        assert_eq!(back.vocab_size, 128_256);
        md.remove("tokenizer.ggml.tokens");
        assert!(BitNetConfig::from_gguf_metadata(|k| md.get(k)).is_err());
    }

    #[test]
    fn other_architecture_names_use_their_own_prefix() {
        let config = BitNetConfig { architecture: "bitnet".into(), ..BitNetConfig::bitnet_2b4t() };
        let md = metadata(&config);
        assert!(md.contains_key("bitnet.block_count"));
        assert_eq!(BitNetConfig::from_gguf_metadata(|k| md.get(k)).unwrap(), config);
    }

    #[test]
    fn rejects_invalid_configs() {
        let base = BitNetConfig::bitnet_2b4t();
        let check = |config: BitNetConfig, needle: &str| {
            let err = config.validate().unwrap_err().to_string();
            assert!(err.contains(needle), "{err:?} does not mention {needle:?}");
        };
        check(BitNetConfig { n_kv_heads: 3, ..base.clone() }, "not a multiple of n_kv_heads");
        check(BitNetConfig { hidden_size: 2600, ..base.clone() }, "hidden_size");
        check(BitNetConfig { intermediate_size: 6900, ..base.clone() }, "multiple of 128");
        check(BitNetConfig { n_layers: 0, ..base.clone() }, "n_layers must be positive");
        check(BitNetConfig { rope_theta: f32::NAN, ..base.clone() }, "rope_theta");
        check(BitNetConfig { rms_norm_eps: 0.0, ..base.clone() }, "rms_norm_eps");
        check(BitNetConfig { vocab_size: usize::MAX, ..base.clone() }, "sanity limit");
        check(BitNetConfig { architecture: "llama".into(), ..base }, "unsupported architecture");
    }

    #[test]
    fn rejects_wrong_types_and_partial_rope() {
        let config = BitNetConfig::bitnet_2b4t();
        let mut md = metadata(&config);
        md.insert("bitnet-b1.58.block_count".into(), MetadataValue::String("30".into()));
        let err = BitNetConfig::from_gguf_metadata(|k| md.get(k)).unwrap_err();
        assert!(err.to_string().contains("bitnet-b1.58.block_count"), "{err}");
        let mut md = metadata(&config);
        md.insert("bitnet-b1.58.rope.dimension_count".into(), MetadataValue::U32(64));
        let err = BitNetConfig::from_gguf_metadata(|k| md.get(k)).unwrap_err();
        assert!(err.to_string().contains("partial rotary"), "{err}");
    }

    #[test]
    fn hf_config_round_trips() {
        let config = BitNetConfig::bitnet_2b4t();
        let json = config.to_hf_config_json(Some(128_000), Some(128_001)).to_string();
        assert_eq!(BitNetConfig::from_hf_config_json(&json).unwrap(), config);
    }

    #[test]
    fn hf_config_errors_name_the_field() {
        let err = BitNetConfig::from_hf_config_json(r#"{"model_type":"bitnet"}"#).unwrap_err();
        assert!(err.to_string().contains("config.json"), "{err}");
        let err = BitNetConfig::from_hf_config_json(r#"{"model_type":"llama"}"#).unwrap_err();
        assert!(err.to_string().contains("llama"), "{err}");
        let err = BitNetConfig::from_hf_config_json("{not json").unwrap_err();
        assert!(matches!(err, ConfigError::Json(_)));
    }
}
