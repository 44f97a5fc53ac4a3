//! One hand-built file per reader validation rule, each checking the error
//! variant and that the message says what and where.

use super::builder::*;
use crate::gguf::{GgmlType, GgufError, GgufValueType, MetadataValue, MAX_ARRAY_DEPTH};

/// A valid F32 tensor `w` of 8 elements (32 bytes) at offset 0.
fn one_tensor(kvs: &[Vec<u8>]) -> Vec<u8> {
    assemble(kvs, &[info("w", &[8], G_F32, 0)], &[0; 32]).0
}

#[test]
fn minimal_file_parses() {
    let file = parse(one_tensor(&[kv_str("general.architecture", "bitnet-b1.58")])).unwrap();
    assert_eq!(file.version(), 3);
    assert_eq!(file.alignment(), 32);
    assert_eq!(file.architecture().unwrap(), "bitnet-b1.58");
    assert_eq!(file.tensors().len(), 1);
    assert_eq!(file.tensor_bytes("w").unwrap().len(), 32);
}

#[test]
fn empty_file_is_truncated() {
    check_err!(Vec::new(), GgufError::Truncated { offset: 0, needed: 4, .. }, ["magic", "the GGUF header", "byte 0"]);
}

#[test]
fn wrong_magic() {
    let mut bytes = one_tensor(&[]);
    bytes[..4].copy_from_slice(b"GGML");
    check_err!(
        bytes,
        GgufError::BadMagic { found } if &found == b"GGML",
        ["\"GGML\"", "byte 0", "\"GGUF\""]
    );
}

#[test]
fn versions() {
    let with_version = |version: u32| {
        let mut bytes = one_tensor(&[]);
        bytes[4..8].copy_from_slice(&version.to_le_bytes());
        bytes
    };
    // Version 2 has the same layout as 3 (u64 counts).
    assert_eq!(parse(with_version(2)).unwrap().version(), 2);
    check_err!(with_version(1), GgufError::UnsupportedVersion { version: 1 }, ["version 1", "byte 4", "32-bit counts"]);
    check_err!(with_version(4), GgufError::UnsupportedVersion { version: 4 }, ["version 4", "byte 4"]);
    check_err!(with_version(3u32.swap_bytes()), GgufError::UnsupportedVersion { .. }, ["big-endian"]);
}

#[test]
fn truncated_inside_a_tensor_info_names_the_tensor() {
    // Four dimensions, so that the cut comes after the upfront check that the
    // tensor count could fit (32 bytes per info at least).
    let (bytes, layout) = assemble(&[], &[info("blk.0.w", &[8, 4, 1, 1], G_F32, 0)], &[]);
    // Cut after the name, n_dims and three of the four dimensions.
    let cut = layout.info_offsets[0] + 8 + 7 + 4 + 3 * 8 + 3;
    let err = check_err!(
        bytes[..cut].to_vec(),
        GgufError::Truncated { what: "dimension", .. },
        ["tensor info #0 (`blk.0.w`)", &format!("byte {}", cut - 3), "needs 8 bytes"]
    );
    assert!(matches!(err, GgufError::Truncated { file_size, .. } if file_size == cut as u64));
}

#[test]
fn truncated_inside_a_value_names_the_key() {
    let (bytes, layout) = assemble(&[kv_u32("llama.block_count", 30)], &[], &[]);
    let value_offset = layout.kv_offsets[0] + 8 + 17 + 4;
    check_err!(
        bytes[..value_offset + 2].to_vec(),
        GgufError::Truncated { what: "u32 value", .. },
        ["metadata key `llama.block_count`", &format!("byte {value_offset}")]
    );
}

#[test]
fn unknown_metadata_value_type() {
    let (bytes, layout) = assemble(&[kv("general.odd", 13, &[0; 8])], &[], &[]);
    let type_offset = layout.kv_offsets[0] + 8 + 11;
    check_err!(
        bytes,
        GgufError::UnknownValueType { type_id: 13, ref key, offset } if key == "general.odd" && offset == type_offset as u64,
        ["`general.odd`", "unknown value type 13", &format!("byte {type_offset}")]
    );
}

#[test]
fn unknown_array_element_type() {
    let mut value = Raw::new();
    value.u32(99).u64(0);
    let (bytes, layout) = assemble(&[kv("tokenizer.odd", T_ARRAY, &value.0)], &[], &[]);
    let type_offset = layout.kv_offsets[0] + 8 + 13 + 4;
    check_err!(
        bytes,
        GgufError::UnknownValueType { type_id: 99, .. },
        ["`tokenizer.odd`", &format!("byte {type_offset}")]
    );
}

