//! The host's embedded, transactional state: peers it trusts and VMs it knows.
//!
//! One redb file (`state.redb`) in the state directory. Every record is a versioned JSON
//! value under a string key, so a record written by an older roamd can still be read and a
//! newer one is refused with a clear error instead of being misread. The redb transaction
//! is the unit of change: a migration's commit (generation bump + new owner) is one write.

use std::path::Path;

use redb::{Database, ReadableTable, TableDefinition};
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::error::Error;

const PEERS: TableDefinition<&str, &[u8]> = TableDefinition::new("peers");
const VMS: TableDefinition<&str, &[u8]> = TableDefinition::new("vms");
const LOG: TableDefinition<u64, &[u8]> = TableDefinition::new("log");
/// Replicas this host keeps for other hosts' VMs (the receiving side), by VM name.
const REPLICAS: TableDefinition<&str, &[u8]> = TableDefinition::new("replicas");
/// Replicas of this host's VMs kept elsewhere (the sending side), by "VM/HOST".
const REPLICA_LINKS: TableDefinition<&str, &[u8]> = TableDefinition::new("replica_links");
/// Who owns each VM as far as this host knows (one writer, split brain), by VM name.
const OWNERSHIP: TableDefinition<&str, &[u8]> = TableDefinition::new("ownership");

/// Version of the records below.
const RECORD_VERSION: u32 = 1;
/// No record is larger than this; a bigger value is corruption, not data.
const MAX_RECORD: usize = 1 << 20;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Envelope<T> {
    v: u32,
    #[serde(flatten)]
    body: T,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerRecord {
    pub name: String,
    pub addr: String,
    pub key: String,
    /// Cap on what roam sends to this peer (replication; migrations by default), Mbit/s.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit_mbit: Option<u32>,
}

/// Where a VM stands on this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum VmStatus {
    /// Defined here, not running.
    Stopped,
    /// Running here (this host is the primary).
    Running,
    /// Moved to another host; this host keeps its old disk and must not run it.
    Moved,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmRecord {
    pub name: String,
    pub memory_mib: u64,
    pub vcpus: u32,
    pub disk_bytes: u64,
    pub disk_path: String,
    pub kernel: String,
    pub initrd: String,
    pub cmdline: String,
    pub status: VmStatus,
    /// Rises at every completed migration; see roam-migrate.
    pub generation: u64,
    /// Host the VM moved to, when `status` is `Moved`.
    pub moved_to: Option<String>,
    pub created_at: u64,
    /// The VM's HIP identity and guest LAN (it gets a NIC); records written before
    /// roamd gave VMs a network have none.
    #[serde(default)]
    pub net: Option<roam_migrate::protocol::NetSpec>,
    /// The VM's virtio-balloon device does free page hinting (`roam_vm::VmConfig`).
    /// Stored as `balloon`, its name from before the device could also report. Set at
    /// creation and never changed: the device set must not change under a running
    /// guest or across a migration, so records from before the balloon keep none.
    #[serde(default, rename = "balloon")]
    pub free_page_hint: bool,
    /// The VM's virtio-balloon device does free page reporting (every VM created since
    /// roamd made it the default; older records have none).
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// A replica of another host's VM disk, kept here under `STATE/replicas/NAME/`. The
/// replica's own files (roam-store's `ReplicaWriter` record) are the authority on what was
/// committed; this record is what `roamd` lists and what survives a lost directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaRecord {
    pub vm: String,
    /// The host that last wrote it (the VM's primary at `generation`).
    pub primary: String,
    pub disk_bytes: u64,
    pub chunk_size: u32,
    /// Highest generation and batch committed.
    pub generation: u64,
    pub seq: u64,
    pub last_sync_unix_ms: Option<u64>,
    pub dir: String,
}

/// "Keep VM replicated to HOST": the sending side's wish, restarted with roamd.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ReplicaLinkRecord {
    pub vm: String,
    pub host: String,
    pub created_unix_ms: u64,
}

impl ReplicaLinkRecord {
    pub fn key(vm: &str, host: &str) -> String {
        format!("{vm}/{host}")
    }
}

