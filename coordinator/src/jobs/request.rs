//! A job as submitted: the request body, its validation, its canonical
//! form (idempotency and ownership) and the size of its assignment frame.

use super::*;
use crate::config::DEFAULT_PRIORITY;

/// The body of `POST /v1/jobs`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobRequest {
    /// Client-chosen id (idempotency key); generated when absent.
    pub id: Option<String>,
    /// Job kind.
    pub kind: String,
    /// Source language.
    pub src_lang: String,
    /// Target language.
    pub tgt_lang: String,
    /// Session, for affinity.
    pub session_id: Option<String>,
    /// Opaque input, kept as the text it came as.
    #[serde(default)]
    pub payload: RawJson,
    /// Time limit; the config's default when absent.
    pub timeout_ms: Option<u64>,
    /// Order in the admission queue, 0-100 (higher first); 50 when absent.
    pub priority: Option<u8>,
    /// Whom the fair share of the admission queue counts it for; the
    /// client token when absent.
    pub tenant: Option<String>,
    /// Where it may run: `"gpu"` only, or `"any"` (the default): a kind's
    /// fallback executor too, once no node of the pair has GPU room.
    pub device: Option<String>,
}

/// The longest job timeout, in ms (one hour).
const MAX_TIMEOUT_MS: u64 = 3_600_000;
/// The longest tenant name.
pub const MAX_TENANT_LEN: usize = 64;

/// A validated job.
#[derive(Debug, Clone)]
pub struct Job {
    /// Its id.
    pub id: JobId,
    /// Its kind.
    pub kind: JobKind,
    /// Its pair.
    pub pair: LangPair,
    /// Its session.
    pub session: Option<String>,
    /// Its payload, as the client wrote it.
    pub payload: RawJson,
    /// Its time limit.
    pub timeout: Duration,
    /// When it must end, when that was set before its dispatch here (a
    /// job taken on or over: its record's deadline); else its timeout
    /// from its dispatch's start.
    pub deadline: Option<Instant>,
    /// Who submitted it: a client token's fingerprint, empty for admins.
    pub owner: String,
    /// Its place in the admission queue, 0-100 (higher first).
    pub priority: u8,
    /// Whom the admission queue's fair share counts it for, within its
    /// owner's share (its owner when it names none).
    pub tenant: String,
    /// Where it may run.
    pub device: DeviceChoice,
    /// The priority it named, as named, and whether it named its tenant:
    /// what of them the canonical request holds (whatever the priority it
    /// waits at).
    explicit: (Option<u8>, bool),
}

impl Job {
    /// Validates a request; the error text says which field is wrong.
    pub fn from_request(
        request: JobRequest,
        default_timeout: Duration,
        owner: String,
    ) -> Result<Self, String> {
        let id = match request.id {
            Some(id) => JobId::new(id).map_err(|e| e.to_string())?,
            None => JobId::new(format!("job-{:032x}", rand::random::<u128>()))
                .map_err(|e| e.to_string())?,
        };
        let kind = JobKind::new(request.kind).map_err(|e| e.to_string())?;
        let src: LangCode = request
            .src_lang
            .parse()
            .map_err(|e| format!("src_lang: {e}"))?;
        let tgt: LangCode = request
            .tgt_lang
            .parse()
            .map_err(|e| format!("tgt_lang: {e}"))?;
        let pair = LangPair::new(src, tgt).map_err(|e| e.to_string())?;
        let session = match request.session_id {
            Some(session) => Some(
                JobId::new(session)
                    .map_err(|e| {
                        format!(
                            "session_id: {}",
                            e.to_string().replacen("job id", "session id", 1)
                        )
                    })?
                    .to_string(),
            ),
            None => None,
        };
        let timeout = match request.timeout_ms {
            None => default_timeout,
            Some(0) => return Err("timeout_ms must be at least 1".into()),
            Some(ms) if ms > MAX_TIMEOUT_MS => {
                return Err("timeout_ms must be at most 3600000 (one hour)".into());
            }
            Some(ms) => Duration::from_millis(ms),
        };
        let priority = match request.priority {
            Some(p) if p > 100 => return Err("priority must be at most 100".into()),
            p => p,
        };
        let tenant = match request.tenant {
            Some(t)
                if t.is_empty() || t.len() > MAX_TENANT_LEN || t.chars().any(char::is_control) =>
            {
                return Err(format!(
                    "tenant must be 1 to {MAX_TENANT_LEN} bytes without control characters"
                ));
            }
            t => t,
        };
        let device = match request.device.as_deref() {
            None | Some("any") => DeviceChoice::Any,
            Some("gpu") => DeviceChoice::Gpu,
            Some(other) => {
                return Err(format!(
                    "device must be \"gpu\" (a GPU only) or \"any\" (the default: a kind's CPU fallback too), not {other:?}"
                ));
            }
        };
        Ok(Self {
            id,
            kind,
            pair,
            session,
            payload: request.payload,
            timeout,
            deadline: None,
            explicit: (priority, tenant.is_some()),
            priority: priority.unwrap_or(DEFAULT_PRIORITY),
            tenant: tenant.unwrap_or_else(|| owner.clone()),
            device,
            owner,
        })
    }

