//! `BitNetModel`: a whole BitNet b1.58 model in memory (config, tokenizer,
//! weights), loaded from GGUF and written back to GGUF.

use std::collections::BTreeSet;
use std::path::Path;

use bitnet_quant::{tq1, tq2};

use crate::bytes::SharedBytes;
use crate::config::BitNetConfig;
use crate::error::ModelError;
use crate::gguf::{GgmlType, GgufFile, GgufTensorInfo, GgufWriter, MetadataValue};
use crate::tensor::{FloatDType, FloatTensor, TernaryMatrix};
use crate::tokenizer::Tokenizer;

/// The seven ternary projections of a layer, in GGUF naming order.
pub const PROJECTIONS: [&str; 7] = ["attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"];

/// The weights of one transformer block, with GGUF names.
#[derive(Debug, Clone)]
pub struct LayerWeights {
    pub attn_norm: Vec<f32>,
    pub attn_q: TernaryMatrix,
    pub attn_k: TernaryMatrix,
    pub attn_v: TernaryMatrix,
    pub attn_output: TernaryMatrix,
    pub attn_sub_norm: Vec<f32>,
    pub ffn_norm: Vec<f32>,
    pub ffn_gate: TernaryMatrix,
    pub ffn_up: TernaryMatrix,
    pub ffn_down: TernaryMatrix,
    pub ffn_sub_norm: Vec<f32>,
}

impl LayerWeights {
    /// The projections in [`PROJECTIONS`] order.
    pub fn projections(&self) -> [&TernaryMatrix; 7] {
        [&self.attn_q, &self.attn_k, &self.attn_v, &self.attn_output, &self.ffn_gate, &self.ffn_up, &self.ffn_down]
    }

    /// The norm vectors with their GGUF short names.
    pub fn norms(&self) -> [(&'static str, &[f32]); 4] {
        [
            ("attn_norm", &self.attn_norm),
            ("attn_sub_norm", &self.attn_sub_norm),
            ("ffn_norm", &self.ffn_norm),
            ("ffn_sub_norm", &self.ffn_sub_norm),
        ]
    }
}

/// A complete model. Ternary weights stay packed (I2_S); the embedding stays
/// in its file dtype; norms are f32.
#[derive(Debug, Clone)]
pub struct BitNetModel {
    pub config: BitNetConfig,
    pub tokenizer: Tokenizer,
    /// `[vocab, hidden]`; also the output head when `output` is `None` (tied).
    pub embedding: FloatTensor,
    pub output_norm: Vec<f32>,
    /// An untied output head `[vocab, hidden]`, if the file has one.
    pub output: Option<FloatTensor>,
    pub layers: Vec<LayerWeights>,
}

/// What loading found besides the model itself.
#[derive(Debug, Clone, Default)]
pub struct LoadReport {
    /// Tensors in the file that the model does not use.
    pub unused_tensors: Vec<String>,
    /// Conversions made while loading (e.g. TQ2_0 repacked to I2_S).
    pub notes: Vec<String>,
}

impl BitNetModel {
    /// The logits head: the untied output matrix or the tied embedding.
    pub fn head(&self) -> &FloatTensor {
        self.output.as_ref().unwrap_or(&self.embedding)
    }

    /// Loads a model from a `.gguf` file (read into memory in 2 MiB pages,
    /// [`GgufFile::read_selected`]) or an HF folder (with config.json).
    ///
    /// Only the tensors the model uses in place are read into that memory
    /// (I2_S projections, the embedding and head); the rest (norms, the
    /// `.scale` tensors, TQ2_0 / TQ1_0 projections repacked to I2_S) are read
    /// from the file as they are converted, so a TQ2_0 file costs no more
    /// memory than an I2_S one.
    pub fn load(path: &Path) -> Result<(Self, LoadReport), ModelError> {
        if path.is_dir() {
            return crate::hf::load_hf_dir(path);
        }
        let file = GgufFile::read_selected(path, used_in_place)?;
        Self::from_gguf(&file)
    }

