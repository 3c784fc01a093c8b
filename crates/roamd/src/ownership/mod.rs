//! One writer per disk: what this host claims about each VM, how hosts compare claims
//! when they talk, and the explicit override `roam vm force-primary`.
//!
//! ```text
//!  peer contact (any of):                      this host
//!   roamd start, `vm start`, force-primary ──▶ exchange(peer): Claims{mine} ─▶ peer
//!   replication Hello for a VM defined here ─▶   ◀─ Claims{theirs}
//!   migration Offer for a VM defined here   ─▶ rules::judge(mine, theirs) per VM
//!                                                 │ MineStale ─▶ conflict Stale  (store + log)
//!                                                 │ SplitBrain ─▶ conflict SplitBrain (both sides)
//!                                                 ▼
//!  `vm start` refuses a VM with a conflict; the replica side refuses a split brain's
//!  Hello; `vm show`/`vm list` report it; `force-primary` clears it (generation above all
//!  known, overriding them) and tells every reachable peer.
//! ```
//!
//! The exchange travels on a stream of kind `Replication` whose first message is
//! `ReplMsg::Claims` (see `replication::protocol`), so it needs no new stream kind. A
//! peer speaks only for itself: the `from` of its claims is replaced by the name its
//! pinned key has here.
//!
//! Nothing is ever merged or deleted here: a stale copy stays where it is (its disk under
//! `STATE/vms/NAME/`, never written by replication, whose data lives under
//! `STATE/replicas/NAME/`), and is moved to `STATE/aside/NAME-gGEN-UNIXMS/` when a
//! migration of the newer owner arrives to take its place.

pub mod rules;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use roam_channel::{Connection, RecvStream, SendStream, StreamKind};
use roam_control::api::{ApiError, VmConflict, VmInfo};
use tokio::task::JoinSet;
use tracing::{info, warn};

use crate::daemon::{now_ms, to_api, Daemon};
use crate::error::{Error, Result};
use crate::replication::protocol::ReplMsg;
use crate::state::{Conflict, OwnershipRecord, VmRecord, VmStatus};
use rules::{judge, Claim, Head, Verdict};

/// Version of the claims exchange.
pub const CLAIMS_VERSION: u16 = 1;
/// How long one exchange may take (connect + one round trip); an unreachable peer (a
/// partition) just cannot be asked.
const EXCHANGE_TIMEOUT: Duration = Duration::from_secs(3);

/// The ownership record, if it still speaks for the VM record's generation.
fn current(d: &Daemon, r: &VmRecord) -> Option<OwnershipRecord> {
    d.store
        .ownership(&r.name)
        .ok()
        .flatten()
        .filter(|o| o.generation == r.generation)
}

/// The conflict that keeps this host's copy of `r` from running, if any.
pub fn conflict(d: &Daemon, r: &VmRecord) -> Option<Conflict> {
    if r.status == VmStatus::Moved {
        return None;
    }
    current(d, r).and_then(|o| o.conflict)
}

/// This host's copy is known to be superseded (a replica of the newer owner may live
/// beside it).
pub fn is_stale(d: &Daemon, r: &VmRecord) -> bool {
    matches!(conflict(d, r), Some(Conflict::Stale { .. }))
}

/// The conflict as `vm show` reports it.
pub fn conflict_info(d: &Daemon, r: &VmRecord) -> Option<VmConflict> {
    Some(match conflict(d, r)? {
        Conflict::Stale {
            owner,
            learned_from,
            since_unix_ms,
        } => VmConflict::Stale {
            owner: owner.host,
            owner_generation: owner.generation,
            generation: r.generation,
            learned_from,
            since_unix_ms,
        },
        Conflict::SplitBrain {
            other,
            since_unix_ms,
        } => VmConflict::SplitBrain {
            other_host: other.host,
            other_generation: other.generation,
            generation: r.generation,
            since_unix_ms,
        },
    })
}

