//! Background replicas: a VM's disk kept fresh on other hosts while the VM runs, so that a
//! migration to one of them moves only what changed since the last sync.
//!
//! ```text
//!  primary (this VM runs here)                          replica host
//!  NBD write ─▶ DirtyTracker ─subscribe─▶ Link task ═══ QUIC stream (kind Replication,
//!                 │ flush_epoch            │ CutBuilder   priority below migration) ═══▶
//!                 └───────────────────────▶│ DiskSender (hash negotiation for the seed,
//!                                          │   zstd frames, Sync = committed)
//!                                          ▼                 replica::serve ─▶ ReplicaWriter
//!                                     LinkStatus ─▶ `roam replica list`   STATE/replicas/VM/
//! ```
//!
//! * [`source`]: one task per (VM, replica host). Seeds by offering hashes of every
//!   allocated chunk (the replica says which it lacks), then sends dirty chunks in batches
//!   cut at FLUSH boundaries (`roam_store::CutBuilder`). On a link outage it pauses and
//!   retries with backoff; the VM never waits for it (it only reads the disk file and takes
//!   dirty bits). While a migration runs on this host it yields (migration first).
//! * [`replica`]: the receiving side; one `ReplicaWriter` per VM, batches committed
//!   atomically; the generation rule refuses a stale primary.
//! * [`protocol`]: the messages and the admission rules, pure.
//!
//! Resuming: within one roamd life the dirty subscription outlives link outages, so after
//! reconnecting only what changed is sent. When the VM stops, each link keeps what it knew
//! ([`carry`]: the replica's batch and the chunks written since), in memory and on disk;
//! the VM's next start on an untouched disk goes on from there, in this roamd or after a
//! restart. While the VM runs, the same state lives in a file mapped shared
//! (`roam_store::live`), so that a crash of roamd (its QEMU dies with it) leaves it too:
//! the next start turns it into a carry. When none of these apply (the host itself crashed, the disk changed,
//! the replica's committed batch is not the one the primary last saw) the first batch is
//! a full hash comparison: every chunk is read and hashed here, and only chunks that
//! differ travel (about 40 bytes per chunk on the wire otherwise).

pub mod carry;
pub mod protocol;
pub mod replica;
pub mod source;
pub mod testhooks;
mod throttle;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use roam_control::api::{ApiError, ReplicaInfo};
use roam_store::live;
use tracing::{info, warn};

use crate::daemon::{to_api, Daemon};
use crate::state::{ReplicaLinkRecord, VmStatus};
pub use replica::HeldReplicas;
use source::Link;
use throttle::Bucket;

pub use crate::daemon::now_ms;

/// Per-peer limit for background replication, Mbit/s (0 or unset: no limit). Migration
/// traffic is not limited by it.
pub const RATE_ENV: &str = "ROAM_REPLICATION_MBIT";

/// The daemon's replication state: links of this host's VMs and replicas held here.
#[derive(Default)]
pub struct Replication {
    links: Mutex<HashMap<(String, String), Arc<Link>>>,
    /// One token bucket per peer, shared by every VM replicating to it.
    buckets: Mutex<HashMap<String, Arc<Bucket>>>,
    pub held: HeldReplicas,
}

impl Replication {
    /// The peer's bucket: its `roam peer set-limit` if set, else `ROAM_REPLICATION_MBIT`.
    fn bucket(&self, peer: &str, limit_mbit: Option<u32>) -> Arc<Bucket> {
        let mbit: f64 = match limit_mbit {
            Some(m) => f64::from(m),
            None => std::env::var(RATE_ENV)
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(0.0),
        };
        self.buckets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .entry(peer.to_string())
            .or_insert_with(|| Arc::new(Bucket::new(mbit * 1e6 / 8.0)))
            .clone()
    }

