//! `jobhost run-phase`: try a plugin locally before uploading it.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::Args;

use super::printable;
use crate::model::{PluginGrants, Progress};
use crate::plugins::{Secrets, resolve_grants};
use crate::runtime::{PhaseRun, RunGrants, Runtime, RuntimeConfig};

#[derive(Debug, Args)]
pub struct RunPhaseArgs {
    /// The plugin component (.wasm).
    pub file: PathBuf,
    /// The job payload: JSON text, or @path to read it from a file.
    #[arg(long, default_value = "{}")]
    pub input: String,
    /// The phase config: JSON text, or @path.
    #[arg(long, default_value = "{}")]
    pub config: String,
    /// Output of an earlier phase, as NAME=JSON or NAME=@path; repeat in job order.
    #[arg(long = "previous", value_name = "NAME=JSON")]
    pub previous: Vec<String>,
    /// Stop the phase after this many milliseconds.
    #[arg(long, default_value_t = 60_000)]
    pub timeout_ms: u64,
    /// Linear memory the phase may use, in MiB.
    #[arg(long, default_value_t = 256)]
    pub memory_mb: u64,
    /// Print one JSON object (outcome, output, log, usage) instead of text.
    #[arg(long)]
    pub json: bool,
    /// Let the phase call this origin through wasi:http, as a grant would
    /// (e.g. https://api.example.com, https://*.example.org,
    /// http://127.0.0.1:9000); repeat for several.
    #[arg(long = "allow-http", value_name = "ORIGIN")]
    pub allow_http: Vec<String>,
    /// A value the phase may read through wasi:config/store, as a grant's
    /// `config` would; repeat for several. (`--config` is the phase's
    /// config JSON.)
    #[arg(long = "config-value", value_name = "KEY=VALUE")]
    pub config_values: Vec<String>,
    /// A secret the phase may read through wasi:config/store, its value
    /// from the variable JOBHOST_SECRET_<NAME>, as on a server; repeat for
    /// several.
    #[arg(long = "secret", value_name = "NAME")]
    pub secrets: Vec<String>,
}

/// What `--allow-http`, `--config-value` and `--secret` grant the run: the
/// grants a server would resolve for the plugin, checked the same way.
fn local_grants(args: &RunPhaseArgs, plugin: &str, version: &str) -> anyhow::Result<RunGrants> {
    let config = args
        .config_values
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(key, value)| (key.to_owned(), value.to_owned()))
                .with_context(|| format!("--config-value {pair:?} is not KEY=VALUE"))
        })
        .collect::<anyhow::Result<_>>()?;
    let grants = PluginGrants {
        versions: vec![version.to_owned()],
        config,
        secrets: args.secrets.clone(),
        http: args.allow_http.clone(),
    };
    grants.validate().map_err(anyhow::Error::msg)?;
    let secrets = Secrets::load(None, std::env::vars())?;
    Ok(resolve_grants(
        Some(&grants),
        &secrets,
        plugin,
        version,
        "run-phase",
    ))
}

pub async fn run_phase(args: RunPhaseArgs) -> anyhow::Result<i32> {
    let wasm =
        std::fs::read(&args.file).with_context(|| format!("reading {}", args.file.display()))?;
    let runtime = Runtime::new(RuntimeConfig {
        max_concurrent_runs: 1,
        memory_limit: args.memory_mb << 20,
        ..RuntimeConfig::default()
    })?;
    let plugin = runtime
        .load(&wasm, None)
        .await
        .with_context(|| format!("loading {}", args.file.display()))?
        .plugin;

    let mut run = PhaseRun::new(text_or_file(&args.input)?);
    run.config = text_or_file(&args.config)?;
    for previous in &args.previous {
        let (name, output) = previous
            .split_once('=')
            .with_context(|| format!("--previous {previous:?} is not NAME=JSON"))?;
        run.previous.push((name.to_owned(), text_or_file(output)?));
    }
    run.timeout = Duration::from_millis(args.timeout_ms);
    let m = &plugin.metadata;
    run.granted = Some(Arc::new(local_grants(&args, &m.name, &m.version)?));
    if !args.json {
        eprintln!(
            "{} {} — {}",
            printable(&m.name, false),
            printable(&m.version, false),
            printable(&m.description, false)
        );
        run.progress = Some(Arc::new(|p: Progress| {
            eprintln!("progress {:>3}% {}", p.percent, printable(&p.note, false))
        }));
    }
    // Ctrl-C asks the phase to stop, as a cancelled job would.
    let cancel = run.cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            cancel.cancel();
        }
    });

    let result = runtime.run(&plugin, run).await;
    if args.json {
        let (output, failure) = match &result.outcome {
            Ok(output) => (Some(output.to_value()), None),
            Err(failure) => (None, Some(failure)),
        };
        let report = serde_json::json!({
            "plugin": plugin.metadata,
            "ok": result.outcome.is_ok(),
            "output": output,
            "error": failure.map(|f| serde_json::json!({"failure": f, "message": f.to_string()})),
            "log": result.log,
            "usage": result.usage,
        });
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_text(&result);
    }
    Ok(if result.outcome.is_ok() { 0 } else { 1 })
}

fn print_text(result: &crate::runtime::PhaseResult) {
    for entry in &result.log.entries {
        eprintln!(
            "log {:>5} +{}ms {}",
            format!("{:?}", entry.level).to_lowercase(),
            entry.at_ms,
            printable(&entry.message, false)
        );
    }
    if result.log.dropped_entries > 0 {
        eprintln!(
            "log: {} more lines dropped (log limit)",
            result.log.dropped_entries
        );
    }
    for (name, text, total) in [
        ("stdout", &result.log.stdout, result.log.stdout_bytes),
        ("stderr", &result.log.stderr, result.log.stderr_bytes),
    ] {
        if !text.is_empty() {
            eprintln!(
                "--- {name} ({total} bytes written, {} kept) ---\n{}",
                text.len(),
                printable(text.trim_end(), true)
            );
        }
    }
    let u = &result.usage;
    eprintln!(
        "usage: {} ms wall, {} epoch ticks, {} KiB peak memory, {} B output, {} B logged",
        u.wall_ms,
        u.epoch_ticks,
        u.peak_memory_bytes >> 10,
        u.output_bytes,
        u.log_bytes
    );
    match &result.outcome {
        Ok(output) => {
            let pretty = serde_json::to_string_pretty(&output.to_value())
                .expect("a JSON value always serializes");
            println!("{pretty}");
            eprintln!("outcome: completed");
        }
        Err(failure) => eprintln!("outcome: {}", printable(&failure.to_string(), false)),
    }
}

/// `@path` reads the file; anything else is the text itself.
fn text_or_file(arg: &str) -> anyhow::Result<String> {
    match arg.strip_prefix('@') {
        Some(path) => std::fs::read_to_string(path).with_context(|| format!("reading {path}")),
        None => Ok(arg.to_owned()),
    }
}
