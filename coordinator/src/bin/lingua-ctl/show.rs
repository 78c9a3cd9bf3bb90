//! How `lingua-ctl` shows the API's JSON to people: aligned tables and
//! `key: value` lines (`--json` prints the JSON itself instead).

use std::fmt::Write as _;
use std::time::{SystemTime, UNIX_EPOCH};

use serde_json::Value;

/// `text` without control characters other than newlines: text a node
/// supplied (GPU reasons, versions, error messages) cannot steer the
/// terminal.
pub fn clean(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_control() && c != '\n' {
                '\u{fffd}'
            } else {
                c
            }
        })
        .collect()
}

/// Columns padded to their widest cell, two spaces apart.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (width, cell) in widths.iter_mut().zip(row) {
            *width = (*width).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let head: Vec<String> = headers.iter().map(|h| h.to_string()).collect();
    for row in std::iter::once(&head).chain(rows) {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `key n, key n` of a JSON object of counts; `-` when empty.
pub fn counts(map: &Value) -> String {
    let parts: Vec<String> = map
        .as_object()
        .into_iter()
        .flatten()
        .map(|(key, n)| format!("{key} {n}"))
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

fn strings(list: &Value) -> String {
    let parts: Vec<&str> = list
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    parts.join(",")
}

/// How long ago `ms` (since the Unix epoch) was.
pub fn ago(ms: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    let seconds = now.saturating_sub(ms) / 1000;
    match seconds {
        0..60 => format!("{seconds}s"),
        60..3600 => format!("{}m", seconds / 60),
        _ => format!("{}h", seconds / 3600),
    }
}

fn gib(mb: u64) -> String {
    format!("{:.1}", mb as f64 / 1024.0)
}

/// A node's GPU memory in use over its total, summed, in GiB.
fn vram(node: &Value) -> String {
    let gpus = node["capacity"]["gpus"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    if gpus.is_empty() || node["state"] == "offline" {
        return "-".into();
    }
    let sum = |field: &str| gpus.iter().filter_map(|g| g[field].as_u64()).sum::<u64>();
    format!(
        "{}/{} GiB",
        gib(sum("memory_used_mb")),
        gib(sum("memory_total_mb"))
    )
}

fn pairs(node: &Value) -> String {
    let pools: Vec<&String> = node["pools"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(pair, _)| pair)
        .collect();
    if pools.is_empty() {
        "-".into()
    } else {
        pools
            .iter()
            .map(|p| p.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// The node table (`nodes`, `top`).
pub fn nodes(nodes: &[Value]) -> String {
    let rows: Vec<Vec<String>> = nodes
        .iter()
        .map(|node| {
            let live = node["state"] != "offline";
            let capacity = &node["capacity"];
            let unhealthy = capacity["gpus"]
                .as_array()
                .into_iter()
                .flatten()
                .filter(|g| g["healthy"] == false)
                .count();
            let gpus = capacity["gpus"].as_array().map_or(0, Vec::len).to_string();
            vec![
                text(&node["id"]),
                text(&node["state"]),
                pairs(node),
                if live {
                    counts(&capacity["free_slots"])
                } else {
                    "-".into()
                },
                capacity["running"]
                    .as_u64()
                    .filter(|_| live)
                    .map_or("-".into(), |n| n.to_string()),
                match (live, unhealthy, capacity["gpu_problem"].is_string()) {
                    (false, _, _) => "-".into(),
                    (true, _, true) => format!("{gpus} (PROBLEM: see node)"),
                    (true, 0, false) => gpus,
                    (true, n, false) => format!("{gpus} ({n} unhealthy)"),
                },
                vram(node),
                text(&node["agent_version"]),
                node["last_seen_ms"].as_u64().map_or("-".into(), ago),
            ]
        })
        .collect();
    table(
        &[
            "NODE", "STATE", "PAIRS", "FREE", "RUNNING", "GPUS", "VRAM", "AGENT", "SEEN",
        ],
        &rows,
    )
}

/// A JSON string as text, anything else as JSON; `-` for null.
pub fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

/// One node in detail (`node ID`).
pub fn node(node: &Value) -> String {
    let mut out = String::new();
    let capacity = &node["capacity"];
    let lines = [
        ("Node", text(&node["id"])),
        ("State", text(&node["state"])),
        ("Agent", text(&node["agent_version"])),
        ("Epoch", text(&node["epoch"])),
        (
            "Last seen",
            node["last_seen_ms"]
                .as_u64()
                .map_or("-".into(), |ms| format!("{} ago", ago(ms))),
        ),
        (
            "Languages",
            format!(
                "{} -> {}",
                strings(&node["src_langs"]),
                strings(&node["tgt_langs"])
            ),
        ),
        ("Kinds", strings(&node["kinds"])),
        ("Pools", pools(&node["pools"])),
        ("Free slots", counts(&capacity["free_slots"])),
        ("Running", text(&capacity["running"])),
    ];
    for (key, value) in lines {
        let _ = writeln!(out, "{:<11} {value}", format!("{key}:"));
    }
    if let Some(problem) = capacity["gpu_problem"].as_str() {
        let _ = writeln!(out, "{:<11} {problem}", "GPU problem:");
    }
    let names: Vec<(String, String)> = node["gpus"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| (text(&g["uuid"]), text(&g["name"])))
        .collect();
    let rows: Vec<Vec<String>> = capacity["gpus"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| {
            let uuid = text(&g["uuid"]);
            let name = names
                .iter()
                .find(|(u, _)| *u == uuid)
                .map_or("-".into(), |(_, n)| n.clone());
            let used = g["memory_used_mb"].as_u64().unwrap_or(0);
            let total = g["memory_total_mb"].as_u64().unwrap_or(0);
            let health = match (g["healthy"].as_bool(), g["reason"].as_str()) {
                (Some(true), _) => "healthy".to_owned(),
                (_, Some(reason)) => format!("unhealthy: {reason}"),
                _ => "unhealthy".to_owned(),
            };
            vec![
                uuid,
                name,
                format!("{}/{} GiB", gib(used), gib(total)),
                percent(&g["utilization_pct"]),
                celsius(&g["temperature_c"]),
                health,
            ]
        })
        .collect();
    if !rows.is_empty() {
        out.push('\n');
        out.push_str(&table(
            &["GPU", "NAME", "VRAM", "UTIL", "TEMP", "HEALTH"],
            &rows,
        ));
    }
    out
}

/// `pair (pool P)` of a node's pools.
fn pools(pools: &Value) -> String {
    let parts: Vec<String> = pools
        .as_object()
        .into_iter()
        .flatten()
        .map(|(pair, pool)| format!("{pair} (pool {})", text(pool)))
        .collect();
    if parts.is_empty() {
        "-".into()
    } else {
        parts.join(", ")
    }
}

fn percent(value: &Value) -> String {
    value.as_u64().map_or("-".into(), |v| format!("{v}%"))
}

fn celsius(value: &Value) -> String {
    value.as_u64().map_or("-".into(), |v| format!("{v}C"))
}

/// The pairs table (`pools`).
pub fn pairs_table(pairs: &[Value]) -> String {
    let rows: Vec<Vec<String>> = pairs
        .iter()
        .map(|pair| {
            let pools: Vec<String> = pair["pools"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| format!("pool {}: {}", text(&p["pool"]), strings(&p["nodes"])))
                .collect();
            let free = if pair["no_capacity"] == true {
                "NO CAPACITY".into()
            } else {
                counts(&pair["free_slots"])
            };
            vec![
                text(&pair["pair"]),
                pools.join("; "),
                text(&pair["ready_nodes"]),
                free,
            ]
        })
        .collect();
    table(&["PAIR", "POOLS", "READY", "FREE"], &rows)
}

/// The fleet summary lines (`top`).
pub fn summary(fleet: &Value) -> String {
    let n = &fleet["nodes_by_state"];
    let g = &fleet["gpus"];
    let jobs = &fleet["jobs"];
    let latency = match (jobs["p50_ms"].as_u64(), jobs["p99_ms"].as_u64()) {
        (Some(p50), Some(p99)) => format!("p50 <= {p50} ms, p99 <= {p99} ms"),
        _ => "no jobs".into(),
    };
    let starved: Vec<String> = fleet["pairs"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["no_capacity"] == true)
        .map(|p| text(&p["pair"]))
        .collect();
    let mut out = String::new();
    let _ = writeln!(
        out,
        "Nodes: {} ready, {} draining, {} offline   Coordinators: {}",
        n["ready"], n["draining"], n["offline"], fleet["coordinators"]
    );
    let _ = writeln!(
        out,
        "GPUs: {} ({} unhealthy; {} nodes with a GPU problem)   VRAM: {}/{} GiB",
        g["total"],
        g["unhealthy"],
        g["problem_nodes"],
        gib(g["memory_used_mb"].as_u64().unwrap_or(0)),
        gib(g["memory_total_mb"].as_u64().unwrap_or(0))
    );
    let _ = writeln!(
        out,
        "Jobs: {:.1}/s, {latency}, {} queued",
        jobs["jobs_per_second"].as_f64().unwrap_or(0.0),
        jobs["queued"]
    );
    let _ = writeln!(
        out,
        "Last {}s: failed {}; shed {}; refused {}",
        jobs["window_seconds"],
        counts(&jobs["failed"]),
        counts(&jobs["shed"]),
        counts(&jobs["refused"])
    );
    let _ = writeln!(
        out,
        "Pairs without room: {}",
        if starved.is_empty() {
            "none".into()
        } else {
            starved.join(", ")
        }
    );
    out
}

/// A job (`jobs get`, `jobs submit`).
pub fn job(job: &Value) -> String {
    let mut out = String::new();
    let mut line = |key: &str, value: String| {
        let _ = writeln!(out, "{:<9} {value}", format!("{key}:"));
    };
    line("Job", text(&job["id"]));
    line("Status", text(&job["status"]));
    for (key, field) in [
        ("Node", "node_id"),
        ("Attempts", "attempts"),
        ("Latency", "latency_ms"),
    ] {
        if !job[field].is_null() {
            line(
                key,
                text(&job[field]) + if field == "latency_ms" { " ms" } else { "" },
            );
        }
    }
    if job["error"].is_object() {
        line(
            "Error",
            format!(
                "{}: {}",
                text(&job["error"]["code"]),
                text(&job["error"]["message"])
            ),
        );
    }
    if !job["output"].is_null() {
        line("Output", job["output"].to_string());
    }
    out
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tables_align_columns() {
        let rows = vec![
            vec!["a".into(), "long value".into(), "x".into()],
            vec!["bbbb".into(), "v".into(), "y".into()],
        ];
        let text = table(&["A", "B", "C"], &rows);
        assert_eq!(
            text,
            "A     B           C\na     long value  x\nbbbb  v           y\n"
        );
    }

    #[test]
    fn an_offline_node_shows_no_capacity() {
        let node = json!({"id": "n1", "state": "offline", "pools": {}, "capacity": {"free_slots": {"asr": 2}, "running": 1, "gpus": []}, "agent_version": "0.1.0", "last_seen_ms": 0});
        let text = nodes(&[node]);
        let row: Vec<&str> = text.lines().nth(1).unwrap().split_whitespace().collect();
        assert_eq!(row[..3], ["n1", "offline", "-"], "{row:?}");
        assert!(!row.contains(&"asr"), "{row:?}");
    }

    #[test]
    fn control_characters_never_reach_the_terminal() {
        assert_eq!(
            clean("ok\nreason \u{1b}]0;pwned\u{7}"),
            "ok\nreason \u{fffd}]0;pwned\u{fffd}"
        );
    }
}
