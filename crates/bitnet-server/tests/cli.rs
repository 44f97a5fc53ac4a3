//! End-to-end tests of the `bitnet` binary: generate, inspect, convert, exit codes.

use std::path::Path;
use std::process::{Command, Output};

use bitnet_inference::{generate, GenerationConfig, ReferenceForward};
use bitnet_models::synthetic::{self, Preset};
use bitnet_models::BitNetModel;

const DEFAULT_MODEL: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/assets/default.gguf");

fn bitnet(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_bitnet")).args(args).output().expect("run bitnet")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn embedded_default_model_is_reproducible_with_gen_model() {
    // README: `cargo xtask gen-model --preset tiny --seed 42 --format gguf` rebuilds it.
    let model = synthetic::generate(Preset::Tiny, 42).unwrap();
    let bytes = model.to_gguf_writer("synthetic-tiny-seed42").unwrap().to_bytes().unwrap();
    assert!(bytes == std::fs::read(DEFAULT_MODEL).unwrap(), "assets/default.gguf differs from gen-model's output");
}

#[test]
fn generate_with_the_default_model_prints_the_greedy_continuation() {
    let out = bitnet(&["generate", "--prompt", "Hello", "--max-tokens", "12", "--ignore-eos"]);
    assert!(out.status.success(), "{}", stderr(&out));
    // The same request through the library: the CLI must print exactly this.
    let (model, _) = BitNetModel::load(Path::new(DEFAULT_MODEL)).unwrap();
    let prompt = model.tokenizer.encode("Hello", model.tokenizer.add_bos()).unwrap();
    let forward = ReferenceForward::new(&model);
    let expected = generate(&forward, &prompt, &GenerationConfig::greedy(12), |_| {}).unwrap();
    let text = model.tokenizer.decode(&expected.tokens, true).unwrap();
    assert_eq!(stdout(&out), format!("Hello{text}\n"));
    assert!(stderr(&out).contains("12 generated"), "{}", stderr(&out));
}

#[test]
fn sampling_is_reproducible_by_seed() {
    let run = |seed: &str| {
        let out = bitnet(&[
            "generate", "--prompt", "Once", "--max-tokens", "16", "--temperature", "0.9", "--top-k", "40", "--seed", seed,
        ]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    assert_eq!(run("7"), run("7"));
}

#[test]
fn inspect_validates_the_default_model() {
    let out = bitnet(&["inspect", DEFAULT_MODEL]);
    assert!(out.status.success(), "{}", stderr(&out));
    let text = stdout(&out);
    for needle in ["GGUF v3", "general.architecture = \"bitnet-b1.58\"", "blk.1.ffn_down.weight", "I2_S", "validation: OK"] {
        assert!(text.contains(needle), "inspect output lacks {needle:?}:\n{text}");
    }
    let out = bitnet(&["inspect", "--json", DEFAULT_MODEL]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["validation"]["ok"], true);
    assert_eq!(json["tensors"].as_array().unwrap().len(), 2 + 2 * 11);
}

#[test]
fn corrupt_files_fail_with_exit_1_and_a_clear_message() {
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(DEFAULT_MODEL).unwrap();
    let truncated = dir.path().join("truncated.gguf");
    std::fs::write(&truncated, &bytes[..bytes.len() / 2]).unwrap();
    let bad_magic = dir.path().join("magic.gguf");
    let mut b = bytes.clone();
    b[..4].copy_from_slice(b"GGML");
    std::fs::write(&bad_magic, &b).unwrap();
    for (path, needle) in [(&truncated, "past the end of the file"), (&bad_magic, "magic")] {
        for cmd in [&["inspect", path.to_str().unwrap()][..], &["generate", "--model", path.to_str().unwrap(), "--prompt", "x"][..]] {
            let out = bitnet(cmd);
            assert_eq!(out.status.code(), Some(1), "{cmd:?}");
            let err = stderr(&out);
            assert!(err.contains(needle) && err.contains(path.to_str().unwrap()), "{cmd:?}: {err}");
            assert!(!err.contains("panicked"), "{err}");
        }
    }
}

#[test]
fn usage_errors_exit_2() {
    assert_eq!(bitnet(&["generate"]).status.code(), Some(2));
    assert_eq!(bitnet(&["frobnicate"]).status.code(), Some(2));
}

#[test]
fn bad_generation_parameters_are_reported() {
    let out = bitnet(&["generate", "--prompt", "x", "--top-p", "0"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("top_p"), "{}", stderr(&out));
    let out = bitnet(&["generate", "--prompt", "x", "--max-tokens", "100000"]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("context length"), "{}", stderr(&out));
}

#[test]
fn convert_gguf_to_hf_and_back_preserves_the_model() {
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let gguf = dir.path().join("back.gguf");
    let out = bitnet(&["convert", "--input", DEFAULT_MODEL, "--output", hf.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let out = bitnet(&["convert", "--input", hf.to_str().unwrap(), "--output", gguf.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (a, _) = BitNetModel::load(Path::new(DEFAULT_MODEL)).unwrap();
    let (b, _) = BitNetModel::load(&gguf).unwrap();
    assert_eq!(a.config, b.config);
    assert_eq!(a.embedding.to_f32_vec(), b.embedding.to_f32_vec());
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        for (pa, pb) in la.projections().iter().zip(lb.projections()) {
            assert_eq!((pa.to_ternary(), pa.scale()), (pb.to_ternary(), pb.scale()));
        }
    }
    // Same greedy continuation from both files.
    let gen = |path: &Path| stdout(&bitnet(&["generate", "--model", path.to_str().unwrap(), "--prompt", "abc", "--max-tokens", "8"]));
    assert_eq!(gen(Path::new(DEFAULT_MODEL)), gen(&gguf));
    assert_eq!(gen(Path::new(DEFAULT_MODEL)), gen(&hf));
}