    /// The request as stored, for comparing resubmissions: the same id with
    /// a different canonical request is a conflict.
    /// The owner is part of it: another client reusing the id conflicts
    /// instead of reading someone else's job.
    /// Its fields in the order of their names, as a JSON object's keys
    /// sort, and the payload as the client wrote it: a resubmission with
    /// the payload written otherwise (other spacing, other key order) is
    /// another body.
    pub(super) fn canonical(&self) -> String {
        let request = Canonical {
            device: (self.device == DeviceChoice::Gpu).then_some(self.device),
            kind: &self.kind,
            owner: Some(self.owner.as_str()).filter(|owner| !owner.is_empty()),
            pair: self.pair,
            payload: &self.payload,
            priority: self.explicit.0,
            session_id: self.session.as_deref(),
            tenant: self.explicit.1.then_some(self.tenant.as_str()),
            timeout_ms: u64::try_from(self.timeout.as_millis()).unwrap_or(u64::MAX),
        };
        // Strings, numbers and a JSON value: serialisation cannot fail.
        serde_json::to_string(&request).unwrap_or_default()
    }
}

impl Job {
    /// The job `id` from its canonical request (as its record holds it),
    /// for an instance taking over its dispatch: the inverse of
    /// [`Job::canonical`].
    pub(super) fn from_canonical(id: JobId, request: &str) -> Result<Self, serde_json::Error> {
        let stored: Stored = serde_json::from_str(request)?;
        let owner = stored.owner.unwrap_or_default();
        Ok(Self {
            id,
            kind: stored.kind,
            pair: stored.pair,
            session: stored.session_id,
            payload: stored.payload,
            // Held to the limit a submission is: a record is trusted no
            // further.
            timeout: Duration::from_millis(stored.timeout_ms.min(MAX_TIMEOUT_MS)),
            deadline: None,
            explicit: (stored.priority, stored.tenant.is_some()),
            priority: stored.priority.unwrap_or(DEFAULT_PRIORITY),
            tenant: stored.tenant.unwrap_or_else(|| owner.clone()),
            device: stored.device.unwrap_or(DeviceChoice::Any),
            owner,
        })
    }
}

/// A canonical request read back: see [`Job::from_canonical`].
#[derive(Deserialize)]
struct Stored {
    device: Option<DeviceChoice>,
    kind: JobKind,
    owner: Option<String>,
    pair: LangPair,
    payload: RawJson,
    priority: Option<u8>,
    session_id: Option<String>,
    tenant: Option<String>,
    timeout_ms: u64,
}

/// A job's canonical request: see [`Job::canonical`].
#[derive(Serialize)]
struct Canonical<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    device: Option<DeviceChoice>,
    kind: &'a JobKind,
    #[serde(skip_serializing_if = "Option::is_none")]
    owner: Option<&'a str>,
    pair: LangPair,
    payload: &'a RawJson,
    #[serde(skip_serializing_if = "Option::is_none")]
    priority: Option<u8>,
    session_id: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tenant: Option<&'a str>,
    timeout_ms: u64,
}

impl Job {
    /// The size of this job's `job_assign` frame, at its largest (attempt
    /// and timeout at their widest): a job over the frame limit could
    /// never reach a node.
    pub fn assign_frame_len(&self) -> usize {
        let envelope = Message::JobAssign(JobAssign {
            job_id: self.id.clone(),
            attempt: u32::MAX,
            kind: self.kind.clone(),
            pair: self.pair,
            session_id: self.session.clone(),
            payload: RawJson::default(),
            timeout_ms: u64::MAX,
            device: DeviceChoice::Gpu,
            answer_within_ms: Some(u64::MAX),
        });
        encoded_len(&envelope) - "null".len() + self.payload.get().len()
    }

