//! Whole-model file tests: GGUF and HF round trips, conversions between them,
//! independent decoding of what we wrote by the layout rules of FORMATS.md,
//! and one test per kind of malformed model.

use std::collections::HashMap;

use bitnet_models::gguf::{GgmlType, GgufFile, GgufWriter, MetadataValue};
use bitnet_models::synthetic::{self, Preset};
use bitnet_models::{hf, BitNetModel, ModelError, SharedBytes, TernaryGgufType};

fn tiny() -> BitNetModel {
    synthetic::generate(Preset::Tiny, 42).unwrap()
}

fn gguf_bytes(model: &BitNetModel) -> Vec<u8> {
    model.to_gguf_writer("test").unwrap().to_bytes().unwrap()
}

fn load_gguf(bytes: Vec<u8>) -> Result<BitNetModel, ModelError> {
    BitNetModel::from_gguf_bytes(SharedBytes::from_vec(bytes)).map(|(m, _)| m)
}

/// Asserts two models hold the same numbers, tensor by tensor.
fn assert_same_model(a: &BitNetModel, b: &BitNetModel) {
    assert_eq!(a.config, b.config);
    // Bit for bit: a corrupted file's embedding may hold NaNs.
    let bits = |m: &BitNetModel| m.embedding.to_f32_vec().iter().map(|v| v.to_bits()).collect::<Vec<_>>();
    assert_eq!(bits(a), bits(b));
    assert_eq!(a.output_norm, b.output_norm);
    assert_eq!(a.layers.len(), b.layers.len());
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        for ((name, na), (_, nb)) in la.norms().iter().zip(lb.norms()) {
            assert_eq!(*na, nb, "{name}");
        }
        for (pa, pb) in la.projections().iter().zip(lb.projections()) {
            assert_eq!(pa.to_ternary(), pb.to_ternary(), "{}", pa.name());
            assert_eq!(pa.scale(), pb.scale(), "{}", pa.name());
        }
    }
    let text = "Hello, world! 123 + 456 = 579";
    assert_eq!(a.tokenizer.encode(text, true).unwrap(), b.tokenizer.encode(text, true).unwrap());
}

/// Decodes I2_S bytes with the rule as FORMATS.md states it, independently
/// of bitnet-quant: element k is in byte (k/128)*32 + k%32 at shift
/// 6 - 2*((k%128)/32); codes 0, 1, 2 mean -1, 0, +1; the f32 scale follows.
fn decode_i2s_by_rule(bytes: &[u8], n: usize) -> (Vec<i8>, f32) {
    assert_eq!(bytes.len(), n / 4 + 32);
    let values = (0..n)
        .map(|k| {
            let byte = bytes[(k / 128) * 32 + k % 32];
            let code = (byte >> (6 - 2 * ((k % 128) / 32))) & 3;
            match code {
                0 => -1,
                1 => 0,
                2 => 1,
                _ => panic!("code 3 at element {k}"),
            }
        })
        .collect();
    let scale = f32::from_le_bytes(bytes[n / 4..n / 4 + 4].try_into().unwrap());
    (values, scale)
}

#[test]
fn gguf_round_trip_preserves_every_weight() {
    let model = tiny();
    let back = load_gguf(gguf_bytes(&model)).unwrap();
    assert_same_model(&model, &back);
}

#[test]
fn written_i2s_tensors_decode_by_the_layout_rule() {
    let model = tiny();
    let file = GgufFile::from_bytes(SharedBytes::from_vec(gguf_bytes(&model))).unwrap();
    for (idx, layer) in model.layers.iter().enumerate() {
        for (short, matrix) in bitnet_models::PROJECTIONS.iter().zip(layer.projections()) {
            let name = format!("blk.{idx}.{short}.weight");
            let info = file.tensor_info(&name).unwrap();
            assert_eq!(info.ggml_type, GgmlType::I2_S);
            assert_eq!(info.dims, [matrix.in_features() as u64, matrix.out_features() as u64]);
            let n = matrix.in_features() * matrix.out_features();
            let (values, scale) = decode_i2s_by_rule(&file.tensor_bytes(&name).unwrap(), n);
            assert_eq!(values, matrix.to_ternary(), "{name}");
            assert_eq!(scale, matrix.scale(), "{name}");
        }
    }
}

