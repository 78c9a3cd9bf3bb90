//! Job records: arrival and attempts (recorded by the pick that chose
//! their node), the one terminal state, orphans.
//!
//! A job's hash lives in its pair's slot, beside the routing keys its
//! picks read, so one `route_pick` call records it and picks its node. An
//! index in the id's own slot (`job_pair`) names its pair, for lookups by
//! id and so that an id is one job across pairs.

use super::*;

/// One pick: the route, the job's session, the policy, and the nodes the
/// job tried already.
#[derive(Debug, Clone, Copy)]
pub struct PickOn<'a> {
    /// The routing list picked from.
    pub route: &'a Route,
    /// The job's session: its last node wins while it has room.
    pub session: Option<&'a str>,
    /// How long a session keeps preferring its node.
    pub affinity: Duration,
    /// The pick policy.
    pub policy: PickPolicy,
    /// Nodes not to pick.
    pub excluded: &'a [NodeId],
}

/// A job arriving: what is recorded at its arrival.
#[derive(Debug, Clone, Copy)]
pub struct NewJob<'a> {
    /// The id.
    pub id: &'a JobId,
    /// Its pair (the slot of its hash).
    pub pair: LangPair,
    /// The request, canonical JSON (compared on resubmission).
    pub request: &'a str,
    /// The job's timeout: its deadline is now + timeout.
    pub timeout: Duration,
    /// How long its result is kept once it ended.
    pub retention: Duration,
    /// The coordinator instance dispatching it.
    pub coordinator: &'a str,
    /// The submission's mark, unique on its instance: it knows its own
    /// record by it after losing this call's answer.
    pub opener: u64,
}

/// One job as Redis holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRecord {
    /// Where it stands.
    pub status: JobStatus,
    /// The current (or last) attempt.
    pub attempt: u32,
    /// The node of the current (or last) attempt.
    pub node: Option<String>,
    /// The terminal outcome (output, or error), the JSON text stored.
    pub outcome: Option<String>,
    /// Submission to terminal state, ms.
    pub latency_ms: Option<u64>,
    /// When the job times out, ms since the epoch (Redis's clock).
    pub deadline_ms: Option<u64>,
    /// The canonical request JSON.
    pub request: String,
    /// The instance that recorded it and dispatches it.
    pub coordinator: Option<String>,
    /// The mark of the submission that recorded it, on that instance.
    pub opener: Option<u64>,
}

/// A job whose dispatch this instance took over ([`Store::job_adopt`]):
/// where it stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Adopted {
    /// Its current attempt (0: never sent to a node).
    pub attempt: u32,
    /// When it times out, ms since the epoch (Redis's clock).
    pub deadline_ms: u64,
    /// The canonical request JSON.
    pub request: String,
}

/// A job's pick: the node and the attempt recorded on it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobPick {
    /// This node, for this attempt.
    Node(NodeId, u32),
    /// Live nodes serve the pair and kind, none reported room.
    NoCapacity,
    /// No live node serves the pair and kind.
    NoNodes,
}

/// The answer to [`Store::job_open`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum JobStart {
    /// Recorded: running on the node picked, else queued (the pick, when
    /// one was asked).
    New(Option<JobPick>),
    /// The same request is already known.
    Exists,
    /// The id belongs to a different request; when it is another pair's,
    /// the node the pick here took a slot of, to give it back.
    Conflict {
        /// That node.
        picked: Option<NodeId>,
    },
}

/// How long past a job's deadline (Redis's clock) a node's result is still
/// recorded as it says; later, it is recorded failed `timeout`. The
/// dispatcher times a job on its own clock, from a moment after the
/// deadline was written, and ends it itself at its deadline: this only
/// catches results that come when no dispatcher is left to time them.
const LATE_GRACE: Duration = Duration::from_secs(2);