#[test]
fn invalid_bool() {
    let (bytes, layout) = assemble(&[kv("general.flag", T_BOOL, &[2])], &[], &[]);
    let value_offset = layout.kv_offsets[0] + 8 + 12 + 4;
    check_err!(bytes, GgufError::InvalidBool { byte: 2, .. }, ["`general.flag`", &format!("byte {value_offset}")]);
}

#[test]
fn unknown_ggml_type_names_tensor_and_id() {
    for type_id in [4, 37, 39, 1000] {
        let (bytes, layout) = assemble(&[], &[info("blk.3.ffn_up.weight", &[256], type_id, 0)], &[0; 256]);
        let type_offset = layout.info_offsets[0] + 8 + 19 + 4 + 8;
        check_err!(
            bytes,
            GgufError::UnknownGgmlType { type_id: found, .. } if found == type_id,
            ["`blk.3.ffn_up.weight`", &format!("type id {type_id}"), &format!("byte {type_offset}")]
        );
    }
}

#[test]
fn dimension_count_out_of_range() {
    for dims in [&[][..], &[1, 1, 1, 1, 8][..]] {
        let (bytes, layout) = assemble(&[], &[info("w", dims, G_F32, 0)], &[0; 32]);
        let n_dims_offset = layout.info_offsets[0] + 8 + 1;
        check_err!(
            bytes,
            GgufError::BadDimCount { n_dims, .. } if n_dims == dims.len() as u64,
            ["`w`", &format!("{} dimensions", dims.len()), &format!("byte {n_dims_offset}")]
        );
    }
}

#[test]
fn zero_dimension() {
    let bytes = assemble(&[], &[info("w", &[8, 0], G_F32, 0)], &[0; 32]).0;
    check_err!(bytes, GgufError::ZeroDimension { index: 1, .. }, ["`w`", "dimension 1", "[8, 0]"]);
}

#[test]
fn overflowing_shapes() {
    let shapes: [&[u64]; 4] = [
        &[1 << 32, 1 << 32],  // element count overflows u64
        &[1 << 40, 1 << 23],  // 2^63 elements: overflows ggml's i64
        &[1 << 61, 2],        // 2^62 F32 elements: byte size overflows
        &[u64::MAX, 1, 1, 1], // a single huge dimension
    ];
    for dims in shapes {
        let bytes = assemble(&[], &[info("huge", dims, G_F32, 0)], &[0; 32]).0;
        check_err!(bytes, GgufError::ShapeOverflow { .. }, ["`huge`", &format!("{dims:?}"), "F32"]);
    }
}

#[test]
fn shape_that_does_not_fit_the_type() {
    // I2_S needs the element count to be a multiple of 128.
    let bytes = assemble(&[], &[info("blk.0.attn_q.weight", &[100, 3], G_I2_S, 0)], &[0; 128]).0;
    check_err!(
        bytes,
        GgufError::ShapeNotBlockMultiple { ggml_type: GgmlType::I2_S, .. },
        ["`blk.0.attn_q.weight`", "[100, 3]", "I2_S", "element count", "128"]
    );
    // Block types need ne0 to be a multiple of the block.
    let bytes = assemble(&[], &[info("q", &[33, 32], G_Q8_0, 0)], &[0; 1088]).0;
    check_err!(bytes, GgufError::ShapeNotBlockMultiple { ggml_type: GgmlType::Q8_0, .. }, ["`q`", "ne0", "32"]);
    // I2_S with a 128-multiple count but ne0 not a multiple of 128 is fine:
    // the type packs the tensor as one flat run.
    let file = parse(assemble(&[], &[info("t", &[64, 2], G_I2_S, 0)], &[0; 64]).0).unwrap();
    assert_eq!(file.tensors()[0].n_bytes, 64);
}

#[test]
fn misaligned_tensor_offset() {
    let bytes = assemble(&[], &[info("w", &[4], G_F32, 16)], &[0; 64]).0;
    check_err!(
        bytes,
        GgufError::MisalignedTensor { offset: 16, alignment: 32, .. },
        ["`w`", "offset 16", "alignment 32"]
    );
}