/// Reads one HF tensor's raw bytes and shape with the safetensors crate.
fn hf_tensor(dir: &std::path::Path, name: &str) -> (Vec<usize>, Vec<u8>) {
    let bytes = std::fs::read(dir.join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let view = st.tensor(name).unwrap();
    (view.shape().to_vec(), view.data().to_vec())
}

#[test]
fn hf_round_trip_and_packing_by_the_layout_rule() {
    let model = tiny();
    let dir = tempfile::tempdir().unwrap();
    let report = hf::write_hf_dir(&model, dir.path()).unwrap();
    assert!(report.rounded.is_empty(), "synthetic values are exact in bf16: {:?}", report.rounded);
    let (back, load_report) = BitNetModel::load(dir.path()).unwrap();
    assert!(load_report.unused_tensors.is_empty(), "{:?}", load_report.unused_tensors);
    assert_same_model(&model, &back);

    // FORMATS.md: packed row p, bits 2i..2i+1 (LSB first) hold unpacked row i*(out/4) + p; value = field - 1.
    let q = &model.layers[1].attn_k;
    let (shape, packed) = hf_tensor(dir.path(), "model.layers.1.self_attn.k_proj.weight");
    let (out_f, in_f) = (q.out_features(), q.in_features());
    assert_eq!(shape, [out_f / 4, in_f]);
    let truth = q.to_ternary();
    for p in 0..out_f / 4 {
        for k in 0..in_f {
            for i in 0..4 {
                let field = (packed[p * in_f + k] >> (2 * i)) & 3;
                assert_eq!(field as i8 - 1, truth[(i * (out_f / 4) + p) * in_f + k]);
            }
        }
    }
    let (shape, scale) = hf_tensor(dir.path(), "model.layers.1.self_attn.k_proj.weight_scale");
    assert_eq!(shape, [1]);
    assert_eq!(half::bf16::from_le_bytes([scale[0], scale[1]]).to_f32(), q.scale());
    let config: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("config.json")).unwrap()).unwrap();
    assert_eq!(config["quantization_config"]["linear_class"], "autobitlinear");
    assert_eq!(config["hidden_act"], "relu2");
}

#[test]
fn hf_to_gguf_to_hf_conversion_is_lossless_for_synthetic_models() {
    let model = tiny();
    let dir = tempfile::tempdir().unwrap();
    hf::write_hf_dir(&model, &dir.path().join("a")).unwrap();
    let (from_hf, _) = BitNetModel::load(&dir.path().join("a")).unwrap();
    let gguf_path = dir.path().join("b.gguf");
    from_hf.write_gguf(&gguf_path, "converted").unwrap();
    let (from_gguf, _) = BitNetModel::load(&gguf_path).unwrap();
    hf::write_hf_dir(&from_gguf, &dir.path().join("c")).unwrap();
    let (again, _) = BitNetModel::load(&dir.path().join("c")).unwrap();
    assert_same_model(&model, &from_hf);
    assert_same_model(&model, &from_gguf);
    assert_same_model(&model, &again);
}

/// Rewrites a GGUF through `edit`, which may drop or replace tensors and metadata.
struct Rewrite {
    drop_tensors: Vec<String>,
    replace_tensor: HashMap<String, (Vec<u64>, GgmlType, Vec<u8>)>,
    add_tensor: Vec<(String, Vec<u64>, GgmlType, Vec<u8>)>,
    drop_keys: Vec<String>,
    set_keys: Vec<(String, MetadataValue)>,
}

