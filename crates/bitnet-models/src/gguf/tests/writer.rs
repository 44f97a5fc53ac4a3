//! Writer validation, alignment handling and atomic file writes.

use crate::gguf::{GgmlType, GgufError, GgufFile, GgufValueType, GgufWriter, MetadataValue, MAX_ARRAY_DEPTH};
use crate::SharedBytes;

fn message_contains(err: &GgufError, needles: &[&str]) {
    let msg = err.to_string();
    for needle in needles {
        assert!(msg.contains(needle), "{msg:?} lacks {needle:?}");
    }
}

fn read_back(writer: &GgufWriter) -> GgufFile {
    GgufFile::from_bytes(SharedBytes::from_vec(writer.to_bytes().unwrap())).unwrap()
}

#[test]
fn rejects_duplicates() {
    let mut w = GgufWriter::new();
    w.add_metadata("general.name", MetadataValue::String("a".into())).unwrap();
    let err = w.add_metadata("general.name", MetadataValue::U8(1)).unwrap_err();
    assert!(matches!(err, GgufError::DuplicateKey { offset: None, .. }));
    message_contains(&err, &["`general.name`"]);

    w.add_tensor("w", vec![8], GgmlType::F32, vec![0; 32]).unwrap();
    let err = w.add_tensor("w", vec![8], GgmlType::F32, vec![0; 32]).unwrap_err();
    assert!(matches!(err, GgufError::DuplicateTensor { offset: None, .. }));
    message_contains(&err, &["`w`"]);
}

#[test]
fn checks_tensor_shape_and_size() {
    let mut w = GgufWriter::new();
    let err = w.add_tensor("q", vec![256, 2], GgmlType::I2_S, vec![0; 128]).unwrap_err();
    assert!(matches!(err, GgufError::TensorDataSize { expected: 160, found: 128, .. }));
    message_contains(&err, &["`q`", "I2_S", "[256, 2]", "160", "128"]);

    let err = w.add_tensor("q", vec![100], GgmlType::I2_S, vec![0; 57]).unwrap_err();
    assert!(matches!(err, GgufError::ShapeNotBlockMultiple { .. }));
    let err = w.add_tensor("q", vec![], GgmlType::F32, vec![0; 4]).unwrap_err();
    assert!(matches!(err, GgufError::BadDimCount { n_dims: 0, .. }));
    let err = w.add_tensor("q", vec![1; 5], GgmlType::F32, vec![0; 4]).unwrap_err();
    assert!(matches!(err, GgufError::BadDimCount { n_dims: 5, .. }));
    let err = w.add_tensor("q", vec![4, 0], GgmlType::F32, Vec::new()).unwrap_err();
    assert!(matches!(err, GgufError::ZeroDimension { index: 1, .. }));
    let err = w.add_tensor("q", vec![1 << 62, 4], GgmlType::I8, Vec::new()).unwrap_err();
    assert!(matches!(err, GgufError::ShapeOverflow { .. }));
    // Failed additions leave nothing behind.
    w.add_tensor("q", vec![128], GgmlType::I2_S, vec![0; 64]).unwrap();
    assert_eq!(read_back(&w).tensors().len(), 1);
}

#[test]
fn checks_arrays() {
    let mut w = GgufWriter::new();
    let mixed = MetadataValue::Array(GgufValueType::U32, vec![MetadataValue::U32(1), MetadataValue::I32(2)]);
    let err = w.add_metadata("general.mixed", mixed).unwrap_err();
    assert!(matches!(
        err,
        GgufError::MixedArray { expected: GgufValueType::U32, found: GgufValueType::I32, index: 1, .. }
    ));
    message_contains(&err, &["`general.mixed`", "index 1"]);

    let mut deep = MetadataValue::Array(GgufValueType::U8, Vec::new());
    for _ in 1..MAX_ARRAY_DEPTH {
        deep = MetadataValue::Array(GgufValueType::Array, vec![deep]);
    }
    w.add_metadata("general.deep", deep.clone()).unwrap();
    assert_eq!(read_back(&w).get("general.deep"), Some(&deep));
    let deeper = MetadataValue::Array(GgufValueType::Array, vec![deep]);
    let err = w.add_metadata("general.deeper", deeper).unwrap_err();
    assert!(matches!(err, GgufError::NestingTooDeep { offset: None, .. }));
    message_contains(&err, &["`general.deeper`"]);

    // An empty array keeps its element type.
    w.add_metadata("general.empty", MetadataValue::Array(GgufValueType::F64, Vec::new())).unwrap();
    assert_eq!(read_back(&w).get("general.empty").unwrap().as_array().unwrap().0, GgufValueType::F64);
}

