//! Property tests: writer -> reader round trips of random content, every
//! prefix of a valid file, and random corruption, which must never panic.

use proptest::prelude::*;
use proptest::sample::select;

use crate::gguf::{tensor_nbytes, GgmlType, GgufError, GgufFile, GgufValueType, GgufWriter, MetadataValue};
use crate::SharedBytes;

/// Checks each strict prefix of the valid file `bytes`: one that ends inside
/// the header must fail as truncated; one that holds the whole header but not
/// all tensor data must fail with `TensorOutOfRange`; nothing may panic.
pub(super) fn check_every_prefix(bytes: &[u8]) {
    let whole = SharedBytes::from_vec(bytes.to_vec());
    let full = GgufFile::from_bytes(whole.clone()).expect("the full file parses");
    let data_end = full.tensors().iter().map(|t| full.data_offset() + t.offset + t.n_bytes).max();
    let mut header_complete_at: Option<usize> = None;
    for len in 0..bytes.len() {
        let prefix = whole.slice(0..len).unwrap();
        match GgufFile::from_bytes(prefix) {
            Ok(_) => {
                assert!(
                    data_end.is_none_or(|end| len as u64 >= end),
                    "prefix of {len} bytes parsed although tensor data ends at {data_end:?}"
                );
                header_complete_at.get_or_insert(len);
            }
            Err(GgufError::Truncated { .. } | GgufError::LengthExceedsFile { .. }) => {
                assert!(
                    header_complete_at.is_none(),
                    "prefix of {len} bytes is truncated in the header, but a shorter one was not"
                );
            }
            Err(GgufError::TensorOutOfRange { .. }) => {
                assert!(data_end.is_some_and(|end| (len as u64) < end));
                header_complete_at.get_or_insert(len);
            }
            Err(other) => panic!("prefix of {len} bytes: unexpected error {other}"),
        }
    }
    // The header (before its padding) ends within one alignment of the data.
    let header_end = header_complete_at.unwrap_or(bytes.len()) as u64;
    assert!(header_end <= full.data_offset());
    assert!(header_end + full.alignment() > full.data_offset());
}

const ALL_VALUE_TYPES: [GgufValueType; 13] = [
    GgufValueType::U8,
    GgufValueType::I8,
    GgufValueType::U16,
    GgufValueType::I16,
    GgufValueType::U32,
    GgufValueType::I32,
    GgufValueType::F32,
    GgufValueType::Bool,
    GgufValueType::String,
    GgufValueType::Array,
    GgufValueType::U64,
    GgufValueType::I64,
    GgufValueType::F64,
];

/// Deepest array nesting the generator makes.
const MAX_GENERATED_DEPTH: u32 = 3;

fn value_of(ty: GgufValueType, depth: u32) -> BoxedStrategy<MetadataValue> {
    match ty {
        GgufValueType::U8 => any::<u8>().prop_map(MetadataValue::U8).boxed(),
        GgufValueType::I8 => any::<i8>().prop_map(MetadataValue::I8).boxed(),
        GgufValueType::U16 => any::<u16>().prop_map(MetadataValue::U16).boxed(),
        GgufValueType::I16 => any::<i16>().prop_map(MetadataValue::I16).boxed(),
        GgufValueType::U32 => any::<u32>().prop_map(MetadataValue::U32).boxed(),
        GgufValueType::I32 => any::<i32>().prop_map(MetadataValue::I32).boxed(),
        GgufValueType::F32 => any::<f32>().prop_map(MetadataValue::F32).boxed(),
        GgufValueType::Bool => any::<bool>().prop_map(MetadataValue::Bool).boxed(),
        GgufValueType::String => ".{0,12}".prop_map(MetadataValue::String).boxed(),
        GgufValueType::U64 => any::<u64>().prop_map(MetadataValue::U64).boxed(),
        GgufValueType::I64 => any::<i64>().prop_map(MetadataValue::I64).boxed(),
        GgufValueType::F64 => any::<f64>().prop_map(MetadataValue::F64).boxed(),
        GgufValueType::Array => {
            let element_types: Vec<GgufValueType> = ALL_VALUE_TYPES
                .into_iter()
                .filter(|&t| depth < MAX_GENERATED_DEPTH || t != GgufValueType::Array)
                .collect();
            select(element_types)
                .prop_flat_map(move |element_type| {
                    proptest::collection::vec(value_of(element_type, depth + 1), 0..4)
                        .prop_map(move |values| MetadataValue::Array(element_type, values))
                })
                .boxed()
        }
    }
}

fn any_value() -> impl Strategy<Value = MetadataValue> {
    select(ALL_VALUE_TYPES.to_vec()).prop_flat_map(|ty| value_of(ty, 0))
}

/// Bitwise equality, so NaNs with the same payload compare equal.
fn same_value(a: &MetadataValue, b: &MetadataValue) -> bool {
    match (a, b) {
        (MetadataValue::F32(x), MetadataValue::F32(y)) => x.to_bits() == y.to_bits(),
        (MetadataValue::F64(x), MetadataValue::F64(y)) => x.to_bits() == y.to_bits(),
        (MetadataValue::Array(ta, va), MetadataValue::Array(tb, vb)) => {
            ta == tb && va.len() == vb.len() && va.iter().zip(vb).all(|(x, y)| same_value(x, y))
        }
        _ => a == b,
    }
}

#[derive(Debug, Clone)]
struct TensorSpec {
    name: String,
    dims: Vec<u64>,
    ggml_type: GgmlType,
    data: Vec<u8>,
}