impl Rewrite {
    fn new() -> Self {
        Self {
            drop_tensors: vec![],
            replace_tensor: HashMap::new(),
            add_tensor: vec![],
            drop_keys: vec![],
            set_keys: vec![],
        }
    }

    fn apply(self, bytes: Vec<u8>) -> Vec<u8> {
        let file = GgufFile::from_bytes(SharedBytes::from_vec(bytes)).unwrap();
        let mut w = GgufWriter::new();
        for (key, value) in file.metadata() {
            if self.drop_keys.contains(key) {
                continue;
            }
            let value = self.set_keys.iter().find(|(k, _)| k == key).map_or(value.clone(), |(_, v)| v.clone());
            w.add_metadata(key.clone(), value).unwrap();
        }
        for t in file.tensors() {
            if self.drop_tensors.contains(&t.name) {
                continue;
            }
            match self.replace_tensor.get(&t.name) {
                Some((dims, ty, data)) => w.add_tensor(t.name.clone(), dims.clone(), *ty, data.clone()).unwrap(),
                None => w
                    .add_tensor(t.name.clone(), t.dims.clone(), t.ggml_type, file.tensor_bytes(&t.name).unwrap())
                    .unwrap(),
            }
        }
        for (name, dims, ty, data) in self.add_tensor {
            w.add_tensor(name, dims, ty, data).unwrap();
        }
        w.to_bytes().unwrap()
    }
}

fn check_bad(rewrite: Rewrite, needles: &[&str]) {
    let err = load_gguf(rewrite.apply(gguf_bytes(&tiny()))).unwrap_err().to_string();
    for needle in needles {
        assert!(err.contains(needle), "error {err:?} does not mention {needle:?}");
    }
}

#[test]
fn missing_tensor_is_named() {
    let mut r = Rewrite::new();
    r.drop_tensors.push("blk.1.ffn_down.weight".into());
    check_bad(r, &["missing tensor", "blk.1.ffn_down.weight"]);
}

#[test]
fn wrong_shape_is_named() {
    let mut r = Rewrite::new();
    // A [128, 64] I2_S tensor where [128, 128] is expected.
    let data = bitnet_quant::i2s::encode_i2s(&vec![0i8; 128 * 64], 1.0).unwrap();
    r.replace_tensor.insert("blk.0.attn_q.weight".into(), (vec![128, 64], GgmlType::I2_S, data));
    check_bad(r, &["blk.0.attn_q.weight", "[128, 128]", "[128, 64]"]);
}

#[test]
fn float_projection_is_rejected_with_its_type() {
    let mut r = Rewrite::new();
    r.replace_tensor.insert("blk.0.attn_q.weight".into(), (vec![128, 128], GgmlType::F32, vec![0u8; 128 * 128 * 4]));
    check_bad(r, &["blk.0.attn_q.weight", "F32", "I2_S"]);
}

#[test]
fn invalid_i2s_code_is_named() {
    let mut data = bitnet_quant::i2s::encode_i2s(&vec![0i8; 128 * 128], 1.0).unwrap();
    data[77] = 0xFF;
    let mut r = Rewrite::new();
    r.replace_tensor.insert("blk.1.attn_output.weight".into(), (vec![128, 128], GgmlType::I2_S, data));
    check_bad(r, &["blk.1.attn_output.weight", "code 3", "byte 77"]);
}

#[test]
fn non_finite_norm_is_named() {
    let mut values = vec![1.0f32; 128];
    values[9] = f32::NAN;
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut r = Rewrite::new();
    r.replace_tensor.insert("blk.0.ffn_norm.weight".into(), (vec![128], GgmlType::F32, data));
    check_bad(r, &["blk.0.ffn_norm.weight", "element 9"]);
}

#[test]
fn missing_metadata_is_named() {
    for key in ["bitnet-b1.58.block_count", "general.architecture", "tokenizer.ggml.tokens"] {
        let mut r = Rewrite::new();
        r.drop_keys.push(key.into());
        check_bad(r, &[key]);
    }
}