/// What this host says about `vm`: as its primary, as a tombstone or stale copy naming
/// the newer owner, or as the holder of a replica naming who last wrote it.
pub fn my_claim(d: &Daemon, vm: &str) -> Option<Claim> {
    let me = d.cfg.name.clone();
    let rec = d.store.vm(vm).ok().flatten();
    let id = rec
        .as_ref()
        .and_then(|r| r.net.as_ref())
        .map(|n| n.mac.clone());
    let claim = |head: Head, primary: bool, running: bool, overrides: Vec<Head>| Claim {
        vm: vm.to_string(),
        from: me.clone(),
        head,
        primary,
        running,
        overrides,
        id: id.clone(),
    };
    if let Some(r) = rec.clone() {
        let running = r.status == VmStatus::Running;
        if r.status == VmStatus::Moved {
            let to = r.moved_to.clone().unwrap_or_default();
            return Some(claim(Head::new(r.generation, to), false, false, vec![]));
        }
        let own = current(d, &r);
        return Some(match own {
            Some(OwnershipRecord {
                conflict: Some(Conflict::Stale { owner, .. }),
                ..
            }) => claim(owner, false, running, vec![]),
            own => claim(
                Head::new(r.generation, me.clone()),
                true,
                running,
                own.map(|o| o.overrides).unwrap_or_default(),
            ),
        });
    }
    let rep = d.store.replica(vm).ok().flatten()?;
    Some(claim(
        Head::new(rep.generation, rep.primary),
        false,
        false,
        vec![],
    ))
}

fn all_claims(d: &Daemon) -> Vec<Claim> {
    let mut names: Vec<String> = d
        .store
        .vms()
        .unwrap_or_default()
        .into_iter()
        .map(|r| r.name)
        .collect();
    names.extend(
        d.store
            .replicas()
            .unwrap_or_default()
            .into_iter()
            .map(|r| r.vm),
    );
    names.sort();
    names.dedup();
    names.truncate(rules::MAX_CLAIMS);
    names.iter().filter_map(|n| my_claim(d, n)).collect()
}

/// Judge a peer's claim against mine and record what it means here.
fn apply(d: &Daemon, peer: &str, theirs: &Claim) -> Verdict {
    let Some(r) = d.store.vm(&theirs.vm).ok().flatten() else {
        return Verdict::Agree;
    };
    let Some(mine) = my_claim(d, &theirs.vm) else {
        return Verdict::Agree;
    };
    let v = judge(&mine, theirs);
    let now = now_ms();
    let new = match &v {
        Verdict::MineStale { owner } => Conflict::Stale {
            owner: owner.clone(),
            learned_from: peer.to_string(),
            since_unix_ms: now,
        },
        Verdict::SplitBrain => Conflict::SplitBrain {
            other: theirs.head.clone(),
            since_unix_ms: now,
        },
        Verdict::Agree | Verdict::TheirsStale => return v,
    };
    let own = current(d, &r);
    let same = match (own.as_ref().and_then(|o| o.conflict.as_ref()), &new) {
        (Some(Conflict::Stale { owner: a, .. }), Conflict::Stale { owner: b, .. }) => a == b,
        (Some(Conflict::SplitBrain { other: a, .. }), Conflict::SplitBrain { other: b, .. }) => {
            a == b
        }
        _ => false,
    };
    if same {
        return v;
    }
    let rec = OwnershipRecord {
        vm: r.name.clone(),
        generation: r.generation,
        overrides: own.map(|o| o.overrides).unwrap_or_default(),
        conflict: Some(new),
    };
    let event = match &v {
        Verdict::MineStale { owner } => {
            warn!(vm = %r.name, owner = %owner.host, owner_generation = owner.generation,
                generation = r.generation, from = peer,
                "this copy is stale: a newer generation exists elsewhere; it will not start");
            serde_json::json!({
                "event": "stale", "vm": r.name, "generation": r.generation,
                "owner": owner.host, "owner_generation": owner.generation,
                "learned_from": peer, "running": mine.running, "unix_ms": now,
            })
        }
        _ => {
            warn!(vm = %r.name, other = %theirs.head.host,
                other_generation = theirs.head.generation, generation = r.generation,
                "split brain: another host is primary too; replication with it stops");
            serde_json::json!({
                "event": "split_brain", "vm": r.name, "generation": r.generation,
                "other_host": theirs.head.host, "other_generation": theirs.head.generation,
                "other_running": theirs.running, "running": mine.running, "unix_ms": now,
            })
        }
    };
    if let Err(e) = d
        .store
        .put_ownership(&rec)
        .and_then(|()| d.store.log(&event))
    {
        warn!(vm = %r.name, "recording an ownership conflict: {e}");
    }
    v
}

