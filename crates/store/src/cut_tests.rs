//! The cut rule against a model of a guest writing and flushing while a replicator reads.
//!
//! Oracle: after every commit at FLUSH `e`, each replica chunk holds either its value at
//! FLUSH `e` or a value written to it after FLUSH `e` — and since the rule guarantees no
//! FLUSH completed in between, that is "disk at FLUSH e plus a subset of the next epoch".

use super::*;
use proptest::prelude::*;
use std::collections::{BTreeMap, BTreeSet};

#[derive(Debug, Clone)]
enum Ev {
    Write(usize, u8),
    Flush,
    /// One step of the replicator (begin a pass, read one chunk, or end a pass).
    Step,
}

fn ev(n: usize) -> impl Strategy<Value = Ev> {
    prop_oneof![
        4 => (0..n, 1u8..250).prop_map(|(c, v)| Ev::Write(c, v)),
        2 => Just(Ev::Flush),
        5 => Just(Ev::Step),
    ]
}

/// The guest's disk, the tracker, and the flush history.
struct Guest {
    disk: Vec<u8>,
    dirty: BTreeSet<usize>,
    epoch: u64,
    /// Disk at each completed FLUSH (index = epoch; 0 = initial).
    at_flush: Vec<Vec<u8>>,
    /// Values written to each chunk during the epoch after FLUSH e: (e, chunk) -> values.
    written_after: BTreeMap<(u64, usize), BTreeSet<u8>>,
}

impl Guest {
    fn write(&mut self, c: usize, v: u8) {
        self.disk[c] = v;
        self.dirty.insert(c);
        self.written_after
            .entry((self.epoch, c))
            .or_default()
            .insert(v);
    }
    fn flush(&mut self) {
        self.epoch += 1;
        self.at_flush.push(self.disk.clone());
    }
    fn consistent_at(&self, replica: &[u8], e: u64) -> bool {
        let base = &self.at_flush[e as usize];
        replica.iter().enumerate().all(|(c, v)| {
            *v == base[c]
                || self
                    .written_after
                    .get(&(e, c))
                    .is_some_and(|s| s.contains(v))
        })
    }
}

#[derive(Debug, PartialEq)]
enum Phase {
    Idle,
    Reading,
}

/// Runs the events; `naive` commits after one pass whatever happened (the control).
fn run(n: usize, events: &[Ev], max_passes: u32, naive: bool) -> Result<usize, String> {
    let init: Vec<u8> = (0..n as u8).collect();
    let mut g = Guest {
        disk: init.clone(),
        dirty: BTreeSet::new(),
        epoch: 0,
        at_flush: vec![init.clone()],
        written_after: BTreeMap::new(),
    };
    let mut replica = init;
    let mut cut = CutBuilder::new(max_passes);
    let mut phase = Phase::Idle;
    let mut queue: Vec<usize> = Vec::new();
    let mut staged: BTreeMap<usize, u8> = BTreeMap::new();
    let mut gate = false;
    let mut deferred = false;
    let mut commits = 0;
    for e in events {
        match e {
            Ev::Write(c, v) => g.write(*c, *v),
            // A gated FLUSH runs but its completion (the epoch bump) waits for the gate.
            Ev::Flush if gate => deferred = true,
            Ev::Flush => g.flush(),
            Ev::Step => match phase {
                Phase::Idle => {
                    cut.begin_pass(g.epoch);
                    queue = std::mem::take(&mut g.dirty).into_iter().rev().collect();
                    phase = Phase::Reading;
                }
                Phase::Reading => {
                    if let Some(c) = queue.pop() {
                        staged.insert(c, g.disk[c]);
                        continue;
                    }
                    let end = if naive {
                        PassEnd::Consistent {
                            flush_epoch: g.epoch,
                        }
                    } else {
                        cut.end_pass(g.epoch)
                    };
                    phase = Phase::Idle;
                    match end {
                        PassEnd::Consistent { flush_epoch } => {
                            for (c, v) in std::mem::take(&mut staged) {
                                replica[c] = v;
                            }
                            if !g.consistent_at(&replica, flush_epoch) {
                                return Err(format!(
                                    "replica {replica:?} is not the disk at flush {flush_epoch} \
                                     ({:?}) plus writes of the next epoch",
                                    g.at_flush[flush_epoch as usize]
                                ));
                            }
                            cut = CutBuilder::new(max_passes);
                            commits += 1;
                            // The gate opens: FLUSHes held during the pass complete now.
                            gate = false;
                            if std::mem::take(&mut deferred) {
                                g.flush();
                            }
                        }
                        PassEnd::Again => {}
                        PassEnd::Gate => gate = true,
                    }
                }
            },
        }
    }
    Ok(commits)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn every_commit_is_a_crash_state_of_the_flush_history(
        n in 1usize..8,
        events in proptest::collection::vec(ev(8), 1..150),
        max_passes in 1u32..4,
    ) {
        let events: Vec<Ev> = events.into_iter().map(|e| match e {
            Ev::Write(c, v) => Ev::Write(c % n, v),
            e => e,
        }).collect();
        if let Err(e) = run(n, &events, max_passes, false) {
            prop_assert!(false, "{}", e);
        }
    }
}

/// The control: committing whatever one pass read is caught by the same oracle, so the
/// property above is not vacuous.
#[test]
fn naive_cut_violates_write_order_and_the_rule_refuses_it() {
    // Replicator takes {0, 1}, reads chunk 0 (old); the guest writes 0 := 9 (journal),
    // FLUSHes, writes 1 := 7 (commit block); the replicator reads chunk 1 (new).
    let mut events = vec![Ev::Write(0, 1), Ev::Write(1, 2), Ev::Step, Ev::Step];
    events.extend([
        Ev::Write(0, 9),
        Ev::Flush,
        Ev::Write(1, 7),
        Ev::Step,
        Ev::Step,
    ]);
    let naive = run(2, &events, 3, true);
    assert!(
        naive.is_err(),
        "the oracle must catch the naive cut: {naive:?}"
    );
    // The rule: that pass ends Again; the next pass re-reads chunk 0 and commits.
    events.extend([Ev::Step, Ev::Step, Ev::Step, Ev::Step]);
    assert_eq!(run(2, &events, 3, false), Ok(1));
}

#[test]
fn gate_after_max_passes() {
    let mut c = CutBuilder::new(2);
    c.begin_pass(0);
    assert_eq!(c.end_pass(1), PassEnd::Again);
    c.begin_pass(1);
    assert_eq!(c.end_pass(2), PassEnd::Gate);
    c.begin_pass(2);
    assert_eq!(c.end_pass(2), PassEnd::Consistent { flush_epoch: 2 });
    assert_eq!(c.passes(), 3);
}
