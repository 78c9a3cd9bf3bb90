//! `lingua-demo --speech`: real speech through the fleet. Two agents run
//! the programs of `examples/speech/` (a CPU-only node, and a simulated-GPU
//! node whose translation is an HTTP service); espeak-ng speaks English
//! sentences as the microphone; each utterance goes through asr ->
//! translate (en -> es) -> tts with one session per speaker, and the
//! Spanish speech is written as WAV files.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use lingua_agent::config::AgentConfig;
use lingua_shared::process::Exit;
use lingua_tests::speech::{
    Step, TranslateService, base64, microphone, node_config, read_wav, submit, unbase64,
};
use lingua_tools::percentile;
use serde_json::{Value, json};

use crate::DemoAgent;

/// What the speakers say, in turn.
const SENTENCES: [&str; 4] = [
    "I need to go to the hospital.",
    "We are going to the market tomorrow morning.",
    "The children are playing in the garden.",
    "The house is very big.",
];
const STEPS: [&str; 3] = ["asr", "translate", "tts"];

/// One step of one utterance, as it went.
struct StepRun {
    node: String,
    latency_ms: u64,
    model_ms: u64,
}

/// One utterance, as it went.
struct Done {
    speaker: usize,
    spoken: &'static str,
    transcript: String,
    translation: String,
    audio: Duration,
    file: PathBuf,
    steps: Vec<StepRun>,
}

/// Starts the nodes on the coordinator at `addr`, runs the speakers and
/// prints what each utterance became.
pub async fn run(
    addr: std::net::SocketAddr,
    utterances: u32,
    speakers: u32,
    out: &Path,
) -> ExitCode {
    if let Err(err) = std::fs::create_dir_all(out) {
        eprintln!("lingua-demo: cannot create {}: {err}", out.display());
        return Exit::Usage.into();
    }
    let service = match TranslateService::start().await {
        Ok(service) => service,
        Err(err) => {
            eprintln!("lingua-demo: {err}");
            return Exit::Unavailable.into();
        }
    };
    let ws = format!("ws://{addr}/v1/node");
    let configs = [
        node_config("cpu-node.toml", &ws, None),
        node_config("gpu-node.toml", &ws, Some(&service.url)),
    ];
    let mut agents = Vec::new();
    for config in configs {
        let config = config.and_then(|text| AgentConfig::parse(&text).map_err(|e| e.to_string()));
        match config.and_then(|c| DemoAgent::start(c).map_err(|e| e.to_string())) {
            Ok(agent) => agents.push(agent),
            Err(err) => {
                eprintln!("lingua-demo: cannot start a speech node: {err}");
                return Exit::Internal.into();
            }
        }
    }
    let registered = tokio::time::timeout(Duration::from_secs(15), async {
        for agent in &agents {
            let _ = agent.handles.status.clone().wait_for(|s| s.connected).await;
        }
    })
    .await;
    let code = if registered.is_err() {
        eprintln!("lingua-demo: the speech nodes did not register within 15 s");
        Exit::Internal.into()
    } else {
        println!(
            "lingua-demo: speech nodes cpu-speech-01 (command executors) and gpu-speech-01 \
             (translate over HTTP at {}) registered; {speakers} speakers, {utterances} utterances",
            service.url
        );
        speak(addr, utterances, speakers, out).await
    };
    for agent in agents {
        agent.stop();
    }
    code
}

async fn speak(addr: std::net::SocketAddr, utterances: u32, speakers: u32, out: &Path) -> ExitCode {
    let started = Instant::now();
    let http = reqwest::Client::new();
    let base = format!("http://{addr}");
    let mut tasks = Vec::new();
    for speaker in 0..speakers as usize {
        let turns: Vec<usize> = (speaker..utterances as usize)
            .step_by(speakers as usize)
            .collect();
        let (http, base, out) = (http.clone(), base.clone(), out.to_path_buf());
        tasks.push(tokio::spawn(async move {
            let mut results = Vec::new();
            for turn in turns {
                let result = utterance(&http, &base, speaker, turn, &out).await;
                match &result {
                    Ok(done) => print_done(done),
                    Err(err) => println!("speaker {speaker}, utterance {turn}: FAILED: {err}"),
                }
                results.push(result);
            }
            results
        }));
    }
    let mut done = Vec::new();
    let mut failed = 0;
    for task in tasks {
        for result in task.await.unwrap_or_default() {
            match result {
                Ok(utterance) => done.push(utterance),
                Err(_) => failed += 1,
            }
        }
    }
    summary(&done, started.elapsed());
    if failed == 0 && done.len() == utterances as usize {
        println!(
            "every utterance was translated; Spanish speech in {}",
            out.display()
        );
        ExitCode::SUCCESS
    } else {
        println!(
            "{} of {utterances} utterances failed",
            utterances as usize - done.len()
        );
        Exit::Internal.into()
    }
}