#[test]
fn tensor_data_out_of_range() {
    let (bytes, layout) = assemble(&[], &[info("w", &[8], G_F32, 32)], &[0; 48]);
    let file_size = bytes.len();
    check_err!(
        bytes,
        GgufError::TensorOutOfRange { offset: 32, n_bytes: 32, .. },
        ["`w`", "data offset 32", &format!("file byte {}", layout.data_offset + 32), &format!("byte {file_size}")]
    );
    // An offset so large that offset + size overflows u64.
    let bytes = assemble(&[], &[info("w", &[8], G_F32, u64::MAX - 31)], &[0; 32]).0;
    check_err!(bytes, GgufError::TensorOutOfRange { .. }, ["`w`"]);
}

#[test]
fn overlapping_tensors() {
    let infos = [info("a", &[16], G_F32, 0), info("b", &[8], G_F32, 96), info("c", &[8], G_F32, 32)];
    let bytes = assemble(&[], &infos, &[0; 128]).0;
    check_err!(
        bytes,
        GgufError::OverlappingTensors { ref first, ref second, .. } if first == "a" && second == "c",
        ["`a`", "`c`", "data offset 0", "64 bytes", "data offset 32"]
    );
}

#[test]
fn duplicate_tensor_names() {
    let infos = [info("w", &[8], G_F32, 0), info("w", &[8], G_F32, 32)];
    let (bytes, layout) = assemble(&[], &infos, &[0; 64]);
    let second = layout.info_offsets[1];
    check_err!(
        bytes,
        GgufError::DuplicateTensor { offset: Some(o), .. } if o == second as u64,
        ["`w`", &format!("byte {second}")]
    );
}

#[test]
fn duplicate_metadata_keys() {
    let kvs = [kv_u32("general.x", 1), kv_u32("general.y", 2), kv_u32("general.x", 3)];
    let (bytes, layout) = assemble(&kvs, &[], &[]);
    let third = layout.kv_offsets[2];
    check_err!(
        bytes,
        GgufError::DuplicateKey { ref key, offset: Some(o) } if key == "general.x" && o == third as u64,
        ["`general.x`", &format!("byte {third}")]
    );
}

#[test]
fn invalid_utf8() {
    // In a key.
    let (bytes, layout) = assemble(&[kv(b"general.\xff", T_U32, &[0; 4])], &[], &[]);
    let key_bytes = layout.kv_offsets[0] + 8;
    check_err!(bytes, GgufError::InvalidUtf8 { what: "key", .. }, ["metadata entry #0", &format!("byte {key_bytes}")]);
    // In a string value.
    let mut value = Raw::new();
    value.str(b"ok \xc3\x28");
    let (bytes, layout) = assemble(&[kv("general.name", T_STRING, &value.0)], &[], &[]);
    let string_bytes = layout.kv_offsets[0] + 8 + 12 + 4 + 8;
    check_err!(
        bytes,
        GgufError::InvalidUtf8 { what: "string value", .. },
        ["`general.name`", &format!("byte {string_bytes}")]
    );
    // In a string inside an array.
    let mut value = Raw::new();
    value.u32(T_STRING).u64(2).str("fine").str(b"\x80");
    let bytes = assemble(&[kv("tokenizer.ggml.tokens", T_ARRAY, &value.0)], &[], &[]).0;
    check_err!(bytes, GgufError::InvalidUtf8 { .. }, ["`tokenizer.ggml.tokens`"]);
    // In a tensor name.
    let (bytes, layout) = assemble(&[], &[info(b"blk.\xfe", &[8], G_F32, 0)], &[0; 32]);
    let name_bytes = layout.info_offsets[0] + 8;
    check_err!(
        bytes,
        GgufError::InvalidUtf8 { what: "tensor name", .. },
        ["tensor info #0", &format!("byte {name_bytes}")]
    );
}