impl Store {
    /// Records a job, queued, and (when `pick`) picks its first node on
    /// `on`, recording attempt 1 there; or finds it. One script call, and
    /// beside it (sent at once, the same round trip) the claim of the id in
    /// the index of job pairs: an id that names a job of another pair is a
    /// conflict, and the record made here is taken back.
    pub async fn job_open(
        &self,
        job: NewJob<'_>,
        (on, pick): (PickOn<'_>, bool),
    ) -> Result<JobStart, StoreError> {
        let lifetime = job.timeout + job.retention;
        let pair = job.pair.to_string();
        let keys = PairKeys::new(job.pair);
        let record = keys.job(job.id);
        let mut call = self.pick_call(&keys, &on, Some(record));
        call.arg("open")
            .arg(job.request)
            .arg(millis(lifetime))
            .arg(job.coordinator)
            .arg(millis(job.timeout))
            .arg(if pick { "1" } else { "0" })
            .arg(job.opener);
        // The index outlives every record of the id: a record ends at most
        // `retention` after its lifetime.
        let mut claim = redis::cmd("SET");
        claim
            .arg(keys::job_pair(job.id))
            .arg(&pair)
            .arg("NX")
            .arg("GET")
            .arg("PX")
            .arg(millis(lifetime + job.retention));
        let mut conn = self.conn.clone();
        let (claimed, reply) = tokio::join!(
            claim.query_async::<Option<String>>(&mut conn),
            self.invoke::<Vec<Value>>("route_pick", &call)
        );
        let parsed = reply.and_then(|reply| {
            Ok(match reply.as_slice() {
                [status] if text(status).as_deref() == Some("queued") => JobStart::New(None),
                [status, ..] if text(status).as_deref() == Some("exists") => JobStart::Exists,
                [status] if text(status).as_deref() == Some("conflict") => {
                    JobStart::Conflict { picked: None }
                }
                reply => JobStart::New(Some(job_pick(reply)?)),
            })
        });
        let mut conn = self.conn.clone();
        let opened = match parsed {
            Ok(opened) => opened,
            Err(err) => {
                if matches!(claimed, Ok(None)) {
                    // Claimed for a record that may not exist: let the id go.
                    let _: Result<(), _> = redis::cmd("DEL")
                        .arg(keys::job_pair(job.id))
                        .query_async(&mut conn)
                        .await;
                }
                return Err(err);
            }
        };
        self.settle_claim(&job, record, claimed, opened).await
    }

    /// What the index's claim means for a job just opened: an id that is
    /// another pair's job takes the new record back (a conflict); an index
    /// that outlived an earlier record of this pair is renewed; an index
    /// that could not be written leaves the job recorded (only lookups by
    /// id miss it).
    async fn settle_claim(
        &self,
        job: &NewJob<'_>,
        record: PairKey<'_>,
        claimed: Result<Option<String>, redis::RedisError>,
        opened: JobStart,
    ) -> Result<JobStart, StoreError> {
        let lifetime = job.timeout + job.retention;
        let mut conn = self.conn.clone();
        let JobStart::New(picked) = &opened else {
            // Found: the index says nothing this record does not.
            return Ok(opened);
        };
        match claimed {
            Ok(Some(other)) if other != job.pair.to_string() => {
                // Another pair's job has the id: this record goes. The
                // caller gives back the pick it made.
                let () = redis::cmd("DEL").arg(record).query_async(&mut conn).await?;
                let picked = match picked {
                    Some(JobPick::Node(node, _)) => Some(node.clone()),
                    _ => None,
                };
                return Ok(JobStart::Conflict { picked });
            }
            Ok(Some(_)) => {
                // An earlier record of the id in this pair expired: the
                // index lives as long as the new one.
                let renewed: Result<(), _> = redis::cmd("SET")
                    .arg(keys::job_pair(job.id))
                    .arg(job.pair.to_string())
                    .arg("PX")
                    .arg(millis(lifetime + job.retention))
                    .query_async(&mut conn)
                    .await;
                if let Err(err) = renewed {
                    tracing::warn!(job_id = %job.id, error = %err, "cannot renew the job's index");
                }
            }
            Ok(None) => {}
            // The job is recorded: it runs; only lookups by id miss it.
            Err(err) => {
                tracing::warn!(job_id = %job.id, error = %err, "cannot claim the job's id in the index");
            }
        }
        Ok(opened)
    }

    /// Picks the next node for a job recorded at attempt `current`, and
    /// records the new attempt there; with `retake`, the caller passed
    /// over the node `current` was recorded on (it knew it had no room):
    /// the pick takes `current`'s number instead, and without a node the
    /// attempt is taken back (the job is then at `current - 1`, on no
    /// node). `None` when the job ended or another dispatcher moved it on
    /// (nothing was picked).
    pub async fn job_next(
        &self,
        (pair, id): (LangPair, &JobId),
        (current, retake): (u32, bool),
        on: PickOn<'_>,
    ) -> Result<Option<JobPick>, StoreError> {
        let keys = PairKeys::new(pair);
        let mut call = self.pick_call(&keys, &on, Some(keys.job(id)));
        call.arg(if retake { "retake" } else { "next" })
            .arg(current);
        let reply: Vec<Value> = self.invoke("route_pick", &call).await?;
        match reply.as_slice() {
            [status] if text(status).as_deref() == Some("stale") => Ok(None),
            reply => job_pick(reply).map(Some),
        }
    }

    /// A `route_pick` call with its routing keys and arguments, and the
    /// key of the `job` record it acts on, if any; that job's arguments
    /// follow.
    pub(super) fn pick_call(
        &self,
        keys: &PairKeys,
        on: &PickOn<'_>,
        job: Option<PairKey<'_>>,
    ) -> Call<'_> {
        let mut call = Call::new(&self.scripts.route_pick, 6 + usize::from(job.is_some()));
        call.key(keys.route(on.route))
            .key(keys.free(on.route))
            .key(keys.leases())
            .key(keys.session(on.session.unwrap_or("")))
            .key(keys.memory())
            .key(keys.served(on.route));
        if let Some(job) = job {
            call.key(job);
        }
        let mut excluded = String::new();
        for node in on.excluded {
            if !excluded.is_empty() {
                excluded.push(',');
            }
            excluded.push_str(node.as_str());
        }
        call.arg(if on.session.is_some() { "1" } else { "0" })
            .arg(millis(on.affinity))
            .arg(on.policy.as_str())
            .arg(on.route)
            .arg(excluded);
        call
    }

