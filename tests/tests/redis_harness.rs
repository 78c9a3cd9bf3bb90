//! The harness's promises: a real server per test, isolated, stopped on drop
//! and on panic, and a clear error when redis-server is missing.

use std::path::Path;
use std::time::Duration;

use lingua_coordinator::private_redis::{self, PrivateRedis, PrivateRedisError};

async fn server_pid(conn: &mut redis::aio::MultiplexedConnection) -> u32 {
    let info: String = redis::cmd("INFO")
        .arg("server")
        .query_async(conn)
        .await
        .unwrap();
    info.lines()
        .find_map(|line| line.strip_prefix("process_id:"))
        .and_then(|pid| pid.trim().parse().ok())
        .expect("INFO server has a process_id")
}

/// Waits (bounded) until a process no longer exists.
async fn wait_gone(pid: u32) {
    let proc_dir = format!("/proc/{pid}");
    let gone = tokio::time::timeout(Duration::from_secs(10), async {
        while Path::new(&proc_dir).exists() && !is_zombie(&proc_dir) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    assert!(gone.is_ok(), "redis-server {pid} still runs");
}

fn is_zombie(proc_dir: &str) -> bool {
    std::fs::read_to_string(format!("{proc_dir}/stat"))
        .map(|stat| {
            stat.rsplit(')')
                .next()
                .is_some_and(|rest| rest.trim_start().starts_with('Z'))
        })
        .unwrap_or(true)
}

#[tokio::test]
async fn each_test_gets_its_own_server() {
    let a = lingua_tests::redis().await;
    let b = lingua_tests::redis().await;
    assert_ne!(a.socket_path(), b.socket_path());
    let mut ca = lingua_tests::connect(&a).await;
    let mut cb = lingua_tests::connect(&b).await;
    let _: () = redis::cmd("SET")
        .arg("k")
        .arg("a")
        .query_async(&mut ca)
        .await
        .unwrap();
    let in_b: Option<String> = redis::cmd("GET")
        .arg("k")
        .query_async(&mut cb)
        .await
        .unwrap();
    assert_eq!(in_b, None);
    let port: Vec<String> = redis::cmd("CONFIG")
        .arg("GET")
        .arg("port")
        .query_async(&mut ca)
        .await
        .unwrap();
    assert_eq!(port, ["port", "0"], "no TCP port is bound");
}

#[tokio::test]
async fn stop_and_drop_end_the_server() {
    let redis = lingua_tests::redis().await;
    let pid = server_pid(&mut lingua_tests::connect(&redis).await).await;
    redis.stop().await;
    wait_gone(pid).await;

    let redis = lingua_tests::redis().await;
    let pid = server_pid(&mut lingua_tests::connect(&redis).await).await;
    drop(redis);
    wait_gone(pid).await;
}

#[tokio::test]
async fn a_panicking_test_still_stops_its_server() {
    let (tx, rx) = tokio::sync::oneshot::channel();
    let task = tokio::spawn(async move {
        let redis = lingua_tests::redis().await;
        let pid = server_pid(&mut lingua_tests::connect(&redis).await).await;
        tx.send(pid).unwrap();
        panic!("the test body fails while holding the server");
    });
    assert!(task.await.unwrap_err().is_panic());
    wait_gone(rx.await.unwrap()).await;
}

#[tokio::test]
async fn missing_redis_server_says_how_to_install_it() {
    let empty = tempfile_dir();
    let err = private_redis::locate(Some(empty.as_os_str())).unwrap_err();
    assert!(matches!(err, PrivateRedisError::NotInstalled));
    let text = err.to_string();
    assert!(text.contains("apt-get install redis-server"), "{text}");
    assert!(text.contains("--redis-url"), "{text}");
    assert!(private_redis::locate(None).is_err());
}

#[tokio::test]
async fn a_server_that_cannot_start_is_reported_with_its_log() {
    let err = PrivateRedis::start_binary(Path::new("/bin/false"), false)
        .await
        .unwrap_err();
    assert!(matches!(err, PrivateRedisError::NotReady { .. }), "{err}");
}

fn tempfile_dir() -> std::path::PathBuf {
    std::env::temp_dir().join("lingua-no-such-dir-for-path")
}

#[tokio::test]
async fn a_durable_server_keeps_its_data_across_a_restart_and_a_plain_one_does_not() {
    for durable in [true, false] {
        let mut redis = if durable {
            PrivateRedis::start_durable().await.unwrap()
        } else {
            PrivateRedis::start().await.unwrap()
        };
        let mut conn = lingua_tests::connect(&redis).await;
        let _: () = redis::cmd("SET")
            .arg("kept")
            .arg("yes")
            .query_async(&mut conn)
            .await
            .unwrap();
        redis.restart().await.unwrap();
        let mut conn = lingua_tests::connect(&redis).await;
        let kept: Option<String> = redis::cmd("GET")
            .arg("kept")
            .query_async(&mut conn)
            .await
            .unwrap();
        assert_eq!(kept.is_some(), durable, "durable: {durable}");
        redis.stop().await;
    }
}