fn chan_err(peer: &str) -> impl Fn(roam_channel::ChannelError) -> Error + '_ {
    move |e| Error::Peer {
        peer: peer.to_string(),
        detail: e.to_string(),
    }
}

/// Tell `peer` what this host claims and judge what it claims; returns its claims.
pub async fn exchange(d: &Daemon, peer: &str) -> Result<Vec<Claim>> {
    let r = tokio::time::timeout(EXCHANGE_TIMEOUT, async {
        let conn = d.connect_peer(peer).await?;
        let (mut tx, mut rx) = conn
            .open_stream(StreamKind::Replication)
            .await
            .map_err(chan_err(peer))?;
        tx.send_msg(&ReplMsg::Claims {
            version: CLAIMS_VERSION,
            claims: all_claims(d),
        })
        .await
        .map_err(chan_err(peer))?;
        let reply = rx.recv_msg::<ReplMsg>().await.map_err(chan_err(peer));
        conn.close(0u32, "claims exchanged");
        match reply? {
            ReplMsg::Claims { claims, .. } => Ok(claims),
            ReplMsg::Refuse { reason, .. } => Err(Error::Peer {
                peer: peer.to_string(),
                detail: reason,
            }),
            other => Err(Error::Peer {
                peer: peer.to_string(),
                detail: format!("unexpected answer to claims: {other:?}"),
            }),
        }
    })
    .await
    .map_err(|_| Error::Peer {
        peer: peer.to_string(),
        detail: "no answer to the ownership exchange".into(),
    })??;
    rules::check_claims(&r).map_err(|detail| Error::Peer {
        peer: peer.to_string(),
        detail,
    })?;
    let mut out = Vec::with_capacity(r.len());
    for mut c in r {
        c.from = peer.to_string();
        apply(d, peer, &c);
        out.push(c);
    }
    Ok(out)
}

/// Exchange claims with every peer at once; unreachable peers are skipped (logged at
/// debug level: a partition is exactly when they cannot be asked).
pub async fn exchange_all(d: &Arc<Daemon>) -> Vec<Claim> {
    let peers = d.store.peers().unwrap_or_default();
    let mut set = JoinSet::new();
    for p in peers {
        let d = d.clone();
        set.spawn(async move {
            match exchange(&d, &p.name).await {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(peer = %p.name, "ownership exchange: {e}");
                    vec![]
                }
            }
        });
    }
    let mut all = Vec::new();
    while let Some(r) = set.join_next().await {
        if let Ok(c) = r {
            all.extend(c);
        }
    }
    all
}

/// The answering side of [`exchange`].
pub async fn serve(
    d: Arc<Daemon>,
    conn: Connection,
    mut tx: SendStream,
    _rx: RecvStream,
    version: u16,
    claims: Vec<Claim>,
) {
    let peer = conn.peer_name().unwrap_or("?").to_string();
    let reply = if version != CLAIMS_VERSION {
        ReplMsg::refuse(format!("claims version {version} is not supported"), false)
    } else if let Err(e) = rules::check_claims(&claims) {
        ReplMsg::refuse(e, false)
    } else {
        for mut c in claims {
            c.from = peer.clone();
            apply(&d, &peer, &c);
        }
        // Answer with this host's claims after judging: the peer judges them in turn.
        ReplMsg::Claims {
            version: CLAIMS_VERSION,
            claims: all_claims(&d),
        }
    };
    if tx.send_msg(&reply).await.is_ok() {
        let _ = tokio::time::timeout(Duration::from_secs(2), tx.finish_and_wait()).await;
    }
}

