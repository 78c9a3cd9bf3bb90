//! WebSocket close codes of the node protocol.
//!
//! Standard codes (RFC 6455) where one fits, application codes 4000-4099
//! otherwise. An agent uses the code to decide what to do next: reconnect
//! with backoff, or stop and tell the operator.

/// Why a node connection was closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseCode {
    /// 1000: orderly close (the node finished draining, or said goodbye).
    Normal,
    /// 1001: the coordinator is shutting down; reconnect with backoff.
    GoingAway,
    /// 1008: repeated malformed or unexpected frames; reconnect with backoff.
    PolicyViolation,
    /// 1009: a frame over the size limit; reconnect with backoff.
    TooLarge,
    /// 1011: the coordinator hit an internal error; reconnect with backoff.
    Internal,
    /// 4001: missing or wrong token. Retrying will not help: fix the config.
    Unauthorized,
    /// 4002: no protocol version in common. Upgrade one side.
    UnsupportedVersion,
    /// 4003: the first frame was not a valid `register` in time.
    RegistrationRequired,
    /// 4004: a newer connection of the same agent replaced this one.
    Superseded,
    /// 4005: another live agent (different instance) holds this node id.
    /// Two hosts may be configured with the same `node_id`, or the holder
    /// is a stale process about to time out: retry with backoff, and tell
    /// the operator.
    NodeIdConflict,
    /// 4006: no heartbeat for `missed_heartbeats` intervals.
    HeartbeatTimeout,
}

impl CloseCode {
    /// Every code, for tables and tests.
    pub const ALL: [CloseCode; 11] = [
        CloseCode::Normal,
        CloseCode::GoingAway,
        CloseCode::PolicyViolation,
        CloseCode::TooLarge,
        CloseCode::Internal,
        CloseCode::Unauthorized,
        CloseCode::UnsupportedVersion,
        CloseCode::RegistrationRequired,
        CloseCode::Superseded,
        CloseCode::NodeIdConflict,
        CloseCode::HeartbeatTimeout,
    ];

    /// The numeric code on the wire.
    pub fn code(self) -> u16 {
        match self {
            CloseCode::Normal => 1000,
            CloseCode::GoingAway => 1001,
            CloseCode::PolicyViolation => 1008,
            CloseCode::TooLarge => 1009,
            CloseCode::Internal => 1011,
            CloseCode::Unauthorized => 4001,
            CloseCode::UnsupportedVersion => 4002,
            CloseCode::RegistrationRequired => 4003,
            CloseCode::Superseded => 4004,
            CloseCode::NodeIdConflict => 4005,
            CloseCode::HeartbeatTimeout => 4006,
        }
    }

    /// The code for a numeric value, if it is one of ours.
    pub fn from_code(code: u16) -> Option<CloseCode> {
        Self::ALL.into_iter().find(|c| c.code() == code)
    }

    /// True when reconnecting cannot succeed without a change by an
    /// operator, so an agent should stop instead of retrying.
    pub fn is_fatal(self) -> bool {
        matches!(
            self,
            CloseCode::Unauthorized | CloseCode::UnsupportedVersion
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_round_trip() {
        for code in CloseCode::ALL {
            assert_eq!(CloseCode::from_code(code.code()), Some(code));
        }
        let mut numbers: Vec<u16> = CloseCode::ALL.iter().map(|c| c.code()).collect();
        numbers.dedup();
        assert_eq!(numbers.len(), CloseCode::ALL.len());
        assert_eq!(CloseCode::from_code(4999), None);
    }

    #[test]
    fn only_configuration_problems_are_fatal() {
        assert!(CloseCode::Unauthorized.is_fatal());
        assert!(!CloseCode::NodeIdConflict.is_fatal());
        assert!(!CloseCode::GoingAway.is_fatal());
        assert!(!CloseCode::Superseded.is_fatal());
    }
}
