//! The agent's configuration (packaging/agent.toml), unknown keys rejected,
//! every value validated with a message naming the field and its line.
//!
//! Keys beyond the original contract, all optional:
//! `[gpu] poll_interval_ms`, `pressure_enter_pct`, `pressure_exit_pct`,
//! `pressure_min_priority`, `devices`, `stale_after_ms`;
//! `[gpu.nvml] library_path`, `ignored_xids`;
//! `[jobs.<kind>] busy`, `queue_wait_ms`, `load_time_ms`, `on_vram_overrun`,
//! `[jobs.<kind>.fallback]`
//! (the kind tables are read in `config/kind.rs`, their executor keys in
//! `config/executor.rs`, the `[gpu]` table in `config/gpu.rs`);
//! `[jobs.<kind>.simulated] actual_vram_mb`, `utilization_pct`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use lingua_shared::config_check::ConfigError;
use lingua_shared::config_check::{self, Checker};
use lingua_shared::{JobKind, LangCode, NodeId};
use serde::Deserialize;
use toml::Spanned;

mod executor;
mod gpu;
mod kind;

pub use executor::ExecutorConfig;
pub use gpu::{
    Backend, DEFAULT_IGNORED_XIDS, DeviceSelector, GpuConfig, NvmlConfig, Pressure, SimulatedGpus,
};
use gpu::{RawGpu, gpu_config};
pub use kind::{Busy, Fallback, KindConfig, OverrunAction};
use kind::{RawKind, kind_config};

/// Where the agent looks for its config without `--config`.
pub const DEFAULT_CONFIG_PATH: &str = "/etc/lingua/agent.toml";
/// The coordinator URL without configuration.
pub const DEFAULT_COORDINATOR_URL: &str = "ws://127.0.0.1:7700/v1/node";

/// A validated agent configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentConfig {
    /// The node's id.
    pub node_id: NodeId,
    /// The coordinators' node endpoints, `ws://` or `wss://`, tried in
    /// turn (several instances behind no load balancer, or a fallback).
    pub coordinator_urls: Vec<String>,
    /// The node token.
    pub token: Option<String>,
    /// A CA to trust for `wss://`.
    pub ca_file: Option<PathBuf>,
    /// Whether the system's roots are trusted besides `ca_file` (always
    /// without one).
    pub system_roots: bool,
    /// How long SIGTERM waits for running jobs.
    pub drain_timeout: Duration,
    /// Where to serve this agent's Prometheus metrics.
    pub metrics_listen: Option<SocketAddr>,
    /// Languages recognised.
    pub src_langs: Vec<LangCode>,
    /// Languages produced.
    pub tgt_langs: Vec<LangCode>,
    /// GPU settings.
    pub gpu: GpuConfig,
    /// The kinds served.
    pub jobs: BTreeMap<JobKind, KindConfig>,
}

/// `coordinator_url`: one URL, or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum UrlList {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    node_id: Option<Spanned<String>>,
    coordinator_url: Option<Spanned<UrlList>>,
    token: Option<String>,
    token_file: Option<Spanned<PathBuf>>,
    ca_file: Option<Spanned<PathBuf>>,
    system_roots: Option<Spanned<bool>>,
    drain_timeout_ms: Option<Spanned<u64>>,
    metrics_listen: Option<Spanned<String>>,
    capabilities: Option<RawCapabilities>,
    #[serde(default)]
    gpu: RawGpu,
    #[serde(default)]
    jobs: BTreeMap<Spanned<String>, RawKind>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCapabilities {
    src_langs: Spanned<Vec<String>>,
    tgt_langs: Spanned<Vec<String>>,
}

