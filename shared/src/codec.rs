//! Frames <-> messages.
//!
//! [`decode`] never panics, whatever the bytes: it checks the size first,
//! then the JSON, then the `type`, then the message's fields, and says which
//! step failed with a [`DecodeError`] the receiver can send back as an
//! [`ErrorFrame`](crate::protocol::ErrorFrame).
//!
//! A well-formed frame is read straight from its bytes as the message its
//! `type` names: in one pass when the frame begins with its type (as
//! [`encode`] writes every frame), else after a first pass that reads the
//! `type` alone (borrowed, nothing allocated). Going through a JSON tree,
//! as serde's tagged enums do, allocated every key and value twice; it is
//! kept for frames that fail, to say why.

use std::borrow::Cow;

use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::Value;
use serde_json::value::RawValue;

use crate::protocol::{ErrorCode, Message};

/// The largest frame either side accepts, in bytes (1 MiB). A job payload
/// must fit in one `job_assign` frame with room to spare.
pub const MAX_FRAME_BYTES: usize = 1 << 20;

/// The largest HTTP request body the coordinator reads: a job's body can
/// be no larger than the frame that carries the job to a node.
pub const MAX_REQUEST_BODY_BYTES: usize = MAX_FRAME_BYTES;

/// Read buffer of one WebSocket, either side. Frames are small (a
/// heartbeat is a few hundred bytes, a sentence's result a few more), and
/// a larger one grows the buffer as needed; the libraries' default of
/// 128 KiB would cost a coordinator holding 10,000 node sockets over a
/// gigabyte. tungstenite zeroes the free part of the read buffer before
/// each read, so a smaller one is also less to zero per frame
/// (docs/BENCHMARKS.md).
pub const WS_READ_BUFFER_BYTES: usize = 4 * 1024;

/// How many bytes of frames a WebSocket gathers before it writes them,
/// either side (a flush writes what there is): a batch of small frames
/// goes in one write. The buffer grows only as far as a batch needs.
pub const WS_WRITE_BUFFER_BYTES: usize = 8 * 1024;

/// Why a frame is not a message.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// Over [`MAX_FRAME_BYTES`].
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge {
        /// The frame's size.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// Not valid JSON (truncated, not UTF-8, nested too deep, ...).
    #[error("frame is not valid JSON: {0}")]
    Malformed(#[source] serde_json::Error),
    /// Valid JSON, but not an object.
    #[error("frame must be a JSON object, got {0}")]
    NotAnObject(&'static str),
    /// An object without a string `type` field.
    #[error("frame has no string \"type\" field")]
    MissingType,
    /// A `type` this build does not know.
    #[error("unknown message type {0:?}")]
    UnknownType(String),
    /// A known `type` whose fields are missing, of the wrong type, or invalid
    /// (a bad language code, say).
    #[error("invalid {ty} message: {source}")]
    Invalid {
        /// The message's `type`.
        ty: &'static str,
        /// What serde found wrong.
        #[source]
        source: serde_json::Error,
    },
}

impl DecodeError {
    /// The protocol error code to report for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            DecodeError::Malformed(_) | DecodeError::NotAnObject(_) => ErrorCode::MalformedFrame,
            DecodeError::MissingType | DecodeError::Invalid { .. } => ErrorCode::InvalidMessage,
            DecodeError::UnknownType(_) => ErrorCode::UnknownType,
        }
    }
}

/// Decodes one frame into a message.
pub fn decode(frame: &[u8]) -> Result<Message, DecodeError> {
    if frame.len() > MAX_FRAME_BYTES {
        return Err(DecodeError::TooLarge {
            len: frame.len(),
            max: MAX_FRAME_BYTES,
        });
    }
    fast(frame).map_or_else(|| explain(frame), Ok)
}

/// The `type` of a frame, borrowed from it where it has no escapes.
#[derive(Deserialize)]
struct Tag<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
}

/// How [`encode`] begins every frame: the type comes first.
const TYPE_FIRST: &[u8] = br#"{"type":""#;