/// What this host learnt about who owns a VM (see `crate::ownership`). It speaks for the
/// VM record at `generation` only: a migration or a `force-primary` that changes the
/// record's generation voids it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OwnershipRecord {
    pub vm: String,
    pub generation: u64,
    /// Heads this host's claim overrides (set by `force-primary`).
    #[serde(default)]
    pub overrides: Vec<crate::ownership::rules::Head>,
    #[serde(default)]
    pub conflict: Option<Conflict>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Conflict {
    /// A newer generation exists elsewhere: this copy must not run again without
    /// `force-primary`.
    Stale {
        owner: crate::ownership::rules::Head,
        learned_from: String,
        since_unix_ms: u64,
    },
    /// Another host is primary too, and neither is provably the other's past.
    SplitBrain {
        other: crate::ownership::rules::Head,
        since_unix_ms: u64,
    },
}

pub struct Store {
    db: Database,
}

fn encode<T: Serialize>(body: &T) -> Result<Vec<u8>, Error> {
    serde_json::to_vec(&Envelope {
        v: RECORD_VERSION,
        body,
    })
    .map_err(|e| Error::State(format!("encode record: {e}")))
}

fn decode<T: DeserializeOwned>(what: &str, bytes: &[u8]) -> Result<T, Error> {
    if bytes.len() > MAX_RECORD {
        return Err(Error::State(format!(
            "{what}: record of {} bytes exceeds the cap",
            bytes.len()
        )));
    }
    let env: Envelope<T> = serde_json::from_slice(bytes)
        .map_err(|e| Error::State(format!("{what}: unreadable record: {e}")))?;
    if env.v > RECORD_VERSION {
        return Err(Error::State(format!(
            "{what}: record version {} is newer than this roamd ({RECORD_VERSION})",
            env.v
        )));
    }
    Ok(env.body)
}

fn db_err(e: impl std::fmt::Display) -> Error {
    Error::State(e.to_string())
}

impl Store {
    pub fn open(path: &Path) -> Result<Store, Error> {
        let db = Database::create(path)
            .map_err(|e| Error::State(format!("open {}: {e}", path.display())))?;
        // Create the tables so that read transactions never meet a missing table.
        let tx = db.begin_write().map_err(db_err)?;
        tx.open_table(PEERS).map_err(db_err)?;
        tx.open_table(VMS).map_err(db_err)?;
        tx.open_table(LOG).map_err(db_err)?;
        tx.open_table(REPLICAS).map_err(db_err)?;
        tx.open_table(REPLICA_LINKS).map_err(db_err)?;
        tx.open_table(OWNERSHIP).map_err(db_err)?;
        tx.commit().map_err(db_err)?;
        Ok(Store { db })
    }