impl AgentConfig {
    /// Reads and validates a config file. `token_file` is read relative to
    /// the working directory, like every other path.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        Self::parse(&config_check::read(path)?)
    }

    /// Parses and validates TOML text.
    pub fn parse(source: &str) -> Result<Self, ConfigError> {
        let raw: RawConfig = config_check::parse(source)?;
        let check = Checker::new(source);
        let node_id = match raw.node_id {
            Some(id) => {
                let span = id.span();
                NodeId::new(id.into_inner())
                    .map_err(|e| check.invalid("node_id", span, e.to_string()))?
            }
            None => default_node_id()?,
        };
        let coordinator_urls = coordinator_urls(check, raw.coordinator_url)?;
        let token = token(check, raw.token, raw.token_file)?;
        let metrics_listen = metrics_listen(check, raw.metrics_listen)?;
        let Some(capabilities) = raw.capabilities else {
            return Err(ConfigError::invalid(
                "capabilities",
                "the [capabilities] table with src_langs and tgt_langs is required",
            ));
        };
        let src_langs = languages(check, "capabilities.src_langs", capabilities.src_langs)?;
        let tgt_langs = languages(check, "capabilities.tgt_langs", capabilities.tgt_langs)?;
        let gpu = gpu_config(check, raw.gpu)?;
        let jobs = kinds(check, raw.jobs, gpu.backend)?;
        let (system_roots, ca_file) = trust(check, raw.system_roots, raw.ca_file)?;
        Ok(AgentConfig {
            node_id,
            coordinator_urls,
            token,
            system_roots,
            ca_file,
            drain_timeout: Duration::from_millis(check.range(
                "drain_timeout_ms",
                raw.drain_timeout_ms,
                30_000,
                0..=3_600_000,
            )?),
            metrics_listen,
            src_langs,
            tgt_langs,
            gpu,
            jobs,
        })
    }

    /// The kinds served, sorted.
    pub fn kinds(&self) -> Vec<JobKind> {
        self.jobs.keys().cloned().collect()
    }
}

/// `coordinator_url`: one or more `ws://` or `wss://` URLs.
fn coordinator_urls(
    check: Checker<'_>,
    value: Option<Spanned<UrlList>>,
) -> Result<Vec<String>, ConfigError> {
    let Some(urls) = value else {
        return Ok(vec![DEFAULT_COORDINATOR_URL.to_owned()]);
    };
    let span = urls.span();
    let urls = match urls.into_inner() {
        UrlList::One(url) => vec![url],
        UrlList::Many(urls) => urls,
    };
    if urls.is_empty() {
        return Err(check.invalid(
            "coordinator_url",
            span,
            format!("list at least one coordinator, like [\"{DEFAULT_COORDINATOR_URL}\"]"),
        ));
    }
    if let Some(url) = urls
        .iter()
        .find(|url| !(url.starts_with("ws://") || url.starts_with("wss://")))
    {
        return Err(check.invalid(
            "coordinator_url",
            span,
            format!("{url:?} must start with ws:// or wss://, like \"{DEFAULT_COORDINATOR_URL}\""),
        ));
    }
    Ok(urls)
}

/// The node token: `token`, or read from `token_file`, not both.
fn token(
    check: Checker<'_>,
    token: Option<String>,
    file: Option<Spanned<PathBuf>>,
) -> Result<Option<String>, ConfigError> {
    let file = match (token, file) {
        (Some(_), Some(file)) => {
            return Err(check.invalid(
                "token_file",
                file.span(),
                "set token or token_file, not both",
            ));
        }
        (token, None) => return Ok(token),
        (None, Some(file)) => file,
    };
    let span = file.span();
    let path = file.into_inner();
    let text = std::fs::read_to_string(&path).map_err(|e| {
        check.invalid(
            "token_file",
            span.clone(),
            format!("cannot read {}: {e}", path.display()),
        )
    })?;
    let token = text.trim().to_owned();
    if token.is_empty() {
        return Err(check.invalid("token_file", span, format!("{} is empty", path.display())));
    }
    Ok(Some(token))
}

/// `metrics_listen`: an address to serve the agent's `/metrics` on.
fn metrics_listen(
    check: Checker<'_>,
    value: Option<Spanned<String>>,
) -> Result<Option<SocketAddr>, ConfigError> {
    let Some(addr) = value else {
        return Ok(None);
    };
    let span = addr.span();
    addr.get_ref().parse().map(Some).map_err(|_| {
        check.invalid(
            "metrics_listen",
            span,
            format!(
                "{:?} is not an address; write it as \"127.0.0.1:9471\"",
                addr.get_ref()
            ),
        )
    })
}