    /// [`BitNetModel::load`] with a `.gguf` file memory-mapped instead of
    /// read: nothing copied, the weights shared with the page cache (and
    /// other processes mapping the file), at the decode speed the page
    /// cache's layout of the file gives.
    pub fn load_mapped(path: &Path) -> Result<(Self, LoadReport), ModelError> {
        if path.is_dir() {
            return crate::hf::load_hf_dir(path);
        }
        let file = GgufFile::open(path)?;
        Self::from_gguf(&file)
    }

    /// Loads a model from GGUF bytes held in memory (e.g. embedded in the binary).
    pub fn from_gguf_bytes(bytes: SharedBytes) -> Result<(Self, LoadReport), ModelError> {
        let file = GgufFile::from_bytes(bytes)?;
        Self::from_gguf(&file)
    }

    /// Builds the model from a parsed GGUF file. Every tensor is either used
    /// or listed in [`LoadReport::unused_tensors`].
    pub fn from_gguf(file: &GgufFile) -> Result<(Self, LoadReport), ModelError> {
        let config = BitNetConfig::from_gguf(file)?;
        let tokenizer = Tokenizer::from_gguf_metadata(|key| file.get(key))?;
        if tokenizer.vocab_size() > config.vocab_size {
            return Err(ModelError::InvalidData {
                tensor: "tokenizer.ggml.tokens".into(),
                detail: format!(
                    "the tokenizer has {} tokens but the model vocabulary is {}",
                    tokenizer.vocab_size(),
                    config.vocab_size
                ),
            });
        }
        let mut loader = GgufLoader { file, used: BTreeSet::new(), report: LoadReport::default() };
        let (h, v) = (config.hidden_size, config.vocab_size);
        let embedding = loader.float_matrix("token_embd.weight", v, h)?;
        let output_norm = loader.norm("output_norm.weight", h)?;
        let output = match file.tensor_info("output.weight") {
            Some(_) => Some(loader.float_matrix("output.weight", v, h)?),
            None => None,
        };
        let mut layers = Vec::with_capacity(config.n_layers);
        for layer in 0..config.n_layers {
            layers.push(loader.layer(&config, layer)?);
        }
        for name in ["rope_freqs.weight"] {
            if file.tensor_info(name).is_some() {
                return Err(ModelError::UnsupportedTensor {
                    tensor: name.into(),
                    reason: "rope frequency factors change the rotary embedding; BitNet b1.58 uses plain RoPE".into(),
                });
            }
        }
        let mut report = loader.report;
        report.unused_tensors =
            file.tensors().iter().map(|t| t.name.clone()).filter(|name| !loader.used.contains(name)).collect();
        let model = Self { config, tokenizer, embedding, output_norm, output, layers };
        Ok((model, report))
    }

    /// A GGUF writer holding this model: I2_S projections, the embedding in its
    /// dtype (F16 when it was BF16, as bitnet.cpp writes it), F32 norms, the
    /// config and tokenizer metadata.
    pub fn to_gguf_writer(&self, name: &str) -> Result<GgufWriter, ModelError> {
        self.to_gguf_writer_as(name, TernaryGgufType::I2S)
    }

