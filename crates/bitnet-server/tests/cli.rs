//! End-to-end tests of the `bitnet` binary: generate, inspect, convert, exit codes.

use std::path::Path;
use std::process::{Command, Output};
use std::sync::Arc;

use bitnet_inference::{generate, Backend, CpuBackend, CpuBackendConfig, GenerationConfig, ReferenceBackend};
use bitnet_models::BitNetModel;

const DEFAULT_MODEL: &str =
    concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/bitnet-tiny-tasks/bitnet-tiny-tasks.gguf");
const DEFAULT_MODEL_HF: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../models/bitnet-tiny-tasks/hf");

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
fn embedded_default_model_is_the_committed_trained_model() {
    // The GGUF is `bitnet convert --embedding-dtype bf16 --name bitnet-tiny-tasks` of the HF folder.
    let (model, report) = BitNetModel::load(Path::new(DEFAULT_MODEL_HF)).unwrap();
    assert!(report.unused_tensors.is_empty());
    let bytes = model.to_gguf_writer("bitnet-tiny-tasks").unwrap().to_bytes().unwrap();
    assert!(bytes == std::fs::read(DEFAULT_MODEL).unwrap(), "the GGUF differs from the conversion of the HF folder");
}

#[test]
fn the_readme_example_prompt_gets_the_right_answer() {
    // README: 221 + 696 = 917, which this model writes least-significant digit first, padded to 4 digits.
    let extras: [&[&str]; 5] =
        [&[], &["--device", "cpu"], &["--int8-head"], &["--kv-cache", "f16"], &["--backend", "reference"]];
    for extra in extras {
        let mut args = vec!["generate", "--prompt", "221+696=", "--max-tokens", "8"];
        args.extend_from_slice(extra);
        let out = bitnet(&args);
        assert!(out.status.success(), "{extra:?}: {}", stderr(&out));
        assert_eq!(stdout(&out), "221+696=7190\n", "{extra:?}");
        assert!(stderr(&out).contains("end of sequence"), "{}", stderr(&out));
    }
}

