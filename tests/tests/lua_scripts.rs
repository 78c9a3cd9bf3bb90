//! The Lua scripts against a real redis-server: their logic through the
//! coordinator's `Store`, the Redis Cluster rule (every call's KEYS in one
//! hash slot, checked on the live command stream), EVALSHA with NOSCRIPT
//! reload, and cost that does not grow with the number of pools.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use lingua_coordinator::config::PickPolicy;
use lingua_coordinator::fleet::views::{NodeState, NodeView};
use lingua_coordinator::metrics::Metrics;
use lingua_coordinator::private_redis::PrivateRedis;
use lingua_coordinator::store::{
    DrainOutcome, Finish, JobPick, JobStart, NewJob, Pick, PickOn, RegisterOutcome, Registration,
    Route, RouteEntry, Store,
};
use lingua_shared::protocol::{CapacityReport, Heartbeat};
use lingua_shared::room::Room;
use lingua_shared::{JobId, JobKind, LangPair, Message, NodeId};
use lingua_tests::{TestCoordinator, TestNode, eventually, registration, test_config};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;

const LEASE: Duration = Duration::from_secs(60);
const RETENTION: Duration = Duration::from_secs(3600);

async fn store(redis: &PrivateRedis) -> Store {
    Store::connect(&redis.url(), Arc::new(Metrics::default()))
        .await
        .unwrap()
}

/// The node's state as the admin API shows it.
async fn state(store: &Store, id: &NodeId) -> NodeState {
    NodeView::from(store.node(id).await.unwrap().unwrap()).state
}

fn node(id: &str) -> NodeId {
    NodeId::new(id).unwrap()
}

fn pair(text: &str) -> LangPair {
    text.parse().unwrap()
}

fn fields() -> serde_json::Value {
    serde_json::json!({
        "src_langs": "[\"zh\"]", "tgt_langs": "[\"en\"]", "kinds": "[\"asr\"]",
        "pairs": "[\"zh:en\"]", "gpus": "[]", "capacity": "{}", "agent_version": "t",
    })
}

fn reg<'a>(id: &'a NodeId, instance: &'a str, lease: Duration) -> Registration<'a> {
    Registration {
        node_id: id,
        instance,
        coordinator: "coord-a",
        draining: false,
        lease,
        retention: RETENTION,
        fields: fields(),
    }
}

/// CRC16/XMODEM, the function Redis Cluster uses for key slots.
fn crc16(bytes: &[u8]) -> u16 {
    bytes.iter().fold(0u16, |crc, &byte| {
        (0..8).fold(crc ^ (u16::from(byte) << 8), |crc, _| {
            if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            }
        })
    })
}

/// The cluster slot of a key, honouring `{hash tags}`.
fn key_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let close = key[open + 1..].iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &key[open + 1..open + 1 + close])
    });
    crc16(tagged.unwrap_or(key)) % 16384
}

#[test]
fn key_slot_matches_redis_reference_values() {
    assert_eq!(crc16(b"123456789"), 0x31C3);
    assert_eq!(key_slot(b"foo"), 12182);
    assert_eq!(
        key_slot(b"{user1000}.following"),
        key_slot(b"{user1000}.followers")
    );
    assert_eq!(key_slot(b"foo{}{bar}"), key_slot(b"foo{}{bar}"));
    assert_ne!(key_slot(b"{a}x"), key_slot(b"{b}x"));
}

/// Splits one MONITOR line into its quoted arguments.
fn monitor_args(line: &str) -> Vec<Vec<u8>> {
    let mut args = Vec::new();
    let mut chars = line
        .split_once(']')
        .map_or("", |(_, rest)| rest)
        .bytes()
        .peekable();
    while let Some(c) = chars.next() {
        if c != b'"' {
            continue;
        }
        let mut arg = Vec::new();
        while let Some(c) = chars.next() {
            match c {
                b'"' => break,
                b'\\' => match chars.next() {
                    Some(b'x') => {
                        let hex: Vec<u8> = chars.by_ref().take(2).collect();
                        let text = String::from_utf8_lossy(&hex).into_owned();
                        arg.push(u8::from_str_radix(&text, 16).unwrap_or(b'?'));
                    }
                    Some(b'n') => arg.push(b'\n'),
                    Some(b'r') => arg.push(b'\r'),
                    Some(b't') => arg.push(b'\t'),
                    Some(other) => arg.push(other),
                    None => break,
                },
                other => arg.push(other),
            }
        }
        args.push(arg);
    }
    args
}

fn script_names() -> HashMap<String, &'static str> {
    let scripts = [
        ("register_node", include_str!("../../lua/register_node.lua")),
        (
            "node_heartbeat",
            include_str!("../../lua/node_heartbeat.lua"),
        ),
        ("node_offline", include_str!("../../lua/node_offline.lua")),
        ("node_drain", include_str!("../../lua/node_drain.lua")),
        ("pool_join", include_str!("../../lua/pool_join.lua")),
        ("pool_leave", include_str!("../../lua/pool_leave.lua")),
        ("route_update", include_str!("../../lua/route_update.lua")),
        ("route_pick", include_str!("../../lua/route_pick.lua")),
        ("job_finish", include_str!("../../lua/job_finish.lua")),
        ("job_expire", include_str!("../../lua/job_expire.lua")),
        ("job_adopt", include_str!("../../lua/job_adopt.lua")),
    ];
    scripts
        .into_iter()
        .map(|(name, code)| (redis::Script::new(code).get_hash().to_owned(), name))
        .collect()
}

#[tokio::test]
async fn every_script_call_keeps_its_keys_in_one_cluster_slot() {
    let redis = lingua_tests::redis().await;
    let mut monitor = BufReader::new(UnixStream::connect(redis.socket_path()).await.unwrap());
    monitor.get_mut().write_all(b"MONITOR\r\n").await.unwrap();
    let mut ok = String::new();
    monitor.read_line(&mut ok).await.unwrap();
    assert_eq!(ok.trim(), "+OK");

    // Drive every script through the real coordinator. The raw node sends
    // one heartbeat only: a long interval keeps it live until the drain.
    let config = lingua_coordinator::config::Config {
        heartbeat_interval: Duration::from_secs(10),
        ..test_config()
    };
    let coordinator = TestCoordinator::start(&redis, config).await;
    let mut register = registration("slots", &["zh", "en"], &["en", "ja"]);
    register
        .capabilities
        .kinds
        .push(JobKind::new("asr").unwrap());
    let (mut node, _) = TestNode::register(&coordinator.ws_url(), register).await;
    node.send(&Message::Heartbeat(Heartbeat {
        seq: 1,
        capacity: CapacityReport::default(),
    }))
    .await;
    eventually("the heartbeat to be recorded", || async {
        let (_, view) = coordinator.get("/v1/nodes/slots").await;
        (view["capacity"]["free_slots"] == serde_json::json!({})).then_some(())
    })
    .await;
    // A job through a real agent: route_pick (recording it), job_finish;
    // then a (refused) next attempt on the finished job.
    let agent = lingua_tests::TestAgent::start(lingua_tests::agent_config(
        "slots-agent",
        &coordinator.ws_url(),
        10,
    ));
    agent.registered(1).await;
    let job = serde_json::json!({"id": "slot-job", "kind": "translate", "src_lang": "zh", "tgt_lang": "en", "session_id": "s1"});
    let answer = reqwest::Client::new()
        .post(coordinator.url("/v1/jobs"))
        .json(&job)
        .send()
        .await
        .unwrap();
    assert_eq!(answer.status(), 200);
    let store = store(&redis).await;
    let job_id = JobId::new("slot-job").unwrap();
    let translate = Route::gpu(&JobKind::new("translate").unwrap());
    let next = PickOn {
        route: &translate,
        session: None,
        affinity: Duration::ZERO,
        policy: PickPolicy::Capacity,
        excluded: &[],
    };
    assert_eq!(
        store
            .job_next((pair("zh:en"), &job_id), (1, false), next)
            .await
            .unwrap(),
        None
    );
    agent.stop().await.unwrap();
    let drained = reqwest::Client::new()
        .post(coordinator.url("/v1/nodes/slots/drain"))
        .send()
        .await
        .unwrap();
    assert_eq!(drained.status(), 202);
    node.close().await;
    eventually("the node to go offline", || async {
        let (_, view) = coordinator.get("/v1/nodes/slots").await;
        (view["state"] == "offline").then_some(())
    })
    .await;
    // An orphan: a job recorded as running whose dispatcher is gone. Past
    // its deadline and the grace, reading it ends it (job_expire).
    let orphan = JobId::new("orphan").unwrap();
    let orphaned = NewJob {
        coordinator: "gone",
        ..new_job(&orphan, pair("zh:en"), "{}", Duration::ZERO)
    };
    store.job_open(orphaned, (next, false)).await.unwrap();
    // Nobody gave it up: it is not taken over.
    let adopted = store
        .job_adopt((pair("zh:en"), &orphan), ("elsewhere", "here"), (1, 0))
        .await
        .unwrap();
    assert_eq!(adopted, None);
    let ended = eventually("the orphan to be ended", || async {
        let (_, view) = coordinator.get("/v1/jobs/orphan").await;
        (view["status"] == "failed").then_some(view)
    })
    .await;
    assert_eq!(ended["error"]["code"], "timeout", "{ended}");
    coordinator.stop().await;

    let names = script_names();
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    let mut line = String::new();
    let drain_deadline = tokio::time::Instant::now() + Duration::from_millis(500);
    while let Ok(Ok(n)) =
        tokio::time::timeout_at(drain_deadline, monitor.read_line(&mut line)).await
    {
        if n == 0 {
            break;
        }
        let args = monitor_args(&line);
        line.clear();
        let Some(command) = args
            .first()
            .map(|c| String::from_utf8_lossy(c).to_uppercase())
        else {
            continue;
        };
        assert_ne!(command, "EVAL", "scripts are sent by SHA, never as source");
        if command != "EVALSHA" {
            continue;
        }
        let sha = String::from_utf8_lossy(&args[1]).into_owned();
        let name = names.get(&sha).copied().unwrap_or("unknown script");
        let numkeys: usize = String::from_utf8_lossy(&args[2]).parse().unwrap();
        let keys = &args[3..3 + numkeys];
        assert!(!keys.is_empty(), "{name} takes its keys in KEYS");
        let slot = key_slot(&keys[0]);
        for key in keys {
            assert_eq!(
                key_slot(key),
                slot,
                "{name}: {} and {} are in different slots",
                String::from_utf8_lossy(&keys[0]),
                String::from_utf8_lossy(key)
            );
        }
        *seen.entry(name).or_default() += 1;
    }
    let mut expected: Vec<&str> = names.values().copied().collect();
    expected.sort_unstable();
    assert_eq!(
        seen.keys().copied().collect::<Vec<_>>(),
        expected,
        "every script ran: {seen:?}"
    );
}

