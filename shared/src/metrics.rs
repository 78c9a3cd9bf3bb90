//! What both binaries' `/metrics` share: the `process_*` metrics every
//! Prometheus client library exports ([`ProcessCollector`], read from
//! `/proc` at each scrape), `build_info`, and the exposition format asked
//! for ([`exposition`]): OpenMetrics for a Prometheus server that asks
//! for it, the classic text format (0.0.4) for everyone else (`curl`,
//! `promtool check metrics`).

use std::fmt;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

/// The content type of OpenMetrics text.
pub const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
/// The content type of the classic Prometheus text format.
pub const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

/// The body and content type for a scraper that sent `accept`:
/// `openmetrics` as it is when the scraper asks for OpenMetrics, else
/// rewritten to the classic text format.
pub fn exposition(accept: Option<&str>, openmetrics: String) -> (&'static str, String) {
    if accept.is_some_and(|a| a.contains("application/openmetrics-text")) {
        (OPENMETRICS, openmetrics)
    } else {
        (PROMETHEUS_TEXT, classic_text(&openmetrics))
    }
}

/// OpenMetrics text as the classic format: a counter's family is named
/// with its `_total` suffix, and the `# UNIT` and `# EOF` lines go.
pub fn classic_text(openmetrics: &str) -> String {
    let counters: Vec<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(&name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        match renamed {
            Some(line) => out.push_str(&line),
            None => out.push_str(line),
        }
        out.push('\n');
    }
    out
}

/// `process_*` metrics of this process, read from `/proc` at each scrape:
/// CPU seconds, resident and virtual memory, open and maximum file
/// descriptors, start time. Nothing is encoded where `/proc` cannot be
/// read.
#[derive(Debug, Default, Clone, Copy)]
pub struct ProcessCollector;

/// One reading of this process.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcessSample {
    /// User and system CPU time, in seconds.
    pub cpu_seconds: f64,
    /// Resident memory, in bytes.
    pub resident_bytes: u64,
    /// Virtual memory, in bytes.
    pub virtual_bytes: u64,
    /// Open file descriptors.
    pub open_fds: u64,
    /// The open-files soft limit.
    pub max_fds: u64,
    /// Start time, in seconds since the Unix epoch.
    pub start_time_seconds: f64,
}

/// Reads this process's sample from `/proc`.
pub fn process_sample() -> Option<ProcessSample> {
    use nix::unistd::{SysconfVar, sysconf};
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces), from field 3.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    let ticks = sysconf(SysconfVar::CLK_TCK).ok()??.max(1) as f64;
    let page = sysconf(SysconfVar::PAGE_SIZE).ok()??.max(1) as u64;
    let boot: f64 = std::fs::read_to_string("/proc/stat")
        .ok()?
        .lines()
        .find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())?;
    let open_fds = std::fs::read_dir("/proc/self/fd").ok()?.count() as u64;
    let (soft, _) =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).ok()?;
    Some(ProcessSample {
        cpu_seconds: (field(14)? + field(15)?) as f64 / ticks,
        resident_bytes: field(24)? * page,
        virtual_bytes: field(23)?,
        open_fds,
        max_fds: soft,
        start_time_seconds: boot + field(22)? as f64 / ticks,
    })
}

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), fmt::Error> {
        let Some(sample) = process_sample() else {
            return Ok(());
        };
        let cpu = ConstCounter::new(sample.cpu_seconds);
        cpu.encode(encoder.encode_descriptor(
            "process_cpu_seconds",
            "Total user and system CPU time spent in seconds",
            None,
            cpu.metric_type(),
        )?)?;
        let gauges = [
            (
                "process_resident_memory_bytes",
                "Resident memory size in bytes",
                sample.resident_bytes as f64,
            ),
            (
                "process_virtual_memory_bytes",
                "Virtual memory size in bytes",
                sample.virtual_bytes as f64,
            ),
            (
                "process_open_fds",
                "Number of open file descriptors",
                sample.open_fds as f64,
            ),
            (
                "process_max_fds",
                "Maximum number of open file descriptors",
                sample.max_fds as f64,
            ),
            (
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds",
                sample.start_time_seconds,
            ),
        ];
        for (name, help, value) in gauges {
            let gauge = ConstGauge::new(value);
            gauge.encode(encoder.encode_descriptor(name, help, None, gauge.metric_type())?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::registry::Registry;

    use super::*;

    #[test]
    fn this_process_is_read_from_proc() {
        let sample = process_sample().expect("/proc is readable");
        assert!(sample.resident_bytes > 0 && sample.virtual_bytes >= sample.resident_bytes);
        assert!(sample.open_fds > 0 && sample.max_fds >= sample.open_fds);
        assert!(sample.start_time_seconds > 1.6e9, "{sample:?}");
    }

    #[test]
    fn counters_are_named_with_total_in_the_classic_format() {
        let mut registry = Registry::default();
        registry.register_collector(Box::new(ProcessCollector));
        let mut openmetrics = String::new();
        prometheus_client::encoding::text::encode(&mut openmetrics, &registry).unwrap();
        assert!(openmetrics.contains("# TYPE process_cpu_seconds counter"));
        assert!(openmetrics.ends_with("# EOF\n"));

        let (content_type, text) = exposition(None, openmetrics.clone());
        assert_eq!(content_type, PROMETHEUS_TEXT);
        assert!(
            text.contains("# HELP process_cpu_seconds_total Total user"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter"),
            "{text}"
        );
        assert!(text.contains("\nprocess_cpu_seconds_total "), "{text}");
        assert!(text.contains("# TYPE process_open_fds gauge"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");

        let asked = "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5";
        assert_eq!(
            exposition(Some(asked), openmetrics.clone()),
            (OPENMETRICS, openmetrics)
        );
    }
}
