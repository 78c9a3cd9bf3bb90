//! Pieces for the real speech fleet (`lingua-demo --speech`, the speech
//! test): the programs and node configs of `examples/speech/`, the Debian
//! packages they need, an English "microphone" (espeak-ng), a WAV reader,
//! the HTTP translate service as a child process, and job submission.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

/// The Python the programs run with (Debian's, as the node configs say).
pub const PYTHON: &str = "/usr/bin/python3";
/// What the speech programs need: a program on PATH or a file, and the
/// Debian package that provides it.
const NEEDS: [(&str, &str); 7] = [
    (PYTHON, "python3"),
    ("pocketsphinx_continuous", "pocketsphinx"),
    ("/usr/share/pocketsphinx/model/en-us", "pocketsphinx-en-us"),
    ("apertium", "apertium"),
    ("/usr/share/apertium/modes/eng-spa.mode", "apertium-en-es"),
    ("espeak-ng", "espeak-ng"),
    ("sox", "sox"),
];
/// The coordinator URL in the example node configs.
const EXAMPLE_COORDINATOR: &str = "ws://127.0.0.1:7700/v1/node";
/// The translate service URL in `gpu-node.toml`.
const EXAMPLE_SERVICE: &str = "http://127.0.0.1:8001/translate";

/// `examples/speech/` of this checkout.
pub fn examples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap_or(Path::new("/"))
        .join("examples")
        .join("speech")
}

fn on_path(program: &str) -> bool {
    if program.starts_with('/') {
        return Path::new(program).exists();
    }
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Checks that the speech programs can run here.
///
/// # Errors
/// A message naming each missing package and the command that installs
/// them all.
pub fn check_packages() -> Result<(), String> {
    let missing: Vec<String> = NEEDS
        .iter()
        .filter(|(what, _)| !on_path(what))
        .map(|(what, package)| format!("{package} (no {what})"))
        .collect();
    if !examples_dir().join("asr.py").is_file() {
        return Err(format!(
            "the speech programs are not at {}: run from a checkout of lingua-fleet",
            examples_dir().display()
        ));
    }
    if missing.is_empty() {
        return Ok(());
    }
    let packages: Vec<&str> = NEEDS.iter().map(|(_, package)| *package).collect();
    Err(format!(
        "the speech programs need Debian packages that are missing: {}. Install them with: \
         sudo apt-get install {}",
        missing.join(", "),
        packages.join(" ")
    ))
}

/// The agent config `file` of `examples/speech/` (`cpu-node.toml`,
/// `gpu-node.toml`) made to run from anywhere: it connects to
/// `coordinator` (a `ws://` URL), runs the programs of this checkout and
/// reaches the translate service at `service` (when it uses one).
///
/// # Errors
/// When the file cannot be read or no longer holds what is replaced.
pub fn node_config(file: &str, coordinator: &str, service: Option<&str>) -> Result<String, String> {
    let path = examples_dir().join(file);
    let mut text =
        std::fs::read_to_string(&path).map_err(|e| format!("read {}: {e}", path.display()))?;
    let programs = format!("\"{}/", examples_dir().display());
    let mut replace = vec![
        (EXAMPLE_COORDINATOR, coordinator),
        ("\"examples/speech/", programs.as_str()),
    ];
    if let Some(service) = service {
        replace.push((EXAMPLE_SERVICE, service));
    }
    for (from, to) in replace {
        if !text.contains(from) {
            return Err(format!("{} no longer holds {from:?}", path.display()));
        }
        text = text.replace(from, to);
    }
    Ok(text)
}

/// English speech for `text` from espeak-ng, as WAV bytes (16 kHz, mono,
/// 16-bit): the "microphone". The same text gives the same bytes (sox
/// dithers with a fixed seed).
///
/// # Errors
/// When espeak-ng or sox fails.
pub async fn microphone(text: &str) -> Result<Vec<u8>, String> {
    let dir = tempfile::tempdir().map_err(|e| format!("a temporary directory: {e}"))?;
    let spoken = dir.path().join("spoken.wav");
    let wav = dir.path().join("16k.wav");
    let espeak = ["-v", "en-us", "-s", "130", "-w"];
    let sox = ["-R", "-r", "16000", "-c", "1", "-b", "16"];
    run(
        "espeak-ng",
        Command::new("espeak-ng")
            .args(espeak)
            .arg(&spoken)
            .arg(text),
    )
    .await?;
    run("sox", Command::new("sox").arg(&spoken).args(sox).arg(&wav)).await?;
    std::fs::read(&wav).map_err(|e| format!("read {}: {e}", wav.display()))
}

async fn run(name: &str, command: &mut Command) -> Result<(), String> {
    let output = command
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| format!("start {name}: {e}"))?;
    if output.status.success() {
        return Ok(());
    }
    Err(format!(
        "{name} {}: {}",
        output.status,
        String::from_utf8_lossy(&output.stderr).trim()
    ))
}