    fn links(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), Arc<Link>>> {
        self.links.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The chunks of `vm`'s disk written since its replica on `host` committed `batch`;
    /// `None` when this host cannot tell (no link, or `batch` is not the commit the link
    /// last saw). A migration to `host` then needs to offer only these.
    pub async fn changed_since(
        &self,
        vm: &str,
        host: &str,
        batch: roam_store::Version,
    ) -> Option<std::collections::BTreeSet<u64>> {
        let link = self
            .links()
            .get(&(vm.to_string(), host.to_string()))
            .cloned()?;
        // The replica may have committed a batch whose reply has not reached the link
        // task yet: give it a moment rather than offer every chunk.
        let until = std::time::Instant::now() + std::time::Duration::from_secs(3);
        loop {
            if let Some(c) = link.changed_since(batch) {
                return Some(c);
            }
            if !link.commit_on_the_way(batch) || std::time::Instant::now() > until {
                return None;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
    }
}

/// `roam peer set-limit`: persist the peer's limit and apply it to the links running now.
pub fn set_limit(
    d: &Arc<Daemon>,
    peer: &str,
    mbit: Option<u32>,
) -> Result<roam_control::api::PeerInfo, ApiError> {
    let mut p = d.peer_record(peer).map_err(to_api)?;
    p.rate_limit_mbit = mbit;
    d.store.put_peer(&p).map_err(to_api)?;
    let fallback: f64 = std::env::var(RATE_ENV)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    let mbit_f = mbit.map_or(fallback, f64::from);
    d.replication
        .bucket(peer, mbit)
        .set_rate(mbit_f * 1e6 / 8.0);
    let _ = d.store.log(&serde_json::json!({
        "event": "peer_limit", "peer": peer, "mbit": mbit, "unix_ms": now_ms(),
    }));
    info!(peer, mbit = ?mbit, "peer rate limit set");
    Ok(roam_control::api::PeerInfo {
        name: p.name,
        addr: p.addr,
        key: p.key,
        rate_limit_mbit: p.rate_limit_mbit,
    })
}

/// Start the links recorded in the store (daemon start).
pub fn start_saved(d: &Arc<Daemon>) {
    if let Ok(held) = d.store.replicas() {
        for r in held {
            info!(vm = %r.vm, primary = %r.primary, generation = r.generation, seq = r.seq,
                "holding a replica");
        }
    }
    let links = match d.store.replica_links() {
        Ok(links) => links,
        Err(e) => {
            warn!("replica links unreadable: {e}");
            Vec::new()
        }
    };
    // Every link's state first, then the live maps left by a crash go (those of links
    // removed meanwhile too), and only then do the links start making new ones.
    let mut resumed = Vec::new();
    for l in links {
        info!(vm = %l.vm, host = %l.host, "resuming replication");
        let carried = match carry::Carry::load(&carry::path(&d.paths.state, &l.vm, &l.host)) {
            Ok(c) => c,
            Err(e) => {
                warn!(vm = %l.vm, host = %l.host, "replication state saved at stop unusable (a hash comparison follows): {e}");
                None
            }
        };
        // A live map is left only by a crash; a carry (written at the VM's stop) is newer
        // than any live map beside it.
        let recovered = live::recover(&live_dir(&d.paths.run), &live_key(&l.vm, &l.host));
        let carried = match carried {
            Some(c) => Some(c),
            None => carry_after_crash(d, &l.vm, &l.host, recovered),
        };
        resumed.push((l, carried));
    }
    let _ = std::fs::remove_dir_all(live_dir(&d.paths.run));
    for (l, carried) in resumed {
        start_link_with(d, &l.vm, &l.host, carried);
    }
}

/// The carry a crashed roamd left in a live map: what its link knew, with the disk as it
/// is now. QEMU died with that roamd and writes only through it, so the disk has not
/// changed since; from now on the identity guards it as for any carry. (A write to the
/// file by something else *between* the crash and this start is not seen: nothing on
/// disk described the file at the instant of the crash.)
fn carry_after_crash(
    d: &Daemon,
    vm: &str,
    host: &str,
    recovered: Result<Option<live::Found>, live::Unusable>,
) -> Option<carry::Carry> {
    let found = match recovered {
        Ok(f) => f?,
        Err(e) => {
            info!(
                vm,
                host, "replication state of the crash not used ({e}); comparing by hash"
            );
            return None;
        }
    };
    let rec = d.store.vm(vm).ok().flatten()?;
    let disk = quiet_identity(std::path::Path::new(&rec.disk_path))?;
    let c = carry::Carry {
        generation: found.generation,
        synced_to: found.synced_to,
        pending: found.pending,
        disk,
    };
    // Kept on disk at once: a second crash before the VM starts must not lose it.
    if let Err(e) = c.save(&carry::path(&d.paths.state, vm, host)) {
        warn!(vm, host, "replication state not kept on disk: {e}");
    }
    info!(
        vm,
        host,
        pending = c.pending.len(),
        batch = c.synced_to.seq,
        "replication state recovered after roamd's crash"
    );
    Some(c)
}

/// The file's identity, taken once the kernel's coarse file clock has moved past its
/// last change, so that any later write shows as another ctime.
fn quiet_identity(path: &std::path::Path) -> Option<carry::FileIdentity> {
    let id = carry::FileIdentity::of(path).ok()?;
    let now_ns = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as i128);
    if now_ns - id.ctime_ns > 50_000_000 {
        return Some(id);
    }
    std::thread::sleep(std::time::Duration::from_millis(50));
    carry::FileIdentity::of(path).ok()
}

/// Where the links' live maps are (`roam_store::live`), and each one's name. In the run
/// directory (`--run-dir`, default `STATE/run`): they must outlive a crash of roamd, not
/// a reboot. A run directory on a tmpfs (`/run/roam`) also keeps their pages out of disk
/// writeback; wherever it is, the boot id in each map rules out an older boot's.
pub fn live_dir(run: &std::path::Path) -> std::path::PathBuf {
    run.join("live")
}

pub fn live_key(vm: &str, host: &str) -> String {
    format!("{vm}@{host}")
}

fn start_link(d: &Arc<Daemon>, vm: &str, host: &str) -> Arc<Link> {
    start_link_with(d, vm, host, None)
}

fn start_link_with(
    d: &Arc<Daemon>,
    vm: &str,
    host: &str,
    carried: Option<carry::Carry>,
) -> Arc<Link> {
    let limit = d
        .store
        .peer(host)
        .ok()
        .flatten()
        .and_then(|p| p.rate_limit_mbit);
    let link = Link::start(
        d.clone(),
        vm,
        host,
        d.replication.bucket(host, limit),
        carried,
    );
    d.replication
        .links()
        .insert((vm.to_string(), host.to_string()), link.clone());
    link
}

pub async fn add(d: &Arc<Daemon>, vm: &str, host: &str) -> Result<ReplicaInfo, ApiError> {
    let rec = d.vm_record(vm).map_err(to_api)?;
    if rec.status == VmStatus::Moved {
        return Err(ApiError::conflict(format!(
            "VM '{vm}' moved to '{}'; add replicas where it runs",
            rec.moved_to.as_deref().unwrap_or("?")
        )));
    }
    if host == d.cfg.name {
        return Err(ApiError::bad_request(format!(
            "'{host}' is this host; a replica lives on a peer"
        )));
    }
    d.peer_record(host).map_err(to_api)?;
    if d.replication
        .links()
        .contains_key(&(vm.to_string(), host.to_string()))
    {
        return Err(ApiError::conflict(format!(
            "VM '{vm}' is already replicated to '{host}'"
        )));
    }
    d.store
        .put_replica_link(&ReplicaLinkRecord {
            vm: vm.to_string(),
            host: host.to_string(),
            created_unix_ms: now_ms(),
        })
        .map_err(to_api)?;
    let _ = d.store.log(&serde_json::json!({
        "event": "replica_added", "vm": vm, "host": host, "unix_ms": now_ms(),
    }));
    let link = start_link(d, vm, host);
    Ok(link.info())
}

pub async fn remove(d: &Arc<Daemon>, vm: &str, host: &str) -> Result<(), ApiError> {
    let key = (vm.to_string(), host.to_string());
    let link = d
        .replication
        .links()
        .remove(&key)
        .ok_or_else(|| ApiError::not_found(format!("VM '{vm}' has no replica on '{host}'")))?;
    link.stop().await;
    link.drop_carry(d);
    if let Err(e) = source::remove_remote(d, vm, host).await {
        // Keep replicating rather than forget a replica that still exists over there.
        start_link(d, vm, host);
        return Err(ApiError::unavailable(format!(
            "could not remove the replica on '{host}' (replication continues): {e}"
        )));
    }
    d.store.remove_replica_link(vm, host).map_err(to_api)?;
    let _ = d.store.log(&serde_json::json!({
        "event": "replica_removed", "vm": vm, "host": host, "unix_ms": now_ms(),
    }));
    Ok(())
}

/// Restart `vm`'s links (its generation changed: `force-primary`), so that they speak
/// with the new generation now rather than after a refused session's retry delay.
pub async fn restart_links(d: &Arc<Daemon>, vm: &str) {
    let links: Vec<(String, Arc<Link>)> = {
        let mut all = d.replication.links();
        let keys: Vec<_> = all.keys().filter(|(v, _)| v == vm).cloned().collect();
        keys.into_iter()
            .filter_map(|k| all.remove(&k).map(|l| (k.1, l)))
            .collect()
    };
    for (host, link) in links {
        link.stop().await;
        link.drop_carry(d);
        start_link(d, vm, &host);
    }
}

/// A VM leaves this host: stop its links here (the replicas stay where they are) and
/// return their hosts, for the new primary to adopt.
pub async fn hand_over(d: &Arc<Daemon>, vm: &str) -> Vec<String> {
    let links: Vec<((String, String), Arc<Link>)> = {
        let mut all = d.replication.links();
        let keys: Vec<_> = all.keys().filter(|(v, _)| v == vm).cloned().collect();
        keys.into_iter()
            .filter_map(|k| all.remove(&k).map(|l| (k, l)))
            .collect()
    };
    let mut hosts = Vec::new();
    for ((v, host), link) in links {
        link.stop().await;
        link.drop_carry(d);
        let _ = d.store.remove_replica_link(&v, &host);
        hosts.push(host);
    }
    hosts
}

/// A VM arrived here: replicate it to `hosts` (the old primary, whose kept copy becomes a
/// replica, and the replicas the old primary had). Hosts this roamd does not know as
/// peers are skipped with a warning; so is this host itself.
pub async fn adopt(d: &Arc<Daemon>, vm: &str, hosts: &[String]) {
    for host in hosts {
        if host == &d.cfg.name {
            continue;
        }
        match add(d, vm, host).await {
            Ok(_) => info!(vm, host = %host, "replication follows the VM"),
            Err(e) => {
                warn!(vm, host = %host, "cannot replicate the arrived VM there: {}", e.message)
            }
        }
    }
}

pub fn list(d: &Daemon, vm: Option<&str>) -> Vec<ReplicaInfo> {
    let mut out: Vec<ReplicaInfo> = d
        .replication
        .links()
        .values()
        .filter(|l| vm.is_none_or(|v| l.vm == v))
        .map(|l| l.info())
        .collect();
    out.sort_by(|a, b| (&a.vm, &a.host).cmp(&(&b.vm, &b.host)));
    out
}

/// `rt` stopped here (its export is gone): each of its links keeps what its replica
/// lacks on disk at once (`Link::vm_stopped`).
pub fn vm_stopped(d: &Daemon, rt: &crate::runtime::RunningVm) {
    let links: Vec<Arc<Link>> = d
        .replication
        .links()
        .values()
        .filter(|l| l.vm == rt.name)
        .cloned()
        .collect();
    for l in links {
        l.vm_stopped(d, rt);
    }
}

/// Stop every link task (daemon shutdown, after the VMs stopped) and keep what each knew
/// of its replica for the next start.
pub async fn stop_all(d: &Daemon) {
    let all: Vec<Arc<Link>> = d.replication.links().values().cloned().collect();
    for l in all {
        l.stop().await;
        if let Some(c) = l.carried(d) {
            let p = carry::path(&d.paths.state, &l.vm, &l.host);
            match c.save(&p) {
                Ok(()) => info!(vm = %l.vm, host = %l.host, pending = c.pending.len(),
                    "replication state kept for the next start"),
                Err(e) => warn!(vm = %l.vm, host = %l.host, "replication state not kept: {e}"),
            }
        }
    }
}
