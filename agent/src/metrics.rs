//! The agent's own Prometheus endpoint (`metrics_listen`): what its
//! arbiter sees and admits, and the state of its link. Values are read at
//! scrape time, so an idle agent does no metrics work at all.

use std::fmt::Write;
use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent::Handles;

/// Binds `addr` (so that a taken port fails at start) and returns the
/// server future, which runs until `shutdown`.
pub async fn serve(
    addr: SocketAddr,
    handles: Handles,
    shutdown: CancellationToken,
) -> std::io::Result<impl Future<Output = std::io::Result<()>>> {
    let listener = TcpListener::bind(addr).await?;
    tracing::info!(listen = %listener.local_addr()?, "serving agent metrics");
    let app = Router::new()
        .route("/metrics", get(metrics))
        .with_state(handles);
    Ok(async move {
        axum::serve(listener, app)
            .with_graceful_shutdown(async move { shutdown.cancelled().await })
            .await
    })
}

fn gauge(out: &mut String, name: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

fn counter(out: &mut String, name: &str, help: &str, samples: &[(String, f64)]) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for (labels, value) in samples {
        let _ = writeln!(out, "{name}{labels} {value}");
    }
}

/// Renders every metric in the Prometheus text format.
pub fn render(handles: &Handles) -> String {
    let arbiter = &handles.arbiter;
    let status = handles.status.borrow().clone();
    let mut out = String::new();
    let flag = |b: bool| if b { 1.0 } else { 0.0 };
    gauge(
        &mut out,
        "lingua_agent_connected",
        "1 while registered with the coordinator",
        &[(String::new(), flag(status.connected))],
    );
    gauge(
        &mut out,
        "lingua_agent_registrations",
        "Registrations since start (reconnects + 1)",
        &[(String::new(), status.registrations as f64)],
    );
    gauge(
        &mut out,
        "lingua_agent_outbox_results",
        "Results waiting for the coordinator's acknowledgement",
        &[(String::new(), status.outbox as f64)],
    );
    gauge(
        &mut out,
        "lingua_agent_jobs_running",
        "Jobs running now",
        &[(String::new(), f64::from(arbiter.running()))],
    );
    let waiting: Vec<(String, f64)> = arbiter
        .waiting()
        .into_iter()
        .map(|(kind, n)| (format!("{{kind=\"{kind}\"}}"), f64::from(n)))
        .collect();
    gauge(
        &mut out,
        "lingua_agent_jobs_waiting",
        "Jobs of each kind waiting in the arbiter's queue for a slot",
        &waiting,
    );
    gauge(
        &mut out,
        "lingua_agent_under_pressure",
        "1 while the GPUs are under utilisation pressure",
        &[(String::new(), flag(arbiter.under_pressure()))],
    );
    let free: Vec<(String, f64)> = arbiter
        .free_slots()
        .into_iter()
        .map(|(kind, n)| (format!("{{kind=\"{kind}\"}}"), f64::from(n)))
        .collect();
    gauge(
        &mut out,
        "lingua_agent_free_slots",
        "Jobs of each kind the arbiter would admit now",
        &free,
    );
    let overruns: Vec<(String, f64)> = arbiter
        .vram_overruns()
        .into_iter()
        .map(|(kind, n)| (format!("{{kind=\"{kind}\"}}"), n as f64))
        .collect();
    counter(
        &mut out,
        "lingua_agent_vram_overruns_total",
        "Jobs whose own processes held more GPU memory than their kind's vram_mb",
        &overruns,
    );
    let gpus = arbiter.gpus();
    let per_gpu = |value: &dyn Fn(&crate::gpu::GpuSnapshot) -> Option<f64>| -> Vec<(String, f64)> {
        gpus.iter()
            .filter_map(|g| {
                value(g).map(|v| (format!("{{gpu=\"{}\",uuid=\"{}\"}}", g.index, g.uuid), v))
            })
            .collect()
    };
    gauge(
        &mut out,
        "lingua_agent_gpu_memory_total_mb",
        "GPU memory, MiB",
        &per_gpu(&|g| Some(g.memory_total_mb as f64)),
    );
    gauge(
        &mut out,
        "lingua_agent_gpu_memory_used_mb",
        "GPU memory in use by anyone, MiB",
        &per_gpu(&|g| Some(g.memory_used_mb as f64)),
    );
    gauge(
        &mut out,
        "lingua_agent_gpu_utilization_pct",
        "GPU utilisation, percent",
        &per_gpu(&|g| g.utilization_pct.map(f64::from)),
    );
    gauge(
        &mut out,
        "lingua_agent_gpu_healthy",
        "0 once a GPU reported a critical error or was lost",
        &per_gpu(&|g| Some(flag(g.healthy))),
    );
    out
}

async fn metrics(State(handles): State<Handles>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        render(&handles),
    )
}