/// What a WAV file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Wav {
    /// Samples per second.
    pub sample_rate: u32,
    /// Channels.
    pub channels: u16,
    /// Bits per sample.
    pub bits: u16,
    /// Length of the sound.
    pub duration: Duration,
}

/// Reads the header of a PCM WAV file and the length of its data.
///
/// # Errors
/// When `bytes` is not a PCM WAV file.
pub fn read_wav(bytes: &[u8]) -> Result<Wav, String> {
    if bytes.len() < 12 || &bytes[..4] != b"RIFF" || &bytes[8..12] != b"WAVE" {
        return Err("not a RIFF/WAVE file".into());
    }
    let u16_at = |at: usize| u16::from_le_bytes([bytes[at], bytes[at + 1]]);
    let u32_at =
        |at: usize| u32::from_le_bytes([bytes[at], bytes[at + 1], bytes[at + 2], bytes[at + 3]]);
    let mut format = None;
    let mut at = 12;
    while at + 8 <= bytes.len() {
        let (id, len) = (&bytes[at..at + 4], u32_at(at + 4) as usize);
        let body = at + 8;
        match id {
            b"fmt " if len >= 16 && body + 16 <= bytes.len() => {
                if u16_at(body) != 1 {
                    return Err(format!("not PCM (format {})", u16_at(body)));
                }
                format = Some((u16_at(body + 2), u32_at(body + 4), u16_at(body + 14)));
            }
            b"data" => {
                let Some((channels, sample_rate, bits)) = format else {
                    return Err("data before the fmt chunk".into());
                };
                if len > bytes.len() - body {
                    return Err(format!(
                        "the data chunk says {len} bytes, the file holds fewer"
                    ));
                }
                let frame = u64::from(channels) * u64::from(bits / 8);
                if frame == 0 || sample_rate == 0 {
                    return Err("a format with no samples".into());
                }
                let frames = len as u64 / frame;
                return Ok(Wav {
                    sample_rate,
                    channels,
                    bits,
                    duration: Duration::from_millis(frames * 1000 / u64::from(sample_rate)),
                });
            }
            _ => {}
        }
        at = body + len + len % 2;
    }
    Err("no data chunk".into())
}

/// Base64 text of `bytes`.
pub fn base64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// The bytes of base64 `text`.
///
/// # Errors
/// When `text` is not base64.
pub fn unbase64(text: &str) -> Result<Vec<u8>, String> {
    STANDARD
        .decode(text)
        .map_err(|e| format!("not base64: {e}"))
}

/// `examples/speech/translate_service.py` on a free local port, stopped
/// when dropped.
pub struct TranslateService {
    /// Its `/translate` URL.
    pub url: String,
    _child: Child,
}

