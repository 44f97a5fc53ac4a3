//! The official `openai` Python client against the server. Without python3
//! or the package the test prints SKIPPED, except under CI (env `CI` set),
//! where it fails: .ci/run installs the package.

use std::path::Path;
use std::process::Command;

use crate::common::{self, MODEL_ID};

fn openai_available() -> bool {
    Command::new("python3").args(["-c", "import openai"]).output().is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_openai_python_client_works() {
    if !openai_available() {
        assert!(std::env::var_os("CI").is_none(), "CI must install the openai python package (see .ci/run)");
        println!("SKIPPED: openai python package not installed");
        return;
    }
    let mut config = common::config();
    config.api_key = Some("sk-python".into());
    let server = common::start(config).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/openai_client_check.py");
    let base_url = server.url("/v1");
    let output = tokio::task::spawn_blocking(move || {
        Command::new("python3")
            .arg(script)
            .args(["--base-url", &base_url, "--model", MODEL_ID, "--api-key", "sk-python"])
            .output()
            .expect("running python3")
    })
    .await
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "openai client check failed:\n{stdout}\n{stderr}");
    assert!(stdout.contains("openai client check: ok"), "{stdout}");
    server.shutdown().await.unwrap();
}