    /// Records the terminal state produced by `attempt`.
    pub async fn job_finish(
        &self,
        (pair, id): (LangPair, &JobId),
        (reporter, attempt): (Option<&NodeId>, u32),
        completed: bool,
        outcome: &str,
        retention: Duration,
    ) -> Result<Finish, StoreError> {
        let mut call = Call::new(&self.scripts.job_finish, 1);
        call.key(PairKeys::new(pair).job(id))
            .arg(attempt)
            .arg(
                if completed {
                    JobStatus::Completed
                } else {
                    JobStatus::Failed
                }
                .as_str(),
            )
            .arg(outcome)
            .arg(millis(retention))
            .arg(reporter.map_or("", NodeId::as_str))
            .arg(millis(LATE_GRACE));
        let reply: Value = self.invoke("job_finish", &call).await?;
        let unexpected = || StoreError::Unexpected {
            script: "job_finish",
            reply: format!("{reply:?}"),
        };
        if let Value::Array(items) = &reply {
            return match items.as_slice() {
                [status, latency] if text(status).as_deref() == Some("applied") => {
                    Ok(Finish::Applied {
                        latency_ms: u64::from_redis_value_ref(latency).map_err(|_| unexpected())?,
                    })
                }
                [status, latency, outcome] if text(status).as_deref() == Some("late") => {
                    Ok(Finish::Late {
                        latency_ms: u64::from_redis_value_ref(latency).map_err(|_| unexpected())?,
                        outcome: text(outcome).ok_or_else(unexpected)?,
                    })
                }
                [status, assigned] if text(status).as_deref() == Some("foreign") => {
                    Ok(Finish::Foreign {
                        assigned: text(assigned).unwrap_or_default(),
                    })
                }
                _ => Err(unexpected()),
            };
        }
        match text(&reply).as_deref() {
            Some("duplicate") => Ok(Finish::Duplicate),
            Some("stale") => Ok(Finish::Stale),
            _ => Err(unexpected()),
        }
    }

    /// Records a job still running past its deadline plus `grace` as
    /// failed with `outcome`: its dispatcher and its result are gone.
    pub async fn job_expire(
        &self,
        (pair, id): (LangPair, &JobId),
        grace: Duration,
        outcome: &str,
        retention: Duration,
    ) -> Result<bool, StoreError> {
        let mut call = Call::new(&self.scripts.job_expire, 1);
        call.key(PairKeys::new(pair).job(id))
            .arg(millis(grace))
            .arg(outcome)
            .arg(millis(retention));
        let reply: String = self.invoke("job_expire", &call).await?;
        match reply.as_str() {
            "expired" => Ok(true),
            "running" | "ended" | "missing" => Ok(false),
            _ => Err(StoreError::Unexpected {
                script: "job_expire",
                reply,
            }),
        }
    }