    /// [`Self::to_gguf_writer`] with the projections stored as `ternary`.
    ///
    /// TQ2_0 and TQ1_0 (llama.cpp's types) carry one f16 scale per 256
    /// values; an f32 tensor scale rounded to f16 would change the weights,
    /// so every block's scale is 1 and the tensor's scale goes into an F32
    /// `blk.N.<proj>.scale` tensor, as upstream llama.cpp's `bitnet`
    /// architecture reads it (the product is multiplied by it). Exact: the
    /// file loads back to the same ternary values and scales. Their blocks
    /// never span rows, so every projection's input width must be a
    /// multiple of 256.
    pub fn to_gguf_writer_as(&self, name: &str, ternary: TernaryGgufType) -> Result<GgufWriter, ModelError> {
        let mut writer = GgufWriter::new();
        let mut metadata = self.config.to_gguf_metadata();
        metadata.insert(1, ("general.name".into(), MetadataValue::String(name.to_owned())));
        metadata.push(("general.quantization_version".into(), MetadataValue::U32(2)));
        metadata.extend(self.tokenizer.to_gguf_metadata());
        for (key, value) in metadata {
            writer.add_metadata(key, value)?;
        }
        let h = self.config.hidden_size as u64;
        let float = |writer: &mut GgufWriter, tensor: &FloatTensor, name: &str| -> Result<(), ModelError> {
            let (ty, bytes) = match tensor.dtype() {
                FloatDType::F32 => (GgmlType::F32, tensor.bytes().to_vec()),
                FloatDType::F16 => (GgmlType::F16, tensor.bytes().to_vec()),
                FloatDType::BF16 => (GgmlType::BF16, tensor.bytes().to_vec()),
            };
            writer.add_tensor(name, vec![tensor.cols() as u64, tensor.rows() as u64], ty, bytes)?;
            Ok(())
        };
        let norm = |writer: &mut GgufWriter, values: &[f32], name: &str| -> Result<(), ModelError> {
            let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
            writer.add_tensor(name, vec![values.len() as u64], GgmlType::F32, bytes)?;
            Ok(())
        };
        float(&mut writer, &self.embedding, "token_embd.weight")?;
        norm(&mut writer, &self.output_norm, "output_norm.weight")?;
        if let Some(output) = &self.output {
            float(&mut writer, output, "output.weight")?;
        }
        for (idx, layer) in self.layers.iter().enumerate() {
            for (short, values) in layer.norms() {
                norm(&mut writer, values, &format!("blk.{idx}.{short}.weight"))?;
            }
            for (short, matrix) in PROJECTIONS.iter().zip(layer.projections()) {
                let dims = vec![matrix.in_features() as u64, matrix.out_features() as u64];
                let tensor = format!("blk.{idx}.{short}.weight");
                let (ty, bytes) = match ternary {
                    TernaryGgufType::I2S => (GgmlType::I2_S, matrix.to_i2s_bytes()),
                    TernaryGgufType::Tq2_0 | TernaryGgufType::Tq1_0 => {
                        let bytes = tq_bytes(matrix, ternary, &tensor)?;
                        norm(&mut writer, &[matrix.scale()], &format!("blk.{idx}.{short}.scale"))?;
                        (ternary.ggml_type(), bytes)
                    }
                };
                writer.add_tensor(tensor, dims, ty, bytes)?;
            }
        }
        debug_assert!(h > 0);
        Ok(writer)
    }

    /// Writes the model as a GGUF file (atomically: temp file, then rename).
    pub fn write_gguf(&self, path: &Path, name: &str) -> Result<(), ModelError> {
        self.write_gguf_as(path, name, TernaryGgufType::I2S)
    }

    /// [`Self::write_gguf`] with the projections stored as `ternary`
    /// (see [`Self::to_gguf_writer_as`]).
    pub fn write_gguf_as(&self, path: &Path, name: &str, ternary: TernaryGgufType) -> Result<(), ModelError> {
        self.to_gguf_writer_as(name, ternary)?.write_to_path(path)?;
        Ok(())
    }

    /// Total bytes of weights as held in memory.
    pub fn weight_bytes(&self) -> usize {
        let proj: usize = self.layers.iter().flat_map(|l| l.projections()).map(|m| m.codes().len() + 4).sum();
        let norms: usize = self.layers.iter().flat_map(|l| l.norms()).map(|(_, v)| v.len() * 4).sum();
        proj + norms
            + self.embedding.bytes().len()
            + self.output.as_ref().map_or(0, |o| o.bytes().len())
            + self.output_norm.len() * 4
    }
}

/// The GGUF type of the ternary projections a writer stores.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TernaryGgufType {
    /// bitnet.cpp's I2_S (type 36): one f32 scale per tensor; what the
    /// official 2B-4T file uses.
    #[default]
    I2S,
    /// llama.cpp's TQ2_0 (type 35), with a `.scale` tensor per projection.
    Tq2_0,
    /// llama.cpp's TQ1_0 (type 34), with a `.scale` tensor per projection.
    Tq1_0,
}

