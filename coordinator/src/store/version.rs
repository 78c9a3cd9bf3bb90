//! The Redis version the coordinator needs: 7.0 or later (a job's
//! arrival claims its id with `SET … NX GET`, which 6.2 and older refuse).

use super::{Store, StoreError};

/// The oldest Redis the coordinator runs on, (major, minor).
const OLDEST: (u32, u32) = (7, 0);

impl Store {
    /// Fails when the Redis answering (on a Cluster, any of its nodes that
    /// answers `INFO`) is older than 7.0: jobs would run, but every lookup
    /// by id would miss. A user that may not run `INFO` (an ACL without
    /// `@dangerous`) leaves the version unchecked, with a warning.
    pub async fn require_version(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let mut command = redis::cmd("INFO");
        let info: redis::Value = match command.arg("server").query_async(&mut conn).await {
            Ok(info) => info,
            Err(err) => {
                tracing::warn!(error = %err, "cannot read the Redis version (INFO); not checked: the coordinator needs Redis 7.0 or later");
                return Ok(());
            }
        };
        let mut texts = Vec::new();
        texts_of(&info, &mut texts);
        match texts.iter().find_map(|text| too_old(text)) {
            Some(found) => Err(StoreError::TooOld { found }),
            None => Ok(()),
        }
    }
}

/// Every text in an `INFO` reply (one per node on a Cluster).
fn texts_of(value: &redis::Value, texts: &mut Vec<String>) {
    match value {
        redis::Value::BulkString(bytes) => texts.push(String::from_utf8_lossy(bytes).into_owned()),
        redis::Value::VerbatimString { text, .. } | redis::Value::SimpleString(text) => {
            texts.push(text.clone());
        }
        redis::Value::Array(values) | redis::Value::Set(values) => {
            values.iter().for_each(|value| texts_of(value, texts));
        }
        redis::Value::Map(pairs) => pairs.iter().for_each(|(_, value)| texts_of(value, texts)),
        _ => {}
    }
}

/// The version an `INFO server` text names, when it is older than
/// [`OLDEST`].
fn too_old(info: &str) -> Option<String> {
    let version = info
        .lines()
        .find_map(|line| line.strip_prefix("redis_version:"))?
        .trim();
    let mut parts = version.split('.').map(|part| part.parse::<u32>().ok());
    let (major, minor) = (parts.next()??, parts.next().flatten().unwrap_or(0));
    ((major, minor) < OLDEST).then(|| version.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redis_older_than_7_0_is_named_and_newer_passes() {
        let info = |version: &str| {
            format!("# Server\r\nredis_version:{version}\r\nredis_mode:standalone\r\n")
        };
        assert_eq!(too_old(&info("6.0.16")), Some("6.0.16".to_owned()));
        assert_eq!(too_old(&info("6.2.14")), Some("6.2.14".to_owned()));
        assert_eq!(too_old(&info("7.0.15")), None);
        assert_eq!(too_old(&info("8.2.1")), None);
        assert_eq!(
            too_old("# Server\r\nsomething_else:1\r\n"),
            None,
            "no version: no verdict"
        );
        assert_eq!(too_old(&info("unstable")), None);
    }
}