/// A well-formed frame of a known type as its message; `None` for any
/// other frame. It must be UTF-8 throughout and a JSON object (serde
/// would also read a struct from an array). A frame that begins as
/// [`encode`] writes it is read by the type it names there, without a
/// first pass to find its `type`. Two differences from the JSON tree, both
/// harmless: unknown fields nested deeper than the tree's 128 levels are
/// skipped here (without recursion) where the tree refuses the frame, and
/// a frame that begins with its type and names another later is read by
/// the first (the tree keeps the last).
fn fast(frame: &[u8]) -> Option<Message> {
    let text = object_text(frame)?;
    if let Some(ty) = leading_type(frame) {
        return typed(frame, ty)?.ok();
    }
    let tag: Tag<'_> = serde_json::from_str(text).ok()?;
    typed(frame, &tag.ty)?.ok()
}

/// The known type a frame names first, when it begins as [`encode`]
/// writes it (`{"type":"<name>"`).
fn leading_type(frame: &[u8]) -> Option<&'static str> {
    let rest = frame.strip_prefix(TYPE_FIRST)?;
    let name = &rest[..rest.iter().position(|&byte| byte == b'"')?];
    Message::TYPES
        .into_iter()
        .find(|known| known.as_bytes() == name)
}

/// A frame read as the message its `type` names (`None`: no type of that
/// name). Straight from the frame's text, never from a `Value`: payloads
/// and outputs are kept as text ([`crate::RawJson`]), which only a reader
/// of text can do.
fn typed(frame: &[u8], ty: &str) -> Option<Result<Message, serde_json::Error>> {
    fn read<T: DeserializeOwned>(
        frame: &[u8],
        message: fn(T) -> Message,
    ) -> Option<Result<Message, serde_json::Error>> {
        Some(serde_json::from_slice(frame).map(message))
    }
    match ty {
        "register" => read(frame, Message::Register),
        "register_ack" => read(frame, Message::RegisterAck),
        "heartbeat" => read(frame, Message::Heartbeat),
        "capacity" => read(frame, Message::Capacity),
        "job_assign" => read(frame, Message::JobAssign),
        "job_accept" => read(frame, Message::JobAccept),
        "job_reject" => read(frame, Message::JobReject),
        "job_result" => read(frame, Message::JobResult),
        "result_ack" => read(frame, Message::ResultAck),
        "job_cancel" => read(frame, Message::JobCancel),
        "drain" => read(frame, Message::Drain),
        "error" => read(frame, Message::Error),
        _ => None,
    }
}

/// The frame as text when it is UTF-8 throughout and a JSON object (serde
/// would also read a struct from an array).
fn object_text(frame: &[u8]) -> Option<&str> {
    let text = std::str::from_utf8(frame).ok()?;
    text.trim_start().starts_with('{').then_some(text)
}

/// A `heartbeat` as its frame has it, its capacity not read.
#[derive(Deserialize)]
struct RawHeartbeat<'a> {
    #[serde(rename = "type", borrow)]
    ty: Cow<'a, str>,
    seq: u64,
    #[serde(borrow)]
    capacity: &'a RawValue,
}

/// A `heartbeat` frame's `seq`, and its capacity as the JSON text the
/// frame holds, not read further: a receiver that has read the same text
/// before need not read it again. `None` for any other frame; for a
/// heartbeat too when its fields do not parse this far (what [`decode`]
/// says of it then is the answer). The capacity's text is valid JSON, not
/// yet a valid [`CapacityReport`](crate::protocol::CapacityReport).
pub fn split_heartbeat(frame: &[u8]) -> Option<(u64, &str)> {
    if frame.len() > MAX_FRAME_BYTES {
        return None;
    }
    let raw: RawHeartbeat<'_> = serde_json::from_str(object_text(frame)?).ok()?;
    (raw.ty == "heartbeat").then(|| (raw.seq, raw.capacity.get()))
}

