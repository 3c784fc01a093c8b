//! [`CutBuilder`]: when the chunks a source read from its *live* disk form a state the
//! disk could really be in after a crash — so that a replica committing them is never a
//! mix that violates write order across a FLUSH.
//!
//! # The problem
//! A background replicator reads dirty chunks from the running VM's disk. If the guest
//! completes a FLUSH while the replicator is reading, the chunks read early may miss a
//! write from before that FLUSH while chunks read late already hold a write from after
//! it — a state no crash could produce (a journaling filesystem's commit block without
//! its journal blocks).
//!
//! # The rule
//! The NBD server counts completed FLUSHes (`DirtyTracker::flush_epoch`, bumped after the
//! data is durable and before the reply). A batch is built in *passes*:
//!
//! ```text
//!  e0 = flush_epoch()   begin_pass(e0)
//!  chunks = take()      (the dirty subscription)
//!  read + stage every chunk (later reads of a chunk supersede earlier ones)
//!  e1 = flush_epoch()   end_pass(e1) ─▶ Consistent{e0} if e1 == e0: commit the batch
//!                                   ─▶ Again: another pass over what became dirty
//!                                   ─▶ Gate: hold FLUSH replies during the next pass
//! ```
//!
//! Why a clean pass (`e1 == e0`) is enough: every write acknowledged before FLUSH #e0 was
//! issued marked its chunk before the `take()` of this pass or an earlier one, so it was
//! read afterwards (the tracker's ordering argument) by this batch or by an already
//! committed one; and every newer byte the batch read was written after FLUSH #e0
//! completed and before FLUSH #e0+1 did (none completed during the pass). So the batch
//! plus everything committed before it equals the disk at FLUSH #e0 plus *some* writes of
//! the epoch after it — exactly the set of states a crash right after FLUSH #e0 can leave
//! on a disk with a volatile write cache. Writes of one epoch carry no order between them
//! (the guest did not wait for a FLUSH), so any subset of them is legitimate.
//!
//! Passes shrink (each re-reads only what was written during the previous one), so a
//! guest that flushes now and then lets the first or second pass succeed. A guest that
//! flushes continuously could starve the replicator; after `max_passes` the builder asks
//! for a *gate*: the NBD server delays FLUSH replies (the flushes still run) for the
//! duration of one pass, which then cannot fail. Delaying a reply is always allowed; it
//! costs that guest a little latency once per batch.

/// What to do after a pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PassEnd {
    /// The staged chunks form a crash-consistent state as of FLUSH `flush_epoch`: commit.
    Consistent { flush_epoch: u64 },
    /// A FLUSH completed during the pass: take the dirty set again, read, end again.
    Again,
    /// Like `Again`, but hold FLUSH replies from `begin_pass` to `end_pass` this time.
    Gate,
}

/// The source side of one batch.
#[derive(Debug, Clone)]
pub struct CutBuilder {
    max_passes: u32,
    passes: u32,
    start: Option<u64>,
}

impl CutBuilder {
    /// `max_passes` ungated passes before asking for the gate (at least 1).
    pub fn new(max_passes: u32) -> CutBuilder {
        CutBuilder {
            max_passes: max_passes.max(1),
            passes: 0,
            start: None,
        }
    }

    /// Call with `flush_epoch()` read *before* taking the dirty set.
    pub fn begin_pass(&mut self, flush_epoch: u64) {
        self.start = Some(flush_epoch);
    }

    /// Call with `flush_epoch()` read *after* the last chunk of the pass was read.
    pub fn end_pass(&mut self, flush_epoch: u64) -> PassEnd {
        self.passes += 1;
        match self.start.take() {
            Some(s) if s == flush_epoch => PassEnd::Consistent { flush_epoch },
            _ if self.passes >= self.max_passes => PassEnd::Gate,
            _ => PassEnd::Again,
        }
    }

    /// Passes run so far for this batch.
    pub fn passes(&self) -> u32 {
        self.passes
    }
}

#[cfg(test)]
#[path = "cut_tests.rs"]
mod tests;