#[tokio::test]
async fn scripts_survive_a_script_cache_flush() {
    let redis = lingua_tests::redis().await;
    let coordinator = TestCoordinator::start(&redis, test_config()).await;
    let (first, _) = TestNode::register(
        &coordinator.ws_url(),
        registration("before", &["zh"], &["en"]),
    )
    .await;
    let store = store(&redis).await;
    let flushed = node("flushed");
    let RegisterOutcome::Registered { epoch, .. } = store
        .register_node(&reg(&flushed, "i", LEASE))
        .await
        .unwrap()
    else {
        panic!()
    };
    let mut conn = lingua_tests::connect(&redis).await;
    let _: () = redis::cmd("SCRIPT")
        .arg("FLUSH")
        .query_async(&mut conn)
        .await
        .unwrap();
    // A batch of heartbeats meets NOSCRIPT too, and loads the script.
    assert_eq!(
        store
            .heartbeats(
                &[((flushed, epoch), String::from("{}"))],
                (LEASE, RETENTION)
            )
            .await,
        [Some(true)]
    );
    // NOSCRIPT is answered by loading the script again, transparently.
    let (second, _) = TestNode::register(
        &coordinator.ws_url(),
        registration("after", &["zh"], &["en"]),
    )
    .await;
    let (_, view) = coordinator.get("/v1/nodes/after").await;
    assert_eq!(view["state"], "ready");
    first.close().await;
    second.close().await;
    coordinator.stop().await;
}

#[tokio::test]
async fn register_gives_growing_epochs_and_refuses_a_live_other_instance() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let id = node("gpu-7");
    let RegisterOutcome::Registered {
        epoch: first,
        previous_pairs,
        ..
    } = store
        .register_node(&reg(&id, "inst-a", LEASE))
        .await
        .unwrap()
    else {
        panic!("first registration is accepted");
    };
    assert!(previous_pairs.is_empty());
    let RegisterOutcome::Registered {
        epoch: second,
        previous_pairs,
        previous_kinds,
        ..
    } = store
        .register_node(&reg(&id, "inst-a", LEASE))
        .await
        .unwrap()
    else {
        panic!("the same instance may register again");
    };
    assert!(second > first);
    assert_eq!(previous_pairs, [pair("zh:en")]);
    assert_eq!(previous_kinds, [JobKind::new("asr").unwrap()]);
    assert_eq!(
        store
            .register_node(&reg(&id, "inst-b", LEASE))
            .await
            .unwrap(),
        RegisterOutcome::Conflict {
            holder: "inst-a".into()
        }
    );
    // Once the holder is offline, another instance may take the id.
    assert!(store.node_offline(&id, second).await.unwrap());
    assert!(matches!(
        store.register_node(&reg(&id, "inst-b", LEASE)).await.unwrap(),
        RegisterOutcome::Registered { epoch, .. } if epoch > second
    ));
}

#[tokio::test]
async fn stale_epochs_are_fenced_off() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let id = node("gpu-8");
    let RegisterOutcome::Registered { epoch: old, .. } =
        store.register_node(&reg(&id, "i", LEASE)).await.unwrap()
    else {
        panic!()
    };
    let RegisterOutcome::Registered { epoch: new, .. } =
        store.register_node(&reg(&id, "i", LEASE)).await.unwrap()
    else {
        panic!()
    };
    let beat = |epoch: u64| ((id.clone(), epoch), String::from("{}"));
    // One batch: the stale connection's heartbeat and the current one's
    // (as two nodes' heartbeats share a batch).
    assert_eq!(
        store
            .heartbeats(&[beat(old), beat(new)], (LEASE, RETENTION))
            .await,
        [Some(false), Some(true)]
    );
    assert!(!store.node_offline(&id, old).await.unwrap());
    assert_eq!(
        store.drain_node(&id, Some(old)).await.unwrap(),
        DrainOutcome::Stale
    );
    assert_eq!(state(&store, &id).await, NodeState::Ready);
    assert!(matches!(
        store.drain_node(&id, None).await.unwrap(),
        DrainOutcome::Draining { epoch, .. } if epoch == new
    ));
    assert_eq!(state(&store, &id).await, NodeState::Draining);
    assert_eq!(
        store.drain_node(&node("ghost"), None).await.unwrap(),
        DrainOutcome::Unknown
    );
    // The connection ends; a heartbeat of it recorded late does not bring
    // the lease back.
    assert!(store.node_offline(&id, new).await.unwrap());
    assert_eq!(
        store.heartbeats(&[beat(new)], (LEASE, RETENTION)).await,
        [Some(false)]
    );
    assert_eq!(state(&store, &id).await, NodeState::Offline);
    let mut conn = lingua_tests::connect(&redis).await;
    let lease: u32 = redis::cmd("EXISTS")
        .arg(format!("lingua:v1:node:{{{id}}}:lease"))
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(lease, 0);
}

#[tokio::test]
async fn a_node_lease_expires_without_anyone_watching() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let id = node("gpu-9");
    store
        .register_node(&reg(&id, "i", Duration::from_millis(50)))
        .await
        .unwrap();
    assert_eq!(state(&store, &id).await, NodeState::Ready);
    eventually("the lease to expire", || async {
        (state(&store, &id).await == NodeState::Offline).then_some(())
    })
    .await;
    assert_eq!(
        store.drain_node(&id, None).await.unwrap(),
        DrainOutcome::Offline
    );
}

#[tokio::test]
async fn pools_fill_to_the_maximum_and_reuse_room() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let zh_en = pair("zh:en");
    let mut assigned = Vec::new();
    for i in 0..5 {
        assigned.push(
            store
                .pool_join(zh_en, &node(&format!("n{i}")), &[], 3, LEASE)
                .await
                .unwrap(),
        );
    }
    assert_eq!(assigned, ["1", "1", "1", "2", "2"]);
    assert_eq!(
        store
            .pool_join(zh_en, &node("n0"), &[], 3, LEASE)
            .await
            .unwrap(),
        "1",
        "joining is idempotent"
    );
    assert!(store.pool_leave(zh_en, &node("n0"), &[]).await.unwrap());
    assert!(!store.pool_leave(zh_en, &node("n0"), &[]).await.unwrap());
    assert!(store.pool_leave(zh_en, &node("n3"), &[]).await.unwrap());
    // Pool 1 (2 members) and pool 2 (1 member) have room: the fullest is
    // filled first, then the next, before a new pool is opened.
    assert_eq!(
        store
            .pool_join(zh_en, &node("n5"), &[], 3, LEASE)
            .await
            .unwrap(),
        "1"
    );
    assert_eq!(
        store
            .pool_join(zh_en, &node("n6"), &[], 3, LEASE)
            .await
            .unwrap(),
        "2"
    );
    assert_eq!(
        store
            .pool_join(zh_en, &node("n7"), &[], 3, LEASE)
            .await
            .unwrap(),
        "2"
    );
    assert_eq!(
        store
            .pool_join(zh_en, &node("n8"), &[], 3, LEASE)
            .await
            .unwrap(),
        "3"
    );
    store.pool_leave(zh_en, &node("n8"), &[]).await.unwrap();
    let mut conn = lingua_tests::connect(&redis).await;
    let pools: Vec<String> = redis::cmd("ZRANGE")
        .arg("lingua:v1:pair:{zh:en}:pools")
        .arg(0)
        .arg(-1)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(pools, ["1", "2"], "an emptied pool disappears");
}