#[test]
fn tokenizer_larger_than_vocab_is_rejected() {
    let mut r = Rewrite::new();
    r.set_keys.push(("bitnet-b1.58.vocab_size".into(), MetadataValue::U32(100)));
    // The embedding no longer matches either; the vocabulary check comes first.
    check_bad(r, &["512", "100"]);
}

#[test]
fn extra_tensors_are_reported_and_rope_freqs_rejected() {
    let mut r = Rewrite::new();
    r.add_tensor.push(("mystery.weight".into(), vec![4], GgmlType::F32, vec![0u8; 16]));
    let (_, report) = BitNetModel::from_gguf_bytes(SharedBytes::from_vec(r.apply(gguf_bytes(&tiny())))).unwrap();
    assert_eq!(report.unused_tensors, ["mystery.weight"]);

    let mut r = Rewrite::new();
    r.add_tensor.push(("rope_freqs.weight".into(), vec![16], GgmlType::F32, vec![0u8; 64]));
    check_bad(r, &["rope_freqs.weight"]);
}

#[test]
fn llama_cpp_scale_tensors_fold_into_the_weight_scale() {
    let model = tiny();
    let mut r = Rewrite::new();
    r.add_tensor.push(("blk.0.attn_v.scale".into(), vec![1], GgmlType::F32, 2.0f32.to_le_bytes().to_vec()));
    let back = load_gguf(r.apply(gguf_bytes(&model))).unwrap();
    assert_eq!(back.layers[0].attn_v.scale(), 2.0 * model.layers[0].attn_v.scale());
}

#[test]
fn tq2_0_projections_load_as_the_same_ternary_values() {
    // TQ2_0 blocks are 256 elements along ne0, so the input width must be a multiple of 256.
    let config = bitnet_models::BitNetConfig { hidden_size: 256, n_heads: 8, ..Preset::Tiny.config() };
    let model = synthetic::generate_with_config(config, 42).unwrap();
    let m = &model.layers[0].ffn_up;
    let values = m.to_ternary();
    let scales = vec![m.scale(); values.len() / 256];
    let data = bitnet_quant::tq2::encode_tq2_0(&values, &scales).unwrap();
    let mut r = Rewrite::new();
    r.replace_tensor.insert(
        "blk.0.ffn_up.weight".into(),
        (vec![m.in_features() as u64, m.out_features() as u64], GgmlType::TQ2_0, data),
    );
    let back = load_gguf(r.apply(gguf_bytes(&model))).unwrap();
    assert_eq!(back.layers[0].ffn_up.to_ternary(), values);
    // TQ2_0 stores the scale as f16.
    assert_eq!(back.layers[0].ffn_up.scale(), half::f16::from_f32(m.scale()).to_f32());
}

/// Decodes TQ2_0 bytes with the rule as FORMATS.md states it, independently
/// of bitnet-quant: 66-byte blocks of 256 values, `qs[64]` then an f16 `d`;
/// byte m of half h holds element h*128 + m + 32n in bits 2n..2n+1; value =
/// code - 1 (times d).
fn decode_tq2_0_by_rule(bytes: &[u8], n: usize) -> (Vec<i8>, Vec<f32>) {
    assert_eq!(bytes.len(), n / 256 * 66);
    let mut values = vec![0i8; n];
    let mut scales = Vec::new();
    for (b, block) in bytes.chunks_exact(66).enumerate() {
        for h in 0..2 {
            for m in 0..32 {
                for f in 0..4 {
                    let code = (block[h * 32 + m] >> (2 * f)) & 3;
                    assert_ne!(code, 3, "code 3 in block {b}");
                    values[b * 256 + h * 128 + m + 32 * f] = code as i8 - 1;
                }
            }
        }
        scales.push(half::f16::from_le_bytes([block[64], block[65]]).to_f32());
    }
    (values, scales)
}

