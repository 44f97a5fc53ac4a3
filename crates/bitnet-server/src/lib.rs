//! The library half of the `bitnet` program: the OpenAI-compatible HTTP
//! server (`bitnet serve`), kept in a library so tests and other binaries can
//! start it with any [`bitnet_inference::Backend`].
//!
//! ```no_run
//! use std::sync::Arc;
//! use bitnet_inference::ReferenceBackend;
//! use bitnet_models::synthetic::{self, Preset};
//! use bitnet_server::server::{serve, ServerConfig};
//!
//! # async fn example() -> Result<(), Box<dyn std::error::Error>> {
//! let model = synthetic::generate(Preset::Tiny, 42)?;
//! let tokenizer = model.tokenizer.clone();
//! let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
//! let backend = Box::new(ReferenceBackend::new(Arc::new(model)));
//! serve(listener, backend, tokenizer, ServerConfig::new("bitnet-default"), std::future::pending()).await?;
//! # Ok(()) }
//! ```

pub mod server;
