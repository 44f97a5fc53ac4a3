//! HF model folders in the microsoft/bitnet-b1.58-2B-4T layout: `config.json`,
//! `model.safetensors` (uint8-packed projections plus bf16 `weight_scale`,
//! bf16 norms and embedding, no `lm_head`), `tokenizer.json` and
//! `tokenizer_config.json`. Reader and writer.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use half::bf16;
use safetensors::tensor::{Dtype, TensorInfo, View};
use safetensors::SafeTensors;

use bitnet_device::{HugePageBuffer, MappedFile};
use bitnet_quant::hf_pack;

use crate::bytes::SharedBytes;
use crate::config::BitNetConfig;
use crate::error::ModelError;
use crate::model::{BitNetModel, LayerWeights, LoadReport};
use crate::tensor::{FloatDType, FloatTensor, TernaryMatrix};
use crate::tokenizer::Tokenizer;

/// HF names of the seven projections, in `model::PROJECTIONS` order.
pub const HF_PROJECTIONS: [&str; 7] = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// HF names of the four per-layer norms, in `LayerWeights::norms` order.
pub const HF_NORMS: [&str; 4] =
    ["input_layernorm", "self_attn.attn_sub_norm", "post_attention_layernorm", "mlp.ffn_sub_norm"];

/// One safetensors file: its tensor table, and the open file each tensor's
/// data is read from when the loader asks for it.
struct SafetensorsFile {
    path: PathBuf,
    file: std::fs::File,
    /// The file's length when its header was parsed.
    len: usize,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
}

impl SafetensorsFile {
    /// Maps the file to parse and check its header (the safetensors crate
    /// checks every tensor's range against the file's length), keeps the
    /// table and drops the mapping: the data is read tensor by tensor, so
    /// what the loader converts (packed projections, norms) never stays
    /// resident beside what it makes of it.
    fn open(path: &Path) -> Result<Self, ModelError> {
        let io_error = |source| ModelError::Io { path: path.to_owned(), source };
        let mapped = MappedFile::open(path).map_err(|e| io_error(std::io::Error::other(e.to_string())))?;
        let bytes = SharedBytes::from_mapped(mapped);
        let (header_len, metadata) = SafeTensors::read_metadata(&bytes).map_err(|e| ModelError::Safetensors {
            path: path.to_owned(),
            detail: format!("invalid safetensors header: {e}"),
        })?;
        let tensors = metadata.tensors().into_iter().map(|(name, info)| (name, info.clone())).collect();
        let len = bytes.len();
        drop(bytes);
        let file = std::fs::File::open(path).map_err(io_error)?;
        Ok(Self { path: path.to_owned(), file, len, data_start: 8 + header_len, tensors })
    }

    /// The data of `info` (a tensor of this file), read into 2 MiB pages
    /// when `resident` (kept as it is: the embedding), else onto the heap.
    fn read(&mut self, name: &str, info: &TensorInfo, resident: bool) -> Result<SharedBytes, ModelError> {
        let (start, end) = info.data_offsets;
        let range = self.data_start.checked_add(start).zip(self.data_start.checked_add(end));
        let Some((start, end)) = range.filter(|&(s, e)| s <= e && e <= self.len) else {
            return Err(ModelError::Safetensors {
                path: self.path.clone(),
                detail: format!("tensor `{name}` data is out of range"),
            });
        };
        let io_error = |source: std::io::Error| ModelError::Io {
            path: self.path.clone(),
            source: std::io::Error::new(source.kind(), format!("tensor `{name}`: {source}")),
        };
        // The range lies inside the file as parsed: a file cut short since
        // fails the read, never the allocation.
        self.file.seek(SeekFrom::Start(start as u64)).map_err(io_error)?;
        if resident {
            let mut buffer = HugePageBuffer::zeroed(end - start).map_err(io_error)?;
            self.file.read_exact(buffer.as_bytes_mut()).map_err(io_error)?;
            Ok(SharedBytes::from_huge_pages(buffer))
        } else {
            let mut data = vec![0u8; end - start];
            self.file.read_exact(&mut data).map_err(io_error)?;
            Ok(SharedBytes::from_vec(data))
        }
    }
}

/// Tensors gathered from one or more safetensors shards.
struct HfTensors {
    files: Vec<SafetensorsFile>,
    used: BTreeSet<String>,
}