    /// A client token's job waits at most at `ceiling` (`[auth]
    /// client_max_priority`: one naming none may wait lower than the
    /// default, one recorded before the ceiling was lowered waits at it);
    /// an admin's at the priority it named. Its canonical request keeps
    /// what it named.
    pub fn cap_priority(&mut self, ceiling: u8) {
        if !self.owner.is_empty() {
            self.priority = self.priority.min(ceiling);
        }
    }

    /// Whose fair share in the admission queue it counts against: its
    /// owner's, then its tenant's within that owner.
    pub fn share(&self) -> crate::queue::Share {
        (self.owner.clone(), self.tenant.clone())
    }
}

/// The owner recorded in a canonical request (empty: an admin's job).
pub(super) fn owner_of(request: &str) -> String {
    /// Only the owner is read: the payload is skipped over, not parsed.
    #[derive(Deserialize)]
    struct Owner<'a> {
        #[serde(borrow, default)]
        owner: Option<std::borrow::Cow<'a, str>>,
    }
    serde_json::from_str::<Owner<'_>>(request)
        .ok()
        .and_then(|request| request.owner)
        .map(std::borrow::Cow::into_owned)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(body: &str, owner: &str) -> Job {
        let request: JobRequest = serde_json::from_str(body).unwrap();
        Job::from_request(request, Duration::from_secs(30), owner.into()).unwrap()
    }

    /// Records hold the canonical text of the request that made them: a
    /// resubmission is compared with it, byte for byte. Its fields are
    /// written in one order whatever the body's; the payload goes in as
    /// the client wrote it.
    #[test]
    fn the_canonical_request_is_the_text_records_hold() {
        let full = job(
            r#"{"timeout_ms": 5000, "id": "a-1", "kind": "translate", "src_lang": "zh",
                "tgt_lang": "en", "session_id": "s-1", "payload": {"z": [1, "二"], "a": null},
                "priority": 70, "tenant": "team-a", "device": "gpu"}"#,
            "9f2c",
        );
        assert_eq!(
            full.canonical(),
            r#"{"device":"gpu","kind":"translate","owner":"9f2c","pair":"zh:en","payload":{"z": [1, "二"], "a": null},"priority":70,"session_id":"s-1","tenant":"team-a","timeout_ms":5000}"#
        );
        let bare = job(r#"{"kind": "asr", "src_lang": "en", "tgt_lang": "es"}"#, "");
        assert_eq!(
            bare.canonical(),
            r#"{"kind":"asr","pair":"en:es","payload":null,"session_id":null,"timeout_ms":30000}"#
        );
        let tenanted = job(
            r#"{"kind": "asr", "src_lang": "en", "tgt_lang": "es", "tenant": "t"}"#,
            "ab12",
        );
        // Read back, each is the job it was: its canonical text and what
        // its dispatch and queue go by.
        for job in [full, bare, tenanted] {
            let back = Job::from_canonical(job.id.clone(), &job.canonical()).unwrap();
            assert_eq!(back.canonical(), job.canonical());
            assert_eq!(
                (back.priority, &back.tenant, back.device, back.timeout),
                (job.priority, &job.tenant, job.device, job.timeout)
            );
            assert_eq!(
                (back.pair, &back.kind, &back.session),
                (job.pair, &job.kind, &job.session)
            );
        }
        let wrong =
            r#"{"kind":"asr","pair":"en-es","payload":null,"session_id":null,"timeout_ms":1}"#;
        assert!(Job::from_canonical(JobId::new("j").unwrap(), wrong).is_err());
    }

    #[test]
    fn a_record_is_held_to_a_submissions_limits_and_a_ceiling_leaves_it_as_named() {
        let endless = r#"{"kind":"asr","owner":"ab12","pair":"en:es","payload":null,"priority":90,"session_id":null,"timeout_ms":18446744073709551615}"#;
        let mut job = Job::from_canonical(JobId::new("j").unwrap(), endless).unwrap();
        assert_eq!(job.timeout, Duration::from_secs(3600), "one hour at most");
        job.cap_priority(40);
        assert_eq!(job.priority, 40, "a client's job waits at the ceiling");
        assert!(
            job.canonical().contains(r#""priority":90"#),
            "{}",
            job.canonical()
        );
        let mut admins = Job::from_canonical(
            JobId::new("k").unwrap(),
            &endless.replace(r#""owner":"ab12","#, ""),
        )
        .unwrap();
        admins.cap_priority(40);
        assert_eq!(admins.priority, 90, "an admin's job waits as named");
    }
}
