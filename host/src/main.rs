//! The `jobhost` binary: parse the command line, set up logging, run.

use clap::Parser;
use jobhost::cli::{Cli, Command};
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // The server logs its lifecycle; one-shot commands only warnings.
    let default_filter = match cli.command {
        Command::Serve(_) => "info,jobhost::guest=off,wasmtime=warn,cranelift=warn",
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
    match jobhost::cli::run(cli).await {
        Ok(code) => std::process::ExitCode::from(code as u8),
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::from(2)
        }
    }
}