/// The `[jobs.<kind>]` tables: at least one.
fn kinds(
    check: Checker<'_>,
    raw: BTreeMap<Spanned<String>, RawKind>,
    backend: Backend,
) -> Result<BTreeMap<JobKind, KindConfig>, ConfigError> {
    if raw.is_empty() {
        return Err(ConfigError::invalid(
            "jobs",
            "no job kinds: add at least one [jobs.<kind>] table, like [jobs.translate]",
        ));
    }
    let mut jobs = BTreeMap::new();
    for (name, kind) in raw {
        let span = name.span();
        let name = name.into_inner();
        let kind_id = JobKind::new(name.as_str())
            .map_err(|e| check.invalid(format!("jobs.{name}"), span.clone(), e.to_string()))?;
        let kind = kind_config(check, &name, span, kind, backend)?;
        jobs.insert(kind_id, kind);
    }
    Ok(jobs)
}

/// Whether the system's roots are trusted, and the CA file trusted
/// besides (or instead).
fn trust(
    check: Checker<'_>,
    system_roots: Option<Spanned<bool>>,
    ca_file: Option<Spanned<PathBuf>>,
) -> Result<(bool, Option<PathBuf>), ConfigError> {
    let system_roots = match (&system_roots, &ca_file) {
        (Some(roots), None) if !*roots.get_ref() => {
            return Err(check.invalid(
                "system_roots",
                roots.span(),
                "system_roots = false needs a ca_file to trust instead",
            ));
        }
        (Some(roots), _) => *roots.get_ref(),
        (None, _) => true,
    };
    let Some(file) = ca_file else {
        return Ok((system_roots, None));
    };
    let span = file.span();
    let path = file.into_inner();
    config_check::check_ca_file(&path)
        .map_err(|message| check.invalid("ca_file", span, message))?;
    Ok((system_roots, Some(path)))
}

fn default_node_id() -> Result<NodeId, ConfigError> {
    let host = nix::unistd::gethostname().map_err(|e| {
        ConfigError::invalid(
            "node_id",
            format!("not set, and the hostname cannot be read ({e}); set node_id"),
        )
    })?;
    let host = host.to_string_lossy();
    NodeId::new(host.as_ref()).map_err(|e| {
        ConfigError::invalid(
            "node_id",
            format!("not set, and the hostname is not a valid node id ({e}); set node_id"),
        )
    })
}

