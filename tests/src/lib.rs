//! Harness for the Lingua fleet's cross-process tests.
//!
//! Every test gets its own real `redis-server` on a unix socket in a
//! temporary directory (never a fixed port), started by [`redis`] and
//! stopped when the returned guard drops, also when the test panics and
//! also when the test process is killed (see
//! [`lingua_coordinator::private_redis`]). There are no mocks of Redis.
#![forbid(unsafe_code)]

use lingua_coordinator::private_redis::{PrivateRedis, PrivateRedisError};

/// Starts a fresh `redis-server` for one test and waits until it answers.
///
/// # Panics
/// When `redis-server` is missing or does not start, with a message that
/// says how to install it: these tests cannot run without it.
pub async fn redis() -> PrivateRedis {
    match PrivateRedis::start().await {
        Ok(redis) => redis,
        Err(err @ PrivateRedisError::NotInstalled) => panic!(
            "the integration tests need a real redis-server: {err}. \
             `bash .ci/run` installs it with apt-get."
        ),
        Err(err) => panic!("could not start redis-server for a test: {err}"),
    }
}

/// Opens a multiplexed connection to a test Redis.
///
/// # Panics
/// When the server does not accept the connection.
pub async fn connect(redis: &PrivateRedis) -> redis::aio::MultiplexedConnection {
    redis::Client::open(redis.url())
        .expect("the private Redis URL is valid")
        .get_multiplexed_async_connection()
        .await
        .expect("the private Redis accepts connections")
}
