//! Which peer keys a server accepts. Consulted on every handshake, so the daemon can add
//! and remove peers while connections come and go (`roam peer add` takes effect at once).

use std::collections::BTreeMap;
use std::collections::VecDeque;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, RwLock};
use std::time::SystemTime;

use crate::identity::PublicKey;

/// The set of peer keys a server accepts connections from.
///
/// Implement it over the daemon's own state, or use [`TrustSet`].
pub trait TrustStore: Send + Sync + fmt::Debug + 'static {
    /// The name of the trusted peer holding `key`, or `None` if `key` is not trusted.
    fn lookup(&self, key: &PublicKey) -> Option<String>;
}

/// A run-time updatable map of trusted keys to peer names.
#[derive(Debug, Default)]
pub struct TrustSet {
    peers: RwLock<BTreeMap<PublicKey, String>>,
}

impl TrustSet {
    /// An empty set: trusts no one.
    pub fn new() -> Self {
        Self::default()
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, BTreeMap<PublicKey, String>> {
        // A panic while holding the lock cannot leave a BTreeMap half-updated in a way
        // that matters here, so a poisoned lock is still usable.
        self.peers.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, BTreeMap<PublicKey, String>> {
        self.peers.write().unwrap_or_else(|e| e.into_inner())
    }

    /// Trusts `key` under `name`; returns the previous name of that key, if any.
    pub fn insert(&self, name: impl Into<String>, key: PublicKey) -> Option<String> {
        self.write().insert(key, name.into())
    }

    /// Stops trusting `key`; returns its name if it was trusted. Connections already open
    /// stay open: close them with `Endpoint::disconnect_peer`.
    pub fn remove(&self, key: &PublicKey) -> Option<String> {
        self.write().remove(key)
    }

    /// Whether `key` is trusted.
    pub fn contains(&self, key: &PublicKey) -> bool {
        self.read().contains_key(key)
    }

    /// All trusted peers as (name, key), ordered by key.
    pub fn list(&self) -> Vec<(String, PublicKey)> {
        self.read().iter().map(|(k, n)| (n.clone(), *k)).collect()
    }

    /// Number of trusted keys.
    pub fn len(&self) -> usize {
        self.read().len()
    }

    /// Whether no key is trusted.
    pub fn is_empty(&self) -> bool {
        self.read().is_empty()
    }
}

impl TrustStore for TrustSet {
    fn lookup(&self, key: &PublicKey) -> Option<String> {
        self.read().get(key).cloned()
    }
}

/// A handshake the server refused because the client's key is not trusted.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Refusal {
    /// The key the client presented.
    pub key: PublicKey,
    /// When it was refused.
    pub at: SystemTime,
}

/// Counts refused handshakes and keeps the last few, so that an operator can see which
/// key tried to connect (typically a peer that was not added yet).
#[derive(Debug, Default)]
pub(crate) struct RefusalLog {
    count: AtomicU64,
    recent: Mutex<VecDeque<Refusal>>,
}

const RECENT_REFUSALS: usize = 16;

impl RefusalLog {
    pub(crate) fn record(&self, key: PublicKey) {
        self.count.fetch_add(1, Ordering::Relaxed);
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() == RECENT_REFUSALS {
            recent.pop_front();
        }
        recent.push_back(Refusal {
            key,
            at: SystemTime::now(),
        });
    }

    pub(crate) fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub(crate) fn recent(&self) -> Vec<Refusal> {
        let recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        recent.iter().cloned().collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn insert_lookup_remove() {
        let t = TrustSet::new();
        let k = PublicKey::from_bytes([3; 32]);
        assert_eq!(t.lookup(&k), None);
        assert_eq!(t.insert("home", k), None);
        assert_eq!(t.lookup(&k).as_deref(), Some("home"));
        assert_eq!(t.insert("house", k).as_deref(), Some("home"));
        assert_eq!(t.list(), vec![("house".to_string(), k)]);
        assert_eq!(t.remove(&k).as_deref(), Some("house"));
        assert!(t.is_empty());
    }

    #[test]
    fn refusal_log_is_bounded() {
        let log = RefusalLog::default();
        for i in 0..40u8 {
            log.record(PublicKey::from_bytes([i; 32]));
        }
        assert_eq!(log.count(), 40);
        let recent = log.recent();
        assert_eq!(recent.len(), RECENT_REFUSALS);
        assert_eq!(
            recent[RECENT_REFUSALS - 1].key,
            PublicKey::from_bytes([39; 32])
        );
    }
}