fn languages(
    check: Checker<'_>,
    field: &str,
    value: Spanned<Vec<String>>,
) -> Result<Vec<LangCode>, ConfigError> {
    let span = value.span();
    let codes = value.into_inner();
    if codes.is_empty() {
        return Err(check.invalid(field, span, "list at least one language, like [\"en\"]"));
    }
    codes
        .iter()
        .map(|code| {
            code.parse().map_err(|e: lingua_shared::LangError| {
                check.invalid(field, span.clone(), e.to_string())
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPEC_EXAMPLE: &str = r#"
node_id = "gpu-host-01"
coordinator_url = "ws://127.0.0.1:7700/v1/node"
token = "long-random-secret"
drain_timeout_ms = 30000
metrics_listen = "127.0.0.1:9471"

[capabilities]
src_langs = ["zh", "en"]
tgt_langs = ["en", "zh", "ja"]

[gpu]
backend = "simulated"
reserve_mb = 1024
[gpu.simulated]
count = 1
memory_mb = 24576
external_used_mb = 0

[jobs.translate]
vram_mb = 2000
priority = 50
max_concurrent = 16
executor = "simulated"
[jobs.translate.simulated]
duration_ms = 150
"#;

    #[test]
    fn the_spec_example_parses() {
        let config = AgentConfig::parse(SPEC_EXAMPLE).unwrap();
        assert_eq!(config.node_id.as_str(), "gpu-host-01");
        assert_eq!(config.gpu.backend, Backend::Simulated);
        let translate = &config.jobs[&JobKind::new("translate").unwrap()];
        assert_eq!(translate.max_concurrent, 16);
        assert_eq!(
            translate.executor,
            ExecutorConfig::Simulated {
                duration: Duration::from_millis(150),
                actual_vram_mb: 2000,
                utilization_pct: 10,
            }
        );
        assert_eq!(
            config.metrics_listen,
            Some("127.0.0.1:9471".parse().unwrap())
        );
    }

    fn error(source: &str) -> String {
        AgentConfig::parse(source).unwrap_err().to_string()
    }

    #[test]
    fn errors_name_the_field_and_line() {
        let bad_kind = SPEC_EXAMPLE.replace("max_concurrent = 16", "max_concurrent = 0");
        let text = error(&bad_kind);
        assert!(
            text.contains("jobs.translate.max_concurrent (line 23)"),
            "{text}"
        );
        let bad_lang = SPEC_EXAMPLE.replace("[\"zh\", \"en\"]", "[\"zh\", \"EN\"]");
        assert!(error(&bad_lang).contains("capabilities.src_langs (line 9)"));
        let bad_backend = SPEC_EXAMPLE.replace("\"simulated\"\nreserve", "\"cuda\"\nreserve");
        assert!(error(&bad_backend).contains("gpu.backend (line 13)"));
        let unknown = SPEC_EXAMPLE.replace("priority = 50", "priority = 50\nprio = 1");
        let text = error(&unknown);
        assert!(text.contains("prio") && text.contains("line 23"), "{text}");
        let url = SPEC_EXAMPLE.replace("ws://127.0.0.1:7700/v1/node", "http://x");
        assert!(error(&url).contains("coordinator_url (line 3)"));
    }

    #[test]
    fn coordinator_url_is_one_url_or_a_list() {
        let one = AgentConfig::parse(SPEC_EXAMPLE).unwrap();
        assert_eq!(one.coordinator_urls, ["ws://127.0.0.1:7700/v1/node"]);
        let list = SPEC_EXAMPLE.replace(
            "\"ws://127.0.0.1:7700/v1/node\"",
            "[\"ws://10.0.0.1:7700/v1/node\", \"wss://10.0.0.2:7700/v1/node\"]",
        );
        assert_eq!(
            AgentConfig::parse(&list).unwrap().coordinator_urls,
            ["ws://10.0.0.1:7700/v1/node", "wss://10.0.0.2:7700/v1/node"]
        );
        let empty = SPEC_EXAMPLE.replace("\"ws://127.0.0.1:7700/v1/node\"", "[]");
        assert!(
            error(&empty).contains("at least one coordinator"),
            "{}",
            error(&empty)
        );
        let bad = SPEC_EXAMPLE.replace(
            "\"ws://127.0.0.1:7700/v1/node\"",
            "[\"ws://a/v1/node\", \"http://b\"]",
        );
        assert!(
            error(&bad).contains("\"http://b\" must start with ws://"),
            "{}",
            error(&bad)
        );
    }

    #[test]
    fn executors_need_their_settings() {
        let http = SPEC_EXAMPLE.replace("executor = \"simulated\"", "executor = \"http\"");
        assert!(
            error(&http).contains("jobs.translate.url"),
            "{}",
            error(&http)
        );
        let command = SPEC_EXAMPLE.replace(
            "executor = \"simulated\"",
            "executor = \"command\"\ncommand = []",
        );
        assert!(error(&command).contains("jobs.translate.command"));
        let good = SPEC_EXAMPLE.replace(
            "executor = \"simulated\"",
            "executor = \"http\"\nurl = \"http://127.0.0.1:8001/translate\"\ntimeout_ms = 500",
        );
        let config = AgentConfig::parse(&good).unwrap();
        assert!(matches!(
            &config.jobs[&JobKind::new("translate").unwrap()].executor,
            ExecutorConfig::Http { timeout, .. } if *timeout == Duration::from_millis(500)
        ));
    }

    #[test]
    fn only_simulated_gpus_may_leave_the_executor_out() {
        let unnamed = SPEC_EXAMPLE.replace("executor = \"simulated\"\n", "");
        let config = AgentConfig::parse(&unnamed).unwrap();
        assert!(matches!(
            config.jobs[&JobKind::new("translate").unwrap()].executor,
            ExecutorConfig::Simulated { .. }
        ));
        for backend in ["nvml", "none"] {
            let real =
                unnamed.replace("backend = \"simulated\"", &format!("backend = {backend:?}"));
            let message = error(&real);
            assert!(
                message.contains("jobs.translate.executor (line 20)")
                    && message.contains(&format!("with backend = \"{backend}\""))
                    && message.contains("made-up output"),
                "{message}"
            );
            let named =
                SPEC_EXAMPLE.replace("backend = \"simulated\"", &format!("backend = {backend:?}"));
            AgentConfig::parse(&named).unwrap();
        }
        let fallback = SPEC_EXAMPLE
            .replace("backend = \"simulated\"", "backend = \"nvml\"")
            .replace(
                "[jobs.translate.simulated]",
                "busy = \"fallback\"\n[jobs.translate.fallback]\nmax_concurrent = 2\n[jobs.translate.simulated]",
            );
        let message = error(&fallback);
        assert!(
            message.contains("jobs.translate.fallback.executor"),
            "{message}"
        );
    }

    #[test]
    fn real_gpus_need_each_kind_to_state_its_memory() {
        let nvml = SPEC_EXAMPLE.replace("backend = \"simulated\"", "backend = \"nvml\"");
        AgentConfig::parse(&nvml).unwrap();
        let unstated = nvml.replace("vram_mb = 2000\n", "");
        let message = error(&unstated);
        assert!(
            message.contains("jobs.translate.vram_mb (line 20)")
                && message.contains("with backend = \"nvml\"")
                && message.contains("probe"),
            "{message}"
        );
        let none = nvml.replace("vram_mb = 2000\n", "vram_mb = 0\n");
        let translate =
            &AgentConfig::parse(&none).unwrap().jobs[&JobKind::new("translate").unwrap()];
        assert_eq!(translate.vram_mb, 0, "stated as none, it is none");
        for backend in ["simulated", "none"] {
            let other = unstated.replace("backend = \"nvml\"", &format!("backend = {backend:?}"));
            AgentConfig::parse(&other).unwrap();
        }
    }

    #[test]
    fn required_parts_and_cross_field_rules() {
        assert!(error("[jobs.asr]\n").contains("capabilities"));
        let no_jobs = "[capabilities]\nsrc_langs = [\"zh\"]\ntgt_langs = [\"en\"]\n";
        assert!(error(no_jobs).contains("[jobs.<kind>]"));
        let both = SPEC_EXAMPLE.replace(
            "token = \"long-random-secret\"",
            "token = \"x\"\ntoken_file = \"/tmp/t\"",
        );
        assert!(error(&both).contains("token_file (line 5)"));
        let flat = SPEC_EXAMPLE.replace(
            "reserve_mb = 1024",
            "reserve_mb = 1024\npressure_enter_pct = 70\npressure_exit_pct = 80",
        );
        assert!(error(&flat).contains("hysteresis"));
        let bad_kind = SPEC_EXAMPLE
            .replace("[jobs.translate]", "[jobs.Translate]")
            .replace("[jobs.translate.simulated]", "[jobs.Translate.simulated]");
        assert!(error(&bad_kind).contains("jobs.Translate"));
    }

    #[test]
    fn token_file_is_read_and_trimmed() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.token");
        std::fs::write(&path, "  secret-from-file-123\n").unwrap();
        let source = SPEC_EXAMPLE.replace(
            "token = \"long-random-secret\"",
            &format!("token_file = {:?}", path.display().to_string()),
        );
        let config = AgentConfig::parse(&source).unwrap();
        assert_eq!(config.token.as_deref(), Some("secret-from-file-123"));
    }

    #[test]
    fn gpu_devices_nvml_and_load_time_are_validated() {
        let gpu = |extra: &str| {
            SPEC_EXAMPLE.replace(
                "reserve_mb = 1024\n",
                &format!("reserve_mb = 1024\n{extra}\n"),
            )
        };
        let config = AgentConfig::parse(&gpu("devices = [1, \"GPU-abc\", \"MIG-def\"]")).unwrap();
        assert_eq!(
            config.gpu.devices,
            [
                DeviceSelector::Index(1),
                DeviceSelector::Uuid("GPU-abc".into()),
                DeviceSelector::Uuid("MIG-def".into())
            ]
        );
        assert_eq!(config.gpu.nvml.ignored_xids, DEFAULT_IGNORED_XIDS);
        assert_eq!(config.gpu.stale_after, Duration::from_millis(2500));
        let text = error(&gpu("devices = [\"gpu0\"]"));
        assert!(
            text.contains("gpu.devices (line 15)") && text.contains("nvidia-smi -L"),
            "{text}"
        );
        assert!(error(&gpu("devices = [-1]")).contains("gpu.devices"));
        assert!(error(&gpu("devices = []")).contains("at least one GPU"));
        assert!(error(&gpu("stale_after_ms = 100")).contains("gpu.stale_after_ms"));
        let nvml = SPEC_EXAMPLE.replace(
            "[gpu.simulated]",
            "[gpu.nvml]\nlibrary_path = \"/opt/nvidia/libnvidia-ml.so.1\"\nignored_xids = [13]\n[gpu.simulated]",
        );
        let config = AgentConfig::parse(&nvml).unwrap();
        assert_eq!(
            config.gpu.nvml.library_path.as_deref(),
            Some(Path::new("/opt/nvidia/libnvidia-ml.so.1"))
        );
        assert_eq!(config.gpu.nvml.ignored_xids, [13]);
        let typo = nvml.replace("ignored_xids", "ignore_xids");
        assert!(error(&typo).contains("ignore_xids"));
        let empty = nvml.replace("\"/opt/nvidia/libnvidia-ml.so.1\"", "\"\"");
        assert!(error(&empty).contains("gpu.nvml.library_path"));
        let translate =
            &AgentConfig::parse(SPEC_EXAMPLE).unwrap().jobs[&JobKind::new("translate").unwrap()];
        assert_eq!(
            translate.load_time,
            Duration::ZERO,
            "simulated: one reading"
        );
        let command = SPEC_EXAMPLE.replace(
            "executor = \"simulated\"",
            "executor = \"command\"\ncommand = [\"/bin/model\"]",
        );
        let config = AgentConfig::parse(&command).unwrap();
        assert_eq!(
            config.jobs[&JobKind::new("translate").unwrap()].load_time,
            Duration::from_secs(10)
        );
        let url = SPEC_EXAMPLE.replace(
            "executor = \"simulated\"",
            "executor = \"http\"\nurl = \"http://127.0.0.1:8000/{gpu}/asr\"",
        );
        assert!(
            error(&url).contains("{gpu} is not a placeholder"),
            "{}",
            error(&url)
        );
    }

    #[test]
    fn on_vram_overrun_is_warn_or_kill() {
        let translate = JobKind::new("translate").unwrap();
        let config = AgentConfig::parse(SPEC_EXAMPLE).unwrap();
        assert_eq!(config.jobs[&translate].on_vram_overrun, OverrunAction::Warn);
        let kill =
            SPEC_EXAMPLE.replace("priority = 50", "priority = 50\non_vram_overrun = \"kill\"");
        let config = AgentConfig::parse(&kill).unwrap();
        assert_eq!(config.jobs[&translate].on_vram_overrun, OverrunAction::Kill);
        let text = error(&kill.replace("\"kill\"", "\"stop\""));
        assert!(
            text.contains("jobs.translate.on_vram_overrun (line 23)")
                && text.contains("\"warn\" (the default) or \"kill\""),
            "{text}"
        );
    }
}
