//! systemd notifications for `Type=notify` units, the same in every
//! binary. Each is a no-op outside systemd, and a failed notification is
//! ignored: the service works the same without its supervisor's view.

use std::time::Duration;

use sd_notify::NotifyState;

fn notify(states: &[NotifyState<'_>]) {
    let _ = sd_notify::notify(states);
}

/// `READY=1` with a first `STATUS=` line: the service is up.
pub fn ready(status: &str) {
    notify(&[NotifyState::Ready, NotifyState::Status(status)]);
}

/// `STATUS=`: one line for `systemctl status`.
pub fn status(line: &str) {
    notify(&[NotifyState::Status(line)]);
}

/// `RELOADING=1`: a configuration reload has begun.
pub fn reloading() {
    notify(&[NotifyState::Reloading]);
}

/// `READY=1` after a reload.
pub fn reloaded() {
    notify(&[NotifyState::Ready]);
}

/// `STOPPING=1`: shutdown has begun.
pub fn stopping() {
    notify(&[NotifyState::Stopping]);
}

/// `WATCHDOG=1`: the service is alive.
pub fn watchdog() {
    notify(&[NotifyState::Watchdog]);
}

/// How often to feed the watchdog (half its period), when the unit sets
/// `WatchdogSec`.
pub fn watchdog_interval() -> Option<Duration> {
    sd_notify::watchdog_enabled().map(|period| period / 2)
}