#[tokio::test]
async fn expired_pair_leases_are_cleaned_up_lazily() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let zh_en = pair("zh:en");
    store
        .pool_join(zh_en, &node("dead"), &[], 10, Duration::from_millis(1))
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(20)).await;
    store
        .pool_join(zh_en, &node("alive"), &[], 10, LEASE)
        .await
        .unwrap();
    let mut conn = lingua_tests::connect(&redis).await;
    let members: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("lingua:v1:pair:{zh:en}:members")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(members.keys().collect::<Vec<_>>(), ["alive"]);
}

#[tokio::test]
async fn route_update_tracks_room_and_reports_non_members() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let zh_en = pair("zh:en");
    let asr = JobKind::new("asr").unwrap();
    let tts = JobKind::new("tts").unwrap();
    store
        .pool_join(zh_en, &node("a"), &[], 10, LEASE)
        .await
        .unwrap();
    store
        .pool_join(zh_en, &node("b"), &[], 10, LEASE)
        .await
        .unwrap();
    let entries = [
        RouteEntry {
            node: node("a"),
            free: [(Route::gpu(&asr), 3), (Route::gpu(&tts), 0)].into(),
            room: None,
        },
        RouteEntry {
            node: node("b"),
            free: [(Route::gpu(&tts), 1)].into(),
            room: None,
        },
        RouteEntry {
            node: node("stranger"),
            free: [(Route::gpu(&asr), 5)].into(),
            room: None,
        },
    ];
    let missing = store.route_update(zh_en, &entries, LEASE).await.unwrap();
    assert_eq!(missing.missing, [node("stranger")]);
    let conn = lingua_tests::connect(&redis).await;
    let members = |kind: &'static str| {
        let mut conn = conn.clone();
        async move {
            let members: Vec<String> = redis::cmd("ZRANGE")
                .arg(format!("lingua:v1:pair:{{zh:en}}:route:{kind}"))
                .arg(0)
                .arg(-1)
                .query_async(&mut conn)
                .await
                .unwrap();
            members
        }
    };
    assert_eq!(members("asr").await, ["a"]);
    assert_eq!(members("tts").await, ["b"]);
    let free: Option<u32> = redis::cmd("HGET")
        .arg("lingua:v1:pair:{zh:en}:free:asr")
        .arg("a")
        .query_async(&mut conn.clone())
        .await
        .unwrap();
    assert_eq!(free, Some(3));
    store
        .pool_leave(zh_en, &node("a"), &[asr, tts])
        .await
        .unwrap();
    assert!(members("asr").await.is_empty());
}

/// Redis commands executed (inside scripts included) by one `pool_join`.
async fn commands_for_one_join(redis: &PrivateRedis, store: &Store, id: &str) -> u64 {
    let mut conn = lingua_tests::connect(redis).await;
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(&mut conn)
        .await
        .unwrap();
    store
        .pool_join(pair("zh:en"), &node(id), &[], 2, LEASE)
        .await
        .unwrap();
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(&mut conn)
        .await
        .unwrap();
    stats
        .lines()
        .filter(|line| {
            line.starts_with("cmdstat_")
                && !line.starts_with("cmdstat_evalsha")
                && !line.starts_with("cmdstat_config")
        })
        .filter_map(|line| {
            line.split("calls=")
                .nth(1)?
                .split(',')
                .next()?
                .parse::<u64>()
                .ok()
        })
        .sum()
}

/// Joins nodes so that `pools` pools of size 2 each hold one member.
async fn half_fill(store: &Store, pools: usize, offset: usize) {
    for i in offset..offset + 2 * pools {
        store
            .pool_join(pair("zh:en"), &node(&format!("fill-{i}")), &[], 2, LEASE)
            .await
            .unwrap();
    }
    for i in (offset..offset + 2 * pools).step_by(2) {
        store
            .pool_leave(pair("zh:en"), &node(&format!("fill-{i}")), &[])
            .await
            .unwrap();
    }
}

#[tokio::test]
async fn pool_join_cost_does_not_grow_with_the_number_of_pools() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    half_fill(&store, 10, 0).await;
    let at_10 = commands_for_one_join(&redis, &store, "probe-10").await;
    half_fill(&store, 990, 20).await;
    let mut conn = lingua_tests::connect(&redis).await;
    let with_room: u64 = redis::cmd("ZCARD")
        .arg("lingua:v1:pair:{zh:en}:room")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(with_room >= 990, "hundreds of pools have room: {with_room}");
    let at_1000 = commands_for_one_join(&redis, &store, "probe-1000").await;
    assert_eq!(at_10, at_1000, "commands per join at 10 and at 1,000 pools");
    assert!(
        at_10 <= 10,
        "a join is a handful of O(log n) commands: {at_10}"
    );
}

/// `zh:en` with nodes `a` and `b`, each with `slots` free `asr` slots.
async fn two_nodes_with_room(store: &Store, slots: u32) -> Route {
    let (zh_en, asr) = (pair("zh:en"), JobKind::new("asr").unwrap());
    let route = Route::gpu(&asr);
    let mut entries = Vec::new();
    for id in ["a", "b"] {
        store
            .pool_join(zh_en, &node(id), &[], 10, LEASE)
            .await
            .unwrap();
        entries.push(RouteEntry {
            node: node(id),
            free: [(route.clone(), slots)].into(),
            room: None,
        });
    }
    store.route_update(zh_en, &entries, LEASE).await.unwrap();
    route
}

fn new_job<'a>(id: &'a JobId, pair: LangPair, request: &'a str, timeout: Duration) -> NewJob<'a> {
    NewJob {
        id,
        pair,
        request,
        timeout,
        retention: LEASE,
        coordinator: "c",
        opener: 7,
    }
}

fn on<'a>(route: &'a Route, excluded: &'a [NodeId]) -> PickOn<'a> {
    PickOn {
        route,
        session: None,
        affinity: Duration::ZERO,
        policy: PickPolicy::Capacity,
        excluded,
    }
}

#[tokio::test]
async fn a_job_finished_on_a_clock_behind_its_submission_takes_no_negative_time() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let route = two_nodes_with_room(&store, 4).await;
    let zh_en = pair("zh:en");
    let id = JobId::new("early").unwrap();
    store
        .job_open(new_job(&id, zh_en, "{}", LEASE), (on(&route, &[]), true))
        .await
        .unwrap();
    let (_, record) = store.job(&id).await.unwrap().unwrap();
    let node = record.node.map(|n| NodeId::new(n).unwrap()).unwrap();
    // Submitted, by this Redis's clock, an hour from now.
    let mut conn = lingua_tests::connect(&redis).await;
    let (secs, _): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let () = redis::cmd("HSET")
        .arg("lingua:v1:pair:{zh:en}:job:early")
        .arg("created_ms")
        .arg((secs + 3600) * 1000)
        .query_async(&mut conn)
        .await
        .unwrap();
    let finished = store
        .job_finish((zh_en, &id), (Some(&node), 1), true, "{}", LEASE)
        .await
        .unwrap();
    assert_eq!(finished, Finish::Applied { latency_ms: 0 });
}

#[tokio::test]
async fn a_result_after_its_jobs_deadline_is_recorded_as_a_timeout() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let route = two_nodes_with_room(&store, 4).await;
    let zh_en = pair("zh:en");
    let mut conn = lingua_tests::connect(&redis).await;
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(&mut conn).await.unwrap();
    let now_ms = secs * 1000 + micros / 1000;
    // Their deadlines, by this Redis's clock: a minute ago, or a moment
    // ago (within the grace a dispatcher's own clock needs).
    for (id, ago_ms) in [
        ("late", 60_000),
        ("decided-late", 60_000),
        ("just-in-time", 200),
    ] {
        let id = JobId::new(id).unwrap();
        store
            .job_open(new_job(&id, zh_en, "{}", LEASE), (on(&route, &[]), true))
            .await
            .unwrap();
        let () = redis::cmd("HSET")
            .arg(format!("lingua:v1:pair:{{zh:en}}:job:{id}"))
            .arg("deadline_ms")
            .arg(now_ms - ago_ms)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    let late = JobId::new("late").unwrap();
    let (_, record) = store.job(&late).await.unwrap().unwrap();
    let node = record.node.map(|n| NodeId::new(n).unwrap()).unwrap();
    let completed = r#"{"output":{"text":"too late"}}"#;
    let finished = store
        .job_finish((zh_en, &late), (Some(&node), 1), true, completed, LEASE)
        .await
        .unwrap();
    let Finish::Late { outcome, .. } = finished else {
        panic!("a node's result past the deadline is late: {finished:?}");
    };
    let outcome: serde_json::Value = serde_json::from_str(&outcome).unwrap();
    assert_eq!(outcome["error"]["code"], "timeout", "{outcome}");
    let (_, record) = store.job(&late).await.unwrap().unwrap();
    assert_eq!(record.status.as_str(), "failed");
    let recorded: serde_json::Value = serde_json::from_str(&record.outcome.unwrap()).unwrap();
    assert_eq!(recorded, outcome);
    // The dispatcher's own failure at the deadline is recorded as it says.
    let decided = JobId::new("decided-late").unwrap();
    let failure = r#"{"error":{"code":"timeout","message":"no result within 1000 ms"}}"#;
    let finished = store
        .job_finish((zh_en, &decided), (None, 1), false, failure, LEASE)
        .await
        .unwrap();
    assert!(matches!(finished, Finish::Applied { .. }), "{finished:?}");
    let in_time = JobId::new("just-in-time").unwrap();
    let (_, record) = store.job(&in_time).await.unwrap().unwrap();
    let node = record.node.map(|n| NodeId::new(n).unwrap()).unwrap();
    let finished = store
        .job_finish((zh_en, &in_time), (Some(&node), 1), true, completed, LEASE)
        .await
        .unwrap();
    assert!(matches!(finished, Finish::Applied { .. }), "{finished:?}");
}

