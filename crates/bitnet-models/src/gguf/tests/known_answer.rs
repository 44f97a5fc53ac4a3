//! A tiny GGUF assembled byte by byte: the reader must parse it and the
//! writer must reproduce it exactly.

use crate::gguf::{GgmlType, GgufFile, GgufValueType, GgufWriter, MetadataValue};
use crate::SharedBytes;

fn u32le(v: u32) -> [u8; 4] {
    v.to_le_bytes()
}

fn u64le(v: u64) -> [u8; 8] {
    v.to_le_bytes()
}

/// The 64 packed bytes and f32 scale of the I2_S tensor, then its padding.
fn i2s_data() -> Vec<u8> {
    let mut data: Vec<u8> = (0..64u8).map(|i| [0x00, 0x55, 0xaa, 0x1b][usize::from(i % 4)]).collect();
    data.extend_from_slice(&1.5f32.to_le_bytes());
    data.extend_from_slice(&[0; 28]);
    data
}

fn norm_data() -> Vec<u8> {
    [1.0f32, 2.0, 3.0, 4.0].iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn hand_assembled() -> Vec<u8> {
    let mut b: Vec<u8> = Vec::new();
    b.extend_from_slice(b"GGUF");
    b.extend_from_slice(&u32le(3)); // version
    b.extend_from_slice(&u64le(2)); // tensor count
    b.extend_from_slice(&u64le(5)); // metadata entry count
    assert_eq!(b.len(), 24);

    // general.architecture: string "bitnet-b1.58"
    b.extend_from_slice(&u64le(20));
    b.extend_from_slice(b"general.architecture");
    b.extend_from_slice(&u32le(8));
    b.extend_from_slice(&u64le(12));
    b.extend_from_slice(b"bitnet-b1.58");
    assert_eq!(b.len(), 76);

    // bitnet-b1.58.block_count: u32 1
    b.extend_from_slice(&u64le(24));
    b.extend_from_slice(b"bitnet-b1.58.block_count");
    b.extend_from_slice(&u32le(4));
    b.extend_from_slice(&u32le(1));
    assert_eq!(b.len(), 116);

    // bitnet-b1.58.rope.freq_base: f32 500000 (0x48f42400)
    b.extend_from_slice(&u64le(27));
    b.extend_from_slice(b"bitnet-b1.58.rope.freq_base");
    b.extend_from_slice(&u32le(6));
    b.extend_from_slice(&[0x00, 0x24, 0xf4, 0x48]);
    assert_eq!(b.len(), 159);

    // tokenizer.ggml.tokens: array of 2 strings ["a", "<s>"]
    b.extend_from_slice(&u64le(21));
    b.extend_from_slice(b"tokenizer.ggml.tokens");
    b.extend_from_slice(&u32le(9));
    b.extend_from_slice(&u32le(8));
    b.extend_from_slice(&u64le(2));
    b.extend_from_slice(&u64le(1));
    b.extend_from_slice(b"a");
    b.extend_from_slice(&u64le(3));
    b.extend_from_slice(b"<s>");
    assert_eq!(b.len(), 224);

    // general.flags: bool true
    b.extend_from_slice(&u64le(13));
    b.extend_from_slice(b"general.flags");
    b.extend_from_slice(&u32le(7));
    b.push(1);
    assert_eq!(b.len(), 250);

    // output_norm.weight: 1 dim [4], F32 (0), offset 0
    b.extend_from_slice(&u64le(18));
    b.extend_from_slice(b"output_norm.weight");
    b.extend_from_slice(&u32le(1));
    b.extend_from_slice(&u64le(4));
    b.extend_from_slice(&u32le(0));
    b.extend_from_slice(&u64le(0));
    assert_eq!(b.len(), 300);

    // blk.0.attn_q.weight: 2 dims [128, 2], I2_S (36), offset 32
    b.extend_from_slice(&u64le(19));
    b.extend_from_slice(b"blk.0.attn_q.weight");
    b.extend_from_slice(&u32le(2));
    b.extend_from_slice(&u64le(128));
    b.extend_from_slice(&u64le(2));
    b.extend_from_slice(&u32le(36));
    b.extend_from_slice(&u64le(32));
    assert_eq!(b.len(), 359);

    // Pad to the 32-byte alignment: the data section starts at 384.
    b.extend_from_slice(&[0; 25]);
    assert_eq!(b.len(), 384);

    // output_norm.weight data (16 bytes) and padding to 32.
    b.extend_from_slice(&norm_data());
    b.extend_from_slice(&[0; 16]);
    // blk.0.attn_q.weight data: 256 / 4 + 32 = 96 bytes, already aligned.
    b.extend_from_slice(&i2s_data());
    assert_eq!(b.len(), 512);
    b
}

fn same_content_writer() -> GgufWriter {
    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", MetadataValue::String("bitnet-b1.58".into())).unwrap();
    w.add_metadata("bitnet-b1.58.block_count", MetadataValue::U32(1)).unwrap();
    w.add_metadata("bitnet-b1.58.rope.freq_base", MetadataValue::F32(500000.0)).unwrap();
    w.add_metadata("tokenizer.ggml.tokens", MetadataValue::string_array(["a", "<s>"])).unwrap();
    w.add_metadata("general.flags", MetadataValue::Bool(true)).unwrap();
    w.add_tensor("output_norm.weight", vec![4], GgmlType::F32, norm_data()).unwrap();
    w.add_tensor("blk.0.attn_q.weight", vec![128, 2], GgmlType::I2_S, i2s_data()).unwrap();
    w
}

#[test]
fn reader_parses_hand_assembled_file() {
    let bytes = hand_assembled();
    let file = GgufFile::from_bytes(SharedBytes::from_vec(bytes)).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.alignment(), 32);
    assert_eq!(file.data_offset(), 384);
    assert_eq!(file.file_size(), 512);
    assert_eq!(file.architecture().unwrap(), "bitnet-b1.58");
    assert_eq!(file.get_u64("bitnet-b1.58.block_count").unwrap(), 1);
    assert_eq!(file.get_f32("bitnet-b1.58.rope.freq_base").unwrap(), 500000.0);
    assert!(file.get_bool("general.flags").unwrap());
    let tokens = file.get("tokenizer.ggml.tokens").unwrap();
    assert_eq!(tokens.as_array().unwrap().0, GgufValueType::String);
    assert_eq!(tokens.as_str_array().unwrap(), ["a", "<s>"]);
    let keys: Vec<&str> = file.metadata().iter().map(|(k, _)| k.as_str()).collect();
    assert_eq!(
        keys,
        [
            "general.architecture",
            "bitnet-b1.58.block_count",
            "bitnet-b1.58.rope.freq_base",
            "tokenizer.ggml.tokens",
            "general.flags"
        ]
    );

    let tensors = file.tensors();
    assert_eq!(tensors.len(), 2);
    assert_eq!(tensors[0].name, "output_norm.weight");
    assert_eq!(tensors[0].dims, [4]);
    assert_eq!(tensors[0].ggml_type, GgmlType::F32);
    assert_eq!((tensors[0].offset, tensors[0].n_bytes), (0, 16));
    assert_eq!(tensors[1].name, "blk.0.attn_q.weight");
    assert_eq!(tensors[1].dims, [128, 2]);
    assert_eq!(tensors[1].ggml_type, GgmlType::I2_S);
    assert_eq!((tensors[1].offset, tensors[1].n_bytes), (32, 96));
    assert_eq!(tensors[1].n_elements(), 256);
    assert_eq!(&*file.tensor_bytes("output_norm.weight").unwrap(), &norm_data()[..]);
    assert_eq!(&*file.tensor_bytes("blk.0.attn_q.weight").unwrap(), &i2s_data()[..]);
}

#[test]
fn writer_produces_the_hand_assembled_bytes() {
    let expected = hand_assembled();
    assert_eq!(same_content_writer().to_bytes().unwrap(), expected);

    let mut streamed = Vec::new();
    same_content_writer().write_to(&mut streamed).unwrap();
    assert_eq!(streamed, expected);

    // Re-writing a parsed file reproduces it too.
    let file = GgufFile::from_bytes(SharedBytes::from_vec(expected.clone())).unwrap();
    assert_eq!(GgufWriter::from_gguf(&file).unwrap().to_bytes().unwrap(), expected);
}

#[test]
fn every_prefix_errors_cleanly() {
    super::properties::check_every_prefix(&hand_assembled());
}
