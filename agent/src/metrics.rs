//! The agent's own Prometheus endpoint (`metrics_listen`): what its
//! arbiter sees and admits, its jobs by kind and outcome, the state of its
//! link, and the `process_*` metrics. Gauges are read at scrape time, so
//! an idle agent does no metrics work at all; job counts and durations are
//! kept as they happen ([`crate::jobs::JobMetrics`]). GPUs are labelled `gpu` and
//! `UUID` as NVIDIA's DCGM exporter labels them, so that queries can join
//! the two on `UUID`; the product name is `model_name` (DCGM's `modelName`
//! fails Prometheus' snake_case lint, which `promtool check metrics`
//! applies).

use std::net::SocketAddr;

use axum::Router;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::IntoResponse;
use axum::routing::get;
use lingua_shared::JobKind;
use lingua_shared::metrics::{ProcessCollector, exposition};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Metric, Registry};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::agent::Handles;
use crate::arbiter::Arbiter;
use crate::gpu::GpuSnapshot;
use crate::link::LinkStatus;

/// Label: a job kind.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: String,
}

/// Labels of a GPU: `gpu` and `UUID` as the DCGM exporter names them.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
#[allow(non_snake_case)]
struct GpuLabels {
    gpu: String,
    UUID: String,
    model_name: String,
}

/// Label: this build's version.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct VersionLabel {
    version: String,
}

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

/// Registers `metric` and returns it.
fn register<M: Metric + Clone>(r: &mut Registry, name: &str, help: &str, metric: M) -> M {
    r.register(name, help, metric.clone());
    metric
}

/// A gauge set to `value`, registered.
fn gauge(r: &mut Registry, name: &str, help: &str, value: i64) {
    register(r, name, help, Gauge::<i64>::default()).set(value);
}

/// A family of gauges per kind, registered.
fn per_kind(
    r: &mut Registry,
    name: &str,
    help: &str,
    values: impl Iterator<Item = (JobKind, i64)>,
) {
    let family: Family<KindLabel, Gauge> = register(r, name, help, Family::default());
    for (kind, value) in values {
        family
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .set(value);
    }
}

/// A family of gauges per GPU, registered; GPUs without a value are left
/// out.
fn per_gpu(
    r: &mut Registry,
    (name, help): (&str, &str),
    gpus: &[GpuSnapshot],
    value: impl Fn(&GpuSnapshot) -> Option<f64>,
) {
    let family: Family<GpuLabels, Gauge<f64, std::sync::atomic::AtomicU64>> =
        register(r, name, help, Family::default());
    for gpu in gpus {
        if let Some(v) = value(gpu) {
            let labels = GpuLabels {
                gpu: gpu.index.to_string(),
                UUID: gpu.uuid.clone(),
                model_name: gpu.name.clone(),
            };
            family.get_or_create(&labels).set(v);
        }
    }
}

const MIB: f64 = 1024.0 * 1024.0;

/// Every metric, in OpenMetrics text.
pub fn render(handles: &Handles) -> String {
    let arbiter = &handles.arbiter;
    let mut root = Registry::default();
    root.register_collector(Box::new(ProcessCollector));
    let r = root.sub_registry_with_prefix("lingua_agent");
    let status = handles.status.borrow().clone();
    link_metrics(r, &status);
    arbiter_metrics(r, arbiter);
    let jobs = &handles.job_metrics;
    jobs.known_reasons(arbiter.free_slots().into_keys());
    jobs.register(r);
    gpu_metrics(r, &arbiter.gpus());
    let mut text = String::new();
    prometheus_client::encoding::text::encode(&mut text, &root)
        .expect("writing to a String cannot fail");
    text
}

/// The agent's version, and its link to the coordinator.
fn link_metrics(r: &mut Registry, status: &LinkStatus) {
    let build: Family<VersionLabel, Gauge> = register(
        r,
        "build_info",
        "Always 1; its label says the agent's version",
        Family::default(),
    );
    build
        .get_or_create(&VersionLabel {
            version: env!("CARGO_PKG_VERSION").to_owned(),
        })
        .set(1);
    gauge(
        r,
        "connected",
        "1 while registered with the coordinator",
        i64::from(status.connected),
    );
    register(
        r,
        "registrations",
        "Registrations since start (reconnects + 1)",
        Counter::<u64>::default(),
    )
    .inc_by(status.registrations);
    gauge(
        r,
        "outbox_results",
        "Results waiting for the coordinator's acknowledgement",
        status.outbox as i64,
    );
}

/// What the arbiter runs, holds back and has room for.
fn arbiter_metrics(r: &mut Registry, arbiter: &Arbiter) {
    gauge(
        r,
        "jobs_running",
        "Jobs running now",
        i64::from(arbiter.running()),
    );
    gauge(
        r,
        "under_pressure",
        "1 while the GPUs are under utilisation pressure",
        i64::from(arbiter.under_pressure()),
    );
    let waiting = arbiter
        .waiting()
        .into_iter()
        .map(|(k, n)| (k, i64::from(n)));
    per_kind(
        r,
        "jobs_waiting",
        "Jobs of each kind waiting in the arbiter's queue for a slot",
        waiting,
    );
    let free = arbiter
        .free_slots()
        .into_iter()
        .map(|(k, n)| (k, i64::from(n)));
    per_kind(
        r,
        "free_slots",
        "Jobs of each kind the arbiter would admit now",
        free,
    );
    let overruns: Family<KindLabel, Counter> = register(
        r,
        "vram_overruns",
        "Jobs whose own processes held more GPU memory than their kind's vram_mb",
        Family::default(),
    );
    for (kind, n) in arbiter.vram_overruns() {
        overruns
            .get_or_create(&KindLabel {
                kind: kind.to_string(),
            })
            .inc_by(n);
    }
}

/// Each GPU's latest reading.
fn gpu_metrics(r: &mut Registry, gpus: &[GpuSnapshot]) {
    per_gpu(r, ("gpu_memory_total_bytes", "GPU memory"), gpus, |g| {
        Some(g.memory_total_mb as f64 * MIB)
    });
    per_gpu(
        r,
        ("gpu_memory_used_bytes", "GPU memory in use by anyone"),
        gpus,
        |g| Some(g.memory_used_mb as f64 * MIB),
    );
    per_gpu(
        r,
        ("gpu_utilization_ratio", "GPU utilisation, 0 to 1"),
        gpus,
        |g| g.utilization_pct.map(|p| f64::from(p) / 100.0),
    );
    per_gpu(
        r,
        ("gpu_temperature_celsius", "GPU temperature"),
        gpus,
        |g| g.temperature_c.map(f64::from),
    );
    per_gpu(
        r,
        (
            "gpu_healthy",
            "0 once a GPU reported a critical error or was lost",
        ),
        gpus,
        |g| Some(f64::from(u8::from(g.healthy))),
    );
}

async fn metrics(State(handles): State<Handles>, headers: HeaderMap) -> impl IntoResponse {
    let accept = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok());
    let (content_type, body) = exposition(accept, render(&handles));
    ([(header::CONTENT_TYPE, content_type)], body)
}