/// A stopping instance's waiting job is taken over once, from the
/// instance that gave it up, while it has not ended; the record then names
/// its new dispatcher.
#[tokio::test]
async fn a_job_is_adopted_once_from_the_instance_that_gave_it_up() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let route = two_nodes_with_room(&store, 4).await;
    let zh_en = pair("zh:en");
    let id = JobId::new("handed").unwrap();
    let mut job = new_job(&id, zh_en, "{req}", Duration::from_secs(60));
    job.coordinator = "stopping";
    store.job_open(job, (on(&route, &[]), false)).await.unwrap();
    let (_, queued) = store.job(&id).await.unwrap().unwrap();
    assert_eq!(queued.status.as_str(), "queued");
    let adopt = |from: &'static str, to: &'static str, attempt: u32| {
        let (store, id) = (store.clone(), id.clone());
        async move {
            store
                .job_adopt((zh_en, &id), (from, to), (9, attempt))
                .await
                .unwrap()
        }
    };
    assert_eq!(
        adopt("another", "b", 0).await,
        None,
        "only from its dispatcher"
    );
    assert_eq!(
        adopt("stopping", "b", 1).await,
        None,
        "only at the attempt it waited at"
    );
    let adopted = adopt("stopping", "b", 0).await.expect("taken over");
    assert_eq!(
        adopt("stopping", "b", 0).await,
        Some(adopted.clone()),
        "sent again by the same taker (its reply lost), it answers as it did"
    );
    assert_eq!((adopted.attempt, adopted.request.as_str()), (0, "{req}"));
    assert_eq!(Some(adopted.deadline_ms), queued.deadline_ms);
    let (_, record) = store.job(&id).await.unwrap().unwrap();
    assert_eq!(
        (record.coordinator.as_deref(), record.opener),
        (Some("b"), Some(9))
    );
    assert_eq!(adopt("stopping", "c", 0).await, None, "once");
    let failure = r#"{"error":{"code":"timeout","message":"no result"}}"#;
    store
        .job_finish((zh_en, &id), (None, 0), false, failure, LEASE)
        .await
        .unwrap();
    assert_eq!(adopt("b", "c", 0).await, None, "not once it ended");
    let gone = JobId::new("never").unwrap();
    let missing = store
        .job_adopt((zh_en, &gone), ("b", "c"), (1, 0))
        .await
        .unwrap();
    assert_eq!(missing, None);
}

/// Jobs are handed over only to instances that are live and not
/// stopping, through an inbox that still exists; a stopping instance is
/// reaped only once its presence is gone.
#[tokio::test]
async fn jobs_are_handed_only_to_live_instances_that_are_not_stopping() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    for instance in ["me", "staying", "stopping"] {
        store
            .instance_alive(instance, "127.0.0.1:1", (LEASE, false))
            .await
            .unwrap();
        store.inbox_open(instance).await.unwrap();
    }
    store
        .instance_alive("stopping", "127.0.0.1:1", (LEASE, true))
        .await
        .unwrap();
    let candidates = store.other_live_instances("me").await.unwrap();
    assert_eq!(candidates, ["staying"]);
    assert!(
        store.reap_instances().await.unwrap().is_empty(),
        "still present"
    );
    assert!(store.inbox_push("staying", "{}").await.unwrap());
    store.instance_gone("staying").await.unwrap();
    assert!(
        !store.inbox_push("staying", "{}").await.unwrap(),
        "an inbox that is gone takes nothing"
    );
    // Saying at once that it stops takes an instance out of the takers,
    // and brings back none that is gone.
    store
        .instance_alive("staying", "127.0.0.1:1", (LEASE, false))
        .await
        .unwrap();
    assert_eq!(store.other_live_instances("me").await.unwrap(), ["staying"]);
    store.instance_leaving("staying").await.unwrap();
    assert!(store.other_live_instances("me").await.unwrap().is_empty());
    store.instance_gone("stopping").await.unwrap();
    store.instance_leaving("stopping").await.unwrap();
    let index: Vec<String> = redis::cmd("ZRANGE")
        .arg(lingua_coordinator::keys::ALL_INSTANCES)
        .arg(0)
        .arg(-1)
        .query_async(&mut lingua_tests::connect(&redis).await)
        .await
        .unwrap();
    assert!(!index.contains(&"stopping".to_owned()), "{index:?}");
}

/// A job whose attempt ended without a result, and whose next pick finds
/// no room, is recorded `queued` again at that attempt (a dead
/// dispatcher's job is taken over only when queued); its node may still
/// report for that attempt; a later pick sends it on as `running`.
#[tokio::test]
async fn a_job_waiting_for_room_after_an_attempt_is_recorded_queued() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let route = two_nodes_with_room(&store, 4).await;
    let zh_en = pair("zh:en");
    let id = JobId::new("refused").unwrap();
    let opened = store
        .job_open(new_job(&id, zh_en, "{}", LEASE), (on(&route, &[]), true))
        .await
        .unwrap();
    let JobStart::New(Some(JobPick::Node(first, 1))) = opened else {
        panic!("picked at attempt 1: {opened:?}");
    };
    let record = || {
        let (store, id) = (store.clone(), id.clone());
        async move {
            let (_, record) = store.job(&id).await.unwrap().unwrap();
            (
                record.status.as_str().to_owned(),
                record.attempt,
                record.node,
            )
        }
    };
    let both = [node("a"), node("b")];
    let picked = store
        .job_next((zh_en, &id), (1, false), on(&route, &both))
        .await
        .unwrap();
    assert_eq!(picked, Some(JobPick::NoCapacity));
    assert_eq!(
        record().await,
        ("queued".into(), 1, Some(first.to_string())),
        "waiting for room, at the attempt it stands at"
    );
    let picked = store
        .job_next((zh_en, &id), (1, false), on(&route, &[]))
        .await
        .unwrap();
    let Some(JobPick::Node(second, 2)) = picked else {
        panic!("sent on at attempt 2: {picked:?}");
    };
    assert_eq!(
        record().await,
        ("running".into(), 2, Some(second.to_string()))
    );
}

#[tokio::test]
async fn a_job_is_recorded_by_its_first_pick_idempotently_and_fenced_by_attempt() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let route = two_nodes_with_room(&store, 4).await;
    let zh_en = pair("zh:en");
    let id = JobId::new("j-1").unwrap();
    let opened = store
        .job_open(new_job(&id, zh_en, "{req}", LEASE), (on(&route, &[]), true))
        .await
        .unwrap();
    let JobStart::New(Some(JobPick::Node(first, 1))) = opened else {
        panic!("a new job picks attempt 1: {opened:?}");
    };
    let (_, record) = store.job(&id).await.unwrap().unwrap();
    assert_eq!(
        (
            record.status.as_str(),
            record.attempt,
            record.node.as_deref()
        ),
        ("running", 1, Some(first.as_str())),
        "the pick recorded the job and its attempt"
    );
    let again = |request: &'static str, pair: LangPair| {
        let (store, id, route) = (store.clone(), id.clone(), route.clone());
        async move {
            store
                .job_open(new_job(&id, pair, request, LEASE), (on(&route, &[]), true))
                .await
                .unwrap()
        }
    };
    assert_eq!(again("{req}", zh_en).await, JobStart::Exists);
    assert_eq!(
        again("{other}", zh_en).await,
        JobStart::Conflict { picked: None }
    );
    assert_eq!(
        again("{req}", pair("en:ja")).await,
        JobStart::Conflict { picked: None },
        "an id is one job across pairs"
    );
    let mut conn = lingua_tests::connect(&redis).await;
    let left: u64 = redis::cmd("EXISTS")
        .arg("lingua:v1:pair:{en:ja}:job:j-1")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 0, "the other pair's record is taken back");

    let next = |current: u32, excluded: Vec<NodeId>| {
        let (store, id, route) = (store.clone(), id.clone(), route.clone());
        async move {
            store
                .job_next((zh_en, &id), (current, false), on(&route, &excluded))
                .await
                .unwrap()
        }
    };
    assert_eq!(next(2, vec![]).await, None, "stale: attempt 1 is current");
    let other = if first == node("a") {
        node("b")
    } else {
        node("a")
    };
    assert_eq!(
        next(1, vec![first.clone()]).await,
        Some(JobPick::Node(other.clone(), 2)),
        "the tried node is excluded"
    );
    let done = serde_json::json!({"output": {"text": "hi"}});
    let finish = |reporter: &NodeId, attempt: u32| {
        let (store, id, done, reporter) =
            (store.clone(), id.clone(), done.clone(), reporter.clone());
        async move {
            store
                .job_finish(
                    (zh_en, &id),
                    (Some(&reporter), attempt),
                    true,
                    &done.to_string(),
                    LEASE,
                )
                .await
                .unwrap()
        }
    };
    assert_eq!(
        finish(&first, 1).await,
        Finish::Stale,
        "the superseded attempt is ignored"
    );
    assert_eq!(
        finish(&first, 2).await,
        Finish::Foreign {
            assigned: other.to_string()
        },
        "attempt 2 is the other node's: the first has no say in it"
    );
    assert!(matches!(finish(&other, 2).await, Finish::Applied { .. }));
    assert_eq!(finish(&other, 2).await, Finish::Duplicate);
    assert_eq!(
        next(2, vec![]).await,
        None,
        "an ended job takes no new attempt"
    );
    let (found, record) = store.job(&id).await.unwrap().unwrap();
    assert_eq!(found, zh_en);
    assert_eq!(
        (
            record.status.as_str(),
            record.attempt,
            record.node.as_deref()
        ),
        ("completed", 2, Some(other.as_str()))
    );
    assert_eq!(record.outcome, Some(done.to_string()));
    let unknown = JobId::new("unknown").unwrap();
    assert_eq!(
        store
            .job_finish((zh_en, &unknown), (Some(&first), 1), true, "{}", LEASE)
            .await
            .unwrap(),
        Finish::Stale
    );
}

