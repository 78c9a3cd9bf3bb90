//! The real speech fleet: `redis-server`, the `lingua-coordinator` and
//! `lingua-agent` binaries, the node configs and programs of
//! `examples/speech/` (pocketsphinx, apertium, espeak-ng, sox). An English
//! sentence spoken by espeak-ng goes through ASR -> translate (en -> es)
//! -> TTS; bad input and broken model programs fail their job with a clear
//! error while the node keeps serving.
//!
//! These tests need the Debian packages `.ci/run` installs; without them
//! they fail with the command that installs them.

use std::path::Path;
use std::time::Duration;

use lingua_coordinator::private_redis::PrivateRedis;
use lingua_tests::fleet::{
    CoordinatorProcess, FAST_COORDINATOR, free_local_addr, spawn_agent, workspace_binary,
};
use lingua_tests::speech::{
    Step, TranslateService, Wav, base64, check_packages, microphone, node_config, read_wav, submit,
    unbase64,
};
use lingua_tests::{eventually, redis};
use serde_json::{Value, json};
use tokio::process::Child;

/// What the microphone says.
const SENTENCE: &str = "I need to go to the hospital.";
/// Far beyond what a step takes (about a second on a small machine): the
/// CI machine is shared and may be slow.
const JOB_TIMEOUT_MS: u64 = 120_000;

/// A coordinator and agents running the speech programs.
struct SpeechFleet {
    coordinator: CoordinatorProcess,
    http: reqwest::Client,
    _agents: Vec<Child>,
    _service: Option<TranslateService>,
    _redis: PrivateRedis,
    _dir: tempfile::TempDir,
}

impl SpeechFleet {
    /// Starts one agent per config text (made by `config` from the
    /// coordinator's URL and the translate service's) and waits until the
    /// coordinator shows them all ready.
    async fn start(configs: &[fn(&str, &str) -> String]) -> Self {
        check_packages().unwrap_or_else(|e| panic!("{e}"));
        let dir = tempfile::tempdir().unwrap();
        let redis = redis().await;
        let coordinator =
            CoordinatorProcess::start(dir.path(), &redis, free_local_addr(), FAST_COORDINATOR)
                .await
                .unwrap_or_else(|e| panic!("{e}"));
        let service = TranslateService::start()
            .await
            .unwrap_or_else(|e| panic!("{e}"));
        let agents = configs
            .iter()
            .enumerate()
            .map(|(i, config)| {
                let text = config(&coordinator.ws_url(), &service.url);
                start_agent(dir.path(), &format!("agent-{i}.toml"), &text)
            })
            .collect();
        let fleet = Self {
            coordinator,
            http: reqwest::Client::new(),
            _agents: agents,
            _service: Some(service),
            _redis: redis,
            _dir: dir,
        };
        let wanted = configs.len();
        eventually("the speech nodes to be ready", || async {
            let nodes = fleet.get("/v1/nodes").await?;
            let ready = nodes["nodes"]
                .as_array()?
                .iter()
                .filter(|node| node["state"] == "ready")
                .count();
            (ready == wanted).then_some(())
        })
        .await;
        fleet
    }

    async fn get(&self, path: &str) -> Option<Value> {
        let response = self
            .http
            .get(self.coordinator.url(path))
            .send()
            .await
            .ok()?;
        response.json().await.ok()
    }

    /// Runs one job for speaker `session` of the en -> `tgt` pair and
    /// returns the coordinator's answer.
    async fn job(&self, kind: &str, session: &str, tgt: &str, payload: Value) -> Value {
        let step = Step {
            kind,
            session,
            src_lang: "en",
            tgt_lang: tgt,
            timeout_ms: JOB_TIMEOUT_MS,
        };
        submit(&self.http, &self.coordinator.url(""), step, payload)
            .await
            .unwrap_or_else(|e| panic!("{e}"))
    }

    /// Like [`SpeechFleet::job`] for en -> es, asserting it completed;
    /// returns its output and node.
    async fn completed(&self, kind: &str, session: &str, payload: Value) -> (Value, String) {
        let answer = self.job(kind, session, "es", payload).await;
        assert_eq!(answer["status"], "completed", "{kind}: {answer}");
        (
            answer["output"].clone(),
            answer["node_id"].as_str().unwrap().to_owned(),
        )
    }

    /// Fails the test unless the answer is a failed job with `code` and a
    /// message holding each of `words`.
    fn assert_failed(answer: &Value, code: &str, words: &[&str]) {
        assert_eq!(answer["status"], "failed", "{answer}");
        assert_eq!(answer["error"]["code"], code, "{answer}");
        let message = answer["error"]["message"].as_str().unwrap();
        for word in words {
            assert!(message.contains(word), "{word:?} not in {message:?}");
        }
    }