    /// Takes the dispatch of job `id` over from instance `from` (which
    /// gave it up, or died), for instance `to`, marking the record with the
    /// taker's `opener`: where the job stands, when it was `from`'s, still
    /// at `attempt`, and has not ended.
    pub async fn job_adopt(
        &self,
        (pair, id): (LangPair, &JobId),
        (from, to): (&str, &str),
        (opener, attempt): (u64, u32),
    ) -> Result<Option<Adopted>, StoreError> {
        let mut call = Call::new(&self.scripts.job_adopt, 1);
        call.key(PairKeys::new(pair).job(id))
            .arg(from)
            .arg(to)
            .arg(opener)
            .arg(attempt);
        let reply: Vec<Value> = self.invoke("job_adopt", &call).await?;
        let unexpected = || StoreError::Unexpected {
            script: "job_adopt",
            reply: format!("{reply:?}"),
        };
        match reply.as_slice() {
            [status, attempt, deadline_ms, request]
                if text(status).as_deref() == Some("adopted") =>
            {
                let number = |value: &Value| -> Result<u64, StoreError> {
                    text(value)
                        .and_then(|t| t.parse().ok())
                        .ok_or_else(unexpected)
                };
                Ok(Some(Adopted {
                    attempt: u32::try_from(number(attempt)?).map_err(|_| unexpected())?,
                    deadline_ms: number(deadline_ms)?,
                    request: text(request).ok_or_else(unexpected)?,
                }))
            }
            [status]
                if matches!(
                    text(status).as_deref(),
                    Some("missing" | "ended" | "taken" | "moved")
                ) =>
            {
                Ok(None)
            }
            _ => Err(unexpected()),
        }
    }

    /// The pair of job `id`, from the index of job pairs.
    pub async fn job_pair(&self, id: &JobId) -> Result<Option<LangPair>, StoreError> {
        let mut conn = self.conn.clone();
        let pair: Option<String> = redis::cmd("GET")
            .arg(keys::job_pair(id))
            .query_async(&mut conn)
            .await?;
        Ok(pair.and_then(|pair| pair.parse().ok()))
    }

    /// A job and its pair, if Redis still holds it.
    pub async fn job(&self, id: &JobId) -> Result<Option<(LangPair, JobRecord)>, StoreError> {
        let Some(pair) = self.job_pair(id).await? else {
            return Ok(None);
        };
        let mut conn = self.conn.clone();
        let mut fields: HashMap<String, String> = redis::cmd("HGETALL")
            .arg(PairKeys::new(pair).job(id))
            .query_async(&mut conn)
            .await?;
        let Some(status) = fields
            .remove("status")
            .and_then(|status| JobStatus::parse(&status))
        else {
            return Ok(None);
        };
        Ok(Some((
            pair,
            JobRecord {
                status,
                attempt: fields
                    .get("attempt")
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(0),
                node: fields.remove("node"),
                outcome: fields.remove("outcome"),
                latency_ms: fields.get("latency_ms").and_then(|l| l.parse().ok()),
                deadline_ms: fields.get("deadline_ms").and_then(|d| d.parse().ok()),
                request: fields.remove("request").unwrap_or_default(),
                coordinator: fields.remove("coordinator"),
                opener: fields.get("opener").and_then(|o| o.parse().ok()),
            },
        )))
    }

    /// The instance dispatching job `id` of `pair`.
    pub async fn job_dispatcher(
        &self,
        (pair, id): (LangPair, &JobId),
    ) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("HGET")
            .arg(PairKeys::new(pair).job(id))
            .arg("coordinator")
            .query_async(&mut conn)
            .await?)
    }
}

/// A pick's reply: `{"ok", node, attempt}`, `{"no_capacity"}` or
/// `{"no_nodes"}`.
fn job_pick(reply: &[Value]) -> Result<JobPick, StoreError> {
    match reply {
        [status, node, attempt] if text(status).as_deref() == Some("ok") => {
            let attempt = u32::from_redis_value_ref(attempt).unwrap_or(0);
            Ok(text(node)
                .and_then(|node| NodeId::new(node).ok())
                .map_or(JobPick::NoCapacity, |node| JobPick::Node(node, attempt)))
        }
        [status] if text(status).as_deref() == Some("no_capacity") => Ok(JobPick::NoCapacity),
        [status] if text(status).as_deref() == Some("no_nodes") => Ok(JobPick::NoNodes),
        _ => Err(StoreError::Unexpected {
            script: "route_pick",
            reply: format!("{reply:?}"),
        }),
    }
}