#[tokio::test]
async fn a_passed_over_pick_is_retaken_or_taken_back() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let route = two_nodes_with_room(&store, 1).await;
    let zh_en = pair("zh:en");
    let id = JobId::new("j-retake").unwrap();
    let opened = store
        .job_open(new_job(&id, zh_en, "{}", LEASE), (on(&route, &[]), true))
        .await
        .unwrap();
    let JobStart::New(Some(JobPick::Node(first, 1))) = opened else {
        panic!("a new job picks attempt 1: {opened:?}");
    };
    let other = if first == node("a") {
        node("b")
    } else {
        node("a")
    };
    let record = || async {
        let (_, record) = store.job(&id).await.unwrap().unwrap();
        (
            record.status.as_str().to_owned(),
            record.attempt,
            record.node.unwrap_or_default(),
        )
    };
    let excluded = [first.clone()];
    assert_eq!(
        store
            .job_next((zh_en, &id), (1, true), on(&route, &excluded))
            .await
            .unwrap(),
        Some(JobPick::Node(other.clone(), 1)),
        "the retake takes the passed-over attempt's number"
    );
    assert_eq!(record().await, ("running".into(), 1, other.to_string()));
    let excluded = [first, other];
    assert_eq!(
        store
            .job_next((zh_en, &id), (1, true), on(&route, &excluded))
            .await
            .unwrap(),
        Some(JobPick::NoCapacity)
    );
    assert_eq!(
        record().await,
        ("queued".into(), 0, String::new()),
        "without a node the attempt is taken back: no node may report for it"
    );
}

#[tokio::test]
async fn a_job_is_recorded_with_its_dispatcher_and_its_submissions_mark() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let route = two_nodes_with_room(&store, 1).await;
    let id = JobId::new("marked").unwrap();
    let first = NewJob {
        coordinator: "c-1",
        opener: 41,
        ..new_job(&id, pair("zh:en"), "{}", LEASE)
    };
    store
        .job_open(first, (on(&route, &[]), true))
        .await
        .unwrap();
    // The same request again (a submission that lost its answer, say)
    // finds the job and leaves its marks.
    let again = NewJob {
        coordinator: "c-2",
        opener: 42,
        ..new_job(&id, pair("zh:en"), "{}", LEASE)
    };
    let opened = store
        .job_open(again, (on(&route, &[]), true))
        .await
        .unwrap();
    assert_eq!(opened, JobStart::Exists);
    let (_, record) = store.job(&id).await.unwrap().unwrap();
    assert_eq!(record.coordinator.as_deref(), Some("c-1"));
    assert_eq!(record.opener, Some(41));
    assert_eq!((record.status.as_str(), record.attempt), ("running", 1));
}

#[tokio::test]
async fn a_job_opened_without_room_or_without_a_pick_is_queued() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let route = two_nodes_with_room(&store, 1).await;
    let zh_en = pair("zh:en");
    let (waits, takes, finds) = (
        JobId::new("waits").unwrap(),
        JobId::new("takes").unwrap(),
        JobId::new("finds").unwrap(),
    );
    assert_eq!(
        store
            .job_open(
                new_job(&waits, zh_en, "{}", LEASE),
                (on(&route, &[]), false)
            )
            .await
            .unwrap(),
        JobStart::New(None),
        "others wait ahead: recorded only"
    );
    let (_, record) = store.job(&waits).await.unwrap().unwrap();
    assert_eq!((record.status.as_str(), record.attempt), ("queued", 0));
    for id in [&takes, &finds] {
        let opened = store
            .job_open(new_job(id, zh_en, "{}", LEASE), (on(&route, &[]), true))
            .await
            .unwrap();
        assert!(
            matches!(opened, JobStart::New(Some(JobPick::Node(_, 1)))),
            "{opened:?}"
        );
    }
    assert_eq!(
        store
            .job_next((zh_en, &waits), (0, false), on(&route, &[]))
            .await
            .unwrap(),
        Some(JobPick::NoCapacity),
        "both slots are taken"
    );
    let (_, record) = store.job(&waits).await.unwrap().unwrap();
    assert_eq!(
        (record.status.as_str(), record.attempt),
        ("queued", 0),
        "a pick without room changes nothing"
    );
    let late = JobId::new("late").unwrap();
    assert_eq!(
        store
            .job_open(new_job(&late, zh_en, "{}", LEASE), (on(&route, &[]), true))
            .await
            .unwrap(),
        JobStart::New(Some(JobPick::NoCapacity)),
        "its first pick found no room"
    );
    let (_, record) = store.job(&late).await.unwrap().unwrap();
    assert_eq!(
        (
            record.status.as_str(),
            record.attempt,
            record.node.as_deref()
        ),
        ("queued", 0, Some("")),
        "recorded all the same, waiting for room"
    );
}

#[tokio::test]
async fn a_jobs_times_are_recorded_as_whole_milliseconds() {
    // The scripts hand Redis their numbers as text they format themselves
    // (not as Lua numbers): what they record must still read as integers.
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let mut conn = lingua_tests::connect(&redis).await;
    let route = two_nodes_with_room(&store, 4).await;
    let zh_en = pair("zh:en");
    let id = JobId::new("timed").unwrap();
    let timeout = Duration::from_millis(1_234);
    store
        .job_open(
            new_job(&id, zh_en, "{req}", timeout),
            (on(&route, &[]), true),
        )
        .await
        .unwrap();
    let (_, record) = store.job(&id).await.unwrap().unwrap();
    let node = record.node.map(|n| NodeId::new(n).unwrap()).unwrap();
    let finished = store
        .job_finish((zh_en, &id), (Some(&node), 1), true, "{}", LEASE)
        .await
        .unwrap();
    let times: HashMap<String, String> = redis::cmd("HGETALL")
        .arg("lingua:v1:pair:{zh:en}:job:timed")
        .query_async(&mut conn)
        .await
        .unwrap();
    let ms = |field: &str| -> u64 {
        let text = &times[field];
        assert!(
            !text.is_empty() && text.bytes().all(|b| b.is_ascii_digit()),
            "{field} = {text:?}"
        );
        text.parse().unwrap()
    };
    assert_eq!(ms("attempt"), 1);
    assert_eq!(ms("deadline_ms") - ms("created_ms"), 1_234);
    assert_eq!(ms("latency_ms"), ms("finished_ms") - ms("created_ms"));
    assert_eq!(
        finished,
        Finish::Applied {
            latency_ms: ms("latency_ms")
        }
    );
}

#[tokio::test]
async fn only_a_job_running_past_its_deadline_and_grace_expires() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let route = two_nodes_with_room(&store, 4).await;
    let zh_en = pair("zh:en");
    let (due, later) = (JobId::new("due").unwrap(), JobId::new("later").unwrap());
    for (id, timeout) in [(&due, Duration::ZERO), (&later, LEASE)] {
        store
            .job_open(
                new_job(id, zh_en, "{req}", timeout),
                (on(&route, &[]), true),
            )
            .await
            .unwrap();
    }
    let failed = serde_json::json!({"error": {"code": "timeout", "message": "orphaned"}});
    let expire = |id: &JobId, grace: Duration| {
        let (store, id, failed) = (store.clone(), id.clone(), failed.clone());
        async move {
            store
                .job_expire((zh_en, &id), grace, &failed.to_string(), LEASE)
                .await
                .unwrap()
        }
    };
    assert!(
        !expire(&due, LEASE).await,
        "within the grace it keeps running"
    );
    assert!(!expire(&later, Duration::ZERO).await, "before its deadline");
    assert!(expire(&due, Duration::ZERO).await);
    assert!(!expire(&due, Duration::ZERO).await, "already ended");
    assert!(!expire(&JobId::new("never").unwrap(), Duration::ZERO).await);
    let (_, record) = store.job(&due).await.unwrap().unwrap();
    assert_eq!(record.status, "failed");
    assert_eq!(record.outcome, Some(failed.to_string()));
    let done = serde_json::json!({"output": {}});
    let node = record.node.map(|n| NodeId::new(n).unwrap()).unwrap();
    assert_eq!(
        store
            .job_finish(
                (zh_en, &due),
                (Some(&node), 1),
                true,
                &done.to_string(),
                LEASE
            )
            .await
            .unwrap(),
        Finish::Duplicate,
        "a result arriving after the expiry does not overwrite it"
    );
    assert_eq!(
        store.job(&later).await.unwrap().unwrap().1.status,
        "running"
    );
}