/// A frame [`fast`] could not read, decoded through a JSON tree: the
/// message, or which step failed.
fn explain(frame: &[u8]) -> Result<Message, DecodeError> {
    let value: Value = serde_json::from_slice(frame).map_err(DecodeError::Malformed)?;
    let object = match &value {
        Value::Object(object) => object,
        other => return Err(DecodeError::NotAnObject(json_kind(other))),
    };
    // A frame that begins with its type is that type, as in `fast`.
    let ty = match leading_type(frame) {
        Some(ty) => ty,
        None => object
            .get("type")
            .and_then(Value::as_str)
            .ok_or(DecodeError::MissingType)?,
    };
    let ty = Message::TYPES
        .into_iter()
        .find(|known| *known == ty)
        .ok_or_else(|| DecodeError::UnknownType(clip(ty)))?;
    match typed(frame, ty) {
        Some(read) => read.map_err(|source| DecodeError::Invalid { ty, source }),
        None => Err(DecodeError::UnknownType(clip(ty))),
    }
}

/// Encodes a message as a JSON text frame.
pub fn encode(message: &Message) -> String {
    // Every field is a string, number, bool, map with string keys or JSON
    // value, so serialisation cannot fail.
    serde_json::to_string(message).expect("protocol messages always serialise")
}

