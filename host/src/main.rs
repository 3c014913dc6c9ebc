//! The `jobhost` binary: parse the command line, set up logging, run.
//! `jobhost bench` lives here, not in the library: the benchmark harness
//! and its raw baselines are no part of the server's API.

mod bench;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Debug, Parser)]
#[command(
    name = "jobhost",
    version,
    about = "A job platform whose phases are sandboxed WebAssembly components"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    #[command(flatten)]
    Platform(jobhost::cli::Command),
    /// Run the benchmark scenarios and print their figures.
    Bench(bench::BenchArgs),
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The server logs its lifecycle; one-shot commands only warnings.
    let default_filter = match cli.command {
        Command::Platform(jobhost::cli::Command::Serve(_)) => {
            "info,jobhost::guest=off,wasmtime=warn,cranelift=warn"
        }
        _ => "warn,jobhost::guest=off",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            EnvFilter::try_from_env("JOBHOST_LOG")
                .unwrap_or_else(|_| EnvFilter::new(default_filter)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let outcome = match cli.command {
        Command::Platform(command) => jobhost::cli::run(command).await,
        Command::Bench(args) => bench::bench(args).await,
    };
    match outcome {
        Ok(code) => std::process::ExitCode::from(code as u8),
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::from(2)
        }
    }
}
