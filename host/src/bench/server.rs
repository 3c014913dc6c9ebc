//! A real `jobhost serve`, on a loopback port, for the scenarios that go
//! through the HTTP API: in this process, or as a process of its own whose
//! CPU time and memory are measured apart from its clients'.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use anyhow::Context as _;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::BenchArgs;
use super::http::submit_and_watch;
use super::stats::median;
use jobhost::app::App;
use jobhost::config::ServeArgs;
use jobhost::storage::Durability;

pub struct LocalServer {
    /// `http://127.0.0.1:<port>`
    pub base: String,
    stop: CancellationToken,
    task: JoinHandle<anyhow::Result<()>>,
    _dir: tempfile::TempDir,
}

impl LocalServer {
    /// Starts a server with a fresh data directory.
    pub async fn start(concurrency: usize) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let serve = ServeArgs {
            data_dir: Some(dir.path().to_path_buf()),
            concurrency: Some(concurrency),
            durability: Some(Durability::Process),
            // The fan-out scenarios open thousands of streams from this one
            // address: the per-address cap is lifted for them.
            max_streams_per_ip: Some(usize::MAX),
            ..ServeArgs::default()
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let base = format!("http://{}", listener.local_addr()?);
        let app = App::start(serve.resolve()?).await?;
        let stop = CancellationToken::new();
        let signal = stop.clone();
        let task = tokio::spawn(async move {
            app.serve(listener, async move { signal.cancelled().await })
                .await
        });
        Ok(LocalServer {
            base,
            stop,
            task,
            _dir: dir,
        })
    }

    /// Shuts the server down as a signal would.
    pub async fn stop(self) -> anyhow::Result<()> {
        self.stop.cancel();
        self.task.await?
    }
}

/// Uploads the `echo` test component to the server at `base` as `version`.
pub async fn upload_echo(
    http: &reqwest::Client,
    args: &BenchArgs,
    base: &str,
    version: &str,
) -> anyhow::Result<()> {
    let echo = std::fs::read(args.plugins.join("echo.wasm"))
        .context("reading echo.wasm (see ./bench.sh)")?;
    http.put(format!("{base}/plugins/echo/versions/{version}"))
        .body(echo)
        .send()
        .await?
        .error_for_status()?;
    Ok(())
}

/// An open SSE stream of `url` (the response checked, its events parsed).
pub async fn event_stream(
    http: &reqwest::Client,
    url: &str,
) -> anyhow::Result<
    impl futures::Stream<Item = Result<eventsource_stream::Event, EventError>> + Unpin + use<>,
> {
    let response = http.get(url).send().await?.error_for_status()?;
    Ok(jobhost::cli::sse_events(response))
}

type EventError = eventsource_stream::EventStreamError<reqwest::Error>;

/// `jobhost serve` of this binary as a child process, with a fresh data
/// directory, killed when dropped.
pub struct ServeProcess {
    /// `http://127.0.0.1:<port>`
    pub base: String,
    child: Child,
    _dir: tempfile::TempDir,
}

impl ServeProcess {
    pub fn start(concurrency: usize) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut child = Command::new(std::env::current_exe()?)
            .args(["serve", "--listen", "127.0.0.1:0", "--concurrency"])
            .arg(concurrency.to_string())
            // Every client connects from this one address: the per-address
            // stream cap is lifted for the benchmark.
            .args(["--max-streams-per-ip", "1000000", "--data-dir"])
            .arg(dir.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut line = String::new();
        BufReader::new(child.stdout.take().context("server stdout")?).read_line(&mut line)?;
        let base = line
            .trim()
            .strip_prefix("jobhost listening on ")
            .context("server did not start")?
            .to_owned();
        Ok(ServeProcess {
            base,
            child,
            _dir: dir,
        })
    }

    /// Resident memory, in MiB, from /proc.
    pub fn rss_mib(&self) -> anyhow::Result<f64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        let kib: f64 = status
            .lines()
            .find_map(|line| line.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("no VmRSS")?;
        Ok(kib / 1024.0)
    }

    /// CPU time used so far, in seconds, from /proc (utime + stime, in
    /// USER_HZ ticks, which Linux fixes at 100 per second for user space).
    pub fn cpu_seconds(&self) -> anyhow::Result<f64> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.child.id()))?;
        // Fields after the command name, which is in parentheses and may hold spaces.
        let fields: Vec<&str> = stat
            .rsplit_once(')')
            .context("no command name")?
            .1
            .split_whitespace()
            .collect();
        let ticks = |i: usize| -> anyhow::Result<f64> {
            Ok(fields.get(i).context("short stat")?.parse::<f64>()?)
        };
        // utime and stime are fields 14 and 15 of stat, 12 and 13 after the name.
        Ok((ticks(11)? + ticks(12)?) / 100.0)
    }
}

impl Drop for ServeProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A server process under test, and how the bench reaches it.
#[derive(Clone, Copy)]
pub struct Server<'a> {
    pub http: &'a reqwest::Client,
    pub args: &'a BenchArgs,
    pub process: &'a ServeProcess,
}

/// One measured run of `args.jobs` 1-phase jobs over HTTP.
pub struct Run {
    pub figures: Figures,
    /// The id of its last completion, after which the next run starts.
    pub last_event: i64,
}

#[derive(Clone, Copy)]
pub struct Figures {
    pub jobs_per_second: f64,
    pub server_cpu_micros_per_job: f64,
}

impl Figures {
    /// Figures each found by `of` from how to read it off a run's.
    fn each(of: impl Fn(fn(&Figures) -> f64) -> f64) -> Figures {
        Figures {
            jobs_per_second: of(|f| f.jobs_per_second),
            server_cpu_micros_per_job: of(|f| f.server_cpu_micros_per_job),
        }
    }

    pub fn median(runs: &[Run]) -> Figures {
        Figures::each(|figure| {
            median(
                &mut runs
                    .iter()
                    .map(|run| figure(&run.figures))
                    .collect::<Vec<_>>(),
            )
        })
    }

    /// The median over pairs of runs of each figure's ratio, `after` to
    /// `before`.
    pub fn median_ratio(before: &[Run], after: &[Run]) -> Figures {
        Figures::each(|figure| {
            let ratios = before.iter().zip(after);
            let ratios = ratios.map(|(b, a)| figure(&a.figures) / figure(&b.figures));
            median(&mut ratios.collect::<Vec<_>>())
        })
    }
}

impl Server<'_> {
    /// Runs `args.jobs` 1-phase jobs over HTTP, starting after event `after`
    /// (the last completion the server has had).
    pub async fn run(&self, after: i64) -> anyhow::Result<Run> {
        let cpu = self.process.cpu_seconds()?;
        let jobs = self.args.jobs;
        let (jobs_per_second, last_event) =
            submit_and_watch(self.http, &self.process.base, 1, jobs, after).await?;
        Ok(Run {
            figures: Figures {
                jobs_per_second,
                server_cpu_micros_per_job: (self.process.cpu_seconds()? - cpu) * 1e6 / jobs as f64,
            },
            last_event,
        })
    }
}
