//! A test hook: cutting federation links between servers.
//!
//! [`LinkFaults`] is a set of cut links `(from, to)`, shared by every server
//! of a test cluster through [`crate::Config::faults`]. While `from → to` is
//! cut, every federation request `from` starts towards `to` (signed
//! requests and key fetches alike) fails at once as unreachable, before
//! anything is sent. A link is one-directional: `to` may still reach
//! `from`, and its requests are answered. Production configurations leave
//! the hook unset, and then it costs nothing.
//!
//! The same hook can also hold event streams (spec §6.8) between their
//! authentication and their subscription to new events, so that a test
//! can put a device's removal (§6.4) in that window.

use std::collections::BTreeSet;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};

use kith_proto::ServerName;

/// The links cut between servers; see the module docs.
#[derive(Debug, Default)]
pub struct LinkFaults {
    cut: Mutex<BTreeSet<(ServerName, ServerName)>>,
    /// Links on which only message fan-out (`POST
    /// /v0/federation/channels/{id}/messages`) fails.
    fanout_held: Mutex<BTreeSet<(ServerName, ServerName)>>,
    /// Links on which only certificate pushes (`POST
    /// /v0/federation/channels/{id}/certificate`) fail.
    certificates_held: Mutex<BTreeSet<(ServerName, ServerName)>>,
    /// Whether new event streams wait before they subscribe.
    streams_held: Mutex<bool>,
    /// Wakes the streams waiting at [`LinkFaults::stream_gate`].
    streams_released: tokio::sync::Notify,
    /// How many streams wait there now.
    streams_waiting: AtomicUsize,
}

impl LinkFaults {
    /// No link cut.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeSet<(ServerName, ServerName)>> {
        self.cut
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn lock_held(&self) -> std::sync::MutexGuard<'_, BTreeSet<(ServerName, ServerName)>> {
        self.fanout_held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Holds back message fan-out from `from` to `to`: those POSTs fail as
    /// unreachable (the outbox keeps retrying them), while Raft, votes and
    /// every other request pass. This is what a cut link does to messages
    /// when Raft still reaches `to` through another server.
    pub fn hold_fanout(&self, from: &ServerName, to: &ServerName) {
        self.lock_held().insert((from.clone(), to.clone()));
    }

    /// Holds back certificate pushes from `from` to `to`: those POSTs fail
    /// as unreachable, as when `from` crashes right after certifying, while
    /// Raft, votes and every other request pass.
    pub fn hold_certificates(&self, from: &ServerName, to: &ServerName) {
        self.certificates_held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert((from.clone(), to.clone()));
    }

    /// Whether a request `from → to` with `method` and `path` is held back
    /// by [`LinkFaults::hold_fanout`] or [`LinkFaults::hold_certificates`].
    pub fn is_fanout_held(
        &self,
        from: &ServerName,
        to: &ServerName,
        method: &str,
        path: &str,
    ) -> bool {
        if method != "POST" || !path.starts_with("/v0/federation/channels/") {
            return false;
        }
        let link = (from.clone(), to.clone());
        (path.ends_with("/messages") && self.lock_held().contains(&link))
            || (path.ends_with("/certificate")
                && self
                    .certificates_held
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .contains(&link))
    }

    /// Cuts the link from `from` to `to` (requests `from` sends to `to`).
    pub fn cut(&self, from: &ServerName, to: &ServerName) {
        self.lock().insert((from.clone(), to.clone()));
    }

    /// Heals the link from `from` to `to`.
    pub fn heal(&self, from: &ServerName, to: &ServerName) {
        self.lock().remove(&(from.clone(), to.clone()));
    }

    /// Heals every link.
    pub fn heal_all(&self) {
        self.lock().clear();
        self.lock_held().clear();
        self.certificates_held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clear();
    }

    /// Makes every event stream opened from now on wait, once
    /// authenticated, before it subscribes to new events, until
    /// [`LinkFaults::release_streams`].
    pub fn hold_streams(&self) {
        *self.lock_streams() = true;
    }

    /// Lets the held event streams (and later ones) go on.
    pub fn release_streams(&self) {
        *self.lock_streams() = false;
        self.streams_released.notify_waiters();
    }

    /// How many event streams wait at the gate now.
    pub fn streams_waiting(&self) -> usize {
        self.streams_waiting.load(Ordering::SeqCst)
    }

    /// Where an event stream waits while streams are held.
    pub(crate) async fn stream_gate(&self) {
        let mut counted = false;
        loop {
            let released = self.streams_released.notified();
            tokio::pin!(released);
            // Registered before the check, so a release in between wakes it.
            released.as_mut().enable();
            if !*self.lock_streams() {
                break;
            }
            if !counted {
                counted = true;
                self.streams_waiting.fetch_add(1, Ordering::SeqCst);
            }
            released.await;
        }
        if counted {
            self.streams_waiting.fetch_sub(1, Ordering::SeqCst);
        }
    }

    fn lock_streams(&self) -> std::sync::MutexGuard<'_, bool> {
        self.streams_held
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether the link from `from` to `to` is cut.
    pub fn is_cut(&self, from: &ServerName, to: &ServerName) -> bool {
        self.lock().contains(&(from.clone(), to.clone()))
    }

    /// The cut links, as `(from, to)`.
    pub fn cut_links(&self) -> Vec<(ServerName, ServerName)> {
        self.lock().iter().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_is_one_directional_and_heals() {
        let (a, b): (ServerName, ServerName) =
            ("a.test".parse().unwrap(), "b.test".parse().unwrap());
        let faults = LinkFaults::new();
        faults.cut(&a, &b);
        assert!(faults.is_cut(&a, &b));
        assert!(!faults.is_cut(&b, &a));
        faults.heal(&a, &b);
        assert!(!faults.is_cut(&a, &b));
        faults.cut(&b, &a);
        faults.hold_fanout(&a, &b);
        let fanout = "/v0/federation/channels/00/messages";
        assert!(faults.is_fanout_held(&a, &b, "POST", fanout));
        assert!(!faults.is_fanout_held(&a, &b, "GET", fanout));
        assert!(!faults.is_fanout_held(&a, &b, "POST", "/v0/federation/raft/00/append"));
        assert!(!faults.is_fanout_held(&b, &a, "POST", fanout));
        let push = "/v0/federation/channels/00/certificate";
        assert!(!faults.is_fanout_held(&a, &b, "POST", push));
        faults.hold_certificates(&a, &b);
        assert!(faults.is_fanout_held(&a, &b, "POST", push));
        assert!(!faults.is_fanout_held(&b, &a, "POST", push));
        faults.heal_all();
        assert!(!faults.is_fanout_held(&a, &b, "POST", push));
        assert!(faults.cut_links().is_empty());
        assert!(!faults.is_fanout_held(&a, &b, "POST", fanout));
    }
}
