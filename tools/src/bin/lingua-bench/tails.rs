//! The slowest jobs of a load, stage by stage: the coordinator's
//! `Server-Timing` of each (docs/BENCHMARKS.md), and what the client saw
//! beyond it (HTTP, and both processes' scheduling on shared cores).

use std::time::Duration;

use crate::{Load, Row};

/// The coordinator's stages, in its header's order, then the rest.
const STAGES: [&str; 8] = [
    "start", "queue", "pick", "record", "accept", "run", "answer", "outside",
];

/// `name;dur=ms, …` as (name, milliseconds).
fn parse(header: &str) -> Vec<(String, f64)> {
    header
        .split(',')
        .filter_map(|part| {
            let (name, dur) = part.trim().split_once(";dur=")?;
            Some((name.to_owned(), dur.parse().ok()?))
        })
        .collect()
}

/// Where the time of the slowest `share` of `load`'s jobs (at least one)
/// went: the mean of each stage over them, in milliseconds, and the
/// worst job's stages.
pub fn slowest(load: &Load, share: f64, what: &str) -> Vec<Row> {
    let mut timed: Vec<&(Duration, String)> = load.timings.iter().collect();
    if timed.is_empty() {
        return Vec::new();
    }
    timed.sort_by_key(|(latency, _)| std::cmp::Reverse(*latency));
    let count = ((timed.len() as f64 * share).ceil() as usize).clamp(1, timed.len());
    let breakdown = |jobs: &[&(Duration, String)]| {
        let mut sums = [0.0; STAGES.len()];
        for (latency, header) in jobs {
            let stages = parse(header);
            let mut inside = 0.0;
            for (name, ms) in &stages {
                if let Some(at) = STAGES.iter().position(|s| s == name) {
                    sums[at] += ms;
                    inside += ms;
                }
            }
            sums[STAGES.len() - 1] += latency.as_secs_f64() * 1000.0 - inside;
        }
        let n = jobs.len() as f64;
        STAGES
            .iter()
            .zip(sums)
            .map(|(name, sum)| format!("{name} {:.2}", sum / n))
            .collect::<Vec<_>>()
            .join(", ")
    };
    vec![
        Row::new(
            format!(
                "Slowest 0.1 % {what} ({count} of {} jobs, {:.1} ms and slower): mean ms per stage",
                timed.len(),
                timed[count - 1].0.as_secs_f64() * 1000.0
            ),
            breakdown(&timed[..count]),
            "",
        ),
        Row::new(
            format!(
                "Slowest job {what} ({:.1} ms): ms per stage",
                timed[0].0.as_secs_f64() * 1000.0
            ),
            breakdown(&timed[..1]),
            "",
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_header_parses_into_stages() {
        assert_eq!(
            parse("start;dur=0.412, run;dur=150.000"),
            [("start".to_owned(), 0.412), ("run".to_owned(), 150.0)]
        );
        assert!(parse("garbage").is_empty());
    }

    #[test]
    fn the_slowest_jobs_show_their_stages_and_what_lay_outside() {
        let load = Load {
            timings: vec![
                (Duration::from_millis(10), "run;dur=4.000".to_owned()),
                (Duration::from_millis(2), "run;dur=1.000".to_owned()),
            ],
            ..Load::default()
        };
        let rows = slowest(&load, 0.001, "at half load");
        assert!(
            rows[0].figure.contains("1 of 2 jobs, 10.0 ms"),
            "{}",
            rows[0].figure
        );
        assert!(rows[0].value.contains("run 4.00"), "{}", rows[0].value);
        assert!(rows[0].value.ends_with("outside 6.00"), "{}", rows[0].value);
    }
}