#[tokio::test]
async fn route_pick_prefers_the_session_node_excludes_tried_ones_and_tells_why_not() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let zh_en = pair("zh:en");
    let asr = JobKind::new("asr").unwrap();
    let affinity = Duration::from_secs(60);
    assert_eq!(
        store
            .route_pick(
                zh_en,
                &Route::gpu(&asr),
                None,
                affinity,
                PickPolicy::Capacity,
                &[]
            )
            .await
            .unwrap(),
        Pick::NoNodes
    );
    for id in ["a", "b"] {
        store
            .pool_join(zh_en, &node(id), &[], 10, LEASE)
            .await
            .unwrap();
    }
    let full = [RouteEntry {
        node: node("a"),
        free: [(Route::gpu(&asr), 0)].into(),
        room: None,
    }];
    store.route_update(zh_en, &full, LEASE).await.unwrap();
    assert_eq!(
        store
            .route_pick(
                zh_en,
                &Route::gpu(&asr),
                None,
                affinity,
                PickPolicy::Capacity,
                &[]
            )
            .await
            .unwrap(),
        Pick::NoCapacity,
        "a member serves the kind, none has room"
    );
    assert_eq!(
        store
            .route_pick(
                zh_en,
                &Route::gpu(&JobKind::new("tts").unwrap()),
                None,
                affinity,
                PickPolicy::Capacity,
                &[]
            )
            .await
            .unwrap(),
        Pick::NoNodes,
        "members, none serving the kind"
    );
    let entries = [
        RouteEntry {
            node: node("a"),
            free: [(Route::gpu(&asr), 1)].into(),
            room: None,
        },
        RouteEntry {
            node: node("b"),
            free: [(Route::gpu(&asr), 50)].into(),
            room: None,
        },
    ];
    store.route_update(zh_en, &entries, LEASE).await.unwrap();
    // Two candidates, two choices: the roomier one wins.
    assert_eq!(
        store
            .route_pick(
                zh_en,
                &Route::gpu(&asr),
                None,
                affinity,
                PickPolicy::Capacity,
                &[]
            )
            .await
            .unwrap(),
        Pick::Node(node("b"))
    );
    // Excluded nodes are never picked; a's one slot hint is used up.
    assert_eq!(
        store
            .route_pick(
                zh_en,
                &Route::gpu(&asr),
                None,
                affinity,
                PickPolicy::Capacity,
                &[node("b")]
            )
            .await
            .unwrap(),
        Pick::Node(node("a"))
    );
    assert_eq!(
        store
            .route_pick(
                zh_en,
                &Route::gpu(&asr),
                None,
                affinity,
                PickPolicy::Capacity,
                &[node("b")]
            )
            .await
            .unwrap(),
        Pick::NoCapacity
    );
    // A session sticks to its node while it has room.
    store.route_update(zh_en, &entries, LEASE).await.unwrap();
    assert_eq!(
        store
            .route_pick(
                zh_en,
                &Route::gpu(&asr),
                Some("s1"),
                affinity,
                PickPolicy::Capacity,
                &[node("b")]
            )
            .await
            .unwrap(),
        Pick::Node(node("a"))
    );
    store.route_update(zh_en, &entries, LEASE).await.unwrap();
    for _ in 0..5 {
        assert_eq!(
            store
                .route_pick(
                    zh_en,
                    &Route::gpu(&asr),
                    Some("s1"),
                    affinity,
                    PickPolicy::Capacity,
                    &[]
                )
                .await
                .unwrap(),
            Pick::Node(node("a")),
            "affinity"
        );
        store.route_update(zh_en, &entries, LEASE).await.unwrap();
    }
}

#[tokio::test]
async fn the_random_policy_picks_any_live_member_room_or_not() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let de_fr = pair("de:fr");
    let asr = JobKind::new("asr").unwrap();
    let pick = |excluded: Vec<NodeId>| {
        let store = store.clone();
        let asr = asr.clone();
        async move {
            store
                .route_pick(
                    de_fr,
                    &Route::gpu(&asr),
                    None,
                    LEASE,
                    PickPolicy::Random,
                    &excluded,
                )
                .await
                .unwrap()
        }
    };
    assert_eq!(pick(vec![]).await, Pick::NoNodes);
    for id in ["full", "roomy"] {
        store
            .pool_join(de_fr, &node(id), &[], 10, LEASE)
            .await
            .unwrap();
    }
    let entries = [RouteEntry {
        node: node("roomy"),
        free: [(Route::gpu(&asr), 1_000)].into(),
        room: None,
    }];
    store.route_update(de_fr, &entries, LEASE).await.unwrap();
    let mut chosen = std::collections::BTreeSet::new();
    for _ in 0..200 {
        match pick(vec![]).await {
            Pick::Node(node) => chosen.insert(node.to_string()),
            other => panic!("a live member exists: {other:?}"),
        };
    }
    assert_eq!(
        chosen.into_iter().collect::<Vec<_>>(),
        ["full", "roomy"],
        "room plays no part: both are chosen"
    );
    assert_eq!(pick(vec![node("roomy")]).await, Pick::Node(node("full")));
    assert_eq!(
        pick(vec![node("roomy"), node("full")]).await,
        Pick::NoCapacity
    );
}

/// Redis's clock, in ms (the scripts' time base).
async fn redis_now_ms(conn: &mut redis::aio::MultiplexedConnection) -> u64 {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    secs * 1000 + micros / 1000
}

/// Gives each pair `(pair, count)` that many nodes with `free` slots on
/// `route` (`dead-<count>-<i>`) whose leases run out (their coordinator
/// died holding them), and waits until Redis's clock is past them.
async fn lapsed_nodes(
    store: &Store,
    conn: &mut redis::aio::MultiplexedConnection,
    pairs: &[(LangPair, usize)],
    (route, free): (&Route, u32),
) {
    let short = Duration::from_millis(50);
    for &(pair, count) in pairs {
        let entries: Vec<RouteEntry> = (0..count)
            .map(|i| RouteEntry {
                node: node(&format!("dead-{count}-{i}")),
                free: [(route.clone(), free)].into(),
                room: None,
            })
            .collect();
        for entry in &entries {
            store
                .pool_join(pair, &entry.node, &[], 100, short)
                .await
                .unwrap();
        }
        store.route_update(pair, &entries, short).await.unwrap();
    }
    let expires = redis_now_ms(conn).await + 50;
    eventually("the leases to pass", || {
        let mut conn = conn.clone();
        async move { (redis_now_ms(&mut conn).await > expires).then_some(()) }
    })
    .await;
}

#[tokio::test]
async fn route_pick_never_chooses_a_node_whose_lease_is_past() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let mut conn = lingua_tests::connect(&redis).await;
    let zh_en = pair("zh:en");
    let asr = JobKind::new("asr").unwrap();
    // More expired entries than one pick cleans up on its way (16).
    lapsed_nodes(&store, &mut conn, &[(zh_en, 20)], (&Route::gpu(&asr), 4)).await;
    for _ in 0..3 {
        assert_eq!(
            store
                .route_pick(
                    zh_en,
                    &Route::gpu(&asr),
                    None,
                    Duration::from_secs(60),
                    PickPolicy::Capacity,
                    &[]
                )
                .await
                .unwrap(),
            Pick::NoNodes
        );
    }
}

#[tokio::test]
async fn a_pick_past_a_full_sweep_still_passes_over_lapsed_nodes() {
    // A pick removes up to 16 lapsed entries, then samples: without their
    // deadlines only when the sweep removed fewer (none can be left).
    // Around that limit, the lapsed nodes (more room than the live one)
    // must never be chosen.
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let mut conn = lingua_tests::connect(&redis).await;
    let asr = JobKind::new("asr").unwrap();
    let route = Route::gpu(&asr);
    let cases = [
        (pair("zh:en"), 15),
        (pair("ja:en"), 16),
        (pair("ko:en"), 17),
    ];
    lapsed_nodes(&store, &mut conn, &cases, (&route, 8)).await;
    let live = node("live");
    for (pair, lapsed) in cases {
        store.pool_join(pair, &live, &[], 100, LEASE).await.unwrap();
        let entry = RouteEntry {
            node: live.clone(),
            free: [(route.clone(), 1)].into(),
            room: None,
        };
        store.route_update(pair, &[entry], LEASE).await.unwrap();
        let picked = store
            .route_pick(
                pair,
                &route,
                None,
                Duration::from_secs(60),
                PickPolicy::Capacity,
                &[],
            )
            .await
            .unwrap();
        assert_eq!(
            picked,
            Pick::Node(live.clone()),
            "{lapsed} lapsed in {pair}"
        );
    }
}