/// A peer talks about `vm` as its primary (replication Hello, migration Offer): if this
/// host believes it is the primary too, compare claims before anything else happens.
pub async fn before_contact(d: &Daemon, peer: Option<&str>, vm: &str) {
    let Some(peer) = peer else { return };
    if my_claim(d, vm).is_some_and(|c| c.primary) {
        if let Err(e) = exchange(d, peer).await {
            warn!(vm, peer, "ownership exchange before accepting: {e}");
        }
    }
}

/// `vm start`: ask the reachable peers first, then refuse a copy that must not run.
pub async fn check_start(d: &Arc<Daemon>, name: &str) -> Result<()> {
    if my_claim(d, name).is_some_and(|c| c.primary) {
        exchange_all(d).await;
    }
    let r = d.vm_record(name)?;
    match conflict(d, &r) {
        None => Ok(()),
        Some(Conflict::Stale {
            owner,
            learned_from,
            ..
        }) => Err(Error::Conflict(format!(
            "VM '{name}' is stale here: {owner} is newer (this copy is generation {}, \
             learnt from '{learned_from}'); the copy is kept but must not run; \
             `roam vm force-primary {name}` overrides",
            r.generation
        ))),
        Some(Conflict::SplitBrain { other, .. }) => Err(Error::Conflict(format!(
            "VM '{name}' is in split brain: {other} is primary too (this copy is generation \
             {}); nothing was merged; run `roam vm force-primary {name}` on the host whose \
             copy to keep",
            r.generation
        ))),
    }
}

/// Where a superseded copy of `vm` goes when something must take its place.
pub fn aside_dir(d: &Daemon, vm: &str, generation: u64) -> PathBuf {
    d.paths
        .state
        .join("aside")
        .join(format!("{vm}-g{generation}-{}", now_ms()))
}

/// An incoming migration of `vm` at `offer_generation` from `peer`: compare claims if
/// this host believes it is the primary, and if this host's copy is stale and the offer
/// is at least the newer owner's generation, move the copy aside (disk and record, never
/// deleted) and leave a tombstone, so the migration proceeds as to any old host.
pub async fn prepare_incoming(d: &Daemon, peer: &str, vm: &str, offer_generation: u64) {
    before_contact(d, Some(peer), vm).await;
    let Some(mut r) = d.store.vm(vm).ok().flatten() else {
        return;
    };
    let Some(Conflict::Stale { owner, .. }) = conflict(d, &r) else {
        return;
    };
    if offer_generation < owner.generation || d.running(vm).await.is_some() {
        return;
    }
    let dir = aside_dir(d, vm, r.generation);
    let moved: Result<()> = (|| {
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(format!("create {}", dir.display()), e))?;
        let disk = PathBuf::from(&r.disk_path);
        if disk.exists() {
            std::fs::rename(&disk, dir.join("disk"))
                .map_err(|e| Error::io(format!("move {} aside", disk.display()), e))?;
        }
        let json = serde_json::to_vec_pretty(&r).map_err(|e| Error::State(e.to_string()))?;
        std::fs::write(dir.join("record.json"), json)
            .map_err(|e| Error::io("write the record aside", e))
    })();
    if let Err(e) = moved {
        warn!(
            vm,
            "could not keep the stale copy aside (the migration will be refused): {e}"
        );
        return;
    }
    let old_generation = r.generation;
    r.status = VmStatus::Moved;
    r.moved_to = Some(owner.host.clone());
    r.generation = owner.generation;
    r.disk_path = dir.join("disk").display().to_string();
    if let Err(e) = d.store.put_vm(&r) {
        warn!(vm, "recording the stale copy as set aside: {e}");
        return;
    }
    let _ = d.store.log(&serde_json::json!({
        "event": "kept_aside", "vm": vm, "generation": old_generation,
        "dir": dir.display().to_string(), "for": peer, "unix_ms": now_ms(),
    }));
    info!(vm, dir = %dir.display(), "stale copy kept aside for the arriving VM");
}

