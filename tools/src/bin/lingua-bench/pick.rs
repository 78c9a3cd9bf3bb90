//! Pool scaling: what one `route_pick` costs with 10 and with 10,000 nodes
//! in the pair, inside Redis (`INFO commandstats`) and as the coordinator
//! sees it (one round trip over the unix socket).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use futures_util::future::try_join_all;
use lingua_coordinator::config::PickPolicy;
use lingua_coordinator::metrics::Metrics;
use lingua_coordinator::store::{Pick, Route, RouteEntry, Store};
use lingua_shared::{JobKind, LangPair, NodeId};
use tokio::time::Instant;

use crate::{BenchError, Options, Percentiles, Row, private_redis};

const PICKS: u32 = 20_000;

pub async fn run(_options: &Options) -> Result<Vec<Row>, BenchError> {
    let redis = private_redis().await?;
    let store = Store::connect(&redis.url(), Arc::new(Metrics::default()))
        .await
        .map_err(|e| format!("redis: {e}"))?;
    let mut conn = redis::Client::open(redis.url())
        .map_err(|e| format!("redis: {e}"))?
        .get_multiplexed_async_connection()
        .await
        .map_err(|e| format!("redis: {e}"))?;
    let mut rows = Vec::new();
    let mut server_costs = Vec::new();
    for (size, pair) in [(10u32, "de:fr"), (10_000, "fr:de")] {
        let pair: LangPair = pair.parse().map_err(|e| format!("{e}"))?;
        let (server, mut client) = measure(&store, &mut conn, pair, size).await?;
        server_costs.push(server);
        let client = Percentiles::of(&mut client);
        rows.push(Row::new(
            format!("Pick cost, {size} nodes in the pair ({PICKS} picks)"),
            format!(
                "{server:.1} µs in Redis; round trip p50 / p99 {} / {} ms",
                crate::ms(client.p50),
                crate::ms(client.p99)
            ),
            "",
        ));
    }
    rows.push(Row::new(
        "Pick cost at 10,000 nodes / at 10 nodes (in Redis)",
        format!("{:.2}x", server_costs[1] / server_costs[0]),
        "<= 2x",
    ));
    redis.stop().await;
    Ok(rows)
}

/// Fills `pair` with `size` routable nodes, then picks [`PICKS`] times:
/// returns the mean µs per call inside Redis and the round trips.
async fn measure(
    store: &Store,
    conn: &mut redis::aio::MultiplexedConnection,
    pair: LangPair,
    size: u32,
) -> Result<(f64, Vec<Duration>), BenchError> {
    let kind = JobKind::new("translate").map_err(|e| e.to_string())?;
    let lease = Duration::from_secs(600);
    let nodes: Vec<NodeId> = (0..size)
        .map(|i| NodeId::new(format!("{pair}-{i:05}").replace(':', "-")).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    for chunk in nodes.chunks(500) {
        try_join_all(
            chunk
                .iter()
                .map(|node| store.pool_join(pair, node, &[], 100, lease)),
        )
        .await
        .map_err(|e| e.to_string())?;
        let entries: Vec<RouteEntry> = chunk
            .iter()
            .map(|node| RouteEntry {
                node: node.clone(),
                free: BTreeMap::from([(Route::gpu(&kind), 1_000_000)]),
                room: None,
            })
            .collect();
        store
            .route_update(pair, &entries, lease)
            .await
            .map_err(|e| e.to_string())?;
    }
    let _: () = redis::cmd("CONFIG")
        .arg("RESETSTAT")
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    let mut round_trips = Vec::with_capacity(PICKS as usize);
    for _ in 0..PICKS {
        let started = Instant::now();
        let pick = store
            .route_pick(
                pair,
                &Route::gpu(&kind),
                None,
                Duration::ZERO,
                PickPolicy::Capacity,
                &[],
            )
            .await
            .map_err(|e| e.to_string())?;
        round_trips.push(started.elapsed());
        if !matches!(pick, Pick::Node(_)) {
            return Err(format!("a pick among {size} nodes with room found none"));
        }
    }
    let stats: String = redis::cmd("INFO")
        .arg("commandstats")
        .query_async(conn)
        .await
        .map_err(|e| e.to_string())?;
    let per_call = stats
        .lines()
        .find_map(|l| l.strip_prefix("cmdstat_evalsha:"))
        .and_then(|l| {
            l.split(',')
                .find_map(|kv| kv.strip_prefix("usec_per_call="))
        })
        .and_then(|v| v.parse::<f64>().ok())
        .ok_or("INFO commandstats shows no EVALSHA calls")?;
    Ok((per_call, round_trips))
}
