//! The transfer plan: given what changed at the source and what the destination already
//! holds *anywhere*, how each chunk gets there — and only the chunks no copy of which exists
//! at the destination cross the wire, once each.
//!
//! ```text
//!  source map ─┐  (chunk, state) for changed chunks
//!              ├──────────────────────────────▶ plan ──▶ Zero        (punch a hole)
//!  dest map ───┘  skip chunks already equal       │      CopyLocal   (dest index has it)
//!  dest index (HaveSet) ──────────────────────────┘      CopySent    (same as a chunk sent now)
//!                                                        Send        (compressed, once per hash)
//! ```
//!
//! Pure functions: the daemon computes the plan at the destination (it owns the index) from
//! the `(chunk, state)` list the source offers, and answers with the chunks to `Send`.
//! Local copies must read the destination's *pre-batch* state — the replica writer stages
//! a batch in a journal and writes the disk only at commit, so that holds by construction.

use std::collections::{BTreeSet, HashMap, HashSet};

use crate::chunkmap::{ChunkMap, ChunkState, Digest};
use crate::error::{Result, StoreError};

/// Something that can say whether the destination holds a chunk with this hash.
pub trait HaveSet {
    fn has(&self, hash: &Digest) -> bool;
}

impl HaveSet for HashSet<Digest> {
    fn has(&self, hash: &Digest) -> bool {
        self.contains(hash)
    }
}

impl HaveSet for BTreeSet<Digest> {
    fn has(&self, hash: &Digest) -> bool {
        self.contains(hash)
    }
}

/// How one chunk reaches the destination.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// All zeroes: write zeroes or punch a hole; nothing crosses the wire.
    Zero,
    /// The destination holds this content already (any disk, any offset): copy locally,
    /// re-hashing what it read (the index is a hint, see `ChunkIndex::read_verified`).
    CopyLocal(Digest),
    /// Send the chunk's bytes (compressed).
    Send(Digest),
    /// Same content as chunk `from`, which this plan sends earlier: copy it after receipt.
    CopySent { from: u64, hash: Digest },
}

/// The plan for one batch, in ascending chunk order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TransferPlan {
    pub actions: Vec<(u64, Action)>,
}

impl TransferPlan {
    /// Chunks whose bytes must cross the wire: what the destination answers the source.
    pub fn to_send(&self) -> Vec<u64> {
        self.actions
            .iter()
            .filter(|(_, a)| matches!(a, Action::Send(_)))
            .map(|(c, _)| *c)
            .collect()
    }

    pub fn count(&self, pred: impl Fn(&Action) -> bool) -> usize {
        self.actions.iter().filter(|(_, a)| pred(a)).count()
    }
}

/// Plan the chunks the source offers (`(chunk, state)`, any order, duplicates allowed: the
/// last offer of a chunk wins) against the destination's `have` set.
pub fn plan_offers(
    offers: impl IntoIterator<Item = (u64, ChunkState)>,
    have: &dyn HaveSet,
) -> Result<TransferPlan> {
    let mut latest: std::collections::BTreeMap<u64, ChunkState> = Default::default();
    for (c, s) in offers {
        latest.insert(c, s);
    }
    let mut first_sent: HashMap<Digest, u64> = HashMap::new();
    let mut actions = Vec::with_capacity(latest.len());
    for (c, s) in latest {
        let a = match s {
            ChunkState::Zero => Action::Zero,
            ChunkState::Unknown => {
                return Err(StoreError::Replica(format!(
                    "chunk {c} offered without a hash (the source must hash what it reads)"
                )))
            }
            ChunkState::Data(h) if have.has(&h) => Action::CopyLocal(h),
            ChunkState::Data(h) => match first_sent.get(&h) {
                Some(&from) => Action::CopySent { from, hash: h },
                None => {
                    first_sent.insert(h, c);
                    Action::Send(h)
                }
            },
        };
        actions.push((c, a));
    }
    Ok(TransferPlan { actions })
}