#[test]
fn lengths_and_counts_larger_than_the_file() {
    // String length.
    let mut value = Raw::new();
    value.u64(u64::MAX);
    let (bytes, layout) = assemble(&[kv("general.name", T_STRING, &value.0)], &[], &[]);
    let len_offset = layout.kv_offsets[0] + 8 + 12 + 4;
    check_err!(
        bytes,
        GgufError::LengthExceedsFile { what: "string value", count: u64::MAX, .. },
        ["`general.name`", &format!("byte {len_offset}"), &u64::MAX.to_string()]
    );
    // Key length.
    let mut raw = Raw::new();
    raw.u64(1 << 40).u32(T_U8).u8(0);
    let bytes = assemble(&[raw.take()], &[], &[]).0;
    check_err!(bytes, GgufError::LengthExceedsFile { what: "key", .. }, ["metadata entry #0"]);
    // Array count: 2^40 u32s cannot fit, nor can 2^62 (which overflows when
    // multiplied by the element size).
    for count in [1u64 << 40, 1 << 62] {
        let mut value = Raw::new();
        value.u32(T_U32).u64(count).u32(7);
        let bytes = assemble(&[kv("tokenizer.ggml.token_type", T_ARRAY, &value.0)], &[], &[]).0;
        check_err!(
            bytes,
            GgufError::LengthExceedsFile { what: "array length", min_item_bytes: 4, .. },
            ["`tokenizer.ggml.token_type`", &count.to_string()]
        );
    }
    // An array of arrays: each inner array takes at least 12 bytes.
    let mut value = Raw::new();
    value.u32(T_ARRAY).u64(10).u32(T_U8).u64(0);
    let bytes = assemble(&[kv("general.nested", T_ARRAY, &value.0)], &[], &[]).0;
    check_err!(bytes, GgufError::LengthExceedsFile { min_item_bytes: 12, .. }, ["`general.nested`"]);
    // Metadata entry count and tensor count.
    let bytes = assemble_with(3, u64::MAX, 0, &[], &[], &[]).0;
    check_err!(
        bytes,
        GgufError::LengthExceedsFile { what: "metadata entry count", .. },
        ["the GGUF header", "byte 16"]
    );
    let bytes = assemble_with(3, 0, 1 << 59, &[], &[], &[]).0;
    check_err!(bytes, GgufError::LengthExceedsFile { what: "tensor count", .. }, ["the GGUF header", "byte 8"]);
    // A tensor name.
    let mut raw = Raw::new();
    raw.u64(1 << 50).u32(1).u64(8).u32(G_F32).u64(0);
    let bytes = assemble(&[], &[raw.take()], &[0; 32]).0;
    check_err!(bytes, GgufError::LengthExceedsFile { what: "tensor name", .. }, ["tensor info #0"]);
}

#[test]
fn alignment_key() {
    // A valid custom alignment moves the data section and constrains offsets.
    let mut raw = Raw::new();
    raw.bytes(b"GGUF").u32(3).u64(1).u64(1);
    raw.bytes(&kv_u32("general.alignment", 64));
    raw.bytes(&info("w", &[8], G_F32, 0));
    raw.pad_to(64);
    let data_offset = raw.len();
    raw.bytes(&[7; 32]);
    let file = parse(raw.take()).unwrap();
    assert_eq!(file.alignment(), 64);
    assert_eq!(file.data_offset(), data_offset as u64);
    assert_eq!(&*file.tensor_bytes("w").unwrap(), &[7; 32]);

    let bytes = assemble(&[kv_u32("general.alignment", 64)], &[info("w", &[8], G_F32, 32)], &[0; 64]).0;
    check_err!(bytes, GgufError::MisalignedTensor { alignment: 64, .. }, ["`w`", "64"]);

    for bad in [0, 48, 3] {
        let bytes = assemble(&[kv_u32("general.alignment", bad)], &[], &[]).0;
        check_err!(
            bytes,
            GgufError::InvalidAlignment { alignment } if alignment == u64::from(bad),
            ["general.alignment", &format!("alignment {bad}"), "power of two"]
        );
    }
    let bytes = assemble(&[kv("general.alignment", T_U64, &32u64.to_le_bytes())], &[], &[]).0;
    check_err!(bytes, GgufError::WrongType { found: GgufValueType::U64, .. }, ["`general.alignment`", "U64", "u32"]);
}

/// An array value nested `depth` levels deep around an empty u8 array.
fn nested_array(depth: usize) -> Vec<u8> {
    let mut value = Raw::new();
    for _ in 1..depth {
        value.u32(T_ARRAY).u64(1);
    }
    value.u32(T_U8).u64(0);
    value.take()
}