    /// The known sentence through translate: the expected Spanish words.
    async fn translates_the_known_sentence(&self, session: &str) {
        let payload = json!({"text": SENTENCE, "src_lang": "en", "tgt_lang": "es"});
        let (output, _) = self.completed("translate", session, payload).await;
        let text = output["text"].as_str().unwrap().to_lowercase();
        assert!(
            text.contains("necesito") && text.contains("hospital"),
            "{output}"
        );
    }
}

/// The `lingua-demo` binary of the `lingua-tools` crate, built beside this
/// test by `cargo test --workspace`.
fn demo() -> std::path::PathBuf {
    workspace_binary("lingua-demo").unwrap_or_else(|e| panic!("{e}"))
}

fn start_agent(dir: &Path, name: &str, config: &str) -> Child {
    spawn_agent(&dir.join(name), config).unwrap_or_else(|e| panic!("{e}"))
}

fn cpu_node(coordinator: &str, _service: &str) -> String {
    node_config("cpu-node.toml", coordinator, None).unwrap()
}

fn gpu_node(coordinator: &str, service: &str) -> String {
    node_config("gpu-node.toml", coordinator, Some(service)).unwrap()
}

/// The CPU node that also claims French (espeak-ng speaks it, apertium
/// cannot translate into it), with two broken model programs: one that
/// crashes, one that hangs.
fn cpu_node_with_broken_kinds(coordinator: &str, service: &str) -> String {
    let config = cpu_node(coordinator, service);
    assert!(config.contains("tgt_langs = [\"es\"]"));
    config.replace("tgt_langs = [\"es\"]", "tgt_langs = [\"es\", \"fr\"]")
        + r#"
[jobs.crash]
executor = "command"
command = ["sh", "-c", "echo 'decoder: segmentation fault' >&2; kill -SEGV $$"]
[jobs.hang]
executor = "command"
command = ["sleep", "3600"]
timeout_ms = 2000
"#
}

/// What one utterance became.
struct Utterance {
    transcript: String,
    translation: String,
    speech: Wav,
    nodes: Vec<String>,
}

/// Speaks [`SENTENCE`] and sends it through asr -> translate -> tts as
/// speaker `session`.
async fn utterance(fleet: &SpeechFleet, session: &str) -> Utterance {
    let wav = microphone(SENTENCE).await.unwrap_or_else(|e| panic!("{e}"));
    let (asr, asr_node) = fleet
        .completed("asr", session, json!({"audio": base64(&wav), "lang": "en"}))
        .await;
    let transcript = asr["text"].as_str().unwrap().to_owned();
    let payload = json!({"text": transcript, "src_lang": "en", "tgt_lang": "es"});
    let (mt, mt_node) = fleet.completed("translate", session, payload).await;
    let translation = mt["text"].as_str().unwrap().to_owned();
    let (tts, tts_node) = fleet
        .completed("tts", session, json!({"text": translation, "lang": "es"}))
        .await;
    let audio = unbase64(tts["audio"].as_str().unwrap()).unwrap();
    Utterance {
        transcript,
        translation,
        speech: read_wav(&audio).unwrap_or_else(|e| panic!("the TTS output: {e}")),
        nodes: vec![asr_node, mt_node, tts_node],
    }
}

fn assert_plausible(utterance: &Utterance) {
    let Utterance {
        transcript,
        translation,
        speech,
        ..
    } = utterance;
    // pocketsphinx's general model mishears espeak-ng's voice now and
    // then; some of the sentence's words come through.
    let heard = ["need", "go", "hospital"]
        .iter()
        .filter(|word| {
            transcript
                .to_lowercase()
                .split_whitespace()
                .any(|w| w == **word)
        })
        .count();
    assert!(heard >= 1, "transcript {transcript:?} of {SENTENCE:?}");
    assert!(
        !translation.trim().is_empty(),
        "translation of {transcript:?}"
    );
    assert_eq!(
        (speech.sample_rate, speech.channels, speech.bits),
        (16000, 1, 16),
        "{speech:?}"
    );
    // espeak-ng speaks a few words a second: a sentence of a few words is
    // between half a second and ten.
    assert!(
        speech.duration >= Duration::from_millis(500) && speech.duration <= Duration::from_secs(10),
        "{speech:?} for {translation:?}"
    );
}

#[tokio::test]
async fn an_utterance_goes_through_command_executors_end_to_end() {
    let fleet = SpeechFleet::start(&[cpu_node]).await;
    let spoken = utterance(&fleet, "speaker-1").await;
    assert_plausible(&spoken);
    assert!(
        spoken.nodes.iter().all(|n| n == "cpu-speech-01"),
        "{:?}",
        spoken.nodes
    );
    fleet.translates_the_known_sentence("speaker-1").await;
}