#[tokio::test]
async fn an_offline_node_expires_after_its_retention_and_leaves_the_index() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let mut conn = lingua_tests::connect(&redis).await;
    let (gone, kept) = (node("gone"), node("kept"));
    for (id, retention) in [(&gone, Duration::from_millis(100)), (&kept, RETENTION)] {
        let registration = Registration {
            retention,
            ..reg(id, "i", Duration::from_millis(50))
        };
        store.register_node(&registration).await.unwrap();
        store.index_node(id, &BTreeMap::new()).await.unwrap();
    }
    let keys = lingua_coordinator::keys::NodeKeys::new(&gone);
    eventually("the node's record to expire", || {
        let mut conn = conn.clone();
        let keys = keys.clone();
        async move {
            let left: u32 = redis::cmd("EXISTS")
                .arg(&keys.hash)
                .arg(&keys.epoch)
                .arg(&keys.lease)
                .query_async(&mut conn)
                .await
                .unwrap();
            (left == 0).then_some(())
        }
    })
    .await;
    let listed: Vec<String> = store
        .nodes()
        .await
        .unwrap()
        .into_iter()
        .map(|n| n.id.to_string())
        .collect();
    assert_eq!(
        listed,
        ["kept"],
        "the offline node within its retention stays"
    );
    let indexed: Vec<String> = redis::cmd("SMEMBERS")
        .arg(lingua_coordinator::keys::ALL_NODES)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(indexed, ["kept"], "the index is pruned");
}

#[tokio::test]
async fn a_pair_nobody_serves_keeps_no_key() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let mut conn = lingua_tests::connect(&redis).await;
    let zh_en = pair("zh:en");
    let asr = JobKind::new("asr").unwrap();
    for id in ["a", "b"] {
        store
            .pool_join(zh_en, &node(id), &[], 10, LEASE)
            .await
            .unwrap();
    }
    for id in ["a", "b"] {
        store
            .pool_leave(zh_en, &node(id), std::slice::from_ref(&asr))
            .await
            .unwrap();
    }
    let left: Vec<String> = redis::cmd("KEYS")
        .arg("lingua:v1:pair:{zh:en}:*")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    // A new member starts pool ids afresh.
    assert_eq!(
        store
            .pool_join(zh_en, &node("c"), &[], 10, LEASE)
            .await
            .unwrap(),
        "1"
    );
}

/// A node whose coordinator instance stops leaves its pool and routing,
/// but serves its kinds until its lease deadline: while it moves to
/// another instance the pair's jobs wait for room rather than fail
/// `no_nodes`. Once the lease has passed, nothing serves the pair.
#[tokio::test]
async fn a_moving_node_leaves_routing_but_serves_its_pair_until_its_lease() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let mut conn = lingua_tests::connect(&redis).await;
    let zh_en = pair("zh:en");
    let route = two_nodes_with_room(&store, 1).await;
    let asr = JobKind::new("asr").unwrap();
    for id in ["a", "b"] {
        let left = store
            .pool_leave_moving(zh_en, &node(id), std::slice::from_ref(&asr))
            .await
            .unwrap();
        assert!(left, "{id} was a member");
    }
    assert_eq!(
        pick_once(&store, zh_en, route.clone()).await,
        Pick::NoCapacity
    );
    let pools: u64 = redis::cmd("ZCARD")
        .arg("lingua:v1:pair:{zh:en}:pools")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(pools, 0, "their pool seats are given up");
    // Their leases run out.
    for id in ["a", "b"] {
        let _: u64 = redis::cmd("ZADD")
            .arg("lingua:v1:pair:{zh:en}:served:asr")
            .arg(1)
            .arg(id)
            .query_async(&mut conn)
            .await
            .unwrap();
    }
    assert_eq!(pick_once(&store, zh_en, route).await, Pick::NoNodes);
}

#[tokio::test]
async fn an_admin_drain_is_kept_for_the_same_agent_process_only() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let id = node("held");
    let registered = |instance: &'static str| {
        let store = store.clone();
        let id = id.clone();
        async move {
            match store
                .register_node(&reg(&id, instance, LEASE))
                .await
                .unwrap()
            {
                RegisterOutcome::Registered { epoch, drained, .. } => (epoch, drained),
                other => panic!("expected a registration, got {other:?}"),
            }
        }
    };
    assert!(!registered("inst-a").await.1);
    assert!(matches!(
        store.drain_node(&id, None).await.unwrap(),
        DrainOutcome::Draining { .. }
    ));
    let (epoch, drained) = registered("inst-a").await;
    assert!(
        drained,
        "a reconnection of the drained process stays drained"
    );
    assert_eq!(state(&store, &id).await, NodeState::Draining);
    assert!(store.node_offline(&id, epoch).await.unwrap());
    let (_, drained) = registered("inst-b").await;
    assert!(!drained, "a new agent process comes back ready");
    assert_eq!(state(&store, &id).await, NodeState::Ready);
}

/// One pick on `route` of `pair`, without a session or tried nodes.
async fn pick_once(store: &Store, pair: LangPair, route: Route) -> Pick {
    store
        .route_pick(
            pair,
            &route,
            None,
            Duration::ZERO,
            PickPolicy::Capacity,
            &[],
        )
        .await
        .unwrap()
}

#[tokio::test]
async fn a_pick_of_any_kind_shrinks_every_kind_on_a_node_that_reports_its_room() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let zh_en = pair("zh:en");
    let (asr, translate) = (
        JobKind::new("asr").unwrap(),
        JobKind::new("translate").unwrap(),
    );
    store
        .pool_join(zh_en, &node("a"), &[], 10, LEASE)
        .await
        .unwrap();
    // One 16,000 MiB GPU: 2 asr (6,000 MiB) or 5 translate (3,000 MiB).
    let entry = RouteEntry {
        node: node("a"),
        free: [(Route::gpu(&asr), 2), (Route::gpu(&translate), 5)].into(),
        room: Some(Room {
            devices_mb: vec![16_000],
            vram_mb: [(asr.clone(), 6000), (translate.clone(), 3000)].into(),
        }),
    };
    store.route_update(zh_en, &[entry], LEASE).await.unwrap();
    let pick = |kind: &JobKind| pick_once(&store, zh_en, Route::gpu(kind));
    assert_eq!(pick(&asr).await, Pick::Node(node("a")));
    assert_eq!(pick(&asr).await, Pick::Node(node("a")));
    // 4,000 MiB left: one translate fits, not the five the node counted
    // for translate alone.
    assert_eq!(pick(&translate).await, Pick::Node(node("a")));
    assert_eq!(pick(&translate).await, Pick::NoCapacity);
    assert_eq!(pick(&asr).await, Pick::NoCapacity);
}

#[tokio::test]
async fn a_fallback_route_is_a_list_of_its_own_that_takes_no_memory() {
    let redis = lingua_tests::redis().await;
    let store = store(&redis).await;
    let zh_en = pair("zh:en");
    let asr = JobKind::new("asr").unwrap();
    store
        .pool_join(zh_en, &node("a"), std::slice::from_ref(&asr), 10, LEASE)
        .await
        .unwrap();
    // One 6,000 MiB GPU: one asr job; and two slots of asr's fallback.
    let entry = RouteEntry {
        node: node("a"),
        free: [(Route::gpu(&asr), 1), (Route::fallback(&asr), 2)].into(),
        room: Some(Room {
            devices_mb: vec![6000],
            vram_mb: [(asr.clone(), 6000)].into(),
        }),
    };
    store.route_update(zh_en, &[entry], LEASE).await.unwrap();
    let pick = |route: Route| pick_once(&store, zh_en, route);
    let mut conn = lingua_tests::connect(&redis).await;
    let memory = |conn: &mut redis::aio::MultiplexedConnection| {
        let mut conn = conn.clone();
        async move {
            let text: String = redis::cmd("HGET")
                .arg("lingua:v1:pair:{zh:en}:memory")
                .arg("a")
                .query_async(&mut conn)
                .await
                .unwrap();
            serde_json::from_str::<Room>(&text).unwrap().devices_mb
        }
    };
    assert_eq!(pick(Route::fallback(&asr)).await, Pick::Node(node("a")));
    assert_eq!(
        memory(&mut conn).await,
        [6000],
        "a fallback job leaves the GPU's memory alone"
    );
    assert_eq!(pick(Route::gpu(&asr)).await, Pick::Node(node("a")));
    assert_eq!(memory(&mut conn).await, [0]);
    assert_eq!(pick(Route::gpu(&asr)).await, Pick::NoCapacity);
    assert_eq!(
        pick(Route::fallback(&asr)).await,
        Pick::Node(node("a")),
        "the GPU being full leaves the fallback's room"
    );
    assert_eq!(pick(Route::fallback(&asr)).await, Pick::NoCapacity);
    let free: Option<u32> = redis::cmd("HGET")
        .arg("lingua:v1:pair:{zh:en}:free:asr@cpu")
        .arg("a")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(free, None, "a node out of room leaves the list");
    store
        .pool_leave(zh_en, &node("a"), std::slice::from_ref(&asr))
        .await
        .unwrap();
    let served: u32 = redis::cmd("EXISTS")
        .arg("lingua:v1:pair:{zh:en}:served:asr@cpu")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(served, 0, "leaving the pair leaves the fallback lists too");
}

/// A master of a test cluster: its URL, its node id, a connection to it.
type Master = (String, String, redis::aio::MultiplexedConnection);

