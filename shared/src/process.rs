//! Conventions every Lingua binary follows (docs/OPERATIONS.md):
//! exit codes, logs on stderr through `tracing` with the level from
//! `LINGUA_LOG` and text or JSON lines, the async runtime, and SIGTERM and
//! SIGINT as the request to stop.

use std::future::Future;
use std::io::IsTerminal;
use std::process::ExitCode;

use tokio::signal::unix::{Signal, SignalKind, signal};

use crate::journal;

/// The documented non-zero exit codes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// 64: bad usage or invalid config.
    Usage = 64,
    /// 69: a dependency is unavailable at start.
    Unavailable = 69,
    /// 70: internal error.
    Internal = 70,
}

impl From<Exit> for ExitCode {
    fn from(exit: Exit) -> Self {
        ExitCode::from(exit as u8)
    }
}

/// Prints a line on stderr as `eprintln!` does, with the journal's error
/// priority (`<3>`) in front when stderr goes to the journal, so that the
/// messages a binary exits with are errors in `journalctl -p err`.
pub fn print_error(message: std::fmt::Arguments<'_>) {
    if journal::attached() {
        eprintln!("<3>{message}");
    } else {
        eprintln!("{message}");
    }
}

/// `eprintln!` for the errors a binary exits with: [`print_error`].
#[macro_export]
macro_rules! fatal {
    ($($arg:tt)*) => {
        $crate::process::print_error(format_args!($($arg)*))
    };
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal; under systemd, with
    /// the journal priority on each line and no timestamp).
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global `tracing` subscriber: stderr, level from
/// `LINGUA_LOG` (EnvFilter syntax), else `default_level`. Text under
/// systemd (stderr going to the journal) is written in the journal's form:
/// the priority on each line, no timestamp ([`crate::journal`]).
pub fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LINGUA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
        LogFormat::Text if journal::attached() => builder
            .with_ansi(false)
            .event_format(journal::Journald)
            .init(),
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}

/// The exit for a command line clap could not parse: 0 for `--help` and
/// `--version`, 64 otherwise. Prints clap's message either way.
pub fn usage_error(err: &clap::Error) -> ExitCode {
    let _ = err.print();
    if err.use_stderr() {
        Exit::Usage.into()
    } else {
        ExitCode::SUCCESS
    }
}

/// Writes `command`'s man page and completions into `dir` (the hidden
/// `--generate-docs DIR` of every binary, run by packaging): 0, or 70 with
/// the reason.
pub fn generate_docs(command: clap::Command, dir: &std::path::Path) -> ExitCode {
    match crate::docs::generate(command, dir) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            print_error(format_args!(
                "cannot write the docs into {}: {err}",
                dir.display()
            ));
            Exit::Internal.into()
        }
    }
}

/// Runs `serve` to its exit code on a new tokio runtime with `workers`
/// worker threads (`None`, or 0: one per core); 70 when the runtime cannot
/// start, printed as `program: reason`. One worker is the calling thread
/// itself (tokio's current-thread scheduler): every task runs where
/// `serve` runs, and no hand-off between threads is paid for
/// (docs/BENCHMARKS.md, "One thread, not a worker beside the main one").
/// More are that many threads beside the calling one, which runs `serve`
/// alone.
pub fn block_on(
    program: &str,
    workers: Option<usize>,
    serve: impl Future<Output = ExitCode>,
) -> ExitCode {
    let mut builder = if workers == Some(1) {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    if let Some(workers) = workers.filter(|&workers| workers > 1) {
        builder.worker_threads(workers);
    }
    match builder.enable_all().build() {
        Ok(runtime) => runtime.block_on(serve),
        Err(err) => {
            print_error(format_args!(
                "{program}: cannot start the async runtime: {err}"
            ));
            Exit::Internal.into()
        }
    }
}

/// SIGTERM and SIGINT, caught from the moment they are installed: a signal
/// that arrives during start-up is neither lost nor fatal, and stops the
/// service gracefully once it serves.
pub struct StopSignals {
    term: Signal,
    int: Signal,
}

impl StopSignals {
    /// Installs the handlers; call it first thing inside the runtime.
    ///
    /// # Errors
    /// When a handler cannot be installed.
    pub fn install() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// Waits for the next SIGTERM or SIGINT and returns its name, for the
    /// log line. Cancel-safe: a signal is not lost when this is dropped
    /// unfinished, e.g. as one branch of a `select!`.
    pub async fn stopped(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}

#[cfg(test)]
mod tests {
    use std::process::ExitCode;
    use std::thread::ThreadId;

    use super::{StopSignals, block_on};

    /// The thread a task spawned by `serve` ran on, with `workers`.
    fn where_tasks_run(workers: usize) -> ThreadId {
        let mut ran_on = None;
        block_on("test", Some(workers), async {
            let task = tokio::spawn(async { std::thread::current().id() });
            ran_on = task.await.ok();
            ExitCode::SUCCESS
        });
        ran_on.expect("the task ran")
    }

    #[test]
    fn one_worker_is_the_calling_thread_and_more_are_threads_beside_it() {
        let caller = std::thread::current().id();
        assert_eq!(where_tasks_run(1), caller);
        assert_ne!(where_tasks_run(2), caller);
    }

    #[tokio::test]
    async fn a_signal_caught_before_anyone_waits_is_not_lost() {
        let mut signals = StopSignals::install().unwrap();
        nix::sys::signal::raise(nix::sys::signal::Signal::SIGINT).unwrap();
        let name = tokio::time::timeout(std::time::Duration::from_secs(5), signals.stopped())
            .await
            .unwrap();
        assert_eq!(name, "SIGINT");
    }
}