impl TranslateService {
    /// Starts the service and waits until it listens.
    ///
    /// # Errors
    /// When it does not start or does not say where it listens.
    pub async fn start() -> Result<Self, String> {
        let mut child = Command::new(PYTHON)
            .arg(examples_dir().join("translate_service.py"))
            .arg("0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("start translate_service.py: {e}"))?;
        let stdout = child
            .stdout
            .take()
            .ok_or("translate_service.py has no stdout")?;
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .await
            .map_err(|e| format!("read translate_service.py's stdout: {e}"))?;
        let base = line
            .trim()
            .strip_prefix("listening on ")
            .ok_or_else(|| format!("translate_service.py said {line:?}, not where it listens"))?;
        Ok(Self {
            url: format!("{base}/translate"),
            _child: child,
        })
    }
}

/// One job of the speech fleet, for [`submit`].
#[derive(Debug, Clone, Copy)]
pub struct Step<'a> {
    /// `asr`, `translate` or `tts`.
    pub kind: &'a str,
    /// The speaker's session: its steps stay on one node while it has room.
    pub session: &'a str,
    /// Source language of the utterance.
    pub src_lang: &'a str,
    /// Target language.
    pub tgt_lang: &'a str,
    /// Time limit of the job, in ms.
    pub timeout_ms: u64,
}

/// Submits a job to the coordinator at `base` (`http://host:port`) and
/// waits for its answer (the job view: `status`, `output` or `error`,
/// `node_id`, `latency_ms`).
///
/// # Errors
/// When the coordinator does not answer with JSON.
pub async fn submit(
    http: &reqwest::Client,
    base: &str,
    step: Step<'_>,
    payload: Value,
) -> Result<Value, String> {
    let body = json!({
        "kind": step.kind,
        "src_lang": step.src_lang,
        "tgt_lang": step.tgt_lang,
        "session_id": step.session,
        "payload": payload,
        "timeout_ms": step.timeout_ms,
    });
    http.post(format!("{base}/v1/jobs"))
        .json(&body)
        .send()
        .await
        .map_err(|e| format!("submit a {} job: {e}", step.kind))?
        .json()
        .await
        .map_err(|e| format!("the answer to a {} job: {e}", step.kind))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wav(channels: u16, rate: u32, samples: u32) -> Vec<u8> {
        let data = samples * 2 * u32::from(channels);
        let mut bytes = b"RIFF".to_vec();
        bytes.extend((36 + data).to_le_bytes());
        bytes.extend(b"WAVEfmt ");
        bytes.extend(16u32.to_le_bytes());
        bytes.extend(1u16.to_le_bytes());
        bytes.extend(channels.to_le_bytes());
        bytes.extend(rate.to_le_bytes());
        bytes.extend((rate * 2 * u32::from(channels)).to_le_bytes());
        bytes.extend((2 * channels).to_le_bytes());
        bytes.extend(16u16.to_le_bytes());
        bytes.extend(b"data");
        bytes.extend(data.to_le_bytes());
        bytes.resize(bytes.len() + data as usize, 0);
        bytes
    }

    #[test]
    fn reads_a_wav_header_and_its_length() {
        assert_eq!(
            read_wav(&wav(1, 16000, 24000)),
            Ok(Wav {
                sample_rate: 16000,
                channels: 1,
                bits: 16,
                duration: Duration::from_millis(1500)
            })
        );
        let mut truncated = wav(1, 16000, 100);
        truncated.truncate(60);
        assert!(read_wav(&truncated).unwrap_err().contains("fewer"));
        assert!(read_wav(b"garbage bytes").is_err());
        assert_eq!(unbase64(&base64(b"\x00\xffwav")).unwrap(), b"\x00\xffwav");
    }

    #[test]
    fn the_example_configs_are_made_to_run_from_anywhere() {
        let text = node_config(
            "gpu-node.toml",
            "ws://127.0.0.1:1/v1/node",
            Some("http://x/t"),
        )
        .unwrap();
        assert!(text.contains("ws://127.0.0.1:1/v1/node") && text.contains("http://x/t"));
        assert!(!text.contains("\"examples/speech/"), "{text}");
        lingua_agent::config::AgentConfig::parse(&text).unwrap();
        let text = node_config("cpu-node.toml", "ws://127.0.0.1:1/v1/node", None).unwrap();
        lingua_agent::config::AgentConfig::parse(&text).unwrap();
    }
}