#[tokio::test]
async fn an_utterance_goes_through_the_http_service_end_to_end() {
    let fleet = SpeechFleet::start(&[gpu_node]).await;
    let spoken = utterance(&fleet, "speaker-1").await;
    assert_plausible(&spoken);
    assert!(
        spoken.nodes.iter().all(|n| n == "gpu-speech-01"),
        "{:?}",
        spoken.nodes
    );
    fleet.translates_the_known_sentence("speaker-1").await;
    // The service answers 400 with its reason; the job fails with it.
    let payload = json!({"text": SENTENCE, "src_lang": "en", "tgt_lang": "de"});
    let answer = fleet.job("translate", "speaker-1", "es", payload).await;
    SpeechFleet::assert_failed(
        &answer,
        "executor_failed",
        &["400", "no translation model for en -> de"],
    );
}

#[tokio::test]
async fn a_session_keeps_its_steps_on_one_node() {
    let fleet = SpeechFleet::start(&[cpu_node, gpu_node]).await;
    let spoken = utterance(&fleet, "speaker-1").await;
    assert_plausible(&spoken);
    assert!(
        spoken.nodes.iter().all(|n| *n == spoken.nodes[0]),
        "one session, one node while it has room: {:?}",
        spoken.nodes
    );
}

#[tokio::test]
async fn bad_input_and_broken_programs_fail_clearly_and_the_node_keeps_serving() {
    let fleet = SpeechFleet::start(&[cpu_node_with_broken_kinds]).await;
    let asr = |audio: &str| json!({"audio": audio, "lang": "en"});
    let answer = fleet.job("asr", "s", "es", asr("")).await;
    SpeechFleet::assert_failed(&answer, "executor_failed", &["bad input: audio is empty"]);
    let garbage = base64(b"\x00\x01 these bytes are not a WAV file \xff\xfe");
    let answer = fleet.job("asr", "s", "es", asr(&garbage)).await;
    SpeechFleet::assert_failed(
        &answer,
        "executor_failed",
        &["bad input: audio is not a WAV file"],
    );
    let answer = fleet.job("asr", "s", "es", asr("%%% not base64 %%%")).await;
    SpeechFleet::assert_failed(
        &answer,
        "executor_failed",
        &["bad input: audio is not base64"],
    );

    // The node serves en -> fr (for its TTS), its translator cannot.
    let payload = json!({"text": SENTENCE, "src_lang": "en", "tgt_lang": "fr"});
    let answer = fleet.job("translate", "s", "fr", payload).await;
    SpeechFleet::assert_failed(
        &answer,
        "executor_failed",
        &["no translation model for en -> fr"],
    );

    let answer = fleet.job("crash", "s", "es", json!({})).await;
    SpeechFleet::assert_failed(
        &answer,
        "executor_failed",
        &["SIGSEGV", "segmentation fault"],
    );
    let answer = fleet.job("hang", "s", "es", json!({})).await;
    SpeechFleet::assert_failed(&answer, "timeout", &["sleep", "killed"]);

    fleet.translates_the_known_sentence("s").await;
    let node = fleet.get("/v1/nodes/cpu-speech-01").await.unwrap();
    assert_eq!(node["state"], "ready", "{node}");
}

#[tokio::test]
async fn the_speech_demo_translates_each_utterance() {
    check_packages().unwrap_or_else(|e| panic!("{e}"));
    let out = tempfile::tempdir().unwrap();
    let output = tokio::time::timeout(
        Duration::from_secs(300),
        tokio::process::Command::new(demo())
            .args(["--speech", "--utterances", "2", "--out"])
            .arg(out.path())
            .output(),
    )
    .await
    .expect("the demo finishes")
    .expect("the demo starts");
    let stdout = String::from_utf8_lossy(&output.stdout);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(0), "{stdout}\n{stderr}");
    for expected in [
        "transcript",
        "translation",
        "latency",
        "every utterance was translated",
    ] {
        assert!(
            stdout.contains(expected),
            "{expected:?} missing from:\n{stdout}"
        );
    }
    let files: Vec<_> = std::fs::read_dir(out.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
    for file in files {
        let wav = read_wav(&std::fs::read(&file).unwrap()).unwrap();
        assert_eq!(wav.sample_rate, 16000, "{}", file.display());
    }
}

#[tokio::test]
async fn the_speech_demo_names_a_missing_package() {
    let output = tokio::process::Command::new(demo())
        .arg("--speech")
        .env("PATH", "/nonexistent")
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(69), "{stderr}");
    assert!(
        stderr.contains("espeak-ng (no espeak-ng)") && stderr.contains("apt-get install"),
        "{stderr}"
    );
}