/// Plan bringing a destination whose content is `dst` (if known) to `src`, over the
/// `candidates` chunks (e.g. a dirty set or `src.diff(dst)`). Chunks the destination map
/// already shows equal are left out.
pub fn plan(
    src: &ChunkMap,
    dst: Option<&ChunkMap>,
    candidates: impl IntoIterator<Item = u64>,
    have: &dyn HaveSet,
) -> Result<TransferPlan> {
    if let Some(d) = dst {
        src.same_geometry(d)?;
    }
    let mut offers = Vec::new();
    for c in candidates {
        let s = src.get(c).ok_or(StoreError::ChunkOutOfRange {
            chunk: c,
            chunks: src.len(),
        })?;
        if dst.and_then(|d| d.get(c)).is_some_and(|d| d.same_as(&s)) {
            continue;
        }
        offers.push((c, s));
    }
    plan_offers(offers, have)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const CS: usize = 512;

    fn content(v: u8) -> Vec<u8> {
        vec![v; CS]
    }

    fn map_of(values: &[u8]) -> ChunkMap {
        let mut m = ChunkMap::new((values.len() * CS) as u64, CS as u32, ChunkState::Zero).unwrap();
        for (i, v) in values.iter().enumerate() {
            m.set(i as u64, ChunkState::of(&content(*v))).unwrap();
        }
        m
    }

    #[test]
    fn base_image_shared_with_another_vm_is_not_sent() {
        // The destination holds another VM made from the same base image (values 1..=4).
        let other_vm = map_of(&[1, 2, 3, 4, 0, 0]);
        let have: HashSet<Digest> = other_vm
            .iter()
            .filter_map(|(_, s)| match s {
                ChunkState::Data(h) => Some(h),
                _ => None,
            })
            .collect();
        // Our VM: the base image at a shifted offset, plus private data 9 twice, plus zeroes.
        let src = map_of(&[0, 1, 2, 3, 4, 9, 9, 0]);
        let p = plan(&src, None, 0..src.len(), &have).unwrap();
        assert_eq!(p.to_send(), vec![5]);
        assert_eq!(p.count(|a| matches!(a, Action::CopyLocal(_))), 4);
        assert_eq!(
            p.count(|a| matches!(a, Action::CopySent { from: 5, .. })),
            1
        );
        assert_eq!(p.count(|a| matches!(a, Action::Zero)), 2);
    }

    proptest! {
        /// Apply the plan to a model destination and check it ends equal to the source,
        /// while the wire carried the least possible: each distinct non-zero content the
        /// destination lacked, once.
        #[test]
        fn plan_reconstructs_source_with_minimal_sends(
            src_vals in proptest::collection::vec(0u8..12, 1..80),
            dst_seed in proptest::collection::vec(0u8..12, 80),
            elsewhere in proptest::collection::btree_set(1u8..12, 0..5),
            use_dst_map in any::<bool>(),
        ) {
            let n = src_vals.len();
            let dst_vals: Vec<u8> = dst_seed[..n].to_vec();
            let src = map_of(&src_vals);
            let dst = map_of(&dst_vals);
            // Content store at the destination: its own disk plus other disks.
            let mut store: HashMap<Digest, u8> = HashMap::new();
            for v in dst_vals.iter().chain(elsewhere.iter()).filter(|v| **v != 0) {
                store.insert(*blake3::hash(&content(*v)).as_bytes(), *v);
            }
            let have: HashSet<Digest> = store.keys().copied().collect();
            let p = plan(&src, use_dst_map.then_some(&dst), 0..n as u64, &have).unwrap();

            let mut out = dst_vals.clone();
            let mut wire = Vec::new();
            let mut done = HashSet::new();
            for (c, a) in &p.actions {
                let v = match a {
                    Action::Zero => 0,
                    Action::CopyLocal(h) => *store.get(h).expect("CopyLocal of content the destination lacks"),
                    Action::Send(h) => {
                        prop_assert!(!have.has(h), "sent content the destination had");
                        wire.push(*h);
                        src_vals[*c as usize]
                    }
                    Action::CopySent { from, hash } => {
                        prop_assert!(done.contains(from), "copy from a chunk not yet received");
                        prop_assert_eq!(ChunkState::Data(*hash), src.get(*from).unwrap());
                        out[*from as usize]
                    }
                };
                out[*c as usize] = v;
                done.insert(*c);
            }
            prop_assert_eq!(&out, &src_vals);
            let lacking: HashSet<u8> = src_vals.iter().zip(&dst_vals)
                .filter(|(s, d)| s != d || !use_dst_map)
                .map(|(s, _)| *s)
                .filter(|s| *s != 0 && !store.values().any(|v| v == s))
                .collect();
            prop_assert_eq!(wire.len(), lacking.len());
            let distinct: HashSet<Digest> = wire.iter().copied().collect();
            prop_assert_eq!(distinct.len(), wire.len());
            if use_dst_map {
                // Nothing planned for chunks that were already equal.
                for (c, _) in &p.actions {
                    prop_assert_ne!(src_vals[*c as usize], dst_vals[*c as usize]);
                }
            }
        }

        #[test]
        fn last_offer_of_a_chunk_wins(a in 1u8..5, b in 5u8..9) {
            let offers = vec![(3, ChunkState::of(&content(a))), (3, ChunkState::of(&content(b)))];
            let p = plan_offers(offers, &HashSet::new()).unwrap();
            prop_assert_eq!(p.actions, vec![(3, Action::Send(*blake3::hash(&content(b)).as_bytes()))]);
        }
    }
}
