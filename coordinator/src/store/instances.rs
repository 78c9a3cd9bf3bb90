//! Coordinator instances: presence, reaping, and their inboxes.

use rand::seq::SliceRandom;

use super::*;

impl Store {
    /// Announces (or renews) coordinator `instance`, serving on `listen`,
    /// for `ttl`. A `leaving` instance (stopping) stays present, but its
    /// index entry is overdue: no job is handed to it, and it is reaped
    /// should it die before it removes itself.
    pub async fn instance_alive(
        &self,
        instance: &str,
        listen: &str,
        (ttl, leaving): (Duration, bool),
    ) -> Result<(), StoreError> {
        let keys = InstanceKeys::new(instance);
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(&keys.presence)
            .arg(listen)
            .arg("PX")
            .arg(millis(ttl))
            .query_async::<()>(&mut conn)
            .await?;
        let deadline = if leaving {
            0
        } else {
            wall_clock_ms() + millis(ttl)
        };
        redis::cmd("ZADD")
            .arg(keys::ALL_INSTANCES)
            .arg(deadline)
            .arg(instance)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Says at once that `instance` is stopping (its index entry overdue),
    /// unless it is gone from the index already.
    pub async fn instance_leaving(&self, instance: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("ZADD")
            .arg(keys::ALL_INSTANCES)
            .arg("XX")
            .arg(0)
            .arg(instance)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Publishes `instance`'s recent job counts (JSON), kept for `ttl`.
    pub async fn publish_stats(
        &self,
        instance: &str,
        stats: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        redis::cmd("SET")
            .arg(InstanceKeys::new(instance).stats)
            .arg(stats)
            .arg("PX")
            .arg(millis(ttl))
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// The recent job counts of every instance that published them
    /// lately (JSON): one per live instance.
    pub async fn instance_stats(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        let instances: Vec<String> = redis::cmd("ZRANGE")
            .arg(keys::ALL_INSTANCES)
            .arg(0)
            .arg(-1)
            .query_async(&mut conn)
            .await?;
        // Each instance's keys have a slot of their own: one GET each,
        // sent together.
        let stats = futures_util::future::try_join_all(instances.iter().map(|instance| {
            let mut conn = self.conn.clone();
            async move {
                redis::cmd("GET")
                    .arg(InstanceKeys::new(instance).stats)
                    .query_async::<Option<String>>(&mut conn)
                    .await
            }
        }))
        .await?;
        Ok(stats.into_iter().flatten().collect())
    }

    /// Whether coordinator `instance` is alive.
    pub async fn instance_present(&self, instance: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("EXISTS")
            .arg(InstanceKeys::new(instance).presence)
            .query_async(&mut conn)
            .await?)
    }

    /// Removes an instance: its presence, its inbox, its index entry.
    pub async fn instance_gone(&self, instance: &str) -> Result<(), StoreError> {
        let keys = InstanceKeys::new(instance);
        let mut conn = self.conn.clone();
        redis::cmd("DEL")
            .arg(&keys.presence)
            .arg(&keys.inbox)
            .arg(&keys.stats)
            .query_async::<()>(&mut conn)
            .await?;
        redis::cmd("ZREM")
            .arg(keys::ALL_INSTANCES)
            .arg(instance)
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }

    /// Cleans up after instances whose presence ran out (they died
    /// without saying so): returns their ids.
    pub async fn reap_instances(&self) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        let overdue: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(keys::ALL_INSTANCES)
            .arg("-inf")
            .arg(wall_clock_ms())
            .arg("LIMIT")
            .arg(0)
            .arg(100)
            .query_async(&mut conn)
            .await?;
        let mut reaped = Vec::new();
        for instance in overdue {
            if !self.instance_present(&instance).await? {
                self.instance_gone(&instance).await?;
                reaped.push(instance);
            }
        }
        Ok(reaped)
    }

    /// The live instances other than `me` that are not stopping, in a
    /// random order.
    pub async fn other_live_instances(&self, me: &str) -> Result<Vec<String>, StoreError> {
        let mut conn = self.conn.clone();
        let mut instances: Vec<String> = redis::cmd("ZRANGEBYSCORE")
            .arg(keys::ALL_INSTANCES)
            .arg(wall_clock_ms())
            .arg("+inf")
            .query_async(&mut conn)
            .await?;
        instances.retain(|instance| instance != me);
        instances.shuffle(&mut rand::rng());
        let mut live = Vec::with_capacity(instances.len());
        for instance in instances {
            if self.instance_present(&instance).await? {
                live.push(instance);
            }
        }
        Ok(live)
    }

    /// The live instance other than `me` holding `node`'s socket, if any.
    pub async fn other_live_holder(
        &self,
        node: &NodeId,
        me: &str,
    ) -> Result<Option<String>, StoreError> {
        let Some(holder) = self.node_holder(node).await?.filter(|holder| holder != me) else {
            return Ok(None);
        };
        Ok(self.instance_present(&holder).await?.then_some(holder))
    }

    /// The instance holding `node`'s socket, as last registered.
    async fn node_holder(&self, node: &NodeId) -> Result<Option<String>, StoreError> {
        let mut conn = self.conn.clone();
        Ok(redis::cmd("HGET")
            .arg(NodeKeys::new(node).hash)
            .arg("coordinator")
            .query_async(&mut conn)
            .await?)
    }

    /// Creates `instance`'s inbox and its consumer group, if missing.
    pub async fn inbox_open(&self, instance: &str) -> Result<(), StoreError> {
        let mut conn = self.conn.clone();
        let created: redis::RedisResult<()> = redis::cmd("XGROUP")
            .arg("CREATE")
            .arg(InstanceKeys::new(instance).inbox)
            .arg(INBOX_GROUP)
            .arg("$")
            .arg("MKSTREAM")
            .query_async(&mut conn)
            .await;
        match created {
            Err(err) if err.code() == Some("BUSYGROUP") => Ok(()),
            other => Ok(other?),
        }
    }

    /// Appends `message` to `instance`'s inbox; false when the inbox is
    /// gone (so is the instance).
    pub async fn inbox_push(&self, instance: &str, message: &str) -> Result<bool, StoreError> {
        let mut conn = self.conn.clone();
        // NOMKSTREAM: a message for an instance that is gone (its inbox
        // reaped) is dropped rather than recreating the inbox forever.
        Ok(redis::cmd("XADD")
            .arg(InstanceKeys::new(instance).inbox)
            .arg("NOMKSTREAM")
            .arg("MAXLEN")
            .arg("~")
            .arg(INBOX_MAX)
            .arg("*")
            .arg("m")
            .arg(message)
            .query_async::<Option<String>>(&mut conn)
            .await?
            .is_some())
    }

    /// Waits up to `block` for messages in `instance`'s inbox; returns
    /// their ids and texts. Read them on a [`Store::dedicated`] store.
    pub async fn inbox_read(
        &self,
        instance: &str,
        block: Duration,
    ) -> Result<Vec<(String, String)>, StoreError> {
        let mut conn = self.conn.clone();
        let reply: Option<redis::streams::StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(INBOX_GROUP)
            .arg(instance)
            .arg("COUNT")
            .arg(256)
            .arg("BLOCK")
            .arg(millis(block))
            .arg("STREAMS")
            .arg(InstanceKeys::new(instance).inbox)
            .arg(">")
            .query_async(&mut conn)
            .await?;
        Ok(reply
            .into_iter()
            .flat_map(|r| r.keys)
            .flat_map(|k| k.ids)
            .map(|entry| {
                let text = entry.get::<String>("m").unwrap_or_default();
                (entry.id, text)
            })
            .collect())
    }

    /// Acknowledges and deletes inbox entries.
    pub async fn inbox_ack(&self, instance: &str, ids: &[String]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let inbox = InstanceKeys::new(instance).inbox;
        let mut conn = self.conn.clone();
        redis::pipe()
            .cmd("XACK")
            .arg(&inbox)
            .arg(INBOX_GROUP)
            .arg(ids)
            .ignore()
            .cmd("XDEL")
            .arg(&inbox)
            .arg(ids)
            .ignore()
            .query_async::<()>(&mut conn)
            .await?;
        Ok(())
    }
}
