//! The connection state: connected, disconnected or reintegrating, and why.
//!
//! venus goes offline when a request to the server fails for transport
//! reasons, when a heartbeat goes unanswered, or when the user says
//! `venus disconnect`. It probes in the background and, when the server
//! answers again (and the user has not asked to stay offline), reintegrates
//! the modification log and comes back. Every change is logged with its cause.

use serde::Serialize;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Connected,
    Disconnected,
    Reintegrating,
}

pub struct Link {
    state: Mutex<(State, String, Instant)>,
    /// The user asked to work offline: no automatic reconnection.
    forced: AtomicBool,
    /// Wakes the prober (user asked to reconnect, or a request failed).
    pub wake: tokio::sync::Notify,
}

/// How often a connected venus checks the server is there.
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// How long a heartbeat may take before the server counts as gone.
pub const HEARTBEAT_TIMEOUT: Duration = Duration::from_secs(2);
/// How often a disconnected venus tries the server.
pub const PROBE: Duration = Duration::from_secs(1);

impl Link {
    pub fn new(forced: bool) -> Link {
        let (st, why) = if forced {
            (State::Disconnected, "disconnected by the user".to_string())
        } else {
            (State::Connected, "starting".into())
        };
        Link { state: Mutex::new((st, why, Instant::now())), forced: AtomicBool::new(forced), wake: Default::default() }
    }

    pub fn state(&self) -> State {
        self.state.lock().unwrap().0
    }

    pub fn is_connected(&self) -> bool {
        self.state() == State::Connected
    }

    /// The state, its cause, and for how long.
    pub fn describe(&self) -> (State, String, Duration) {
        let s = self.state.lock().unwrap();
        (s.0, s.1.clone(), s.2.elapsed())
    }

    pub fn forced(&self) -> bool {
        self.forced.load(Ordering::SeqCst)
    }

    pub fn set_forced(&self, on: bool) {
        self.forced.store(on, Ordering::SeqCst);
    }

    /// Moves to `to`, logging the cause when the state changes.
    pub fn set(&self, to: State, cause: impl Into<String>) {
        let cause = cause.into();
        let mut s = self.state.lock().unwrap();
        if s.0 != to {
            match to {
                State::Disconnected => tracing::warn!(cause = %cause, "disconnected"),
                State::Reintegrating => tracing::info!(cause = %cause, "reintegrating"),
                State::Connected => tracing::info!(cause = %cause, "connected"),
            }
            *s = (to, cause, Instant::now());
        }
    }

    /// A request failed for transport reasons: go offline.
    pub fn lost(&self, cause: impl Into<String>) {
        if self.state() == State::Connected {
            self.set(State::Disconnected, cause);
            self.wake.notify_one();
        }
    }
}
