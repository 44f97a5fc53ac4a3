//! Tests of the GGUF reader and writer: hand-built files for every
//! validation rule, a known-answer file, and writer/reader round trips.

mod builder;
mod known_answer;
mod properties;
mod validation;
mod writer;
