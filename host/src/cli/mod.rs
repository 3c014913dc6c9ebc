//! The `jobhost` command line. `main.rs` parses it (adding `jobhost bench`,
//! which is not part of the library) and dispatches here.

mod client;
mod new_plugin;
mod queue;
mod remote;
mod run_phase;
mod schedule;

use anyhow::Context as _;
use clap::Subcommand;

pub use client::sse_events;
use remote::{JobAction, PluginAction, Remote};

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the jobhost server: HTTP API, queue and workers.
    Serve(Box<crate::config::ServeArgs>),
    /// Run one phase of a plugin component locally and print its output,
    /// logs and outcome. Exits non-zero when the phase fails.
    RunPhase(run_phase::RunPhaseArgs),
    /// Bring a PostgreSQL database's schema up to this build's (what
    /// `serve` does at start), or, with --from, move an embedded
    /// installation into an empty PostgreSQL database.
    Migrate(MigrateArgs),
    /// Scaffold a Rust plugin crate that builds into a component.
    NewPlugin(new_plugin::NewPluginArgs),
    /// Upload, list, show and activate plugins on a server.
    Plugin {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        action: PluginAction,
    },
    /// Submit, follow, show, list, cancel and retry jobs on a server.
    Job {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        action: JobAction,
    },
    /// Create, list, show, replace, delete, pause, resume and trigger
    /// schedules on a server.
    Schedule {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        action: schedule::ScheduleAction,
    },
    /// Show the queue, pause or resume it, and set concurrency limits on a
    /// server.
    Queue {
        #[command(flatten)]
        remote: Remote,
        #[command(subcommand)]
        action: queue::QueueAction,
    },
    /// Tail a server's event stream: events from now on, or with --job
    /// that job's whole history first.
    Events {
        #[command(flatten)]
        remote: Remote,
        /// Only this job's events.
        #[arg(long)]
        job: Option<String>,
        /// Comma-separated event types, e.g. job:completed,job:failed.
        #[arg(long)]
        types: Option<String>,
        /// Replay the logged events after this sequence number first (0:
        /// the whole log).
        #[arg(long)]
        since: Option<i64>,
    },
}

/// Runs the parsed command; returns the process exit code.
pub async fn run(command: Command) -> anyhow::Result<i32> {
    match command {
        Command::Serve(args) => serve(*args).await,
        Command::RunPhase(args) => run_phase::run_phase(args).await,
        Command::Migrate(args) => migrate(args).await,
        Command::NewPlugin(args) => new_plugin::new_plugin(args),
        Command::Plugin { remote, action } => remote::plugin(&remote, action).await,
        Command::Job { remote, action } => remote::job(&remote, action).await,
        Command::Schedule { remote, action } => schedule::schedule(&remote, action).await,
        Command::Queue { remote, action } => queue::queue(&remote, action).await,
        Command::Events {
            remote,
            job,
            types,
            since,
        } => remote::events(&remote, job, types, since).await,
    }
}

#[derive(Debug, clap::Args)]
pub struct MigrateArgs {
    /// The PostgreSQL database, `postgres://user@host:port/database`.
    #[arg(long, alias = "database", env = "JOBHOST_DATABASE_URL")]
    to: String,
    /// An embedded installation's SQLite file (e.g. data/jobhost.db) to
    /// copy into it: plugins, jobs, the event log with its ids, the
    /// webhook outbox. No server may be using it.
    #[arg(long)]
    from: Option<std::path::PathBuf>,
}

async fn migrate(args: MigrateArgs) -> anyhow::Result<i32> {
    let options = crate::storage::PgOptions::new(args.to);
    let Some(from) = args.from else {
        let version = crate::storage::postgres::migrate(&options).await?;
        println!("{}: schema version {version}", options.redacted_url());
        return Ok(0);
    };
    // Held while copying: no server may write to the file meanwhile.
    let _lock = crate::data_dir::open(from.parent().unwrap_or(std::path::Path::new(".")))?;
    anyhow::ensure!(from.is_file(), "{} is not a file", from.display());
    let report = crate::storage::import::sqlite_into_postgres(&from, &options)
        .await
        .with_context(|| format!("copying {} into {}", from.display(), options.redacted_url()))?;
    for (table, rows) in &report.rows {
        println!("{table}: {rows} rows");
    }
    println!(
        "{} now holds everything {} held",
        options.redacted_url(),
        from.display()
    );
    Ok(0)
}

async fn serve(args: crate::config::ServeArgs) -> anyhow::Result<i32> {
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

/// Text from a server or a guest as a terminal should show it: control
/// characters (an escape sequence could rewrite the screen or hide a line)
/// written out as `\u{..}`. `keep_lines` keeps newlines and tabs, for
/// multi-line blocks such as captured stdout.
pub(crate) fn printable(text: &str, keep_lines: bool) -> std::borrow::Cow<'_, str> {
    let escaped = |c: char| c.is_control() && !(keep_lines && matches!(c, '\n' | '\t'));
    if !text.chars().any(escaped) {
        return std::borrow::Cow::Borrowed(text);
    }
    let mut shown = String::with_capacity(text.len() + 8);
    for c in text.chars() {
        if escaped(c) {
            shown.push_str(&c.escape_unicode().to_string());
        } else {
            shown.push(c);
        }
    }
    std::borrow::Cow::Owned(shown)
}

#[cfg(test)]
mod tests {
    use super::printable;

    #[test]
    fn control_characters_are_shown_not_obeyed() {
        assert_eq!(printable("plain text", false), "plain text");
        assert_eq!(printable("red \u{1b}[31m!", false), "red \\u{1b}[31m!");
        assert_eq!(printable("two\nlines\r", false), "two\\u{a}lines\\u{d}");
        assert_eq!(printable("two\nlines\r", true), "two\nlines\\u{d}");
        assert_eq!(printable("\u{9b}2J", true), "\\u{9b}2J");
    }
}