/// A synthetic model whose projections' rows are whole 256-value blocks.
fn blockable() -> BitNetModel {
    let config =
        bitnet_models::BitNetConfig { hidden_size: 256, n_heads: 8, intermediate_size: 512, ..Preset::Tiny.config() };
    synthetic::generate_with_config(config, 42).unwrap()
}

#[test]
fn models_written_with_llama_cpp_ternary_types_load_back_exactly() {
    let model = blockable();
    for ternary in [TernaryGgufType::Tq2_0, TernaryGgufType::Tq1_0] {
        let bytes = model.to_gguf_writer_as("test", ternary).unwrap().to_bytes().unwrap();
        let back = load_gguf(bytes.clone()).unwrap();
        assert_same_model(&model, &back);
        // From a file, whose TQ blocks are read from disk as they are repacked.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tq.gguf");
        std::fs::write(&path, &bytes).unwrap();
        assert_same_model(&model, &BitNetModel::load(&path).unwrap().0);
        let file = GgufFile::from_bytes(SharedBytes::from_vec(bytes)).unwrap();
        for (idx, layer) in model.layers.iter().enumerate() {
            for (short, matrix) in bitnet_models::PROJECTIONS.iter().zip(layer.projections()) {
                let name = format!("blk.{idx}.{short}.weight");
                assert_eq!(file.tensor_info(&name).unwrap().ggml_type, ternary.ggml_type(), "{name}");
                // The tensor scale, exact in f32, beside blocks of scale 1.
                let scale = file.tensor_bytes(&format!("blk.{idx}.{short}.scale")).unwrap();
                assert_eq!(f32::from_le_bytes(scale[..4].try_into().unwrap()), matrix.scale(), "{name}");
                if ternary == TernaryGgufType::Tq2_0 {
                    let n = matrix.in_features() * matrix.out_features();
                    let (values, scales) = decode_tq2_0_by_rule(&file.tensor_bytes(&name).unwrap(), n);
                    assert_eq!(values, matrix.to_ternary(), "{name}");
                    assert!(scales.iter().all(|&d| d == 1.0), "{name}");
                }
            }
        }
    }
}

#[test]
fn llama_cpp_ternary_types_refuse_rows_that_are_not_whole_blocks() {
    // The tiny preset's rows hold 128 values; TQ blocks hold 256 of one row.
    let err = tiny().to_gguf_writer_as("test", TernaryGgufType::Tq2_0).unwrap_err().to_string();
    assert!(err.contains("blk.0.attn_q.weight") && err.contains("256") && err.contains("128"), "{err}");
}

#[test]
fn truncated_model_file_is_an_error_not_a_panic() {
    let bytes = gguf_bytes(&tiny());
    for cut in [0, 3, 4, 24, bytes.len() / 3, bytes.len() - 1] {
        assert!(load_gguf(bytes[..cut].to_vec()).is_err(), "cut at {cut}");
    }
}

#[test]
fn gguf_files_load_read_into_memory_or_mapped_alike() {
    let model = tiny();
    let bytes = gguf_bytes(&model);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let (read, _) = BitNetModel::load(&path).unwrap();
    let (mapped, _) = BitNetModel::load_mapped(&path).unwrap();
    assert_same_model(&model, &read);
    assert_same_model(&model, &mapped);
    let file = GgufFile::read(&path).unwrap();
    assert_eq!(file.bytes().unwrap().as_slice(), &bytes[..]);
    // Read whole, a file is its bytes, whatever lies between and after its
    // tensors.
    let mut padded = bytes.clone();
    padded.extend_from_slice(&[0xA5; 100]);
    let padded_path = dir.path().join("padded.gguf");
    std::fs::write(&padded_path, &padded).unwrap();
    assert_eq!(GgufFile::read(&padded_path).unwrap().bytes().unwrap().as_slice(), &padded[..]);
    // A truncated file fails in the mapped parse, before its data is read, naming the file.
    let cut = dir.path().join("cut.gguf");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = BitNetModel::load(&cut).unwrap_err().to_string();
    assert!(err.contains("cut.gguf"), "{err}");
    let err = BitNetModel::load(&dir.path().join("missing.gguf")).unwrap_err().to_string();
    assert!(err.contains("missing.gguf"), "{err}");
}