/// `roam vm force-primary`: see the module doc.
pub async fn force_primary(d: &Arc<Daemon>, name: &str, by: &str) -> Result<VmInfo, ApiError> {
    let guard = d.claim(name).map_err(to_api)?;
    d.vm_record(name).map_err(to_api)?;
    let me = d.cfg.name.clone();
    // Learn what the reachable peers hold; the partitioned ones cannot say (that is why
    // the user forces), and their copies are overridden by name when they are known.
    let peer_claims: Vec<Claim> = exchange_all(d)
        .await
        .into_iter()
        .filter(|c| c.vm == name)
        .collect();
    let mut r = d.vm_record(name).map_err(to_api)?;
    let mut known = vec![Head::new(
        r.generation,
        match (&r.moved_to, r.status) {
            (Some(to), VmStatus::Moved) => to.clone(),
            _ => me.clone(),
        },
    )];
    if let Some(o) = d.store.ownership(name).map_err(to_api)? {
        known.extend(o.overrides);
        match o.conflict {
            Some(Conflict::Stale { owner, .. }) => known.push(owner),
            Some(Conflict::SplitBrain { other, .. }) => known.push(other),
            None => {}
        }
    }
    if let Some(rep) = d.store.replica(name).map_err(to_api)? {
        known.push(Head::new(rep.generation, rep.primary));
    }
    known.extend(peer_claims.iter().map(|c| c.head.clone()));
    let generation = rules::forced_generation(known.iter().map(|h| h.generation));
    let overrides = rules::overrides(known);
    let old_generation = r.generation;

    // A copy that had moved away becomes the primary again: from the committed replica
    // held here if there is one (it is what the last primary wrote), else the disk kept
    // when the VM left.
    let mut disk_from = "this host's disk";
    if r.status == VmStatus::Moved {
        let disk = PathBuf::from(&r.disk_path);
        let tmp = disk.with_extension("forced");
        let (d2, n2, bytes, t2) = (d.clone(), name.to_string(), r.disk_bytes, tmp.clone());
        let seeded = tokio::task::spawn_blocking(move || {
            crate::replication::replica::seed_copy(&d2, &n2, bytes, &t2)
        })
        .await
        .map_err(|e| ApiError::internal(format!("copy the replica: {e}")))?
        .map_err(to_api)?;
        if seeded {
            std::fs::rename(&tmp, &disk)
                .map_err(|e| to_api(Error::io("promote the replica", e)))?;
            disk_from = "the replica held here";
        } else if disk.exists() {
            disk_from = "the copy kept when the VM left";
        } else {
            return Err(ApiError::conflict(format!(
                "VM '{name}' has no disk on this host to make primary"
            )));
        }
        r.status = VmStatus::Stopped;
        r.moved_to = None;
    }
    r.generation = generation;
    d.store.put_vm(&r).map_err(to_api)?;
    d.store
        .put_ownership(&OwnershipRecord {
            vm: name.to_string(),
            generation,
            overrides: overrides.clone(),
            conflict: None,
        })
        .map_err(to_api)?;
    let event = serde_json::json!({
        "event": "force_primary", "vm": name, "by": by, "unix_ms": now_ms(),
        "old_generation": old_generation, "new_generation": generation,
        "overrides": overrides, "disk": disk_from,
    });
    d.store.log(&event).map_err(to_api)?;
    warn!(
        vm = name,
        by,
        old_generation,
        new_generation = generation,
        ?overrides,
        disk = disk_from,
        "force_primary: this host is the VM's primary now"
    );
    drop(guard);
    // Tell every reachable peer now; the others learn when they next talk to us.
    exchange_all(d).await;
    crate::replication::restart_links(d, name).await;
    Ok(d.vm_info(&r).await)
}

/// Daemon start: tell the peers what this host claims (a host restored from a backup
/// learns here that it is stale before anyone starts the VM).
pub fn announce_at_start(d: &Arc<Daemon>) {
    let d = d.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(500)).await;
        exchange_all(&d).await;
    });
}
