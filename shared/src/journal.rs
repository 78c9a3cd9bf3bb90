//! Log lines for the systemd journal: when a service's stderr goes to the
//! journal (systemd sets `JOURNAL_STREAM`), each line starts with its
//! syslog priority (`<3>` error, `<4>` warning, `<6>` info, `<7>` debug),
//! which journald stores as the entry's priority (`journalctl -p warning`
//! works), and carries no timestamp (journald adds its own). The spans a
//! line was logged in come first, with their fields (`job{job_id=…}:`),
//! so `journalctl -g job_id=…` follows one job.

use std::fmt;

use tracing::{Event, Level, Subscriber};
use tracing_subscriber::fmt::format::Writer;
use tracing_subscriber::fmt::{FmtContext, FormatEvent, FormatFields, FormattedFields};
use tracing_subscriber::registry::LookupSpan;

/// True when stderr goes to the systemd journal: systemd sets
/// `JOURNAL_STREAM` to the device and inode of the stream it connected,
/// and a process that inherited the variable but writes elsewhere (a
/// shell, an executor, a test's pipe) does not match it.
pub fn attached() -> bool {
    use std::os::unix::fs::MetadataExt;
    let Some(stream) = std::env::var_os("JOURNAL_STREAM") else {
        return false;
    };
    let Some((dev, ino)) = stream.to_str().and_then(|s| s.split_once(':')) else {
        return false;
    };
    let Ok(stderr) = std::fs::metadata("/proc/self/fd/2") else {
        return false;
    };
    dev.parse() == Ok(stderr.dev()) && ino.parse() == Ok(stderr.ino())
}

/// The syslog priority of a level.
pub fn priority(level: Level) -> u8 {
    match level {
        Level::ERROR => 3,
        Level::WARN => 4,
        Level::INFO => 6,
        _ => 7,
    }
}

/// The journal's line format: `<priority>spans: target: message fields`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Journald;

impl<S, N> FormatEvent<S, N> for Journald
where
    S: Subscriber + for<'a> LookupSpan<'a>,
    N: for<'a> FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &FmtContext<'_, S, N>,
        mut writer: Writer<'_>,
        event: &Event<'_>,
    ) -> fmt::Result {
        write!(writer, "<{}>", priority(*event.metadata().level()))?;
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                write!(writer, "{}", span.name())?;
                let extensions = span.extensions();
                if let Some(fields) = extensions.get::<FormattedFields<N>>()
                    && !fields.is_empty()
                {
                    write!(writer, "{{{fields}}}")?;
                }
                write!(writer, ": ")?;
            }
        }
        write!(writer, "{}: ", event.metadata().target())?;
        ctx.field_format().format_fields(writer.by_ref(), event)?;
        writeln!(writer)
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::sync::{Arc, Mutex};

    use super::*;

    /// Collects what the subscriber writes.
    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn lines_carry_the_priority_and_spans_and_no_timestamp() {
        let captured = Captured::default();
        let writer = captured.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .event_format(Journald)
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            let span = tracing::info_span!("job", job_id = "j-1", attempt = 2);
            let _entered = span.enter();
            tracing::warn!(node_id = "gpu-01", "node refused the job");
            tracing::error!("dispatch failed");
            tracing::info!("done");
        });
        let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
        let lines: Vec<&str> = text.lines().collect();
        let target = module_path!();
        assert_eq!(
            lines,
            [
                format!(
                    "<4>job{{job_id=\"j-1\" attempt=2}}: {target}: node refused the job node_id=\"gpu-01\""
                ),
                format!("<3>job{{job_id=\"j-1\" attempt=2}}: {target}: dispatch failed"),
                format!("<6>job{{job_id=\"j-1\" attempt=2}}: {target}: done"),
            ]
        );
    }

    #[test]
    fn debug_and_trace_are_priority_7() {
        assert_eq!(priority(Level::DEBUG), 7);
        assert_eq!(priority(Level::TRACE), 7);
    }
}
