//! `cargo xtask`: the project's automation, in Rust so it runs wherever cargo does.

mod gen_model;
mod logits;
mod npy;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(name = "cargo xtask")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Write a deterministic synthetic model (GGUF I2_S or HF folder).
    GenModel(gen_model::GenModelArgs),
    /// Reference-forward logits and greedy continuations over the prompt set (.npy + JSON).
    Logits(logits::LogitsArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::GenModel(args) => gen_model::run(args),
        Command::Logits(args) => logits::run(args),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(1)
        }
    }
}
