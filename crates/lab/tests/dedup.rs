//! Dedup across VMs end to end: two VMs made from the same base image on office; the
//! first moves to home; moving the second then sends only what home holds nowhere, and
//! the guest agent finds every acknowledged write on home afterwards.
#![allow(clippy::unwrap_used)]

use roam_control::api::{Outcome, Workload};
use roam_lab::{Lab, LabConfig};
use roam_wan::LinkParams;

const BASE_MIB: u64 = 64;
const OWN_MIB: u64 = 32;

fn config() -> LabConfig {
    LabConfig {
        link: LinkParams {
            bandwidth_mbit: 100.0,
            rtt_ms: 20.0,
            loss_pct: 0.0,
            ..LinkParams::default()
        },
        memory_mib: 256,
        disk_bytes: 1 << 30,
        data_mib: BASE_MIB,
        workload: Workload {
            mem_dirty_mib_s: 4,
            mem_working_set_mib: 8,
            disk_writes_per_s: 40,
            ..Workload::default()
        },
        home_state_limit_mib: None,
        keep: std::env::var_os("ROAM_LAB_KEEP").is_some(),
        correspondent: false,
        host_env: Vec::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_vm_from_the_same_base_sends_only_its_own_data() {
    let lab = Lab::start(config()).await.unwrap();
    // "base": the base image only; "desk": the same base image plus its own files.
    lab.create_vm_with_data("office", "base", BASE_MIB)
        .await
        .unwrap();
    lab.create_vm_with_data("office", "desk", BASE_MIB + OWN_MIB)
        .await
        .unwrap();
    let first = lab.migrate("base", "office", "home", |_| {}).await.unwrap();
    assert_eq!(first.outcome, Outcome::Completed, "{:?}", first.error);
    eprintln!(
        "first move: disk {} B, wire {} B, skipped {:?}, deduped {:?}",
        first.bytes.disk, first.bytes.wire, first.chunks_skipped, first.chunks_deduped
    );

    lab.start_workload("office", "desk").await.unwrap();
    tokio::time::sleep(std::time::Duration::from_secs(2)).await;
    let m = lab.migrate("desk", "office", "home", |_| {}).await.unwrap();
    eprintln!(
        "second move: disk {} B, wire {} B, least {:?}, skipped {:?}, deduped {:?}, \
         acked {}, lost {}, {} ms",
        m.bytes.disk,
        m.bytes.wire,
        m.least_bytes,
        m.chunks_skipped,
        m.chunks_deduped,
        m.acked_writes,
        m.acked_writes_lost,
        m.total_ms
    );
    assert_eq!(
        m.outcome,
        Outcome::Completed,
        "{:?}\n--- office ---\n{}\n--- home ---\n{}",
        m.error,
        lab.host("office").log_tail(40),
        lab.host("home").log_tail(40)
    );
    assert!(
        m.acked_writes > 0,
        "the guest wrote nothing: the check is empty"
    );
    assert_eq!(m.acked_writes_lost, 0);
    // ~1000 chunks of the base image are on home already (in "base"'s disk).
    let deduped = m.chunks_deduped.unwrap_or(0);
    assert!(deduped > 900, "only {deduped} chunks found on home");
    // The disk holds 96 MiB of data; only the 32 MiB of its own (half compressible
    // text) plus the guest's writes and 56 bytes of offer per chunk may travel.
    let data = (BASE_MIB + OWN_MIB) << 20;
    assert!(
        m.bytes.disk < data * 2 / 5,
        "sent {} disk bytes for {} of data",
        m.bytes.disk,
        data
    );
    // And against the least possible (each lacking content once, compressed).
    let least = m.least_bytes.unwrap_or(0);
    assert!(
        least > 8 << 20,
        "least {least}: its own data must have been sent"
    );
    assert!(
        (m.bytes.disk as f64) <= 1.1 * least as f64,
        "disk bytes {} vs least {least}",
        m.bytes.disk
    );
    lab.shutdown().await;
}
