//! `lingua-ctl top`: follows `GET /v1/fleet/events` and redraws the
//! summary and the node table on each event; reconnects when a stream
//! that worked breaks.

use std::io::{IsTerminal, Write};
use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use crate::api::{Api, CtlError};
use crate::show;

/// How long a stream may stay silent: events come every second, keep-alive
/// comments every 15 s.
const SILENCE: Duration = Duration::from_secs(45);
/// The pause before reconnecting.
const RECONNECT: Duration = Duration::from_secs(2);

/// Shows `iterations` updates (or until interrupted).
pub async fn run(api: &Api, json: bool, iterations: Option<u64>) -> Result<(), CtlError> {
    let redraw = std::io::stdout().is_terminal() && !json;
    let mut shown = 0;
    loop {
        let before = shown;
        let ended = follow(api, json, redraw, iterations, &mut shown).await;
        match ended {
            Ok(()) => return Ok(()),
            // Never connected, or nothing came: say so and stop.
            Err(err) if shown == before => return Err(err),
            Err(err) => {
                draw_line(&format!("{err}; reconnecting"), redraw);
                tokio::time::sleep(RECONNECT).await;
            }
        }
    }
}

/// Reads one stream, drawing each event, until `iterations` are shown
/// (`Ok`) or the stream ends (`Err`).
async fn follow(
    api: &Api,
    json: bool,
    redraw: bool,
    iterations: Option<u64>,
    shown: &mut u64,
) -> Result<(), CtlError> {
    let lost = |why: String| {
        CtlError::Unavailable(format!("lost the coordinator at {}: {why}", api.base()))
    };
    let mut response = api
        .open(api.request(Method::GET, "/v1/fleet/events"))
        .await?;
    let mut buffer = String::new();
    loop {
        if iterations.is_some_and(|n| *shown >= n) {
            return Ok(());
        }
        let chunk = tokio::time::timeout(SILENCE, response.chunk())
            .await
            .map_err(|_| lost(format!("nothing for {}s", SILENCE.as_secs())))?
            .map_err(|err| lost(err.to_string()))?
            .ok_or_else(|| lost("it closed the stream".into()))?;
        buffer.push_str(&String::from_utf8_lossy(&chunk));
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let Some(data) = event.lines().find_map(|line| line.strip_prefix("data:")) else {
                continue;
            };
            let fleet: Value = serde_json::from_str(data.trim_start())
                .map_err(|err| CtlError::Internal(format!("unexpected event: {err}")))?;
            draw(&fleet, json, redraw);
            *shown += 1;
            if iterations.is_some_and(|n| *shown >= n) {
                return Ok(());
            }
        }
    }
}

fn draw(fleet: &Value, json: bool, redraw: bool) {
    if json {
        println!("{fleet}");
        return;
    }
    let text = match fleet["error"]["message"].as_str() {
        Some(message) => format!("coordinator: {message}\n"),
        None => {
            let nodes = fleet["nodes"]
                .as_array()
                .map(Vec::as_slice)
                .unwrap_or_default();
            format!("{}\n{}", show::summary(fleet), show::nodes(nodes))
        }
    };
    let mut out = std::io::stdout().lock();
    if redraw {
        let _ = write!(out, "\x1b[H\x1b[2J");
    }
    let _ = write!(out, "{}", show::clean(&text));
    if !redraw {
        let _ = writeln!(out);
    }
    let _ = out.flush();
}

fn draw_line(line: &str, redraw: bool) {
    let mut out = std::io::stdout().lock();
    if redraw {
        let _ = write!(out, "\x1b[H\x1b[2J");
    }
    let _ = writeln!(out, "{}", show::clean(line));
    let _ = out.flush();
}
