//! Conventions every Lingua binary follows (docs/OPERATIONS.md):
//! exit codes, and logs on stderr through `tracing` with the level from
//! `LINGUA_LOG` and text or JSON lines.

use std::io::IsTerminal;
use std::process::ExitCode;

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

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines (coloured on a terminal).
    Text,
    /// One JSON object per line.
    Json,
}

/// Installs the global `tracing` subscriber: stderr, level from
/// `LINGUA_LOG` (EnvFilter syntax), else `default_level`.
pub fn init_logging(format: LogFormat, default_level: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("LINGUA_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match format {
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
