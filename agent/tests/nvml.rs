//! The real NVML path (`NvmlProbe` through nvml-wrapper, the arbiter, the
//! `lingua-agent` binary) driven through a fake `libnvidia-ml.so.1`
//! (`tests/fake_nvml/fake_nvml.c`, compiled here with the C compiler Rust
//! already needs) loaded with `[gpu.nvml] library_path`.
//!
//! Tests named `host_*` run against the real driver instead when
//! `LINGUA_NVML_REAL=1` (scripts/gpu-check.sh on a GPU machine); they then
//! check what holds on any machine rather than the fake's exact numbers.
//! Every other test always uses the fake.
//!
//! The `command` job tests run real jobs (`sh`) whose shell writes its own
//! PID to a file once started; the test then lists that PID, with the
//! memory it should hold, among the fake GPU's compute processes.

#[path = "../../tests/src/signal.rs"]
mod signal;
use signal::terminate;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use lingua_agent::agent::Handles;
use lingua_agent::arbiter::{Arbiter, Limits, Refusal};
use lingua_agent::config::AgentConfig;
use lingua_agent::executor::Executor;
use lingua_agent::gpu::nvml::NvmlLibrary;
use lingua_agent::gpu::{self, GpuProcess, GpuSnapshot};
use lingua_agent::jobs::JobMetrics;
use lingua_agent::jobs::{Executors, Jobs, Outgoing};
use lingua_agent::link::LinkStatus;
use lingua_agent::metrics;
use lingua_shared::protocol::{DeviceChoice, FailureCode, JobAssign, JobResult, Outcome};
use lingua_shared::{JobId, JobKind};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// The agent binary: this build's, or `LINGUA_AGENT_BIN` (a prebuilt copy
/// next to a test binary carried to a GPU machine).
fn bin() -> String {
    std::env::var("LINGUA_AGENT_BIN").unwrap_or_else(|_| env!("CARGO_BIN_EXE_lingua-agent").into())
}
const PATIENCE: Duration = Duration::from_secs(20);
const MIB_PER_GB: u64 = 1024;

/// True when the `host_*` tests target the machine's own NVIDIA driver.
fn real_driver() -> bool {
    std::env::var("LINGUA_NVML_REAL").is_ok_and(|v| v == "1")
}

/// Builds one variant of the fake library once per test process.
fn compiled(variant: &str, defines: &[&str]) -> PathBuf {
    static PLAIN: OnceLock<PathBuf> = OnceLock::new();
    static NO_V2: OnceLock<PathBuf> = OnceLock::new();
    let cell = if defines.is_empty() { &PLAIN } else { &NO_V2 };
    cell.get_or_init(|| {
        let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_nvml/fake_nvml.c");
        let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("fake-nvml-{variant}-{}.so", std::process::id()));
        let compiler = std::env::var("CC").unwrap_or_else(|_| "cc".into());
        let status = std::process::Command::new(&compiler)
            .args(["-shared", "-fPIC", "-O1", "-Wall", "-o"])
            .arg(&out)
            .args(defines)
            .arg(&source)
            .arg("-lpthread")
            .arg("-ldl")
            .status()
            .unwrap_or_else(|e| panic!("cannot run the C compiler {compiler:?}: {e}"));
        assert!(status.success(), "the fake NVML library does not compile");
        out
    })
    .clone()
}

/// One copy of the fake library with its own state file.
struct FakeNvml {
    dir: tempfile::TempDir,
    lib: PathBuf,
}

impl FakeNvml {
    fn new(state: &str) -> Self {
        Self::build(compiled("plain", &[]), state)
    }

    fn without_memory_v2(state: &str) -> Self {
        Self::build(compiled("no-v2", &["-DFAKE_NO_MEMORY_V2"]), state)
    }

    fn build(compiled: PathBuf, state: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let lib = dir.path().join("libnvidia-ml.so.1");
        std::fs::copy(compiled, &lib).unwrap();
        let fake = Self { dir, lib };
        fake.set(state);
        fake
    }

    /// Replaces the state atomically (the library re-reads it every call).
    fn set(&self, state: &str) {
        let tmp = self.dir.path().join("state.tmp");
        std::fs::write(&tmp, state).unwrap();
        std::fs::rename(&tmp, self.lib.with_extension("1.state")).unwrap();
    }