#[test]
fn nested_arrays() {
    let mut value = Raw::new();
    value.u32(T_ARRAY).u64(2);
    value.u32(T_STRING).u64(2).str("a").str("bc");
    value.u32(T_F32).u64(1).bytes(&1.5f32.to_le_bytes());
    let bytes = assemble(&[kv("general.nested", T_ARRAY, &value.0)], &[], &[]).0;
    let file = parse(bytes).unwrap();
    assert_eq!(
        file.get("general.nested"),
        Some(&MetadataValue::Array(
            GgufValueType::Array,
            vec![MetadataValue::string_array(["a", "bc"]), MetadataValue::f32_array([1.5])],
        ))
    );

    let bytes = assemble(&[kv("general.deep", T_ARRAY, &nested_array(MAX_ARRAY_DEPTH))], &[], &[]).0;
    parse(bytes).unwrap();
    let bytes = assemble(&[kv("general.deep", T_ARRAY, &nested_array(MAX_ARRAY_DEPTH + 1))], &[], &[]).0;
    check_err!(bytes, GgufError::NestingTooDeep { .. }, ["`general.deep`", &MAX_ARRAY_DEPTH.to_string()]);
    // Deep enough to overflow the stack of a parser without a depth limit.
    let bytes = assemble(&[kv("general.deep", T_ARRAY, &nested_array(1_000_000))], &[], &[]).0;
    check_err!(bytes, GgufError::NestingTooDeep { .. }, ["`general.deep`"]);
}

#[test]
fn metadata_accessors() {
    let kvs = [
        kv_str("general.architecture", "bitnet-b1.58"),
        kv_u32("bitnet-b1.58.block_count", 30),
        kv("bitnet-b1.58.rope.freq_base", T_F32, &500000f32.to_le_bytes()),
        kv("general.signed", 5, &(-1i32).to_le_bytes()),
    ];
    let file = parse(one_tensor(&kvs)).unwrap();
    assert_eq!(file.metadata().len(), 4);
    assert_eq!(file.metadata()[1].0, "bitnet-b1.58.block_count");
    assert_eq!(file.get_u64("bitnet-b1.58.block_count").unwrap(), 30);
    assert_eq!(file.get_i64("general.signed").unwrap(), -1);
    assert_eq!(file.get_f32("bitnet-b1.58.rope.freq_base").unwrap(), 500000.0);
    assert!(file.get("nope").is_none());

    let check = |err: GgufError, needles: &[&str]| {
        let msg = err.to_string();
        for needle in needles {
            assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
        }
        err
    };
    let err = check(file.get_u64("bitnet-b1.58.vocab_size").unwrap_err(), &["`bitnet-b1.58.vocab_size`", "missing"]);
    assert!(matches!(err, GgufError::MissingKey { .. }));
    let err =
        check(file.get_str("bitnet-b1.58.block_count").unwrap_err(), &["`bitnet-b1.58.block_count`", "U32", "string"]);
    assert!(matches!(err, GgufError::WrongType { found: GgufValueType::U32, expected: "string", .. }));
    let err = check(file.get_f32("bitnet-b1.58.block_count").unwrap_err(), &["f32"]);
    assert!(matches!(err, GgufError::WrongType { .. }));
    let err = check(file.get_u64("general.architecture").unwrap_err(), &["String"]);
    assert!(matches!(err, GgufError::WrongType { .. }));
    let err = check(file.get_u64("general.signed").unwrap_err(), &["`general.signed`", "-1", "non-negative"]);
    assert!(matches!(err, GgufError::ValueOutOfRange { .. }));
    let err = check(file.get_bool("general.signed").unwrap_err(), &["bool"]);
    assert!(matches!(err, GgufError::WrongType { .. }));

    let err = check(file.tensor_bytes("output.weight").unwrap_err(), &["`output.weight`"]);
    assert!(matches!(err, GgufError::TensorNotFound { .. }));
    assert!(file.tensor_info("output.weight").is_none());
    let info = file.tensor_info("w").unwrap();
    assert_eq!((info.n_elements(), info.n_bytes, info.offset), (8, 32, 0));
}

#[test]
fn open_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("broken.gguf");
    std::fs::write(&path, b"GGUF\x01\x00\x00\x00").unwrap();
    let err = crate::gguf::GgufFile::open(&path).unwrap_err();
    assert!(matches!(err.innermost(), GgufError::UnsupportedVersion { version: 1 }));
    let msg = err.to_string();
    assert!(msg.contains("broken.gguf") && msg.contains("version 1"), "{msg}");

    let missing = dir.path().join("missing.gguf");
    let err = crate::gguf::GgufFile::open(&missing).unwrap_err();
    assert!(matches!(err, GgufError::Map(_)));
    assert!(err.to_string().contains("missing.gguf"), "{err}");

    let good = dir.path().join("good.gguf");
    std::fs::write(&good, one_tensor(&[])).unwrap();
    let file = crate::gguf::GgufFile::open(&good).unwrap();
    assert_eq!(file.path(), Some(good.as_path()));
    assert_eq!(file.tensor_bytes("w").unwrap().len(), 32);
}
