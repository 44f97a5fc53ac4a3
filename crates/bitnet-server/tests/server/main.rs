//! The HTTP server, tested by starting the real router on 127.0.0.1:0 with
//! the tiny synthetic model (the embedded default model's recipe) and
//! talking HTTP to it.

mod batching;
mod cli_serve;
mod common;
mod errors;
mod fallback;
mod openai_client;
mod prefix_cache;
mod random_requests;
mod shutdown;
mod snapshots;