impl HfTensors {
    /// Which shard holds a tensor, and its table entry.
    fn find(&mut self, name: &str) -> Result<(usize, TensorInfo), ModelError> {
        for (idx, file) in self.files.iter().enumerate() {
            if let Some(info) = file.tensors.get(name) {
                self.used.insert(name.to_owned());
                return Ok((idx, info.clone()));
            }
        }
        Err(ModelError::MissingTensor { name: name.to_owned() })
    }

    /// The data of a tensor [`HfTensors::find`] found, once its type and
    /// shape are checked; `resident` as [`SafetensorsFile::read`].
    fn data(
        &mut self,
        (idx, info): &(usize, TensorInfo),
        name: &str,
        resident: bool,
    ) -> Result<SharedBytes, ModelError> {
        self.files[*idx].read(name, info, resident)
    }

    fn contains(&self, name: &str) -> bool {
        self.files.iter().any(|f| f.tensors.contains_key(name))
    }

    /// A float tensor of `shape`; a matrix (the embedding) stays in 2 MiB
    /// pages, read once, as decode reads it.
    fn float(&mut self, name: &str, shape: &[usize]) -> Result<FloatTensor, ModelError> {
        let found = self.find(name)?;
        if found.1.shape != shape {
            return Err(ModelError::BadShape {
                tensor: name.to_owned(),
                expected: format!("{shape:?}"),
                found: format!("{:?}", found.1.shape),
            });
        }
        let dtype = float_dtype(name, found.1.dtype)?;
        let (rows, cols) = match shape {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            _ => (1, shape.iter().product()),
        };
        let bytes = self.data(&found, name, shape.len() >= 2)?;
        FloatTensor::new(name, rows, cols, dtype, bytes)
    }

    fn norm(&mut self, name: &str, len: usize) -> Result<Vec<f32>, ModelError> {
        self.float(name, &[len])?.to_finite_f32_vec()
    }

    fn projection(
        &mut self,
        prefix: &str,
        out_features: usize,
        in_features: usize,
    ) -> Result<TernaryMatrix, ModelError> {
        let name = format!("{prefix}.weight");
        let found = self.find(&name)?;
        let (dtype, shape) = (found.1.dtype, &found.1.shape);
        if dtype != Dtype::U8 {
            return Err(ModelError::UnsupportedType {
                tensor: name,
                found: format!("{dtype:?}"),
                expected: "U8 (packed ternary, 4 values per byte along the output dimension)",
            });
        }
        if out_features % 4 != 0 || *shape != [out_features / 4, in_features] {
            return Err(ModelError::BadShape {
                tensor: name,
                expected: format!("[{}, {in_features}] (packed [out/4, in])", out_features / 4),
                found: format!("{shape:?}"),
            });
        }
        let bytes = self.data(&found, &name, false)?;
        let values = hf_pack::unpack_hf(&bytes, out_features, in_features)
            .map_err(|source| ModelError::Quant { tensor: name.clone(), source })?;
        let scale_name = format!("{prefix}.weight_scale");
        let scale_values = self.float(&scale_name, &[1])?.to_f32_vec();
        TernaryMatrix::from_ternary(name, out_features, in_features, &values, scale_values[0])
    }
}

fn float_dtype(name: &str, dtype: Dtype) -> Result<FloatDType, ModelError> {
    match dtype {
        Dtype::F32 => Ok(FloatDType::F32),
        Dtype::F16 => Ok(FloatDType::F16),
        Dtype::BF16 => Ok(FloatDType::BF16),
        other => Err(ModelError::UnsupportedType {
            tensor: name.to_owned(),
            found: format!("{other:?}"),
            expected: "F32, F16 or BF16",
        }),
    }
}

fn read_text(path: &Path) -> Result<String, ModelError> {
    std::fs::read_to_string(path).map_err(|source| ModelError::Io { path: path.to_owned(), source })
}

