//! Graceful shutdown under load: every request accepted before the signal
//! gets its complete answer.

use futures_util::future::join_all;
use serde_json::json;

use crate::common::{self, stream_text, MODEL_ID};

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_during_load_loses_no_accepted_request() {
    // The gate holds the engine's first step, so every request is still in
    // flight when the signal comes, whatever the speed of the machine.
    let (backend, gate) = common::GatedBackend::new();
    let mut config = common::config();
    config.max_batch_size = 8;
    let mut server = common::start_with(Box::new(backend), config).await;
    const N: usize = 24;
    const MAX_TOKENS: usize = 40;
    let requests: Vec<_> = (0..N)
        .map(|i| {
            let (client, base) = (server.client.clone(), server.base.clone());
            tokio::spawn(async move {
                let body = json!({
                    "model": MODEL_ID, "prompt": format!("Shutdown test {i}"), "max_tokens": MAX_TOKENS,
                    "temperature": 0, "stream": i % 4 == 0,
                });
                let response = client.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
                let status = response.status().as_u16();
                (i, status, response.text().await.unwrap())
            })
        })
        .collect();
    // Every request is accepted (holds an in-flight slot), none answered.
    server.wait_until(|s| s.metric("bitnet_num_requests_in_flight"), N as f64).await;
    server.trigger_shutdown();
    // Draining: the listener is closed (new connections fail) or /health is 503.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let fresh = reqwest::Client::builder().pool_max_idle_per_host(0).build().unwrap();
    while fresh.get(server.url("/health")).send().await.is_ok_and(|r| r.status() == 200) {
        assert!(tokio::time::Instant::now() < deadline, "the server never started draining");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    common::open_gate(&gate);
    for outcome in join_all(requests).await {
        let (i, status, text) = outcome.unwrap();
        assert_eq!(status, 200, "request {i}: {text}");
        let (finish, completion_tokens) = if i % 4 == 0 {
            let chunks = common::sse_data(&text);
            let (_, finish) = stream_text(&chunks);
            (finish.unwrap(), None)
        } else {
            let value: serde_json::Value = serde_json::from_str(&text).unwrap();
            let finish = value["choices"][0]["finish_reason"].as_str().unwrap().to_owned();
            (finish, value["usage"]["completion_tokens"].as_u64())
        };
        if finish == "length" {
            assert!(completion_tokens.is_none_or(|n| n == MAX_TOKENS as u64), "request {i}");
        } else {
            assert_eq!(finish, "stop", "request {i}");
        }
    }
    let base = server.base.clone();
    server.join().await.unwrap();
    // Stopped: nothing listens any more.
    assert!(reqwest::get(format!("{base}/health")).await.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_while_draining() {
    let (backend, gate) = common::GatedBackend::new();
    let mut server = common::start_with(Box::new(backend), common::config()).await;
    let held = {
        let (client, url) = (server.client.clone(), server.url("/v1/completions"));
        tokio::spawn(async move {
            let body = json!({ "model": MODEL_ID, "prompt": "Hello", "max_tokens": 2 });
            client.post(url).json(&body).send().await.unwrap().status().as_u16()
        })
    };
    server.wait_until(|s| s.metric("bitnet_num_requests_in_flight"), 1.0).await;
    // A kept-alive connection sees the draining state.
    let keep_alive = reqwest::Client::builder().pool_max_idle_per_host(1).build().unwrap();
    assert_eq!(keep_alive.get(server.url("/health")).send().await.unwrap().status(), 200);
    server.trigger_shutdown();
    // The signal reaches the server asynchronously: poll until /health stops
    // answering 200. Then either the draining server closed the idle
    // connection, or it answered 503.
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    let status = loop {
        let status = keep_alive.get(server.url("/health")).send().await.map(|r| r.status().as_u16());
        if !matches!(status, Ok(200)) {
            break status;
        }
        assert!(tokio::time::Instant::now() < deadline, "/health stayed 200 after the shutdown signal");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    };
    assert!(matches!(status, Err(_) | Ok(503)), "{status:?}");
    common::open_gate(&gate);
    assert_eq!(held.await.unwrap(), 200);
    server.join().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_is_503_while_loading_and_a_failed_load_stops_the_server() {
    use bitnet_inference::{Backend, ReferenceBackend};
    use bitnet_server::server::{serve_with_loader, LoadError, ServeError};

    let start = |outcome: Result<(), String>| async move {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let (release, released) = std::sync::mpsc::channel::<()>();
        let load = move || -> Result<(Box<dyn Backend>, bitnet_models::Tokenizer), LoadError> {
            let _ = released.recv();
            outcome?;
            Ok((Box::new(ReferenceBackend::new(common::model())), common::model().tokenizer.clone()))
        };
        let task = tokio::spawn(serve_with_loader(listener, common::config(), load, std::future::pending()));
        (base, release, task)
    };
    let client = reqwest::Client::new();

    let (base, release, task) = start(Ok(())).await;
    let health = client.get(format!("{base}/health")).send().await.unwrap();
    assert_eq!(health.status(), 503);
    assert_eq!(health.json::<serde_json::Value>().await.unwrap()["status"], "loading");
    let body = json!({ "model": MODEL_ID, "prompt": "Hello", "max_tokens": 2 });
    let early = client.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap();
    assert_eq!(early.status(), 503);
    assert_eq!(client.get(format!("{base}/live")).send().await.unwrap().status(), 200);
    release.send(()).unwrap();
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(60);
    while client.get(format!("{base}/health")).send().await.unwrap().status() != 200 {
        assert!(tokio::time::Instant::now() < deadline, "never became ready");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(client.post(format!("{base}/v1/completions")).json(&body).send().await.unwrap().status(), 200);
    task.abort();

    let (_, release, task) = start(Err("no such file".into())).await;
    release.send(()).unwrap();
    let outcome = task.await.unwrap();
    assert!(matches!(outcome, Err(ServeError::Load(ref e)) if e.to_string() == "no such file"), "{outcome:?}");
}