#[test]
fn alignment() {
    let mut w = GgufWriter::new();
    for bad in [0, 3, 48, 1 << 32] {
        let err = w.set_alignment(bad).unwrap_err();
        assert!(matches!(err, GgufError::InvalidAlignment { alignment } if alignment == bad));
        message_contains(&err, &[&bad.to_string(), "power of two"]);
    }
    // The default alignment writes no key.
    w.set_alignment(32).unwrap();
    w.add_tensor("a", vec![1], GgmlType::I8, vec![1]).unwrap();
    w.add_tensor("b", vec![1], GgmlType::I8, vec![2]).unwrap();
    let file = read_back(&w);
    assert!(file.get("general.alignment").is_none());
    assert_eq!(file.tensor_info("b").unwrap().offset, 32);

    // Changing it after adding tensors re-lays them out.
    w.set_alignment(64).unwrap();
    let file = read_back(&w);
    assert_eq!(file.get("general.alignment"), Some(&MetadataValue::U32(64)));
    assert_eq!(file.tensor_info("b").unwrap().offset, 64);
    assert_eq!(file.data_offset() % 64, 0);
    assert_eq!(&*file.tensor_bytes("b").unwrap(), &[2]);

    // Setting it again updates the key in place.
    w.set_alignment(8).unwrap();
    let file = read_back(&w);
    assert_eq!(file.metadata().len(), 1);
    assert_eq!(file.alignment(), 8);

    // The key itself can be given as metadata, with the reader's rules.
    let mut w = GgufWriter::new();
    let err = w.add_metadata("general.alignment", MetadataValue::U64(64)).unwrap_err();
    assert!(matches!(err, GgufError::WrongType { found: GgufValueType::U64, .. }));
    let err = w.add_metadata("general.alignment", MetadataValue::U32(12)).unwrap_err();
    assert!(matches!(err, GgufError::InvalidAlignment { alignment: 12 }));
    w.add_metadata("general.name", MetadataValue::String("x".into())).unwrap();
    w.add_metadata("general.alignment", MetadataValue::U32(16)).unwrap();
    assert_eq!(w.alignment(), 16);
    let file = read_back(&w);
    assert_eq!(file.alignment(), 16);
    assert_eq!(file.metadata()[1].0, "general.alignment");
}

#[test]
fn shared_bytes_are_accepted_without_copying() {
    let backing = SharedBytes::from_vec((0..=255).collect());
    let mut w = GgufWriter::new();
    w.add_tensor("t", vec![64], GgmlType::I8, backing.slice(64..128).unwrap()).unwrap();
    w.add_tensor("u", vec![2], GgmlType::F16, &[1u8, 2, 3, 4][..]).unwrap();
    let file = read_back(&w);
    assert_eq!(&*file.tensor_bytes("t").unwrap(), &backing[64..128]);
    assert_eq!(&*file.tensor_bytes("u").unwrap(), &[1, 2, 3, 4]);
}

#[test]
fn write_to_path_is_atomic() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("model.gguf");
    std::fs::write(&path, b"old contents").unwrap();

    let mut w = GgufWriter::new();
    w.add_metadata("general.architecture", MetadataValue::String("bitnet-b1.58".into())).unwrap();
    w.add_tensor("w", vec![128], GgmlType::I2_S, vec![7; 64]).unwrap();
    w.write_to_path(&path).unwrap();

    let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(names, ["model.gguf"], "no temporary file is left behind");
    assert_eq!(std::fs::read(&path).unwrap(), w.to_bytes().unwrap());
    let file = GgufFile::open(&path).unwrap();
    assert_eq!(file.architecture().unwrap(), "bitnet-b1.58");
    assert_eq!(&*file.tensor_bytes("w").unwrap(), &[7; 64][..]);

    let missing_dir = dir.path().join("missing").join("model.gguf");
    let err = w.write_to_path(&missing_dir).unwrap_err();
    assert!(matches!(err, GgufError::WriteFile { .. }));
    message_contains(&err, &["missing/model.gguf"]);
    assert!(!dir.path().join("missing").exists());

    let err = w.write_to_path(std::path::Path::new("/")).unwrap_err();
    assert!(matches!(err, GgufError::NoFileName { .. }));
}

#[test]
fn failing_stream_reports_io_error() {
    struct Failing;
    impl std::io::Write for Failing {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::Error::other("disk full"))
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let err = GgufWriter::new().write_to(Failing).unwrap_err();
    assert!(matches!(err, GgufError::Write { .. }));
    message_contains(&err, &["disk full"]);
}
