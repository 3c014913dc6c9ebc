use clap::Parser;
use tracing_subscriber::EnvFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_env("JOBHOST_LOG").unwrap_or_else(|_| {
            EnvFilter::new("info,jobhost::guest=off,wasmtime=warn,cranelift=warn")
        }))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = jobhost::cli::Cli::parse();
    match jobhost::cli::run(cli).await {
        Ok(code) => std::process::ExitCode::from(code as u8),
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::from(2)
        }
    }
}