/// A file read in part hands out every tensor's data as the file holds it:
/// the kept ones from memory, the others read from disk when asked for.
#[test]
fn gguf_files_read_in_part_give_every_tensor_its_bytes() {
    let bytes = gguf_bytes(&tiny());
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tiny.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let whole = GgufFile::from_bytes(SharedBytes::from_vec(bytes.clone())).unwrap();
    let keep = |t: &bitnet_models::gguf::GgufTensorInfo| t.dims.len() >= 2;
    let part = GgufFile::read_selected(&path, keep).unwrap();
    assert!(part.bytes().is_none(), "a file read in part does not pretend to hold all its bytes");
    assert_eq!(part.file_size(), bytes.len() as u64);
    let (kept, unread): (Vec<_>, Vec<_>) = whole.tensors().iter().partition(|t| keep(t));
    assert!(!kept.is_empty() && !unread.is_empty());
    for info in whole.tensors() {
        let start = (whole.data_offset() + info.offset) as usize;
        let expected = &bytes[start..start + info.n_bytes as usize];
        assert_eq!(&*part.tensor_bytes(&info.name).unwrap(), expected, "{}", info.name);
    }
    // The same model as from the whole file.
    assert_same_model(&BitNetModel::from_gguf(&whole).unwrap().0, &BitNetModel::from_gguf(&part).unwrap().0);

    // Cut the file short: the kept tensors are in memory still; an unread
    // tensor past the cut is an error naming the file and the tensor.
    let last = unread.iter().max_by_key(|t| t.offset).unwrap();
    let cut_at = (whole.data_offset() + last.offset) as usize;
    std::fs::write(&path, &bytes[..cut_at]).unwrap();
    for info in &kept {
        assert_eq!(part.tensor_bytes(&info.name).unwrap().len() as u64, info.n_bytes);
    }
    let err = part.tensor_bytes(&last.name).unwrap_err().to_string();
    assert!(err.contains("tiny.gguf") && err.contains(&last.name), "{err}");
}