/// Deterministic filler bytes (splitmix64).
fn filler(seed: u64, len: usize) -> Vec<u8> {
    let mut state = seed;
    (0..len)
        .map(|_| {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            (z ^ (z >> 31)) as u8
        })
        .collect()
}

fn tensor_spec() -> impl Strategy<Value = TensorSpec> {
    let types = vec![
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::I8,
        GgmlType::Q8_0,
        GgmlType::Q4_K,
        GgmlType::TQ2_0,
        GgmlType::I2_S,
    ];
    (".{0,10}", select(types), 1u64..=2, proptest::collection::vec(1u64..=3, 0..=3), any::<u64>()).prop_map(
        |(name, ggml_type, ne0_blocks, rest, seed)| {
            let mut dims = vec![ggml_type.block_elems() as u64 * ne0_blocks];
            dims.extend(rest);
            let n_bytes = tensor_nbytes(ggml_type, &dims).unwrap();
            TensorSpec { name, dims, ggml_type, data: filler(seed, n_bytes as usize) }
        },
    )
}

#[derive(Debug, Clone)]
struct FileSpec {
    alignment: u64,
    metadata: Vec<(String, MetadataValue)>,
    tensors: Vec<TensorSpec>,
}

fn file_spec() -> impl Strategy<Value = FileSpec> {
    (
        select(vec![1u64, 8, 32, 64, 256]),
        proptest::collection::vec((".{0,16}", any_value()), 0..8),
        proptest::collection::vec(tensor_spec(), 0..5),
    )
        .prop_map(|(alignment, metadata, tensors)| FileSpec {
            alignment,
            // Random keys and names, made unique by their index.
            metadata: metadata.into_iter().enumerate().map(|(i, (key, value))| (format!("{key}#{i}"), value)).collect(),
            tensors: tensors
                .into_iter()
                .enumerate()
                .map(|(i, t)| TensorSpec { name: format!("{}#{i}", t.name), ..t })
                .collect(),
        })
}

fn write(spec: &FileSpec) -> Vec<u8> {
    let mut writer = GgufWriter::new();
    writer.set_alignment(spec.alignment).unwrap();
    for (key, value) in &spec.metadata {
        writer.add_metadata(key.clone(), value.clone()).unwrap();
    }
    for t in &spec.tensors {
        writer.add_tensor(t.name.clone(), t.dims.clone(), t.ggml_type, t.data.clone()).unwrap();
    }
    writer.to_bytes().unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    #[test]
    fn writer_reader_round_trip(spec in file_spec()) {
        let bytes = write(&spec);
        let file = GgufFile::from_bytes(SharedBytes::from_vec(bytes.clone())).unwrap();
        prop_assert_eq!(file.version(), 3);
        prop_assert_eq!(file.alignment(), spec.alignment);
        prop_assert_eq!(file.data_offset() % spec.alignment, 0);

        let mut expected = spec.metadata.clone();
        if spec.alignment != 32 {
            expected.insert(0, ("general.alignment".to_owned(), MetadataValue::U32(spec.alignment as u32)));
        }
        prop_assert_eq!(file.metadata().len(), expected.len());
        for ((key, value), (expected_key, expected_value)) in file.metadata().iter().zip(&expected) {
            prop_assert_eq!(key, expected_key);
            prop_assert!(same_value(value, expected_value), "{}: {:?} != {:?}", key, value, expected_value);
            prop_assert!(same_value(file.get(key).unwrap(), expected_value));
        }

        prop_assert_eq!(file.tensors().len(), spec.tensors.len());
        for (info, t) in file.tensors().iter().zip(&spec.tensors) {
            prop_assert_eq!(&info.name, &t.name);
            prop_assert_eq!(&info.dims, &t.dims);
            prop_assert_eq!(info.ggml_type, t.ggml_type);
            prop_assert_eq!(info.n_bytes, t.data.len() as u64);
            prop_assert_eq!(info.offset % spec.alignment, 0);
            prop_assert_eq!(file.tensor_info(&t.name), Some(info));
            prop_assert_eq!(&*file.tensor_bytes(&t.name).unwrap(), &t.data[..]);
        }

        // Writing what was read reproduces the file byte for byte.
        prop_assert_eq!(GgufWriter::from_gguf(&file).unwrap().to_bytes().unwrap(), bytes);
    }

    #[test]
    fn prefixes_of_random_files(spec in file_spec()) {
        check_every_prefix(&write(&spec));
    }

    #[test]
    fn corrupted_files_never_panic(
        spec in file_spec(),
        edits in proptest::collection::vec((any::<proptest::sample::Index>(), any::<u8>()), 1..8),
    ) {
        let mut bytes = write(&spec);
        for (index, byte) in edits {
            let i = index.index(bytes.len());
            bytes[i] = byte;
        }
        if let Ok(file) = GgufFile::from_bytes(SharedBytes::from_vec(bytes)) {
            for info in file.tensors() {
                prop_assert_eq!(file.tensor_bytes(&info.name).unwrap().len() as u64, info.n_bytes);
            }
        }
    }

    #[test]
    fn random_bytes_after_the_header_never_panic(tail in proptest::collection::vec(any::<u8>(), 0..512)) {
        let mut bytes = b"GGUF\x03\x00\x00\x00".to_vec();
        bytes.extend(tail);
        let _ = GgufFile::from_bytes(SharedBytes::from_vec(bytes));
    }
}
