//! The `jobhost` command line. `main.rs` only parses and dispatches here.

mod run_phase;

use clap::{Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "jobhost",
    version,
    about = "A job platform whose phases are sandboxed WebAssembly components"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the jobhost server: HTTP API, queue and workers.
    Serve(crate::config::ServeArgs),
    /// Run one phase of a plugin component locally and print its output,
    /// logs and outcome. Exits non-zero when the phase fails.
    RunPhase(run_phase::RunPhaseArgs),
    /// Run the benchmark scenarios and print their figures.
    Bench(crate::bench::BenchArgs),
}

/// Runs the parsed command; returns the process exit code.
pub async fn run(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Command::Serve(args) => serve(args).await,
        Command::RunPhase(args) => run_phase::run_phase(args).await,
        Command::Bench(args) => crate::bench::bench(args).await,
    }
}

async fn serve(args: crate::config::ServeArgs) -> anyhow::Result<i32> {
    use anyhow::Context as _;
    let config = args.resolve()?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("listening on {}", config.listen))?;
    let address = listener.local_addr()?;
    let app = crate::app::App::start(config).await?;
    // Scripts and tests read this line to learn the port when using :0.
    println!("jobhost listening on http://{address}");
    app.serve(listener, crate::app::shutdown_signal()).await?;
    Ok(0)
}
