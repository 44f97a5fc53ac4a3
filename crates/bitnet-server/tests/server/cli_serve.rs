//! `bitnet serve` as a process: the embedded default model, an API key from
//! the environment, and a graceful exit 0 on SIGTERM.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};

use serde_json::{json, Value};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bitnet_serve_answers_and_exits_0_on_sigterm() {
    let mut child = Command::new(env!("CARGO_BIN_EXE_bitnet"))
        .args(["serve", "--port", "0", "--max-batch-size", "4"])
        .env("BITNET_API_KEY", "sk-env")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("starting bitnet serve");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    stderr.read_line(&mut line).unwrap();
    let base = line
        .split_whitespace()
        .find(|w| w.starts_with("http://"))
        .unwrap_or_else(|| panic!("no address in {line:?}"))
        .to_owned();
    // Keep draining stderr so the server never blocks on a full pipe.
    let drain = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap_or_default());

    let client = reqwest::Client::new();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while !client.get(format!("{base}/health")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(tokio::time::Instant::now() < deadline, "never became ready");
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    let models: Value =
        client.get(format!("{base}/v1/models")).bearer_auth("sk-env").send().await.unwrap().json().await.unwrap();
    assert_eq!(models["data"][0]["id"], "bitnet-default");
    let body = json!({ "model": "bitnet-default", "prompt": "Hello", "max_tokens": 3, "temperature": 0 });
    let unauthorized = client.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(unauthorized.status(), 401);
    let ok = client.post(format!("{base}/v1/completions")).bearer_auth("sk-env").json(&body).send().await.unwrap();
    assert_eq!(ok.status(), 200);

    let killed = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait()).await.unwrap().unwrap();
    let log = drain.join().unwrap();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("shutting down"), "{log}");
}