#[test]
fn bad_hf_folders_get_clear_errors() {
    let model = tiny();
    let dir = tempfile::tempdir().unwrap();
    hf::write_hf_dir(&model, dir.path()).unwrap();

    // Missing weight_scale.
    let bytes = std::fs::read(dir.path().join("model.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<(String, safetensors::tensor::TensorView<'_>)> =
        st.tensors().into_iter().filter(|(n, _)| n != "model.layers.0.mlp.up_proj.weight_scale").collect();
    let broken = tempfile::tempdir().unwrap();
    for f in ["config.json", "tokenizer.json", "tokenizer_config.json"] {
        std::fs::copy(dir.path().join(f), broken.path().join(f)).unwrap();
    }
    safetensors::serialize_to_file(kept, None, &broken.path().join("model.safetensors")).unwrap();
    let err = BitNetModel::load(broken.path()).unwrap_err().to_string();
    assert!(err.contains("model.layers.0.mlp.up_proj.weight_scale"), "{err}");

    // Garbage safetensors header.
    std::fs::write(broken.path().join("model.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    let err = BitNetModel::load(broken.path()).unwrap_err().to_string();
    assert!(err.contains("model.safetensors"), "{err}");

    // A config.json that is not BitNet.
    std::fs::write(broken.path().join("config.json"), r#"{"model_type": "llama"}"#).unwrap();
    let err = BitNetModel::load(broken.path()).unwrap_err().to_string();
    assert!(err.contains("llama"), "{err}");
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

    /// Random byte edits of a valid model file, mostly in its header and
    /// metadata (config, tokenizer), sometimes in its tensor data: loading
    /// gives a model or an error, never a panic, and a model it gives has a
    /// configuration that validates and weights of the shapes it names.
    #[test]
    fn corrupted_model_files_load_or_fail_without_panicking(
        edits in proptest::collection::vec(
            (proptest::bool::weighted(0.8), proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()),
            1..6,
        ),
    ) {
        let bytes = gguf_bytes(&tiny());
        let header = GgufFile::from_bytes(SharedBytes::from_vec(bytes.clone())).unwrap().data_offset() as usize;
        let mut bytes = bytes;
        for (in_header, index, byte) in edits {
            let i = if in_header { index.index(header) } else { header + index.index(bytes.len() - header) };
            bytes[i] = byte;
        }
        // The same bytes read from a file (`BitNetModel::load` reads only the
        // tensors used in place, the rest as they are converted) load alike.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("edited.gguf");
        std::fs::write(&path, &bytes).unwrap();
        let from_file = BitNetModel::load(&path);
        match load_gguf(bytes) {
            Ok(model) => {
                check_consistent(&model)?;
                assert_same_model(&model, &from_file.unwrap().0);
            }
            Err(_) => proptest::prop_assert!(from_file.is_err()),
        }
    }

    /// The same for an HF folder: random byte edits of config.json,
    /// tokenizer.json, tokenizer_config.json or model.safetensors (mostly
    /// its JSON header).
    #[test]
    fn corrupted_hf_folders_load_or_fail_without_panicking(
        edits in proptest::collection::vec(
            (0..4usize, proptest::bool::weighted(0.8), proptest::prelude::any::<proptest::sample::Index>(), proptest::prelude::any::<u8>()),
            1..6,
        ),
    ) {
        const FILES: [&str; 4] = ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"];
        static CLEAN: std::sync::OnceLock<Vec<Vec<u8>>> = std::sync::OnceLock::new();
        let clean = CLEAN.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            hf::write_hf_dir(&tiny(), dir.path()).unwrap();
            FILES.iter().map(|f| std::fs::read(dir.path().join(f)).unwrap()).collect()
        });
        // safetensors: an 8-byte length, then the JSON header (measured
        // before any edit, which may hit the length itself).
        let header_len = |bytes: &[u8]| 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let headers: Vec<usize> =
            clean.iter().enumerate().map(|(f, b)| if f == 3 { header_len(b) } else { b.len() }).collect();
        let mut files = clean.clone();
        for (file, in_header, index, byte) in edits {
            let (bytes, header) = (&mut files[file], headers[file]);
            let i = if in_header || header == bytes.len() {
                index.index(header)
            } else {
                header + index.index(bytes.len() - header)
            };
            bytes[i] = byte;
        }
        let dir = tempfile::tempdir().unwrap();
        for (name, bytes) in FILES.iter().zip(&files) {
            std::fs::write(dir.path().join(name), bytes).unwrap();
        }
        if let Ok((model, _)) = BitNetModel::load(dir.path()) {
            check_consistent(&model)?;
        }
    }
}

/// What any model a load returns must hold: a configuration that validates
/// and weights of the shapes it names.
fn check_consistent(model: &BitNetModel) -> Result<(), proptest::test_runner::TestCaseError> {
    let c = &model.config;
    proptest::prop_assert!(c.validate().is_ok());
    proptest::prop_assert_eq!(model.layers.len(), c.n_layers);
    proptest::prop_assert_eq!(model.embedding.rows(), c.vocab_size);
    proptest::prop_assert_eq!(model.embedding.cols(), c.hidden_size);
    for layer in &model.layers {
        proptest::prop_assert_eq!(layer.attn_q.in_features(), c.hidden_size);
        proptest::prop_assert_eq!(layer.ffn_down.in_features(), c.intermediate_size);
    }
    proptest::prop_assert!(model.tokenizer.vocab_size() <= c.vocab_size);
    Ok(())
}
