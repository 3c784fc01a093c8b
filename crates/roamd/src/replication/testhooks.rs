//! Test-only hooks of replication, off unless their environment variable is set. They let
//! the crash-consistency campaign (`crates/lab/tests/crash_consistency.rs`) check a
//! replica against what this primary shipped. Nothing here changes what replication does.
//!
//! * `ROAM_TEST_CUT_LOG=PATH`: for every batch this host proposes (at `Sync`, before the
//!   replica commits it), append one JSON line to PATH:
//!   `{"source","vm","host","seq","flush_epoch","seed","chunks","root"}`. `root` is the
//!   `roam_migrate` digest root (`ChunkHashes::root`) of the **whole replica disk as it is
//!   once this batch commits**: the last confirmed state with this batch's chunks (the
//!   hashes of the bytes actually sent) laid over it, or for a seed batch every chunk as
//!   the seed left it. A replica read at any instant (after `ReplicaWriter::open`
//!   recovery) must hash to one of these roots. The confirmed state is also kept in
//!   `PATH.SOURCE.VM@HOST.confirmed`, so that a roamd restarted after a crash, which goes
//!   on without a seed (its live map), lays its batches over the right base.
//! * `ROAM_TEST_IDLE_TIMEOUT_MS=N`: the host channel's idle timeout (keep-alive N/3), so
//!   a test notices a dead peer in about a second instead of five.
//!
//! Cost when on: a copy of the per-chunk hash list (32 bytes per 64 KiB chunk) per link.

use std::collections::{BTreeSet, HashMap};
use std::io::Write;
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use roam_channel::ChannelConfig;
use roam_migrate::digest::{to_hex, ChunkHashes};
use tracing::warn;

pub const CUT_LOG_ENV: &str = "ROAM_TEST_CUT_LOG";
pub const IDLE_TIMEOUT_ENV: &str = "ROAM_TEST_IDLE_TIMEOUT_MS";

/// The replica state per (vm, host) as of its last confirmed commit, and the proposal in
/// flight (confirmed when `Sync` is answered).
#[derive(Default)]
struct Links {
    confirmed: HashMap<(String, String), ChunkHashes>,
    proposed: HashMap<(String, String), ChunkHashes>,
}

struct CutLog {
    path: std::path::PathBuf,
    links: Mutex<Links>,
}

fn cut_log() -> Option<&'static CutLog> {
    static LOG: OnceLock<Option<CutLog>> = OnceLock::new();
    LOG.get_or_init(|| {
        std::env::var_os(CUT_LOG_ENV).map(|p| CutLog {
            path: p.into(),
            links: Mutex::default(),
        })
    })
    .as_ref()
}

/// One batch as the source proposes it.
pub struct Proposal<'a> {
    pub source: &'a str,
    pub vm: &'a str,
    pub host: &'a str,
    pub seq: u64,
    pub flush_epoch: u64,
    pub seed: bool,
    /// Chunks sent (or, for a seed, negotiated) in this batch.
    pub chunks: &'a BTreeSet<u64>,
    /// The sender's hashes: for each chunk, the bytes it last read and sent.
    pub hashes: Option<&'a ChunkHashes>,
}

/// Record `p` (no-op unless `ROAM_TEST_CUT_LOG` is set).
pub fn proposed(p: Proposal<'_>) {
    let Some(log) = cut_log() else { return };
    let Some(hashes) = p.hashes else { return };
    let key = (p.vm.to_string(), p.host.to_string());
    let mut links = log.links.lock().unwrap_or_else(|e| e.into_inner());
    if !links.confirmed.contains_key(&key) {
        if let Some(kept) = load_confirmed(&confirmed_path(&log.path, p.source, p.vm, p.host)) {
            links.confirmed.insert(key.clone(), kept);
        }
    }
    let state = next_state(links.confirmed.get(&key), p.seed, p.chunks, hashes);
    let line = serde_json::json!({
        "source": p.source, "vm": p.vm, "host": p.host, "seq": p.seq,
        "flush_epoch": p.flush_epoch, "seed": p.seed, "chunks": p.chunks.len(),
        "root": to_hex(&state.root()),
    });
    links.proposed.insert(key, state);
    let r = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log.path)
        .and_then(|mut f| writeln!(f, "{line}"));
    if let Err(e) = r {
        warn!("{CUT_LOG_ENV} {}: {e}", log.path.display());
    }
}