/// The safetensors shards of a folder: `model.safetensors`, or the files
/// named by `model.safetensors.index.json`.
fn shard_paths(dir: &Path) -> Result<Vec<PathBuf>, ModelError> {
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index_path = dir.join("model.safetensors.index.json");
    if !index_path.is_file() {
        return Err(ModelError::MissingTensor {
            name: format!("{} (no model.safetensors or model.safetensors.index.json)", dir.display()),
        });
    }
    let index: serde_json::Value = serde_json::from_str(&read_text(&index_path)?)
        .map_err(|e| ModelError::Safetensors { path: index_path.clone(), detail: e.to_string() })?;
    let map = index
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| ModelError::Safetensors { path: index_path.clone(), detail: "no `weight_map` object".into() })?;
    let mut files = BTreeSet::new();
    for (tensor, file) in map {
        let file = file.as_str().ok_or_else(|| ModelError::Safetensors {
            path: index_path.clone(),
            detail: format!("weight_map entry for `{tensor}` is not a string"),
        })?;
        // Shard names must stay inside the folder.
        if file.contains('/') || file.contains('\\') || file.starts_with('.') {
            return Err(ModelError::Safetensors {
                path: index_path.clone(),
                detail: format!("shard name {file:?} is not a plain file name"),
            });
        }
        files.insert(dir.join(file));
    }
    Ok(files.into_iter().collect())
}

/// Loads an HF folder. Projections are unpacked and re-encoded as I2_S.
pub fn load_hf_dir(dir: &Path) -> Result<(BitNetModel, LoadReport), ModelError> {
    let config = BitNetConfig::from_hf_config_json(&read_text(&dir.join("config.json"))?)?;
    let tokenizer_config = dir.join("tokenizer_config.json");
    let tokenizer_config = if tokenizer_config.is_file() { Some(read_text(&tokenizer_config)?) } else { None };
    let tokenizer =
        Tokenizer::from_tokenizer_json(&read_text(&dir.join("tokenizer.json"))?, tokenizer_config.as_deref())?;
    if tokenizer.vocab_size() > config.vocab_size {
        return Err(ModelError::InvalidData {
            tensor: "tokenizer.json".into(),
            detail: format!(
                "the tokenizer has {} tokens but config.json's vocab_size is {}",
                tokenizer.vocab_size(),
                config.vocab_size
            ),
        });
    }
    let files = shard_paths(dir)?.iter().map(|p| SafetensorsFile::open(p)).collect::<Result<Vec<_>, _>>()?;
    let mut tensors = HfTensors { files, used: BTreeSet::new() };
    let (h, i, kv, v) = (config.hidden_size, config.intermediate_size, config.kv_dim(), config.vocab_size);
    let embedding = tensors.float("model.embed_tokens.weight", &[v, h])?;
    let output_norm = tensors.norm("model.norm.weight", h)?;
    let mut layers = Vec::with_capacity(config.n_layers);
    for idx in 0..config.n_layers {
        let p = |name: &str| format!("model.layers.{idx}.{name}");
        let shapes = [(h, h), (kv, h), (kv, h), (h, h), (i, h), (i, h), (h, i)];
        let mut proj = Vec::with_capacity(7);
        for (name, (out_f, in_f)) in HF_PROJECTIONS.iter().zip(shapes) {
            proj.push(tensors.projection(&p(name), out_f, in_f)?);
        }
        let mut proj = proj.into_iter();
        let mut next = || proj.next().expect("seven projections");
        layers.push(LayerWeights {
            attn_norm: tensors.norm(&p("input_layernorm.weight"), h)?,
            attn_q: next(),
            attn_k: next(),
            attn_v: next(),
            attn_output: next(),
            attn_sub_norm: tensors.norm(&p("self_attn.attn_sub_norm.weight"), h)?,
            ffn_norm: tensors.norm(&p("post_attention_layernorm.weight"), h)?,
            ffn_gate: next(),
            ffn_up: next(),
            ffn_down: next(),
            ffn_sub_norm: tensors.norm(&p("mlp.ffn_sub_norm.weight"), i)?,
        });
    }
    let mut report = LoadReport::default();
    if tensors.contains("lm_head.weight") {
        report.notes.push("lm_head.weight ignored: config.json ties the head to the embedding".into());
    }
    let mut unused: Vec<String> = tensors
        .files
        .iter()
        .flat_map(|f| f.tensors.keys())
        .filter(|name| !tensors.used.contains(*name))
        .cloned()
        .collect();
    unused.sort();
    report.unused_tensors = unused;
    let model = BitNetModel { config, tokenizer, embedding, output_norm, output: None, layers };
    Ok((model, report))
}

/// A tensor ready for safetensors serialization.
struct OwnedView {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl View for &OwnedView {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> Cow<'_, [u8]> {
        Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}

fn bf16_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| bf16::from_f32(*v).to_le_bytes()).collect()
}