/// The bytes [`encode`] would produce for `value`, counted without
/// building the text.
pub fn encoded_len<T: serde::Serialize>(value: &T) -> usize {
    struct Count(usize);
    impl std::io::Write for Count {
        fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
            self.0 += bytes.len();
            Ok(bytes.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let mut count = Count(0);
    // Writing to a counter cannot fail, and neither can the values this
    // crate serialises (see `encode`).
    let _ = serde_json::to_writer(&mut count, value);
    count.0
}

fn json_kind(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

fn clip(text: &str) -> String {
    text.chars().take(64).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use crate::RawJson;

    use proptest::prelude::*;

    #[test]
    fn encoded_len_counts_what_encode_writes() {
        let message = Message::Error(crate::protocol::ErrorFrame {
            code: ErrorCode::Internal,
            message: "é and \"quotes\"".into(),
        });
        assert_eq!(encoded_len(&message), encode(&message).len());
    }
    use serde_json::json;

    use super::*;
    use crate::bounded::{MAX_REPORTED_DEVICES, MAX_REPORTED_KINDS};
    use crate::ids::{JobId, JobKind, NodeId};
    use crate::protocol::*;

    fn every_message() -> Vec<Message> {
        let job_id = JobId::new("job-1").unwrap();
        let capacity = CapacityReport {
            free_slots: BTreeMap::from([(JobKind::new("translate").unwrap(), 3)]),
            gpus: vec![GpuReading {
                uuid: "GPU-1".into(),
                memory_total_mb: 24576,
                memory_used_mb: 4000,
                utilization_pct: Some(40),
                temperature_c: None,
                healthy: true,
                reason: None,
            }],
            gpu_problem: None,
            room: Some(crate::room::Room {
                devices_mb: vec![19_000],
                vram_mb: BTreeMap::from([(JobKind::new("translate").unwrap(), 3000)]),
            }),
            running: Some(2),
            fallback_slots: BTreeMap::from([(JobKind::new("translate").unwrap(), 1)]),
        };
        vec![
            Message::Register(Register {
                node_id: NodeId::new("gpu-01").unwrap(),
                token: Some(Secret("s3cret".into())),
                protocol: VersionRange::OURS,
                agent_version: "0.1.0".into(),
                instance: "b1c2".into(),
                capabilities: Capabilities {
                    src_langs: vec!["zh".parse().unwrap()],
                    tgt_langs: vec!["en".parse().unwrap()],
                    kinds: vec![JobKind::new("translate").unwrap()],
                },
                gpus: vec![GpuInfo {
                    index: 0,
                    uuid: "GPU-1".into(),
                    name: "Simulated".into(),
                    memory_total_mb: 24576,
                }],
                capacity: capacity.clone(),
                draining: false,
            }),
            Message::RegisterAck(RegisterAck {
                protocol_version: 1,
                epoch: 7,
                heartbeat_interval_ms: 2000,
                pairs: vec!["zh:en".parse().unwrap()],
            }),
            Message::Heartbeat(Heartbeat {
                seq: 3,
                capacity: capacity.clone(),
            }),
            Message::Capacity(capacity),
            Message::JobAssign(JobAssign {
                job_id: job_id.clone(),
                attempt: 1,
                kind: JobKind::new("translate").unwrap(),
                pair: "zh:en".parse().unwrap(),
                session_id: Some("sess".into()),
                payload: RawJson::of(&json!({"text": "你好"})),
                timeout_ms: 30000,
                device: DeviceChoice::Gpu,
                answer_within_ms: Some(2000),
            }),
            Message::JobAccept(JobRef {
                job_id: job_id.clone(),
                attempt: 1,
            }),
            Message::JobReject(JobReject {
                job_id: job_id.clone(),
                attempt: 1,
                reason: RejectReason::NoCapacity,
                message: "full".into(),
            }),
            Message::JobResult(JobResult {
                job_id: job_id.clone(),
                attempt: 1,
                outcome: Outcome::Completed {
                    output: RawJson::of(&json!({"text": "hello"})),
                },
                duration_ms: 12,
                device: Some(Device::Cpu),
            }),
            Message::JobResult(JobResult {
                job_id: job_id.clone(),
                attempt: 2,
                outcome: Outcome::Failed {
                    code: FailureCode::ExecutorFailed,
                    message: "exit 1".into(),
                },
                duration_ms: 5,
                device: None,
            }),
            Message::ResultAck(JobRef {
                job_id: job_id.clone(),
                attempt: 1,
            }),
            Message::JobCancel(JobCancel {
                job_id,
                attempt: 1,
                reason: "timeout".into(),
            }),
            Message::Drain(Drain {
                reason: "maintenance".into(),
            }),
            Message::Error(ErrorFrame {
                code: ErrorCode::UnknownType,
                message: "no".into(),
            }),
        ]
    }

    #[test]
    fn every_message_round_trips() {
        let messages = every_message();
        let mut types: Vec<&str> = messages.iter().map(Message::type_name).collect();
        types.dedup();
        assert_eq!(types, Message::TYPES, "the sample covers every type");
        for message in messages {
            let frame = encode(&message);
            assert_eq!(decode(frame.as_bytes()).unwrap(), message, "{frame}");
        }
    }

    #[test]
    fn a_split_heartbeat_holds_what_decode_reads() {
        let beat = every_message()
            .into_iter()
            .find(|m| matches!(m, Message::Heartbeat(_)))
            .unwrap();
        let Message::Heartbeat(expected) = &beat else {
            unreachable!()
        };
        let capacity = serde_json::to_string(&expected.capacity).unwrap();
        let seq = expected.seq;
        for frame in [
            encode(&beat),
            format!(r#"{{"capacity":{capacity},"seq":{seq},"type":"heartbeat"}}"#),
            format!(r#" {{"type":"heart\u0062eat","x":[1],"seq":{seq},"capacity":{capacity}}}"#),
        ] {
            let (split_seq, text) = split_heartbeat(frame.as_bytes()).expect(&frame);
            assert_eq!(split_seq, seq, "{frame}");
            let read: CapacityReport = serde_json::from_str(text).unwrap();
            assert_eq!(read, expected.capacity, "{frame}");
            assert_eq!(decode(frame.as_bytes()).unwrap(), beat, "{frame}");
        }
        for frame in [
            encode(&Message::Capacity(expected.capacity.clone())),
            format!(r#"{{"type":"heartbeat","seq":-1,"capacity":{capacity}}}"#),
            format!(r#"{{"type":"heartbeat","capacity":{capacity}}}"#),
            format!(r#"{{"type":"heartbeat","seq":1,"seq":2,"capacity":{capacity}}}"#),
            format!(r#"["heartbeat",{seq},{capacity}]"#),
        ] {
            assert_eq!(split_heartbeat(frame.as_bytes()), None, "{frame}");
        }
        let huge = format!(
            r#"{{"type":"heartbeat","seq":1,"capacity":{{"x":"{}"}}}}"#,
            "a".repeat(MAX_FRAME_BYTES)
        );
        assert_eq!(split_heartbeat(huge.as_bytes()), None);
    }

    #[test]
    fn the_fast_path_reads_what_the_json_tree_reads() {
        let mut frames: Vec<String> = every_message().iter().map(encode).collect();
        // Field order, unknown fields, an escaped type, nested unknowns.
        frames.push(r#"{"reason":"x","type":"drain"}"#.into());
        frames.push(r#"{"type":"dr\u0061in","reason":"x"}"#.into());
        frames.push(r#"{"type":"job_accept","job_id":"j","attempt":1,"x":[{"y":null}]}"#.into());
        frames.push(r#"{"type":"drain","type":"drain"}"#.into());
        for frame in &frames {
            let fast = fast(frame.as_bytes());
            assert!(fast.is_some(), "{frame}");
            assert_eq!(fast.unwrap(), explain(frame.as_bytes()).unwrap(), "{frame}");
        }
        // A frame that begins with its type is read by it: a later `type`
        // is an unknown field to that message (the tree keeps the last).
        let twice = br#"{"type":"drain","reason":"x","type":"job_accept"}"#;
        assert!(matches!(fast(twice), Some(Message::Drain(_))));
        assert!(matches!(decode(twice), Ok(Message::Drain(_))));
        // Invalid as its first type, it is that type's error, whatever
        // the later one would make of it.
        for frame in [
            br#"{"type":"drain","reason":5,"type":"job_accept","job_id":"j","attempt":1}"#
                .as_slice(),
            br#"{"type":"drain","reason":5,"type":"job_accept"}"#,
        ] {
            assert!(
                matches!(decode(frame), Err(DecodeError::Invalid { ty: "drain", .. })),
                "{}",
                String::from_utf8_lossy(frame)
            );
        }
        // What the fast path declines, the tree explains.
        let invalid_utf8 = b"{\"type\":\"drain\",\"x\":\"\xff\"}".to_vec();
        for frame in [
            br#"{"type":"teleport"}"#.to_vec(),
            br#"{"type":"drain"#.to_vec(),
            br#"{"type":"job_accept","job_id":"j"}"#.to_vec(),
            br#"[1]"#.to_vec(),
            // serde reads a struct from an array too; the tree does not.
            br#"["drain"]"#.to_vec(),
            br#" ["job_accept", "j", 1]"#.to_vec(),
            invalid_utf8,
        ] {
            let text = String::from_utf8_lossy(&frame);
            assert!(fast(&frame).is_none(), "{text}");
            assert_eq!(
                decode(&frame).map_err(|e| e.code()),
                explain(&frame).map_err(|e| e.code()),
                "{text}"
            );
        }
    }

    #[test]
    fn unknown_fields_are_tolerated() {
        let frame = br#"{"type":"drain","reason":"x","added_in_v2":{"a":1}}"#;
        assert_eq!(
            decode(frame).unwrap(),
            Message::Drain(Drain { reason: "x".into() })
        );
    }

    #[test]
    fn newer_enum_values_map_to_other() {
        let frame = br#"{"type":"job_reject","job_id":"j","attempt":1,"reason":"gpu_on_fire"}"#;
        let Message::JobReject(reject) = decode(frame).unwrap() else {
            panic!("not a reject");
        };
        assert_eq!(reject.reason, RejectReason::Other);
    }

    #[test]
    fn truncated_json_is_malformed() {
        let frame = encode(&every_message()[0]);
        let err = decode(&frame.as_bytes()[..frame.len() / 2]).unwrap_err();
        assert!(matches!(err, DecodeError::Malformed(_)), "{err}");
        assert_eq!(err.code(), ErrorCode::MalformedFrame);
    }

    #[test]
    fn non_objects_and_non_utf8_are_malformed() {
        assert!(matches!(
            decode(b"[1,2]"),
            Err(DecodeError::NotAnObject("an array"))
        ));
        assert!(matches!(decode(b"\"x\""), Err(DecodeError::NotAnObject(_))));
        assert!(matches!(
            decode(b"\xff\xfe{}"),
            Err(DecodeError::Malformed(_))
        ));
        assert!(matches!(decode(b""), Err(DecodeError::Malformed(_))));
    }

    #[test]
    fn deep_nesting_is_an_error_not_a_stack_overflow() {
        let frame = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
        assert!(matches!(
            decode(frame.as_bytes()),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn missing_and_unknown_types() {
        assert!(matches!(
            decode(br#"{"seq":1}"#),
            Err(DecodeError::MissingType)
        ));
        assert!(matches!(
            decode(br#"{"type":7}"#),
            Err(DecodeError::MissingType)
        ));
        let err = decode(br#"{"type":"launch_missiles"}"#).unwrap_err();
        assert!(matches!(&err, DecodeError::UnknownType(t) if t == "launch_missiles"));
        assert_eq!(err.code(), ErrorCode::UnknownType);
    }

    #[test]
    fn wrong_field_types_are_invalid() {
        let err = decode(br#"{"type":"heartbeat","seq":"three","capacity":{"free_slots":{}}}"#)
            .unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::Invalid {
                    ty: "heartbeat",
                    ..
                }
            ),
            "{err}"
        );
        let err = decode(br#"{"type":"job_accept","job_id":"j"}"#).unwrap_err();
        assert!(err.to_string().contains("attempt"), "{err}");
    }

    #[test]
    fn invalid_language_codes_are_invalid_messages() {
        let mut value = serde_json::to_value(&every_message()[4]).unwrap();
        for bad in ["ZH:en", "zh-CN:en", "zh:zh", "zhen", ""] {
            value["pair"] = json!(bad);
            let err = decode(value.to_string().as_bytes()).unwrap_err();
            assert!(
                matches!(
                    err,
                    DecodeError::Invalid {
                        ty: "job_assign",
                        ..
                    }
                ),
                "{bad}: {err}"
            );
            assert_eq!(err.code(), ErrorCode::InvalidMessage);
        }
        let mut register = serde_json::to_value(&every_message()[0]).unwrap();
        register["capabilities"]["src_langs"] = json!(["english"]);
        let err = decode(register.to_string().as_bytes()).unwrap_err();
        assert!(err.to_string().contains("english"), "{err}");
    }

    #[test]
    fn capacity_reports_list_a_bounded_number_of_devices_and_kinds() {
        let kinds = |n: usize| -> serde_json::Map<String, serde_json::Value> {
            (0..n).map(|i| (format!("k{i}"), json!(1000))).collect()
        };
        let devices = |n: usize| vec![json!(1000); n];
        let gpus = |n: usize| {
            let reading = serde_json::to_value(&every_message()[3]).unwrap()["gpus"][0].clone();
            vec![reading; n]
        };
        let report = |free: usize,
                      devices_mb: Vec<serde_json::Value>,
                      vram: usize,
                      gpus: Vec<serde_json::Value>| {
            json!({"type": "capacity", "free_slots": kinds(free), "gpus": gpus,
                   "room": {"devices_mb": devices_mb, "vram_mb": kinds(vram)},
                   "fallback_slots": kinds(free)})
        };
        let at_limit = report(
            MAX_REPORTED_KINDS,
            devices(MAX_REPORTED_DEVICES),
            MAX_REPORTED_KINDS,
            gpus(MAX_REPORTED_DEVICES),
        );
        let decoded = decode(at_limit.to_string().as_bytes());
        assert!(matches!(decoded, Ok(Message::Capacity(_))), "{decoded:?}");
        let over = [
            report(MAX_REPORTED_KINDS + 1, devices(1), 1, gpus(1)),
            report(1, devices(MAX_REPORTED_DEVICES + 1), 1, gpus(1)),
            report(1, devices(1), MAX_REPORTED_KINDS + 1, gpus(1)),
            report(1, devices(1), 1, gpus(MAX_REPORTED_DEVICES + 1)),
        ];
        for frame in over {
            let err = decode(frame.to_string().as_bytes()).unwrap_err();
            assert!(
                matches!(err, DecodeError::Invalid { ty: "capacity", .. }),
                "{err}"
            );
            assert!(err.to_string().contains("where at most"), "{err}");
            assert_eq!(err.code(), ErrorCode::InvalidMessage);
        }
        let mut register = serde_json::to_value(&every_message()[0]).unwrap();
        let info = register["gpus"][0].clone();
        register["gpus"] = json!(vec![info; MAX_REPORTED_DEVICES + 1]);
        let err = decode(register.to_string().as_bytes()).unwrap_err();
        assert!(
            matches!(err, DecodeError::Invalid { ty: "register", .. }),
            "{err}"
        );
        let mut heartbeat = serde_json::to_value(&every_message()[2]).unwrap();
        heartbeat["capacity"]["room"] = json!({"devices_mb": devices(100_000), "vram_mb": {}});
        let err = decode(heartbeat.to_string().as_bytes()).unwrap_err();
        assert!(
            matches!(
                err,
                DecodeError::Invalid {
                    ty: "heartbeat",
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn oversize_frames_are_refused_before_parsing() {
        let frame = vec![b' '; MAX_FRAME_BYTES + 1];
        let err = decode(&frame).unwrap_err();
        assert!(matches!(
            err,
            DecodeError::TooLarge { len, max } if len == MAX_FRAME_BYTES + 1 && max == MAX_FRAME_BYTES
        ));
        assert_eq!(err.code(), ErrorCode::FrameTooLarge);
    }

    /// Mutations of valid frames: the likeliest shapes of a buggy peer.
    fn mutated_frame() -> impl Strategy<Value = Vec<u8>> {
        let frames: Vec<Vec<u8>> = every_message()
            .iter()
            .map(|m| encode(m).into_bytes())
            .collect();
        (
            proptest::sample::select(frames),
            any::<prop::sample::Index>(),
            any::<prop::sample::Index>(),
            any::<u8>(),
        )
            .prop_map(|(mut frame, cut, at, byte)| {
                let at = at.index(frame.len());
                frame[at] = byte;
                frame.truncate(cut.index(frame.len() + 1));
                frame
            })
    }

    fn arbitrary_json() -> impl Strategy<Value = Value> {
        let leaf = prop_oneof![
            Just(Value::Null),
            any::<bool>().prop_map(Value::from),
            any::<i64>().prop_map(Value::from),
            any::<f64>().prop_map(|f| json!(f)),
            "[a-z_]{0,12}".prop_map(Value::from),
            proptest::sample::select(Message::TYPES.to_vec()).prop_map(Value::from),
        ];
        leaf.prop_recursive(4, 64, 8, |inner| {
            prop_oneof![
                prop::collection::vec(inner.clone(), 0..8).prop_map(Value::Array),
                prop::collection::btree_map(
                    prop_oneof![
                        Just("type".to_owned()),
                        Just("job_id".to_owned()),
                        Just("attempt".to_owned()),
                        Just("capacity".to_owned()),
                        "[a-z_]{1,10}",
                    ],
                    inner,
                    0..8
                )
                .prop_map(|m| Value::Object(m.into_iter().collect())),
            ]
        })
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(10_000))]

        #[test]
        fn arbitrary_bytes_never_panic(bytes in prop::collection::vec(any::<u8>(), 0..512)) {
            let _ = decode(&bytes);
        }

        #[test]
        fn arbitrary_json_never_panics(value in arbitrary_json()) {
            let _ = decode(value.to_string().as_bytes());
        }

        #[test]
        fn mutated_frames_never_panic_and_valid_ones_round_trip(frame in mutated_frame()) {
            if let Ok(message) = decode(&frame) {
                prop_assert_eq!(decode(encode(&message).as_bytes()).unwrap(), message);
            }
        }
    }
}