    fn get<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
    ) -> Result<Option<T>, Error> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(table).map_err(db_err)?;
        match t.get(key).map_err(db_err)? {
            Some(v) => Ok(Some(decode(key, v.value())?)),
            None => Ok(None),
        }
    }

    fn list<T: DeserializeOwned>(
        &self,
        table: TableDefinition<&str, &[u8]>,
    ) -> Result<Vec<T>, Error> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(table).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)? {
            let (k, v) = row.map_err(db_err)?;
            out.push(decode(k.value(), v.value())?);
        }
        Ok(out)
    }

    fn put<T: Serialize>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        key: &str,
        value: &T,
    ) -> Result<(), Error> {
        let bytes = encode(value)?;
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(table).map_err(db_err)?;
            t.insert(key, bytes.as_slice()).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }

    fn remove(&self, table: TableDefinition<&str, &[u8]>, key: &str) -> Result<bool, Error> {
        let tx = self.db.begin_write().map_err(db_err)?;
        let existed = {
            let mut t = tx.open_table(table).map_err(db_err)?;
            let r = t.remove(key).map_err(db_err)?;
            r.is_some()
        };
        tx.commit().map_err(db_err)?;
        Ok(existed)
    }

    pub fn peer(&self, name: &str) -> Result<Option<PeerRecord>, Error> {
        self.get(PEERS, name)
    }
    pub fn peers(&self) -> Result<Vec<PeerRecord>, Error> {
        self.list(PEERS)
    }
    pub fn put_peer(&self, p: &PeerRecord) -> Result<(), Error> {
        self.put(PEERS, &p.name, p)
    }
    pub fn remove_peer(&self, name: &str) -> Result<bool, Error> {
        self.remove(PEERS, name)
    }

    pub fn vm(&self, name: &str) -> Result<Option<VmRecord>, Error> {
        self.get(VMS, name)
    }
    pub fn vms(&self) -> Result<Vec<VmRecord>, Error> {
        self.list(VMS)
    }
    pub fn put_vm(&self, v: &VmRecord) -> Result<(), Error> {
        self.put(VMS, &v.name, v)
    }
    pub fn remove_vm(&self, name: &str) -> Result<bool, Error> {
        self.remove(VMS, name)
    }

    pub fn replica(&self, vm: &str) -> Result<Option<ReplicaRecord>, Error> {
        self.get(REPLICAS, vm)
    }
    pub fn replicas(&self) -> Result<Vec<ReplicaRecord>, Error> {
        self.list(REPLICAS)
    }
    pub fn put_replica(&self, r: &ReplicaRecord) -> Result<(), Error> {
        self.put(REPLICAS, &r.vm, r)
    }
    pub fn remove_replica(&self, vm: &str) -> Result<bool, Error> {
        self.remove(REPLICAS, vm)
    }

    pub fn replica_links(&self) -> Result<Vec<ReplicaLinkRecord>, Error> {
        self.list(REPLICA_LINKS)
    }
    pub fn put_replica_link(&self, l: &ReplicaLinkRecord) -> Result<(), Error> {
        self.put(REPLICA_LINKS, &ReplicaLinkRecord::key(&l.vm, &l.host), l)
    }
    pub fn remove_replica_link(&self, vm: &str, host: &str) -> Result<bool, Error> {
        self.remove(REPLICA_LINKS, &ReplicaLinkRecord::key(vm, host))
    }

    pub fn ownership(&self, vm: &str) -> Result<Option<OwnershipRecord>, Error> {
        self.get(OWNERSHIP, vm)
    }
    pub fn put_ownership(&self, o: &OwnershipRecord) -> Result<(), Error> {
        self.put(OWNERSHIP, &o.vm, o)
    }

    /// The host's log, oldest first (at most the last `max` events).
    pub fn log_events(&self, max: usize) -> Result<Vec<serde_json::Value>, Error> {
        let tx = self.db.begin_read().map_err(db_err)?;
        let t = tx.open_table(LOG).map_err(db_err)?;
        let mut out = Vec::new();
        for row in t.iter().map_err(db_err)?.rev().take(max) {
            let (k, v) = row.map_err(db_err)?;
            out.push(decode(&format!("log {}", k.value()), v.value())?);
        }
        out.reverse();
        Ok(out)
    }

    /// Append an event to the host's log (ownership changes, forced actions).
    pub fn log(&self, event: &serde_json::Value) -> Result<(), Error> {
        let bytes = encode(event)?;
        let tx = self.db.begin_write().map_err(db_err)?;
        {
            let mut t = tx.open_table(LOG).map_err(db_err)?;
            let next = t
                .last()
                .map_err(db_err)?
                .map(|(k, _)| k.value() + 1)
                .unwrap_or(0);
            t.insert(next, bytes.as_slice()).map_err(db_err)?;
        }
        tx.commit().map_err(db_err)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str) -> VmRecord {
        VmRecord {
            name: name.into(),
            memory_mib: 512,
            vcpus: 1,
            disk_bytes: 1 << 30,
            disk_path: "/x".into(),
            kernel: "k".into(),
            initrd: "i".into(),
            cmdline: "c".into(),
            status: VmStatus::Stopped,
            generation: 1,
            moved_to: None,
            created_at: 1,
            net: None,
            free_page_hint: false,
            free_page_reporting: true,
        }
    }

    #[test]
    fn records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.redb");
        {
            let s = Store::open(&p).unwrap();
            s.put_vm(&vm("desk")).unwrap();
            s.put_peer(&PeerRecord {
                name: "home".into(),
                addr: "198.18.2.2:7000".into(),
                key: "k".into(),
                rate_limit_mbit: None,
            })
            .unwrap();
            s.log(&serde_json::json!({"event": "x"})).unwrap();
        }
        let s = Store::open(&p).unwrap();
        assert_eq!(s.vm("desk").unwrap().unwrap(), vm("desk"));
        assert_eq!(s.peers().unwrap().len(), 1);
        assert_eq!(s.log_events(10).unwrap()[0]["event"], "x");
        assert!(s.remove_vm("desk").unwrap());
        assert!(s.vm("desk").unwrap().is_none());
    }

    #[test]
    fn replica_records_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("state.redb");
        let rec = ReplicaRecord {
            vm: "desk".into(),
            primary: "office".into(),
            disk_bytes: 1 << 30,
            chunk_size: 65536,
            generation: 2,
            seq: 7,
            last_sync_unix_ms: Some(5),
            dir: "/x".into(),
        };
        let link = ReplicaLinkRecord {
            vm: "desk".into(),
            host: "home".into(),
            created_unix_ms: 1,
        };
        {
            let s = Store::open(&p).unwrap();
            s.put_replica(&rec).unwrap();
            s.put_replica_link(&link).unwrap();
        }
        let s = Store::open(&p).unwrap();
        assert_eq!(s.replica("desk").unwrap(), Some(rec));
        assert_eq!(s.replica_links().unwrap(), vec![link]);
        assert!(s.remove_replica_link("desk", "home").unwrap());
        assert!(s.remove_replica("desk").unwrap());
        assert!(s.replicas().unwrap().is_empty());
    }

    #[test]
    fn records_without_a_network_still_load() {
        // A VmRecord as roamd wrote it before VMs had a HIP identity.
        let old = br#"{"v":1,"name":"desk","memory_mib":512,"vcpus":1,"disk_bytes":1073741824,
            "disk_path":"/x","kernel":"k","initrd":"i","cmdline":"c","status":"stopped",
            "generation":1,"moved_to":null,"created_at":1}"#;
        let r: VmRecord = decode("desk", old).unwrap();
        // Nor a balloon: the device set of a VM created then must not change.
        let was = VmRecord {
            free_page_hint: false,
            free_page_reporting: false,
            ..vm("desk")
        };
        assert_eq!(r, was);
        let mut with = vm("desk");
        with.net = Some(crate::net::new_spec());
        let back: VmRecord = decode("desk", &encode(&with).unwrap()).unwrap();
        assert_eq!(back, with);
    }

    #[test]
    fn records_with_a_hinting_balloon_keep_it() {
        // A VmRecord as roamd wrote it when the balloon could only hint.
        let old = br#"{"v":1,"name":"desk","memory_mib":512,"vcpus":1,"disk_bytes":1073741824,
            "disk_path":"/x","kernel":"k","initrd":"i","cmdline":"c","status":"stopped",
            "generation":1,"moved_to":null,"created_at":1,"net":null,"balloon":true}"#;
        let r: VmRecord = decode("desk", old).unwrap();
        assert!(r.free_page_hint && !r.free_page_reporting);
        // And the hinting is still written under the name older roamds read.
        let v: serde_json::Value = serde_json::from_slice(&encode(&r).unwrap()).unwrap();
        assert_eq!(v["balloon"], true);
    }

    #[test]
    fn ownership_records_round_trip_and_old_peers_load() {
        use crate::ownership::rules::Head;
        let dir = tempfile::tempdir().unwrap();
        let s = Store::open(&dir.path().join("state.redb")).unwrap();
        let o = OwnershipRecord {
            vm: "desk".into(),
            generation: 3,
            overrides: vec![Head::new(2, "home")],
            conflict: Some(Conflict::SplitBrain {
                other: Head::new(3, "home"),
                since_unix_ms: 9,
            }),
        };
        s.put_ownership(&o).unwrap();
        assert_eq!(s.ownership("desk").unwrap(), Some(o));
        let p: PeerRecord = decode("p", br#"{"v":1,"name":"a","addr":"b","key":"c"}"#).unwrap();
        assert_eq!(p.rate_limit_mbit, None);
    }

    #[test]
    fn newer_records_are_refused() {
        let e = decode::<PeerRecord>("p", br#"{"v":99,"name":"a","addr":"b","key":"c"}"#);
        assert!(matches!(e, Err(Error::State(m)) if m.contains("newer")));
    }
}