/// Largest absolute change of rounding `values` to bf16.
fn bf16_loss(values: &[f32]) -> f32 {
    values.iter().map(|v| (bf16::from_f32(*v).to_f32() - v).abs()).fold(0.0, f32::max)
}

/// What [`write_hf_dir`] had to round (bf16 is the layout's dtype for
/// norms, scales and the embedding).
#[derive(Debug, Clone, Default)]
pub struct HfWriteReport {
    /// `(tensor, largest absolute change)` for every tensor rounding changed.
    pub rounded: Vec<(String, f32)>,
}

/// Writes `model` as an HF folder loadable by transformers' `BitNetForCausalLM`.
/// The safetensors file is written to a temporary name and renamed.
pub fn write_hf_dir(model: &BitNetModel, dir: &Path) -> Result<HfWriteReport, ModelError> {
    if model.output.is_some() {
        return Err(ModelError::UnsupportedTensor {
            tensor: "output.weight".into(),
            reason: "the HF BitNet layout ties the head to the embedding; this model has an untied head".into(),
        });
    }
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| ModelError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut report = HfWriteReport::default();
    let mut note = |name: &str, loss: f32| {
        if loss > 0.0 {
            report.rounded.push((name.to_owned(), loss));
        }
    };
    let mut tensors: Vec<(String, OwnedView)> = Vec::new();
    let mut add_bf16 = |name: String, shape: Vec<usize>, values: &[f32], note: &mut dyn FnMut(&str, f32)| {
        note(&name, bf16_loss(values));
        tensors.push((name, OwnedView { dtype: Dtype::BF16, shape, data: bf16_bytes(values) }));
    };
    let config = &model.config;
    let embedding = model.embedding.to_f32_vec();
    add_bf16(
        "model.embed_tokens.weight".into(),
        vec![model.embedding.rows(), model.embedding.cols()],
        &embedding,
        &mut note,
    );
    add_bf16("model.norm.weight".into(), vec![config.hidden_size], &model.output_norm, &mut note);
    let mut packed = Vec::new();
    for (idx, layer) in model.layers.iter().enumerate() {
        for (hf_name, (_, values)) in HF_NORMS.iter().zip(layer.norms()) {
            add_bf16(format!("model.layers.{idx}.{hf_name}.weight"), vec![values.len()], values, &mut note);
        }
        for (hf_name, matrix) in HF_PROJECTIONS.iter().zip(layer.projections()) {
            let name = format!("model.layers.{idx}.{hf_name}");
            add_bf16(format!("{name}.weight_scale"), vec![1], &[matrix.scale()], &mut note);
            let data = hf_pack::pack_hf(&matrix.to_ternary(), matrix.out_features(), matrix.in_features())
                .map_err(|source| ModelError::Quant { tensor: name.clone(), source })?;
            packed.push((
                format!("{name}.weight"),
                OwnedView { dtype: Dtype::U8, shape: vec![matrix.out_features() / 4, matrix.in_features()], data },
            ));
        }
    }
    tensors.extend(packed);
    let metadata: HashMap<String, String> = [("format".to_owned(), "pt".to_owned())].into();
    let final_path = dir.join("model.safetensors");
    let tmp_path = dir.join(".model.safetensors.partial");
    safetensors::serialize_to_file(tensors.iter().map(|(n, v)| (n.as_str(), v)), Some(metadata), &tmp_path)
        .map_err(|e| ModelError::Safetensors { path: tmp_path.clone(), detail: e.to_string() })?;
    std::fs::rename(&tmp_path, &final_path).map_err(io(&final_path))?;

    let tok = &model.tokenizer;
    let write = |name: &str, text: String| -> Result<(), ModelError> {
        let path = dir.join(name);
        std::fs::write(&path, text).map_err(io(&path))
    };
    let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).expect("JSON values serialize");
    write("config.json", pretty(&config.to_hf_config_json(tok.bos_id(), tok.eos_id())))?;
    write("tokenizer.json", tok.to_tokenizer_json()?)?;
    write("tokenizer_config.json", tok.to_tokenizer_config_json())?;
    let eos: Vec<u32> = [tok.eos_id(), tok.eot_id()].into_iter().flatten().collect();
    write(
        "generation_config.json",
        pretty(&serde_json::json!({
            "bos_token_id": tok.bos_id(),
            "eos_token_id": eos,
            "do_sample": false,
        })),
    )?;
    Ok(report)
}