    /// The calls recorded: "init", "shutdown".
    fn calls(&self) -> Vec<String> {
        std::fs::read_to_string(self.lib.with_extension("1.calls"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }
}

const KINDS: &str = r#"
[jobs.translate]
vram_mb = 2000
max_concurrent = 64
executor = "simulated"
[jobs.asr]
vram_mb = 6000
priority = 90
max_concurrent = 64
executor = "simulated"
[jobs.repair]
vram_mb = 1000
priority = 20
max_concurrent = 64
executor = "simulated"
"#;

/// An agent config with the NVML backend, loading `library` (the system's
/// when `None`); `gpu_extra` goes into `[gpu]`.
fn config_text(library: Option<&Path>, gpu_extra: &str, metrics: &str) -> String {
    let nvml = library.map_or_else(String::new, |lib| {
        format!(
            "[gpu.nvml]\nlibrary_path = {:?}\n",
            lib.display().to_string()
        )
    });
    format!(
        r#"
node_id = "nvml-test"
coordinator_url = "ws://127.0.0.1:1/v1/node"
{metrics}
[capabilities]
src_langs = ["zh"]
tgt_langs = ["en"]
[gpu]
backend = "nvml"
reserve_mb = 1000
poll_interval_ms = 50
{gpu_extra}
{nvml}
{KINDS}
"#
    )
}

fn config(fake: &FakeNvml, gpu_extra: &str) -> AgentConfig {
    AgentConfig::parse(&config_text(Some(&fake.lib), gpu_extra, "")).unwrap()
}

fn kind(name: &str) -> JobKind {
    JobKind::new(name).unwrap()
}

/// Reads once through the real probe and feeds the arbiter.
fn read(config: &AgentConfig) -> (Vec<GpuSnapshot>, Arc<Arbiter>) {
    let gpus = gpu::open(&config.gpu, None).read_once().unwrap();
    let arbiter = Arbiter::new(Limits::from_config(config));
    arbiter.update(gpus.clone(), Instant::now());
    (gpus, arbiter)
}

fn gpu_line(index: usize, total_gb: u64, used_mb: u64, extra: &str) -> String {
    format!(
        "gpu {extra} uuid=GPU-{index:08x}-fake name=FakeH200 total={} used={used_mb} util=5 temp=41\n",
        total_gb * MIB_PER_GB
    )
}

#[test]
fn one_two_and_eight_gpus_are_read_and_admitted_by_memory() {
    for count in [1usize, 2, 8] {
        let state: String = (0..count)
            .map(|i| gpu_line(i, 24, 500 * i as u64, ""))
            .collect();
        let fake = FakeNvml::new(&format!("init code=0\n{state}"));
        let (gpus, arbiter) = read(&config(&fake, ""));
        assert_eq!(gpus.len(), count);
        for (i, gpu) in gpus.iter().enumerate() {
            assert_eq!(gpu.index, i as u32);
            assert_eq!(gpu.uuid, format!("GPU-{i:08x}-fake"));
            assert_eq!(gpu.name, "FakeH200");
            assert_eq!(gpu.memory_total_mb, 24_576);
            assert_eq!(gpu.memory_used_mb, 500 * i as u64);
            assert_eq!(gpu.utilization_pct, Some(5));
            assert_eq!(gpu.temperature_c, Some(41));
            assert!(gpu.healthy && gpu.reason.is_none());
        }
        // Per GPU: 24,576 - 1,000 reserve - used; 6,000 MiB ASR jobs.
        let expected: u64 = (0..count as u64)
            .map(|i| (24_576 - 1_000 - 500 * i) / 6_000)
            .sum();
        assert_eq!(
            u64::from(arbiter.free_slots()[&kind("asr")]),
            expected,
            "{count} GPUs"
        );
        let held: Vec<_> = (0..expected)
            .map(|_| arbiter.try_admit(&kind("asr")).unwrap())
            .collect();
        assert!(matches!(
            arbiter.try_admit(&kind("asr")),
            Err(Refusal::Memory { .. })
        ));
        let mut per_gpu = vec![0; count];
        for permit in &held {
            per_gpu[permit.gpu().unwrap() as usize] += 1;
        }
        assert!(per_gpu.iter().all(|&n| n == 3), "{per_gpu:?}");
    }
}

#[test]
fn mig_instances_are_the_schedulable_devices() {
    let fake = FakeNvml::new(&format!(
        "init code=0\n{}mig uuid=MIG-a total=19968 used=0\nmig uuid=MIG-b total=19968 used=18000\nmig uuid=MIG-c total=9728 used=0\n{}",
        gpu_line(0, 80, 35_000, "mig=1"),
        gpu_line(1, 80, 0, ""),
    ));
    let (gpus, arbiter) = read(&config(&fake, ""));
    let uuids: Vec<&str> = gpus.iter().map(|g| g.uuid.as_str()).collect();
    assert_eq!(uuids, ["MIG-a", "MIG-b", "MIG-c", "GPU-00000001-fake"]);
    let mig_a = &gpus[0];
    assert_eq!(mig_a.index, 0);
    assert_eq!(mig_a.parent_uuid.as_deref(), Some("GPU-00000000-fake"));
    assert_eq!(mig_a.memory_total_mb, 19_968);
    assert_eq!(mig_a.utilization_pct, None, "not measured per instance");
    // MIG-b is 90 % full without utilisation: under pressure by memory.
    assert_eq!(arbiter.hot_gpus(), ["MIG-b"]);
    // ASR (6,000): MIG-a 3, MIG-b 0, MIG-c 1, GPU 1 13 (81,920 - 1,000).
    assert_eq!(arbiter.free_slots()[&kind("asr")], 3 + 1 + 13);
    // The parent GPU's 80 GB pool is not offered: the ASR jobs fill the
    // instances best-fit, smallest hole first.
    let first = arbiter.try_admit(&kind("asr")).unwrap();
    assert_eq!(first.placement().unwrap().uuid, "MIG-c");
    // Selecting the GPU selects its instances.
    let only = config(&fake, "devices = [\"GPU-00000000-fake\"]");
    let (gpus, _) = read(&only);
    assert_eq!(gpus.len(), 3);
    assert!(gpus.iter().all(|g| g.uuid.starts_with("MIG-")));
}

#[test]
fn devices_select_gpus_by_uuid_or_index() {
    let state: String = (0..4).map(|i| gpu_line(i, 24, 0, "")).collect();
    let fake = FakeNvml::new(&format!("init code=0\n{state}"));
    let (gpus, arbiter) = read(&config(&fake, "devices = [3, \"GPU-00000001-fake\"]"));
    let picked: Vec<u32> = gpus.iter().map(|g| g.index).collect();
    assert_eq!(picked, [1, 3]);
    assert_eq!(arbiter.free_slots()[&kind("asr")], 6);
}

#[test]
fn a_gpu_lost_mid_run_takes_only_that_gpu_out() {
    let two = |lost: &str| {
        format!(
            "init code=0\n{}{}",
            gpu_line(0, 24, 0, ""),
            gpu_line(1, 24, 0, lost)
        )
    };
    let fake = FakeNvml::new(&two(""));
    let config = config(&fake, "");
    let library = NvmlLibrary::open(&config.gpu.nvml).unwrap();
    let mut probe = library.probe(&config.gpu.nvml);
    let arbiter = Arbiter::new(Limits::from_config(&config));
    arbiter.update(probe.read().unwrap(), Instant::now());
    assert_eq!(arbiter.free_slots()[&kind("asr")], 6);
    fake.set(&two("lost=1"));
    let gpus = probe.read().unwrap();
    assert!(gpus[0].healthy);
    assert!(!gpus[1].healthy);
    assert_eq!(gpus[1].uuid, "GPU-00000001-fake", "named by its last UUID");
    assert!(gpus[1].reason.as_deref().unwrap().contains("GPU lost"));
    arbiter.update(gpus, Instant::now());
    assert_eq!(arbiter.free_slots()[&kind("asr")], 3);
    for _ in 0..3 {
        assert_eq!(arbiter.try_admit(&kind("asr")).unwrap().gpu(), Some(0));
    }
    // It stays out even if the bus answers again.
    fake.set(&two(""));
    let gpus = probe.read().unwrap();
    assert!(!gpus[1].healthy);
}

#[test]
fn application_xids_are_ignored_and_critical_xids_take_the_gpu_out() {
    let gpus = format!("{}{}", gpu_line(0, 24, 0, ""), gpu_line(1, 24, 0, ""));
    let fake = FakeNvml::new(&format!("init code=0\n{gpus}"));
    let config = config(&fake, "");
    let library = NvmlLibrary::open(&config.gpu.nvml).unwrap();
    let mut probe = library.probe(&config.gpu.nvml);
    assert_eq!(probe.watched(), ["GPU-00000000-fake", "GPU-00000001-fake"]);
    // A CUDA program killed mid-work: Xid 13, 31, 43 on GPU 0.
    fake.set(&format!(
        "init code=0\n{gpus}xid gpu=0 value=13\nxid gpu=0 value=31\nxid gpu=0 value=43\n"
    ));
    let read = probe.read().unwrap();
    assert!(read.iter().all(|g| g.healthy), "{read:?}");
    // Xid 79 (fallen off the bus) on GPU 1.
    fake.set(&format!(
        "init code=0\n{gpus}xid gpu=0 value=13\nxid gpu=0 value=31\nxid gpu=0 value=43\nxid gpu=1 value=79\n"
    ));
    let read = probe.read().unwrap();
    assert!(read[0].healthy);
    assert!(!read[1].healthy);
    assert_eq!(read[1].reason.as_deref(), Some("critical Xid 79"));
    let arbiter = Arbiter::new(Limits::from_config(&config));
    arbiter.update(read, Instant::now());
    assert_eq!(arbiter.free_slots()[&kind("asr")], 3);

    // With an empty ignore list, an application Xid counts too.
    let strict_fake = FakeNvml::new(&format!("init code=0\n{gpus}"));
    let strict = AgentConfig::parse(
        &config_text(Some(&strict_fake.lib), "", "")
            .replace("[gpu.nvml]\n", "[gpu.nvml]\nignored_xids = []\n"),
    )
    .unwrap();
    assert!(strict.gpu.nvml.ignored_xids.is_empty());
    let library = NvmlLibrary::open(&strict.gpu.nvml).unwrap();
    let mut probe = library.probe(&strict.gpu.nvml);
    strict_fake.set(&format!("init code=0\n{gpus}xid gpu=0 value=13\n"));
    let read = probe.read().unwrap();
    assert!(!read[0].healthy);
    assert_eq!(read[0].reason.as_deref(), Some("critical Xid 13"));
}

#[test]
fn a_failed_event_registration_loses_no_other_gpu() {
    let gpus = format!(
        "{}{}{}",
        gpu_line(0, 24, 0, ""),
        gpu_line(1, 24, 0, "register=3"),
        gpu_line(2, 24, 0, "")
    );
    let fake = FakeNvml::new(&format!("init code=0\n{gpus}"));
    let config = config(&fake, "");
    let library = NvmlLibrary::open(&config.gpu.nvml).unwrap();
    let mut probe = library.probe(&config.gpu.nvml);
    assert_eq!(probe.watched(), ["GPU-00000000-fake", "GPU-00000002-fake"]);
    fake.set(&format!(
        "init code=0\n{gpus}xid gpu=0 value=48\nxid gpu=2 value=62\n"
    ));
    let read = probe.read().unwrap();
    let healthy: Vec<bool> = read.iter().map(|g| g.healthy).collect();
    assert_eq!(healthy, [false, true, false]);
}

#[test]
fn a_driver_without_the_v2_memory_call_is_named() {
    let fake = FakeNvml::without_memory_v2(&format!("init code=0\n{}", gpu_line(0, 24, 0, "")));
    let (gpus, arbiter) = read(&config(&fake, ""));
    assert!(!gpus[0].healthy);
    let reason = gpus[0].reason.as_deref().unwrap();
    assert!(
        reason.contains("nvmlDeviceGetMemoryInfo_v2") && reason.contains("R510"),
        "{reason}"
    );
    assert_eq!(arbiter.free_slots()[&kind("translate")], 0);
}

#[test]
fn unsupported_utilisation_is_a_missing_metric() {
    let fake = FakeNvml::new(&format!(
        "init code=0\n{}{}",
        gpu_line(0, 24, 0, "util=-1 temp=-1"),
        gpu_line(1, 24, 0, "util=95")
    ));
    let (gpus, arbiter) = read(&config(&fake, ""));
    assert_eq!(gpus[0].utilization_pct, None);
    assert_eq!(gpus[0].temperature_c, None);
    assert!(gpus[0].healthy);
    // GPU 1 is hot: the low-priority kind goes to GPU 0 only.
    assert_eq!(arbiter.hot_gpus(), ["GPU-00000001-fake"]);
    assert_eq!(arbiter.free_slots()[&kind("repair")], 23);
    assert_eq!(arbiter.try_admit(&kind("repair")).unwrap().gpu(), Some(0));
}

#[test]
fn ecc_errors_take_the_gpu_out() {
    let fake = FakeNvml::new(&format!(
        "init code=0\n{}{}",
        gpu_line(0, 24, 0, "ecc=2"),
        gpu_line(1, 24, 0, "")
    ));
    let (gpus, arbiter) = read(&config(&fake, ""));
    assert!(!gpus[0].healthy);
    assert!(
        gpus[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("2 uncorrectable"),
        "{gpus:?}"
    );
    assert!(gpus[1].healthy);
    assert_eq!(arbiter.free_slots()[&kind("asr")], 3);
}

/// Polls `check` until it holds or `PATIENCE` runs out.
fn wait_for(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + PATIENCE;
    while !check() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// An arbiter fed by the sampler of `config`'s GPUs (stopped when the
/// sampler is dropped).
fn sampled(config: &AgentConfig) -> (Arc<Arbiter>, gpu::Sampler) {
    let arbiter = Arbiter::new(Limits::from_config(config));
    let publishing = Arc::clone(&arbiter);
    let sampler = gpu::spawn_sampler(
        gpu::open(&config.gpu, None),
        config.gpu.poll_interval,
        move |r, taken| publishing.publish(r, taken),
    )
    .unwrap();
    (arbiter, sampler)
}

#[test]
fn init_failure_then_recovery_through_the_sampler() {
    let fake = FakeNvml::new("init code=9\n");
    let config = config(&fake, "");
    let (arbiter, sampler) = sampled(&config);
    wait_for("the failure to be published", || arbiter.health().is_some());
    let health = arbiter.health().unwrap();
    assert!(health.contains("driver is not loaded"), "{health}");
    assert!(matches!(
        arbiter.try_admit(&kind("translate")),
        Err(Refusal::Unavailable(_))
    ));
    wait_for("a retry", || fake.calls().len() >= 2);
    fake.set(&format!("init code=0\n{}", gpu_line(0, 24, 0, "")));
    wait_for("recovery", || arbiter.free_slots()[&kind("asr")] == 3);
    assert_eq!(arbiter.health(), None);
    drop(sampler);
    assert_eq!(fake.calls().last().map(String::as_str), Some("shutdown"));
}

/// While NVML cannot be initialised the sampler's readings stay fresh
/// (it says every interval why there are none), so the systemd watchdog,
/// fed while they are, is fed through the retries. Before, it published
/// once per retry, whose pauses double up to 30 s: the readings went
/// stale, and systemd killed an agent that had no driver, again and again.
#[test]
fn readings_stay_fresh_while_nvml_cannot_be_initialised() {
    let fake = FakeNvml::new("init code=9\n");
    let config = config(&fake, "stale_after_ms = 1000");
    let (arbiter, _sampler) = sampled(&config);
    wait_for("a first reading", || arbiter.health().is_some());
    // Retries 50, 100, 200, 400, 800 and 1,600 ms apart: the last pause
    // is longer than a reading stays fresh.
    while fake.calls().len() < 7 {
        assert!(arbiter.fresh(), "stale after {} tries", fake.calls().len());
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// NVML failing once initialised (it cannot count the GPUs: a driver
/// reloaded, say) takes the GPUs out, says why, and is initialised again.
/// Before, the failure read as a node without GPUs, healthy, for good.
#[test]
fn nvml_failing_after_it_initialised_is_initialised_again() {
    let fake = FakeNvml::new(&format!("init code=0\n{}", gpu_line(0, 24, 0, "")));
    let config = config(&fake, "");
    let (arbiter, _sampler) = sampled(&config);
    wait_for("slots", || arbiter.free_slots()[&kind("asr")] == 3);
    fake.set(&format!(
        "init code=0\ncount code=999\n{}",
        gpu_line(0, 24, 0, "")
    ));
    wait_for("the failure to be published", || arbiter.health().is_some());
    let health = arbiter.health().unwrap();
    assert!(health.contains("nvml stopped answering"), "{health}");
    assert_eq!(arbiter.free_slots()[&kind("asr")], 0);
    let inits = |fake: &FakeNvml| fake.calls().iter().filter(|c| *c == "init").count();
    wait_for("NVML to be initialised again", || inits(&fake) >= 2);
    fake.set(&format!("init code=0\n{}", gpu_line(0, 24, 0, "")));
    wait_for("recovery", || arbiter.free_slots()[&kind("asr")] == 3);
    assert_eq!(arbiter.health(), None);
}

/// A GPU taken out for a critical Xid stays out when NVML is initialised
/// again: Xid events are not replayed. Before, a transient NVML failure
/// put it back in admission.
#[test]
fn a_gpu_out_for_a_critical_xid_stays_out_when_nvml_is_initialised_again() {
    let gpus = format!("{}{}", gpu_line(0, 24, 0, ""), gpu_line(1, 24, 0, ""));
    let fake = FakeNvml::new(&format!("init code=0\n{gpus}xid gpu=0 value=79\n"));
    let config = config(&fake, "");
    let (arbiter, _sampler) = sampled(&config);
    let out = |arbiter: &Arbiter| arbiter.gpus().iter().filter(|g| !g.healthy).count();
    wait_for("GPU 0 out for its Xid", || out(&arbiter) == 1);
    fake.set(&format!("init code=0\ncount code=999\n{gpus}"));
    wait_for("the failure to be published", || arbiter.health().is_some());
    fake.set(&format!("init code=0\n{gpus}"));
    wait_for("NVML back", || {
        arbiter.health().is_none() && arbiter.gpus().len() == 2
    });
    assert_eq!(out(&arbiter), 1, "{:?}", arbiter.gpus());
}

async fn metrics(port: u16) -> String {
    match reqwest::get(format!("http://127.0.0.1:{port}/metrics")).await {
        Ok(response) => response.text().await.unwrap_or_default(),
        Err(_) => String::new(),
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[tokio::test]
async fn the_service_outlives_an_nvml_failure_and_shuts_nvml_down_on_exit() {
    let fake = FakeNvml::new("init code=18\n");
    let port = free_port();
    let path = fake.dir.path().join("agent.toml");
    std::fs::write(
        &path,
        config_text(
            Some(&fake.lib),
            "",
            &format!("metrics_listen = \"127.0.0.1:{port}\""),
        ),
    )
    .unwrap();
    let mut child = Command::new(bin())
        .args(["--config", path.to_str().unwrap()])
        .env("LINGUA_LOG", "warn")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stderr.take().unwrap()).lines();
    let said = tokio::time::timeout(PATIENCE, async {
        while let Some(line) = lines.next_line().await.unwrap() {
            if line.contains("nvml unavailable") {
                return line;
            }
        }
        String::new()
    })
    .await
    .expect("the agent says why it has no slots");
    assert!(said.contains("version mismatch"), "{said}");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let zero = "lingua_agent_free_slots{kind=\"asr\"} 0";
    tokio::time::timeout(PATIENCE, async {
        while !metrics(port).await.contains(zero) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("the agent runs with zero slots");
    assert!(child.try_wait().unwrap().is_none(), "still running");
    fake.set(&format!("init code=0\n{}", gpu_line(0, 24, 0, "")));
    let three = "lingua_agent_free_slots{kind=\"asr\"} 3";
    tokio::time::timeout(PATIENCE, async {
        while !metrics(port).await.contains(three) {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("slots once NVML initialises");
    assert_eq!(terminate(&mut child, PATIENCE).await.code(), Some(0));
    assert_eq!(fake.calls().last().map(String::as_str), Some("shutdown"));
}

async fn probe_json(config: &str) -> (i32, serde_json::Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.toml");
    std::fs::write(&path, config).unwrap();
    let output = tokio::time::timeout(
        PATIENCE,
        Command::new(bin())
            .args(["probe", "--config", path.to_str().unwrap()])
            .env("LINGUA_LOG", "error")
            .output(),
    )
    .await
    .unwrap()
    .unwrap();
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let doc = serde_json::from_str(&stdout).unwrap_or(serde_json::Value::Null);
    (
        output.status.code().unwrap_or(-1),
        doc,
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

#[tokio::test]
async fn probe_shows_mig_instances_and_unhealthy_reasons() {
    let fake = FakeNvml::new(&format!(
        "init code=0\n{}mig uuid=MIG-a total=19968 used=0\n{}",
        gpu_line(0, 80, 0, "mig=1"),
        gpu_line(1, 80, 0, "ecc=1"),
    ));
    let (code, doc, stderr) = probe_json(&config_text(Some(&fake.lib), "", "")).await;
    assert_eq!(code, 0, "{stderr}");
    assert_eq!(doc["backend"], "nvml");
    let gpus = doc["gpus"].as_array().unwrap();
    assert_eq!(gpus.len(), 2);
    assert_eq!(gpus[0]["uuid"], "MIG-a");
    assert_eq!(gpus[0]["mig_parent_uuid"], "GPU-00000000-fake");
    assert_eq!(gpus[1]["healthy"], false);
    assert!(gpus[1]["reason"].as_str().unwrap().contains("ECC"));
    assert_eq!(doc["jobs"]["asr"]["free_slots"], 3);
    assert_eq!(fake.calls(), ["init", "shutdown"]);
}

#[test]
fn host_probe_reads_every_gpu_and_the_arbiter_admits_by_memory() {
    let fake;
    let config = if real_driver() {
        AgentConfig::parse(&config_text(None, "", "")).unwrap()
    } else {
        fake = FakeNvml::new(&format!(
            "init code=0\n{}{}",
            gpu_line(0, 80, 1000, ""),
            gpu_line(1, 80, 0, "")
        ));
        config(&fake, "")
    };
    let (gpus, arbiter) = read(&config);
    assert!(!gpus.is_empty(), "no GPU read");
    for gpu in &gpus {
        eprintln!("{gpu:?}");
        assert!(
            gpu.uuid.starts_with("GPU-") || gpu.uuid.starts_with("MIG-"),
            "{gpu:?}"
        );
        assert!(gpu.memory_total_mb > 0 && gpu.memory_used_mb <= gpu.memory_total_mb);
        assert!(gpu.healthy, "{gpu:?}");
    }
    // What the arbiter offers matches the memory it read.
    let expected: u64 = gpus
        .iter()
        .map(|g| {
            g.memory_total_mb
                .saturating_sub(1000)
                .saturating_sub(g.memory_used_mb)
                / 6000
        })
        .sum();
    assert_eq!(
        u64::from(arbiter.free_slots()[&kind("asr")]),
        expected.min(64)
    );
    if expected > 0 {
        let permit = arbiter.try_admit(&kind("asr")).unwrap();
        let placed = permit.placement().unwrap();
        assert!(gpus.iter().any(|g| g.uuid == placed.uuid));
    }
}

#[tokio::test]
async fn host_probe_binary_prints_the_gpus() {
    let fake;
    let text = if real_driver() {
        config_text(None, "", "")
    } else {
        fake = FakeNvml::new(&format!("init code=0\n{}", gpu_line(0, 80, 0, "")));
        config_text(Some(&fake.lib), "", "")
    };
    let (code, doc, stderr) = probe_json(&text).await;
    assert_eq!(code, 0, "{stderr}");
    println!("{doc:#}");
    assert_eq!(doc["backend"], "nvml");
    let gpus = doc["gpus"].as_array().unwrap();
    assert!(!gpus.is_empty());
    for gpu in gpus {
        assert!(gpu["memory_total_mb"].as_u64().unwrap() > 0, "{gpu}");
    }
}

/// A node's job side on the fake library: the real sampler, arbiter,
/// `Jobs` and `command` executor, and the metrics it renders.
struct JobNode {
    jobs: Arc<Jobs>,
    handles: Handles,
    results: mpsc::UnboundedReceiver<Outgoing>,
    _status: watch::Sender<LinkStatus>,
    _sampler: gpu::Sampler,
}

/// A `command` kind `asr` declaring 4,000 MiB with a long load time. Each
/// job writes its shell's PID (its process group) to `<dir>/<n>.pid`, `n`
/// being its payload, then waits for a line on the FIFO `<dir>/<n>.go`.
fn command_kind(dir: &Path, extra: &str) -> String {
    let script = format!(
        r#"read -r n || true; echo $$ > {d}/$n.tmp; mv {d}/$n.tmp {d}/$n.pid; read -r go < {d}/$n.go; printf '{{"done": %s}}' "$n""#,
        d = dir.display()
    );
    format!(
        "[jobs.asr]\nvram_mb = 4000\nmax_concurrent = 8\nload_time_ms = 600000\nexecutor = \"command\"\ncommand = [\"sh\", \"-c\", {script:?}]\n{extra}\n"
    )
}

impl JobNode {
    fn start(fake: &FakeNvml, kind: &str) -> Self {
        let text = format!(
            r#"
node_id = "nvml-jobs"
coordinator_url = "ws://127.0.0.1:1/v1/node"
[capabilities]
src_langs = ["zh"]
tgt_langs = ["en"]
[gpu]
backend = "nvml"
reserve_mb = 1000
poll_interval_ms = 20
[gpu.nvml]
library_path = {:?}
{kind}
"#,
            fake.lib.display().to_string()
        );
        let config = AgentConfig::parse(&text).unwrap();
        let arbiter = Arbiter::new(Limits::from_config(&config));
        let sampler = {
            let arbiter = Arc::clone(&arbiter);
            gpu::spawn_sampler(
                gpu::open(&config.gpu, None),
                config.gpu.poll_interval,
                move |r, taken| arbiter.publish(r, taken),
            )
            .unwrap()
        };
        let client = reqwest::Client::new();
        let executors = config
            .jobs
            .iter()
            .map(|(k, c)| {
                let executors = Executors {
                    primary: Arc::new(Executor::new(&c.executor, None, &client)),
                    fallback: None,
                };
                (k.clone(), executors)
            })
            .collect();
        let (tx, results) = mpsc::unbounded_channel();
        let job_metrics = Arc::new(JobMetrics::default());
        let jobs = Jobs::new(
            Arc::clone(&arbiter),
            executors,
            vec!["zh:en".parse().unwrap()],
            (tx, Arc::clone(&job_metrics)),
        );
        let (status, status_rx) = watch::channel(LinkStatus::default());
        Self {
            jobs,
            handles: Handles {
                arbiter,
                status: status_rx,
                job_metrics,
                simulated: None,
            },
            results,
            _status: status,
            _sampler: sampler,
        }
    }

    /// Assigns job `n` and waits for its acceptance.
    async fn assign(&mut self, n: u32) {
        self.jobs.assign(JobAssign {
            job_id: JobId::new(format!("job-{n}")).unwrap(),
            attempt: 1,
            kind: kind("asr"),
            pair: "zh:en".parse().unwrap(),
            session_id: None,
            payload: lingua_shared::RawJson::of(&serde_json::json!(n)),
            timeout_ms: 60_000,
            device: DeviceChoice::Gpu,
            answer_within_ms: None,
        });
        let answer = tokio::time::timeout(PATIENCE, self.results.recv())
            .await
            .unwrap();
        assert!(matches!(answer, Some(Outgoing::Accept(..))), "{answer:?}");
    }

    async fn result(&mut self) -> JobResult {
        match tokio::time::timeout(PATIENCE, self.results.recv()).await {
            Ok(Some(Outgoing::Result(result))) => result,
            other => panic!("expected a result, got {other:?}"),
        }
    }

    fn overruns_metric(&self) -> String {
        metrics::render(&self.handles)
            .lines()
            .find(|l| l.starts_with("lingua_agent_vram_overruns_total{kind=\"asr\"}"))
            .unwrap_or_default()
            .to_owned()
    }

    /// Waits until a reading shows `used_mb` in use on GPU 0.
    async fn reading_shows(&self, used_mb: u64) {
        until(&format!("a reading of {used_mb} MiB"), || {
            self.handles
                .arbiter
                .gpus()
                .first()
                .is_some_and(|g| g.memory_used_mb == used_mb)
        })
        .await;
    }
}

/// Polls `check` every 10 ms until it holds or `PATIENCE` runs out.
async fn until(what: &str, mut check: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !check() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Creates the FIFO job `n` waits on.
fn make_fifo(dir: &Path, n: u32) -> PathBuf {
    let fifo = dir.join(format!("{n}.go"));
    let made = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .unwrap();
    assert!(made.success());
    fifo
}

/// Waits for job `n` to write its PID.
async fn job_pid(dir: &Path, n: u32) -> u32 {
    let file = dir.join(format!("{n}.pid"));
    until("the job's pid", || file.exists()).await;
    std::fs::read_to_string(&file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Lets job `n` finish (on a thread: opening a FIFO blocks until the job
/// reads it).
fn release(fifo: PathBuf) {
    std::thread::spawn(move || std::fs::write(fifo, "go\n"));
}

/// GPU 0 (24 GiB) with `used_mb` in use and these compute processes.
fn one_gpu(used_mb: u64, extra: &str, processes: &[(u32, u64)]) -> String {
    let procs: String = processes
        .iter()
        .map(|(pid, mb)| format!("proc gpu=0 pid={pid} used={mb}\n"))
        .collect();
    format!("init code=0\n{}{procs}", gpu_line(0, 24, used_mb, extra))
}

#[tokio::test]
async fn command_jobs_are_attributed_their_processes_memory_and_overruns_reported() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeNvml::new(&one_gpu(1000, "", &[]));
    let mut node = JobNode::start(&fake, &command_kind(dir.path(), ""));
    node.reading_shows(1000).await;
    let fifo = make_fifo(dir.path(), 1);
    node.assign(1).await;
    let pid = job_pid(dir.path(), 1).await;
    // 24,576 - 1,000 reserve - (1,000 used + 4,000 loading): 4 more.
    assert_eq!(node.handles.arbiter.free_slots()[&kind("asr")], 4);
    // Another process (not in the job's group) holds memory too: it is
    // measured, never attributed to the job.
    let stranger = 1;
    // The job's processes hold its 4,000 MiB, within what it declares.
    fake.set(&one_gpu(5500, "", &[(pid, 4000), (stranger, 500)]));
    node.reading_shows(5500).await;
    // Released early: the measurement holds the job's memory, so the
    // reservation is not counted on top (5,500 + 4,000 would leave 3).
    assert_eq!(node.handles.arbiter.free_slots()[&kind("asr")], 4);
    assert_eq!(
        node.overruns_metric(),
        "lingua_agent_vram_overruns_total{kind=\"asr\"} 0"
    );
    // It grows past its 4,000 MiB: reported, and (warn) it runs on.
    fake.set(&one_gpu(6500, "", &[(pid, 5000), (stranger, 500)]));
    until("the overrun to be counted", || {
        node.overruns_metric() == "lingua_agent_vram_overruns_total{kind=\"asr\"} 1"
    })
    .await;
    release(fifo);
    let result = node.result().await;
    let Outcome::Completed { output } = &result.outcome else {
        panic!("not completed: {:?}", result.outcome)
    };
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(output.get()).unwrap(),
        serde_json::json!({"done": 1})
    );
    assert_eq!(
        node.overruns_metric(),
        "lingua_agent_vram_overruns_total{kind=\"asr\"} 1",
        "one job, counted once"
    );
}

#[tokio::test]
async fn on_vram_overrun_kill_fails_the_job_and_the_node_keeps_serving() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeNvml::new(&one_gpu(1000, "", &[]));
    let mut node = JobNode::start(
        &fake,
        &command_kind(dir.path(), "on_vram_overrun = \"kill\""),
    );
    node.reading_shows(1000).await;
    make_fifo(dir.path(), 1);
    node.assign(1).await;
    let pid = job_pid(dir.path(), 1).await;
    fake.set(&one_gpu(7000, "", &[(pid, 6000)]));
    let result = node.result().await;
    let Outcome::Failed { code, message } = result.outcome else {
        panic!("the job fails: {result:?}")
    };
    assert_eq!(code, FailureCode::ExecutorFailed);
    assert!(
        message.contains("6000 MiB")
            && message.contains("4000 MiB")
            && message.contains("on_vram_overrun = \"kill\""),
        "{message}"
    );
    assert_eq!(
        node.overruns_metric(),
        "lingua_agent_vram_overruns_total{kind=\"asr\"} 1"
    );
    until("the job's process to be killed", || gone(pid)).await;
    assert_eq!(node.handles.arbiter.running(), 0);
    // The node keeps serving: the next job runs to the end.
    fake.set(&one_gpu(1000, "", &[]));
    let fifo = make_fifo(dir.path(), 2);
    node.assign(2).await;
    let pid = job_pid(dir.path(), 2).await;
    fake.set(&one_gpu(4000, "", &[(pid, 3000)]));
    node.reading_shows(4000).await;
    release(fifo);
    let result = node.result().await;
    let Outcome::Completed { output } = &result.outcome else {
        panic!("not completed: {:?}", result.outcome)
    };
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(output.get()).unwrap(),
        serde_json::json!({"done": 2})
    );
    assert_eq!(
        node.overruns_metric(),
        "lingua_agent_vram_overruns_total{kind=\"asr\"} 1"
    );
}

#[tokio::test]
async fn without_per_process_data_a_reservation_waits_for_the_load_time() {
    let dir = tempfile::tempdir().unwrap();
    let fake = FakeNvml::new(&one_gpu(1000, "procs=-1", &[]));
    let mut node = JobNode::start(
        &fake,
        &command_kind(dir.path(), "on_vram_overrun = \"kill\""),
    );
    node.reading_shows(1000).await;
    let fifo = make_fifo(dir.path(), 1);
    node.assign(1).await;
    let pid = job_pid(dir.path(), 1).await;
    // NVML does not list processes here: the job's 5,000 MiB are only in
    // the measurement, its 4,000 MiB stay reserved on top until its load
    // time passes, and nothing can be said about an overrun.
    fake.set(&one_gpu(6000, "procs=-1", &[(pid, 5000)]));
    node.reading_shows(6000).await;
    assert_eq!(node.handles.arbiter.gpus()[0].processes, None);
    // 24,576 - 1,000 - (6,000 + 4,000) = 13,576: 3 more.
    assert_eq!(node.handles.arbiter.free_slots()[&kind("asr")], 3);
    release(fifo);
    assert!(matches!(
        node.result().await.outcome,
        Outcome::Completed { .. }
    ));
    assert_eq!(
        node.overruns_metric(),
        "lingua_agent_vram_overruns_total{kind=\"asr\"} 0"
    );
}

#[test]
fn compute_processes_are_read_with_their_process_groups() {
    let me = std::process::id();
    let fake = FakeNvml::new(&format!(
        "init code=0\n{}mig uuid=MIG-a total=19968 used=0\n{}proc gpu=1 pid={me} used=1500\n",
        gpu_line(0, 80, 0, "mig=1"),
        gpu_line(1, 80, 1500, ""),
    ));
    let (gpus, _) = read(&config(&fake, ""));
    assert_eq!(gpus[0].processes, None, "MIG instances do not list them");
    let listed = gpus[1].processes.as_ref().unwrap();
    assert_eq!(
        listed,
        &[GpuProcess {
            pid: me,
            group: gpu::process_group(me),
            used_mb: 1500
        }]
    );
    assert!(listed[0].group.is_some());
}

/// True once `pid` has exited (or is a zombie waiting to be reaped).
fn gone(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |stat| {
        stat.rsplit(')')
            .next()
            .is_some_and(|rest| rest.trim_start().starts_with('Z'))
    })
}