/// The replica's state once a batch commits: `base` (the last confirmed state) with the
/// batch's chunks as the sender read them; a seed decides every chunk (and without a
/// confirmed base the source always seeds).
fn next_state(
    base: Option<&ChunkHashes>,
    seed: bool,
    chunks: &BTreeSet<u64>,
    hashes: &ChunkHashes,
) -> ChunkHashes {
    match (seed, base) {
        (false, Some(base)) => {
            let mut s = base.clone();
            for &c in chunks {
                if let Some(h) = hashes.get(c) {
                    s.set(c, *h);
                }
            }
            s
        }
        _ => hashes.clone(),
    }
}

/// The replica answered `Sync`: the proposal of (vm, host) is its state now.
pub fn committed(source: &str, vm: &str, host: &str) {
    let Some(log) = cut_log() else { return };
    let key = (vm.to_string(), host.to_string());
    let mut links = log.links.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(s) = links.proposed.remove(&key) {
        let path = confirmed_path(&log.path, source, vm, host);
        let tmp = path.with_extension("tmp");
        let r = serde_json::to_vec(&s)
            .map_err(std::io::Error::other)
            .and_then(|b| std::fs::write(&tmp, b))
            .and_then(|()| std::fs::rename(&tmp, &path));
        if let Err(e) = r {
            warn!("{CUT_LOG_ENV} {}: {e}", path.display());
        }
        links.confirmed.insert(key, s);
    }
}

fn confirmed_path(log: &std::path::Path, source: &str, vm: &str, host: &str) -> std::path::PathBuf {
    let mut p = log.as_os_str().to_owned();
    p.push(format!(".{source}.{vm}@{host}.confirmed"));
    p.into()
}

fn load_confirmed(path: &std::path::Path) -> Option<ChunkHashes> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// The host channel's settings: the default, or a short idle timeout for tests.
pub fn channel_config() -> ChannelConfig {
    channel_config_from(std::env::var(IDLE_TIMEOUT_ENV).ok().as_deref())
}

fn channel_config_from(idle_ms: Option<&str>) -> ChannelConfig {
    let mut c = ChannelConfig::default();
    let ms: Option<u64> = idle_ms.and_then(|v| v.parse().ok());
    if let Some(ms) = ms.filter(|&ms| (300..=600_000).contains(&ms)) {
        c.idle_timeout = Duration::from_millis(ms);
        c.keep_alive = Duration::from_millis(ms / 3);
    }
    c
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn idle_timeout_override_is_bounded_and_valid() {
        let c = channel_config_from(Some("1200"));
        assert_eq!(c.idle_timeout, Duration::from_millis(1200));
        assert!(c.keep_alive * 2 <= c.idle_timeout);
        let default = ChannelConfig::default().idle_timeout;
        for bad in [Some("5"), Some("x"), None] {
            assert_eq!(channel_config_from(bad).idle_timeout, default, "{bad:?}");
        }
    }

    #[test]
    fn proposals_lay_sent_chunks_over_the_confirmed_state() {
        let mut base = ChunkHashes::new_zero(4 << 16, 1 << 16);
        base.set(1, [1; 32]);
        base.set(3, [3; 32]);
        let mut sent = ChunkHashes::new_zero(4 << 16, 1 << 16);
        sent.set(1, [9; 32]);
        sent.set(2, [8; 32]);
        let chunks: BTreeSet<u64> = [2].into();
        let s = next_state(Some(&base), false, &chunks, &sent);
        assert_eq!(
            s.get(1),
            Some(&[1; 32]),
            "a chunk not in the batch keeps its state"
        );
        assert_eq!(s.get(2), Some(&[8; 32]));
        assert_eq!(s.get(3), Some(&[3; 32]));
        assert_ne!(s.root(), base.root());
        assert_eq!(next_state(Some(&base), true, &chunks, &sent), sent);
        assert_eq!(next_state(None, false, &chunks, &sent), sent);
    }
}