impl std::str::FromStr for TernaryGgufType {
    type Err = String;

    /// `i2s`, `tq2_0` or `tq1_0` (the command lines' `--ternary`).
    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "i2s" | "i2_s" => Ok(Self::I2S),
            "tq2_0" => Ok(Self::Tq2_0),
            "tq1_0" => Ok(Self::Tq1_0),
            _ => Err(format!("unknown ternary type {s:?}; expected i2s, tq2_0 or tq1_0")),
        }
    }
}

impl TernaryGgufType {
    pub fn ggml_type(self) -> GgmlType {
        match self {
            Self::I2S => GgmlType::I2_S,
            Self::Tq2_0 => GgmlType::TQ2_0,
            Self::Tq1_0 => GgmlType::TQ1_0,
        }
    }
}

/// A projection as TQ2_0 / TQ1_0 blocks of scale 1 (its scale is written apart).
fn tq_bytes(matrix: &TernaryMatrix, ternary: TernaryGgufType, tensor: &str) -> Result<Vec<u8>, ModelError> {
    const BLOCK: usize = 256;
    if matrix.in_features() % BLOCK != 0 {
        return Err(ModelError::UnsupportedTensor {
            tensor: tensor.to_owned(),
            reason: format!(
                "{} stores rows in blocks of {BLOCK} values, and its rows have {}",
                ternary.ggml_type().name(),
                matrix.in_features()
            ),
        });
    }
    let values = matrix.to_ternary();
    let scales = vec![1.0f32; values.len() / BLOCK];
    let quant = |source| ModelError::Quant { tensor: tensor.to_owned(), source };
    match ternary {
        TernaryGgufType::Tq1_0 => tq1::encode_tq1_0(&values, &scales).map_err(quant),
        _ => tq2::encode_tq2_0(&values, &scales).map_err(quant),
    }
}

/// Whether [`BitNetModel::from_gguf`] keeps a tensor's bytes as they lie in
/// the file (I2_S projections, float matrices), rather than converting them
/// into memory of its own.
fn used_in_place(info: &GgufTensorInfo) -> bool {
    match info.ggml_type {
        GgmlType::I2_S => true,
        GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => info.dims.len() >= 2,
        _ => false,
    }
}

struct GgufLoader<'a> {
    file: &'a GgufFile,
    used: BTreeSet<String>,
    report: LoadReport,
}