/// A direct connection to each master of `cluster`, with its node id.
async fn masters(cluster: &lingua_tests::cluster::RedisCluster) -> Vec<Master> {
    let mut masters = Vec::new();
    for url in cluster.seeds() {
        let mut conn = redis::Client::open(url.as_str())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap();
        let id: String = redis::cmd("CLUSTER")
            .arg("MYID")
            .query_async(&mut conn)
            .await
            .unwrap();
        masters.push((url, id, conn));
    }
    masters
}

/// Moves `slot` from the master at `from` to the one at `to`, keys and
/// all, as `redis-cli --cluster reshard` does.
async fn move_slot(masters: &mut [Master], slot: u16, (from, to): (usize, usize)) {
    let (from_id, to_id) = (masters[from].1.clone(), masters[to].1.clone());
    let to_port = masters[to].0.rsplit(':').next().unwrap().to_owned();
    let () = redis::cmd("CLUSTER")
        .arg("SETSLOT")
        .arg(slot)
        .arg("IMPORTING")
        .arg(&from_id)
        .query_async(&mut masters[to].2)
        .await
        .unwrap();
    let () = redis::cmd("CLUSTER")
        .arg("SETSLOT")
        .arg(slot)
        .arg("MIGRATING")
        .arg(&to_id)
        .query_async(&mut masters[from].2)
        .await
        .unwrap();
    let keys: Vec<String> = redis::cmd("CLUSTER")
        .arg("GETKEYSINSLOT")
        .arg(slot)
        .arg(1000)
        .query_async(&mut masters[from].2)
        .await
        .unwrap();
    assert!(!keys.is_empty(), "the slot holds the node's keys");
    let () = redis::cmd("MIGRATE")
        .arg("127.0.0.1")
        .arg(&to_port)
        .arg("")
        .arg(0)
        .arg(5000)
        .arg("KEYS")
        .arg(&keys)
        .query_async(&mut masters[from].2)
        .await
        .unwrap();
    for (_, _, conn) in masters.iter_mut() {
        let () = redis::cmd("CLUSTER")
            .arg("SETSLOT")
            .arg(slot)
            .arg("NODE")
            .arg(&to_id)
            .query_async(conn)
            .await
            .unwrap();
    }
}

/// The index of the master that holds keys of `slot`.
async fn holder(masters: &mut [Master], slot: u16) -> usize {
    for (index, (_, _, conn)) in masters.iter_mut().enumerate() {
        let keys: u64 = redis::cmd("CLUSTER")
            .arg("COUNTKEYSINSLOT")
            .arg(slot)
            .query_async(conn)
            .await
            .unwrap();
        if keys > 0 {
            return index;
        }
    }
    panic!("no master holds keys of slot {slot}");
}

/// Script calls through `store` until `metrics` counts `maps` slot maps
/// read.
async fn mapped(store: &Store, metrics: &Metrics, id: &NodeId, maps: u64) {
    eventually(&format!("{maps} slot maps read"), || async {
        let _ = store.register_node(&reg(id, "i1", LEASE)).await;
        (metrics.cluster_slot_maps.get() >= maps).then_some(())
    })
    .await;
}

/// Has each master drop every client connection but the harness's own.
async fn drop_every_connection(masters: &mut [Master]) {
    for (_, _, conn) in masters {
        let _killed: u64 = redis::cmd("CLIENT")
            .arg("KILL")
            .arg("TYPE")
            .arg("normal")
            .arg("SKIPME")
            .arg("yes")
            .query_async(conn)
            .await
            .unwrap();
    }
}

/// Whether the master on `conn` serves `slot` (its own line of
/// `CLUSTER NODES`: flags with `myself`, then its slot ranges).
async fn serves(conn: &mut redis::aio::MultiplexedConnection, slot: u16) -> bool {
    let nodes: String = redis::cmd("CLUSTER")
        .arg("NODES")
        .query_async(conn)
        .await
        .unwrap();
    let mine = nodes
        .lines()
        .find(|line| line.split(' ').nth(2).is_some_and(|f| f.contains("myself")))
        .expect("a master lists itself");
    mine.split(' ').skip(8).any(|range| {
        let (from, to) = range.split_once('-').unwrap_or((range, range));
        (from.parse::<u16>().unwrap()..=to.parse::<u16>().unwrap()).contains(&slot)
    })
}

/// A store on a new cluster, which has mapped its slots through calls
/// for node `id`; the cluster, the store's metrics and each master.
async fn mapped_cluster(
    id: &NodeId,
) -> (
    lingua_tests::cluster::RedisCluster,
    Arc<Metrics>,
    Store,
    Vec<Master>,
) {
    let cluster = lingua_tests::cluster::RedisCluster::start().await.unwrap();
    let metrics = Arc::new(Metrics::default());
    let store = Store::connect_cluster(&cluster.seeds(), None, metrics.clone())
        .await
        .unwrap();
    let masters = masters(&cluster).await;
    mapped(&store, &metrics, id, 1).await;
    (cluster, metrics, store, masters)
}

#[tokio::test]
async fn script_calls_follow_a_slot_that_moves_to_another_master() {
    let id = node("moving");
    let (_cluster, metrics, store, mut masters) = mapped_cluster(&id).await;
    let slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg("lingua:v1:node:{moving}")
        .query_async(&mut masters[0].2)
        .await
        .unwrap();
    let from = holder(&mut masters, slot).await;
    let to = (from + 1) % masters.len();
    move_slot(&mut masters, slot, (from, to)).await;

    // The calls after the move meet MOVED at the old master and are sent
    // again, until the slots are mapped anew; none fails.
    let RegisterOutcome::Registered { epoch, .. } =
        store.register_node(&reg(&id, "i1", LEASE)).await.unwrap()
    else {
        panic!("the node's own instance registers again");
    };
    mapped(&store, &metrics, &id, 2).await;
    for _ in 0..20 {
        store.register_node(&reg(&id, "i1", LEASE)).await.unwrap();
    }
    assert_eq!(holder(&mut masters, slot).await, to);
    let record = store.node(&id).await.unwrap().unwrap();
    assert!(record.fields["epoch"].parse::<u64>().unwrap() > epoch + 20);
}

#[tokio::test]
async fn script_calls_go_through_again_once_the_masters_drop_every_connection() {
    let id = node("dropped");
    let (_cluster, metrics, store, mut masters) = mapped_cluster(&id).await;
    drop_every_connection(&mut masters).await;
    // A call on a dropped connection may fail (it may have run); the
    // store then maps the masters again and connects to them anew.
    mapped(&store, &metrics, &id, 2).await;
    for _ in 0..20 {
        store.register_node(&reg(&id, "i1", LEASE)).await.unwrap();
    }
}

#[tokio::test]
async fn a_job_keeps_its_id_claim_when_its_master_drops_every_connection() {
    let id = node("claiming");
    let (_cluster, _metrics, store, mut masters) = mapped_cluster(&id).await;
    let route = two_nodes_with_room(&store, 4).await;
    let zh_en = pair("zh:en");
    let pair_slot: u16 = redis::cmd("CLUSTER")
        .arg("KEYSLOT")
        .arg("{zh:en}")
        .query_async(&mut masters[0].2)
        .await
        .unwrap();
    let pair_master = holder(&mut masters, pair_slot).await;
    // A job whose id is claimed on another master than its pair's record.
    let mut job = None;
    for n in 0.. {
        let candidate = JobId::new(format!("claimed-{n}")).unwrap();
        let slot: u16 = redis::cmd("CLUSTER")
            .arg("KEYSLOT")
            .arg(lingua_coordinator::keys::job_pair(&candidate))
            .query_async(&mut masters[0].2)
            .await
            .unwrap();
        if !serves(&mut masters[pair_master].2, slot).await {
            job = Some(candidate);
            break;
        }
    }
    let job = job.unwrap();
    let others: Vec<usize> = (0..masters.len()).filter(|&m| m != pair_master).collect();
    for m in others {
        drop_every_connection(&mut masters[m..=m]).await;
    }
    // The claim meets a dropped connection; `SET NX GET` changes nothing
    // when run twice, so it is sent again, and the id stays found.
    let opened = store
        .job_open(new_job(&job, zh_en, "{}", LEASE), (on(&route, &[]), true))
        .await
        .unwrap();
    assert!(
        matches!(opened, JobStart::New(Some(JobPick::Node(_, 1)))),
        "{opened:?}"
    );
    assert_eq!(store.job_pair(&job).await.unwrap(), Some(zh_en));
}

#[tokio::test]
async fn index_writes_go_through_when_the_masters_drop_every_connection() {
    let id = node("indexed");
    let (_cluster, _metrics, store, mut masters) = mapped_cluster(&id).await;
    store.register_node(&reg(&id, "i1", LEASE)).await.unwrap();
    drop_every_connection(&mut masters).await;
    // `SADD` and `HSET` change nothing when run twice: a dropped
    // connection has them sent again, not failed as "may have run".
    let pools = BTreeMap::from([(pair("zh:en"), "p1".to_owned())]);
    store.index_node(&id, &pools).await.unwrap();
    let listed = store.nodes().await.unwrap();
    let record = listed
        .iter()
        .find(|n| n.id == id)
        .expect("the node is indexed");
    assert_eq!(
        record.fields.get("pools").map(String::as_str),
        Some(r#"{"zh:en":"p1"}"#)
    );
}