async fn utterance(
    http: &reqwest::Client,
    base: &str,
    speaker: usize,
    turn: usize,
    out: &Path,
) -> Result<Done, String> {
    let spoken = SENTENCES[turn % SENTENCES.len()];
    let session = format!("speaker-{speaker}");
    let wav = microphone(spoken).await?;
    let mut steps = Vec::new();
    let step = |kind| Step {
        kind,
        session: &session,
        src_lang: "en",
        tgt_lang: "es",
        timeout_ms: 60_000,
    };
    let asr = run_step(
        http,
        base,
        step("asr"),
        json!({"audio": base64(&wav), "lang": "en"}),
        &mut steps,
    )
    .await?;
    let transcript = text(&asr, "text")?;
    let payload = json!({"text": transcript, "src_lang": "en", "tgt_lang": "es"});
    let mt = run_step(http, base, step("translate"), payload, &mut steps).await?;
    let translation = text(&mt, "text")?;
    let tts = run_step(
        http,
        base,
        step("tts"),
        json!({"text": translation, "lang": "es"}),
        &mut steps,
    )
    .await?;
    let audio = unbase64(&text(&tts, "audio")?)?;
    let wav = read_wav(&audio).map_err(|e| format!("the TTS output: {e}"))?;
    let file = out.join(format!("utterance-{turn:02}-speaker-{speaker}.es.wav"));
    std::fs::write(&file, &audio).map_err(|e| format!("write {}: {e}", file.display()))?;
    Ok(Done {
        speaker,
        spoken,
        transcript,
        translation,
        audio: wav.duration,
        file,
        steps,
    })
}

fn text(output: &Value, field: &str) -> Result<String, String> {
    output[field]
        .as_str()
        .map(str::to_owned)
        .ok_or_else(|| format!("the output has no {field:?}: {output}"))
}

async fn run_step(
    http: &reqwest::Client,
    base: &str,
    step: Step<'_>,
    payload: Value,
    steps: &mut Vec<StepRun>,
) -> Result<Value, String> {
    let answer = submit(http, base, step, payload).await?;
    if answer["status"] != "completed" {
        return Err(format!("{}: {}", step.kind, answer["error"]));
    }
    let output = answer["output"].clone();
    steps.push(StepRun {
        node: answer["node_id"].as_str().unwrap_or("?").to_owned(),
        latency_ms: answer["latency_ms"].as_u64().unwrap_or(0),
        model_ms: output["model_ms"].as_u64().unwrap_or(0),
    });
    Ok(output)
}

fn print_done(done: &Done) {
    let steps: Vec<String> = STEPS
        .iter()
        .zip(&done.steps)
        .map(|(kind, step)| format!("{kind} {} ms on {}", step.latency_ms, step.node))
        .collect();
    println!(
        "speaker {} said  {:?}\n  transcript   {:?}\n  translation  {:?}\n  speech       {:.1} s in {}\n  latency      {}",
        done.speaker,
        done.spoken,
        done.transcript,
        done.translation,
        done.audio.as_secs_f64(),
        done.file.display(),
        steps.join(", ")
    );
}

fn summary(done: &[Done], elapsed: Duration) {
    println!();
    println!(
        "summary ({} utterances in {:.1} s, {:.2} utterances/s)",
        done.len(),
        elapsed.as_secs_f64(),
        done.len() as f64 / elapsed.as_secs_f64().max(0.001)
    );
    println!(
        "  {:<10} {:>12} {:>12} {:>12} {:>14}",
        "step", "latency p50", "mean", "model mean", "fleet overhead"
    );
    for (i, kind) in STEPS.iter().enumerate() {
        let mut latency: Vec<u64> = done.iter().map(|d| d.steps[i].latency_ms).collect();
        latency.sort_unstable();
        if latency.is_empty() {
            continue;
        }
        let mean = |v: &mut dyn Iterator<Item = u64>| v.sum::<u64>() / done.len() as u64;
        let mean_latency = mean(&mut latency.iter().copied());
        let mean_model = mean(&mut done.iter().map(|d| d.steps[i].model_ms));
        println!(
            "  {:<10} {:>9} ms {:>9} ms {:>9} ms {:>11} ms",
            kind,
            percentile(&latency, 0.50),
            mean_latency,
            mean_model,
            mean_latency.saturating_sub(mean_model)
        );
    }
    println!(
        "  (latency: the coordinator's, submit to result; model: the program's own time; overhead: the difference, i.e. Python start-up, process spawn, agent and coordinator)"
    );
}