#[test]
fn cpu_options_with_device_gpu_are_clear_errors() {
    for (flag, value) in [("--kv-cache", "f16"), ("--int8-head", "")] {
        let mut args = vec!["generate", "--prompt", "1+1=", "--max-tokens", "2", "--device", "gpu", flag];
        if !value.is_empty() {
            args.push(value);
        }
        let out = bitnet(&args);
        assert!(!out.status.success(), "{flag}");
        assert!(stderr(&out).contains(&format!("{flag} is a CPU option")), "{flag}: {}", stderr(&out));
    }
    let out = bitnet(&["generate", "--prompt", "1+1=", "--kv-cache", "bf16"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("expected f32 or f16"), "{}", stderr(&out));
}

#[test]
fn the_readme_example_runs_on_the_gpu_in_every_precision() {
    let gpu = matches!(bitnet_device::probe_gpus(), bitnet_device::GpuProbe::Devices { gpus, .. } if !gpus.is_empty());
    if !gpu {
        println!("SKIPPED: no CUDA GPU");
        return;
    }
    for precision in ["fp32", "fp16", "bf16"] {
        let args =
            ["generate", "--prompt", "221+696=", "--max-tokens", "8", "--device", "gpu", "--precision", precision];
        let out = bitnet(&args);
        assert!(out.status.success(), "{precision}: {}", stderr(&out));
        assert_eq!(stdout(&out), "221+696=7190\n", "{precision}");
        let short = if precision == "fp32" { "f32" } else { precision };
        assert!(stderr(&out).contains(&format!("device cuda ({short}")), "{precision}: {}", stderr(&out));
    }
}

#[test]
fn device_gpu_without_a_gpu_is_a_clear_error() {
    let gpu = matches!(bitnet_device::probe_gpus(), bitnet_device::GpuProbe::Devices { gpus, .. } if !gpus.is_empty());
    if gpu {
        println!("SKIPPED: a GPU is present");
        return;
    }
    let out = bitnet(&["generate", "--prompt", "1+1=", "--device", "gpu"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--device gpu"), "{}", stderr(&out));
    // auto falls back visibly and still answers.
    let out = bitnet(&["generate", "--prompt", "221+696=", "--max-tokens", "8"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stderr(&out).contains("GPU not used"), "{}", stderr(&out));
}

#[test]
fn generate_with_the_default_model_prints_the_greedy_continuation() {
    let (model, _) = BitNetModel::load(Path::new(DEFAULT_MODEL)).unwrap();
    let model = Arc::new(model);
    let prompt = model.tokenizer.encode("Hello", model.tokenizer.add_bos()).unwrap();
    let backends: [(&str, Box<dyn Backend>); 2] = [
        ("cpu", Box::new(CpuBackend::new(model.clone(), &CpuBackendConfig::default()).unwrap())),
        ("reference", Box::new(ReferenceBackend::new(model.clone()))),
    ];
    for (name, mut backend) in backends {
        let choice = if name == "cpu" { ["--device", "cpu"] } else { ["--backend", "reference"] };
        let out =
            bitnet(&["generate", "--prompt", "Hello", "--max-tokens", "12", "--ignore-eos", choice[0], choice[1]]);
        assert!(out.status.success(), "{}", stderr(&out));
        // The same request through the library: the CLI must print exactly this.
        let expected = generate(backend.as_mut(), &prompt, &GenerationConfig::greedy(12), |_| {}).unwrap();
        let text = model.tokenizer.decode(&expected.tokens, true).unwrap();
        assert_eq!(stdout(&out), format!("Hello{text}\n"), "backend {name}");
        assert!(stderr(&out).contains("12 generated"), "{}", stderr(&out));
    }
}

#[test]
fn sampling_is_reproducible_by_seed() {
    let run = |seed: &str| {
        let out = bitnet(&[
            "generate",
            "--prompt",
            "Once",
            "--max-tokens",
            "16",
            "--temperature",
            "0.9",
            "--top-k",
            "40",
            "--seed",
            seed,
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
    for needle in
        ["GGUF v3", "general.architecture = \"bitnet-b1.58\"", "blk.1.ffn_down.weight", "I2_S", "validation: OK"]
    {
        assert!(text.contains(needle), "inspect output lacks {needle:?}:\n{text}");
    }
    let out = bitnet(&["inspect", "--json", DEFAULT_MODEL]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["validation"]["ok"], true);
    assert_eq!(json["tensors"].as_array().unwrap().len(), 2 + 6 * 11);
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
        for cmd in [
            &["inspect", path.to_str().unwrap()][..],
            &["generate", "--model", path.to_str().unwrap(), "--prompt", "x"][..],
        ] {
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
fn a_bad_fault_plan_is_a_clear_error() {
    for (spec, needle) in [("vram=1GB", "unknown fault plan key `vram`"), ("cc=six", "`cc` has a bad value `six`")] {
        let out = bitnet(&["serve", "--port", "0", "--simulate-gpu", "--fault-plan", spec]);
        assert_eq!(out.status.code(), Some(1), "{spec}");
        assert!(stderr(&out).contains(needle), "{spec}: {}", stderr(&out));
        let out = Command::new(env!("CARGO_BIN_EXE_bitnet"))
            .args(["serve", "--port", "0"])
            .env("BITNET_FAULT_PLAN", spec)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(1), "{spec} from the environment");
        assert!(stderr(&out).contains(needle), "{spec}: {}", stderr(&out));
    }
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
    // The default model's embedding is bf16; keep it so the round trip is exact.
    let out = bitnet(&[
        "convert",
        "--input",
        hf.to_str().unwrap(),
        "--output",
        gguf.to_str().unwrap(),
        "--embedding-dtype",
        "bf16",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    let (a, _) = BitNetModel::load(Path::new(DEFAULT_MODEL)).unwrap();
    let (b, _) = BitNetModel::load(&gguf).unwrap();
    assert_eq!(a.config, b.config);
    assert!(a.embedding.to_f32_vec() == b.embedding.to_f32_vec(), "embedding changed");
    for (la, lb) in a.layers.iter().zip(&b.layers) {
        for (pa, pb) in la.projections().iter().zip(lb.projections()) {
            assert!(pa.to_ternary() == pb.to_ternary() && pa.scale() == pb.scale(), "{} changed", pa.name());
        }
    }
    // Same greedy continuation from both files.
    let gen = |path: &Path| {
        stdout(&bitnet(&["generate", "--model", path.to_str().unwrap(), "--prompt", "abc", "--max-tokens", "8"]))
    };
    assert_eq!(gen(Path::new(DEFAULT_MODEL)), gen(&gguf));
    assert_eq!(gen(Path::new(DEFAULT_MODEL)), gen(&hf));
}

#[test]
fn devices_reports_the_gpu_backend_of_this_build() {
    let text = bitnet(&["devices"]);
    assert!(text.status.success(), "{}", stderr(&text));
    let json = bitnet(&["devices", "--json"]);
    assert!(json.status.success(), "{}", stderr(&json));
    let v: serde_json::Value = serde_json::from_str(&stdout(&json)).expect("devices --json prints JSON");
    let backend = &v["gpu_backend"];
    // This test binary is built with the default features, which include `cuda`.
    assert_eq!(backend["built"], cfg!(feature = "cuda"), "{backend}");
    if cfg!(feature = "cuda") {
        assert!(stdout(&text).contains("gpu backend: CUDA (fp32, fp16, bf16)"), "{}", stdout(&text));
        // One kernel line per GPU the probe found, in both forms.
        let gpus = v["gpus"].as_array().expect("gpus").len();
        assert_eq!(backend["gpus"].as_array().expect("gpu_backend.gpus").len(), gpus, "{backend}");
        assert_eq!(stdout(&text).matches(" kernels: ").count(), gpus, "{}", stdout(&text));
        if gpus == 0 {
            assert!(stdout(&text).contains("no GPU to run on here"), "{}", stdout(&text));
        }
    } else {
        assert!(stdout(&text).contains("gpu backend: not in this build"), "{}", stdout(&text));
    }
}

#[test]
fn convert_writes_llama_cpp_ternary_types_that_load_back_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let source = dir.path().join("source.gguf");
    // Rows of 256 values: TQ blocks never span rows.
    let config = bitnet_models::BitNetConfig {
        hidden_size: 256,
        n_heads: 8,
        intermediate_size: 512,
        ..bitnet_models::synthetic::Preset::Tiny.config()
    };
    let model = bitnet_models::synthetic::generate_with_config(config, 7).unwrap();
    model.write_gguf(&source, "source").unwrap();
    let gen = |path: &Path| {
        let out = bitnet(&["generate", "--model", path.to_str().unwrap(), "--prompt", "abc", "--max-tokens", "8"]);
        assert!(out.status.success(), "{}", stderr(&out));
        stdout(&out)
    };
    for ternary in ["tq2_0", "tq1_0"] {
        let out_path = dir.path().join(format!("{ternary}.gguf"));
        let out = bitnet(&[
            "convert",
            "--input",
            source.to_str().unwrap(),
            "--output",
            out_path.to_str().unwrap(),
            "--to",
            "gguf",
            "--embedding-dtype",
            "f32",
            "--ternary",
            ternary,
            "--arch",
            "bitnet",
        ]);
        assert!(out.status.success(), "{ternary}: {}", stderr(&out));
        let (back, report) = BitNetModel::load(&out_path).unwrap();
        assert!(report.unused_tensors.is_empty(), "{ternary}: {:?}", report.unused_tensors);
        assert_eq!(back.config.architecture, "bitnet");
        assert_eq!(back.config.hidden_size, model.config.hidden_size);
        for (la, lb) in model.layers.iter().zip(&back.layers) {
            for (pa, pb) in la.projections().iter().zip(lb.projections()) {
                assert!(pa.to_ternary() == pb.to_ternary() && pa.scale() == pb.scale(), "{ternary}: {}", pa.name());
            }
        }
        assert_eq!(gen(&out_path), gen(&source), "{ternary}");
    }
    // The trained model's rows hold 384 values: refused, naming the tensor.
    let out = bitnet(&[
        "convert",
        "--input",
        DEFAULT_MODEL,
        "--output",
        dir.path().join("no.gguf").to_str().unwrap(),
        "--to",
        "gguf",
        "--ternary",
        "tq2_0",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("blk.0.attn_q.weight") && stderr(&out).contains("256"), "{}", stderr(&out));
    assert!(!dir.path().join("no.gguf").exists());
    // An unknown type is refused with the ones there are.
    let out = bitnet(&["convert", "--input", DEFAULT_MODEL, "--output", "x.gguf", "--ternary", "q4_0"]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("i2s, tq2_0 or tq1_0"), "{}", stderr(&out));
    // A folder output cannot take them.
    let out = bitnet(&[
        "convert",
        "--input",
        source.to_str().unwrap(),
        "--output",
        dir.path().join("hf").to_str().unwrap(),
        "--ternary",
        "tq2_0",
    ]);
    assert!(!out.status.success());
    assert!(stderr(&out).contains("--ternary"), "{}", stderr(&out));
}
