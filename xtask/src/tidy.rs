//! Architecture invariants checked as tests (ARCHITECTURE.md): which crate may
//! depend on which, and where `unsafe` may appear.

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};
    use std::process::Command;

    fn workspace_root() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("xtask lives in the workspace root").to_owned()
    }

    /// Normal (non-dev) dependency names of each workspace package.
    fn dependencies() -> Vec<(String, Vec<String>)> {
        let out = Command::new(env!("CARGO"))
            .args(["metadata", "--format-version", "1", "--no-deps", "--offline"])
            .current_dir(workspace_root())
            .output()
            .expect("run cargo metadata");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let meta: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
        meta["packages"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| {
                let deps = p["dependencies"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .filter(|d| d["kind"].is_null())
                    .map(|d| d["name"].as_str().unwrap().to_owned())
                    .collect();
                (p["name"].as_str().unwrap().to_owned(), deps)
            })
            .collect()
    }

    #[test]
    fn crate_dependencies_follow_the_architecture() {
        let forbidden: &[(&str, &[&str])] = &[
            (
                "bitnet-quant",
                &["bitnet-device", "bitnet-kernels", "bitnet-models", "bitnet-inference", "bitnet-server"],
            ),
            (
                "bitnet-device",
                &["bitnet-quant", "bitnet-kernels", "bitnet-models", "bitnet-inference", "bitnet-server"],
            ),
            ("bitnet-kernels", &["bitnet-models", "bitnet-inference", "bitnet-server"]),
            ("bitnet-models", &["bitnet-kernels", "bitnet-inference", "bitnet-server", "axum", "tokio"]),
            ("bitnet-inference", &["bitnet-server", "axum", "tokio", "serde_json", "clap"]),
        ];
        let deps = dependencies();
        let mut checked = 0;
        for (package, banned) in forbidden {
            let (_, list) =
                deps.iter().find(|(name, _)| name == package).unwrap_or_else(|| panic!("{package} not found"));
            for dep in *banned {
                assert!(!list.iter().any(|d| d == dep), "{package} must not depend on {dep}");
            }
            checked += 1;
        }
        assert_eq!(checked, forbidden.len());
    }

    fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                rust_files(&path, out);
            } else if path.extension().is_some_and(|e| e == "rs") {
                out.push(path);
            }
        }
    }

    #[test]
    fn unsafe_code_only_in_device_and_kernel_crates() {
        let root = workspace_root();
        let mut files = Vec::new();
        rust_files(&root.join("crates"), &mut files);
        rust_files(&root.join("xtask"), &mut files);
        let allowed = [root.join("crates/bitnet-device"), root.join("crates/bitnet-kernels")];
        let mut offenders = Vec::new();
        for file in &files {
            if allowed.iter().any(|a| file.starts_with(a)) || file.ends_with("tidy.rs") {
                continue;
            }
            let text = std::fs::read_to_string(file).unwrap();
            if text.contains("unsafe {") || text.contains("unsafe fn") || text.contains("allow(unsafe_code)") {
                offenders.push(file.display().to_string());
            }
        }
        assert!(files.len() > 50, "found only {} Rust files", files.len());
        assert!(offenders.is_empty(), "unsafe outside bitnet-device and bitnet-kernels: {offenders:?}");
    }

    #[test]
    fn every_unsafe_block_states_its_invariant() {
        let root = workspace_root();
        let mut files = Vec::new();
        for dir in ["crates/bitnet-device", "crates/bitnet-kernels"] {
            rust_files(&root.join(dir), &mut files);
        }
        let mut missing = Vec::new();
        for file in &files {
            let text = std::fs::read_to_string(file).unwrap();
            let lines: Vec<&str> = text.lines().collect();
            for (i, line) in lines.iter().enumerate() {
                if !line.contains("unsafe {") || line.trim_start().starts_with("//") {
                    continue;
                }
                // A SAFETY comment within the few lines above the block (or on it).
                let window = &lines[i.saturating_sub(12)..=i];
                if !window.iter().any(|l| l.contains("SAFETY")) {
                    missing.push(format!("{}:{}", file.display(), i + 1));
                }
            }
        }
        assert!(missing.is_empty(), "unsafe blocks without a SAFETY comment: {missing:?}");
    }
}