impl GgufLoader<'_> {
    fn info(&mut self, name: &str) -> Result<GgufTensorInfo, ModelError> {
        let info =
            self.file.tensor_info(name).ok_or_else(|| ModelError::MissingTensor { name: name.to_owned() })?.clone();
        self.used.insert(name.to_owned());
        Ok(info)
    }

    fn expect_dims(info: &GgufTensorInfo, expected: &[u64]) -> Result<(), ModelError> {
        if info.dims != expected {
            return Err(ModelError::BadShape {
                tensor: info.name.clone(),
                expected: format!("{expected:?} (ne0 first)"),
                found: format!("{:?}", info.dims),
            });
        }
        Ok(())
    }

    fn float_dtype(info: &GgufTensorInfo) -> Result<FloatDType, ModelError> {
        match info.ggml_type {
            GgmlType::F32 => Ok(FloatDType::F32),
            GgmlType::F16 => Ok(FloatDType::F16),
            GgmlType::BF16 => Ok(FloatDType::BF16),
            other => Err(ModelError::UnsupportedType {
                tensor: info.name.clone(),
                found: other.name().to_owned(),
                expected: "F32, F16 or BF16",
            }),
        }
    }

    /// A `[rows, cols]` float matrix (GGUF dims `[cols, rows]`).
    fn float_matrix(&mut self, name: &str, rows: usize, cols: usize) -> Result<FloatTensor, ModelError> {
        let info = self.info(name)?;
        Self::expect_dims(&info, &[cols as u64, rows as u64])?;
        let dtype = Self::float_dtype(&info)?;
        FloatTensor::new(name, rows, cols, dtype, self.file.tensor_bytes(name)?)
    }

    fn norm(&mut self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        let info = self.info(name)?;
        Self::expect_dims(&info, &[len as u64])?;
        let dtype = Self::float_dtype(&info)?;
        FloatTensor::new(name, 1, len, dtype, self.file.tensor_bytes(name)?)?.to_finite_f32_vec()
    }

    fn ternary(&mut self, name: &str, out_features: usize, in_features: usize) -> Result<TernaryMatrix, ModelError> {
        let info = self.info(name)?;
        Self::expect_dims(&info, &[in_features as u64, out_features as u64])?;
        let bytes = self.file.tensor_bytes(name)?;
        let n = out_features * in_features;
        let quant = |source| ModelError::Quant { tensor: name.to_owned(), source };
        let matrix = match info.ggml_type {
            GgmlType::I2_S => TernaryMatrix::from_i2s(name, out_features, in_features, bytes)?,
            GgmlType::TQ2_0 => {
                // Byte for byte, without decoding to values (tq2_0_to_i2s).
                let (i2s, scale) = tq2::tq2_0_to_i2s(&bytes, n).map_err(quant)?;
                self.report
                    .notes
                    .push(format!("{name}: {} repacked to I2_S (uniform block scale {scale})", info.ggml_type.name()));
                TernaryMatrix::from_i2s(name, out_features, in_features, SharedBytes::from_vec(i2s))?
            }
            GgmlType::TQ1_0 => {
                let (values, scale) = tq1::decode_tq1_0(&bytes, n).and_then(|b| b.into_per_tensor()).map_err(quant)?;
                self.report
                    .notes
                    .push(format!("{name}: {} repacked to I2_S (uniform block scale {scale})", info.ggml_type.name()));
                TernaryMatrix::from_ternary(name, out_features, in_features, &values, scale)?
            }
            other => {
                return Err(ModelError::UnsupportedType {
                    tensor: name.to_owned(),
                    found: other.name().to_owned(),
                    expected: "I2_S, TQ2_0 or TQ1_0 (ternary)",
                })
            }
        };
        // Upstream llama.cpp's `bitnet` arch stores an extra per-tensor output
        // multiplier next to the weight.
        let scale_name = name.replace(".weight", ".scale");
        if self.file.tensor_info(&scale_name).is_some() {
            let factor = self.norm(&scale_name, 1)?[0];
            return matrix.with_scale_factor(factor);
        }
        Ok(matrix)
    }

    fn layer(&mut self, config: &BitNetConfig, idx: usize) -> Result<LayerWeights, ModelError> {
        let (h, i, kv) = (config.hidden_size, config.intermediate_size, config.kv_dim());
        let p = |short: &str| format!("blk.{idx}.{short}.weight");
        Ok(LayerWeights {
            attn_norm: self.norm(&p("attn_norm"), h)?,
            attn_q: self.ternary(&p("attn_q"), h, h)?,
            attn_k: self.ternary(&p("attn_k"), kv, h)?,
            attn_v: self.ternary(&p("attn_v"), kv, h)?,
            attn_output: self.ternary(&p("attn_output"), h, h)?,
            attn_sub_norm: self.norm(&p("attn_sub_norm"), h)?,
            ffn_norm: self.norm(&p("ffn_norm"), h)?,
            ffn_gate: self.ternary(&p("ffn_gate"), i, h)?,
            ffn_up: self.ternary(&p("ffn_up"), i, h)?,
            ffn_down: self.ternary(&p("ffn_down"), h, i)?,
            ffn_sub_norm: self.norm(&p("ffn_sub_norm"), i)?,
        })
    }
}
