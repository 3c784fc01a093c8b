//! The one-writer rule as data: what a host claims about a VM, and what two claims mean
//! when two hosts compare them. Pure; every rule is tested here without sockets.
//!
//! A VM's disk has one primary at a time, named by a generation that rises at every
//! migration (the destination takes `g + 1`) and at every `roam vm force-primary` (the
//! forcing host takes a generation above every one it knows, and lists the heads it
//! overrides). A *head* is `(generation, host that owns it)`.
//!
//! ```text
//!  mine \ theirs      not primary            primary, head (gt, T)
//!  ─────────────────  ─────────────────────  ───────────────────────────────────────────
//!  not primary        agree                  agree (I am a replica or a tombstone)
//!  primary (gm, M)    gt > gm: I am stale     my head in their overrides: I am stale
//!                     else agree              theirs in mine: they are stale
//!                                             both: split brain
//!                                             gm == gt: split brain (two owners, one generation)
//!                                             gm < gt: I am stale, or split brain if I run
//!                                             gm > gt: they are stale, or split brain if they run
//! ```
//!
//! "If I run": a copy that runs at a superseded generation has been written while the
//! newer owner wrote too (a host restored from a backup that started the VM, or the old
//! side of a partition while the other side forced): two writers, so split brain, not
//! merely stale. An explicit override (`force-primary` that named the head) is the
//! user's decision and always wins: the overridden copy becomes stale even if it runs.
//!
//! The function is symmetric: `judge(a, b)` and `judge(b, a)` are mirror images, so both
//! hosts reach the same conclusion from the same pair of claims.

use serde::{Deserialize, Serialize};

/// How many overridden heads a claim carries; older ones are dropped first.
pub const MAX_OVERRIDES: usize = 16;
/// How many claims one exchange message may carry.
pub const MAX_CLAIMS: usize = 1024;

/// A generation and the host that owns (owned) it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Head {
    pub generation: u64,
    pub host: String,
}

impl Head {
    pub fn new(generation: u64, host: impl Into<String>) -> Head {
        Head {
            generation,
            host: host.into(),
        }
    }
}

impl std::fmt::Display for Head {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "'{}' at generation {}", self.host, self.generation)
    }
}

/// What one host says about one VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Claim {
    pub vm: String,
    /// The host speaking.
    pub from: String,
    /// The newest head the speaker knows: its own when it believes it is the primary,
    /// else the owner it last heard of (a moved VM's new host, a stale copy's owner).
    pub head: Head,
    /// The speaker believes it is the VM's primary (defined or running there, not moved,
    /// not known to be stale).
    pub primary: bool,
    /// The VM runs on the speaker now.
    pub running: bool,
    /// Heads this claim overrides explicitly (`force-primary`).
    #[serde(default)]
    pub overrides: Vec<Head>,
    /// What makes the VM itself unique beyond its name (its NIC's MAC, drawn at creation
    /// and carried by every migration): two hosts that each created a VM of the same
    /// name hold two VMs, not two copies of one. `None` when unknown (matches any).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
}

/// The outcome of comparing my claim with theirs, from my side.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Nothing to do: at most one of us is primary, and not behind.
    Agree,
    /// My copy is superseded by `owner`: refuse to start it, keep it.
    MineStale { owner: Head },
    /// Their copy is superseded by mine; they learn it from my claim.
    TheirsStale,
    /// Both of us are primary and neither is provably the other's past.
    SplitBrain,
}

/// Compare my claim with a peer's about the same VM.
pub fn judge(mine: &Claim, theirs: &Claim) -> Verdict {
    if mine.vm != theirs.vm || mine.from == theirs.from {
        return Verdict::Agree;
    }
    if let (Some(a), Some(b)) = (&mine.id, &theirs.id) {
        if a != b {
            return Verdict::Agree;
        }
    }
    match (mine.primary, theirs.primary) {
        (false, _) => Verdict::Agree,
        (true, false) => {
            if theirs.head.generation > mine.head.generation {
                Verdict::MineStale {
                    owner: theirs.head.clone(),
                }
            } else {
                Verdict::Agree
            }
        }
        (true, true) => {
            let mine_overridden = theirs.overrides.contains(&mine.head);
            let theirs_overridden = mine.overrides.contains(&theirs.head);
            let (gm, gt) = (mine.head.generation, theirs.head.generation);
            match (mine_overridden, theirs_overridden) {
                (true, true) => Verdict::SplitBrain,
                (true, false) => Verdict::MineStale {
                    owner: theirs.head.clone(),
                },
                (false, true) => Verdict::TheirsStale,
                (false, false) if gm == gt => Verdict::SplitBrain,
                (false, false) if gm < gt => {
                    if mine.running {
                        Verdict::SplitBrain
                    } else {
                        Verdict::MineStale {
                            owner: theirs.head.clone(),
                        }
                    }
                }
                (false, false) => {
                    if theirs.running {
                        Verdict::SplitBrain
                    } else {
                        Verdict::TheirsStale
                    }
                }
            }
        }
    }
}

/// The generation `force-primary` takes: above every one this host knows of.
pub fn forced_generation(known: impl IntoIterator<Item = u64>) -> u64 {
    known.into_iter().max().unwrap_or(0).saturating_add(1)
}

/// The heads a forced claim overrides: every known head, newest first, without duplicates, at most [`MAX_OVERRIDES`].
pub fn overrides(known: impl IntoIterator<Item = Head>) -> Vec<Head> {
    let mut all: Vec<Head> = known.into_iter().collect();
    all.sort_by(|a, b| b.generation.cmp(&a.generation).then(a.host.cmp(&b.host)));
    all.dedup();
    all.truncate(MAX_OVERRIDES);
    all
}

/// A batch of claims from outside is bounded before it is used.
pub fn check_claims(claims: &[Claim]) -> Result<(), String> {
    if claims.len() > MAX_CLAIMS {
        return Err(format!(
            "{} claims in one message (at most {MAX_CLAIMS})",
            claims.len()
        ));
    }
    if let Some(c) = claims.iter().find(|c| c.overrides.len() > MAX_OVERRIDES) {
        return Err(format!(
            "claim for '{}' overrides {} heads (at most {MAX_OVERRIDES})",
            c.vm,
            c.overrides.len()
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn claim(from: &str, g: u64, primary: bool, running: bool) -> Claim {
        Claim {
            vm: "desk".into(),
            from: from.into(),
            head: Head::new(g, if primary { from } else { "elsewhere" }),
            primary,
            running,
            overrides: vec![],
            id: None,
        }
    }

    fn mirror(v: &Verdict) -> Verdict {
        match v {
            Verdict::Agree => Verdict::Agree,
            Verdict::SplitBrain => Verdict::SplitBrain,
            Verdict::TheirsStale => Verdict::MineStale {
                owner: Head::new(0, "?"),
            },
            Verdict::MineStale { .. } => Verdict::TheirsStale,
        }
    }

    fn same_kind(a: &Verdict, b: &Verdict) -> bool {
        std::mem::discriminant(a) == std::mem::discriminant(b)
    }

    #[test]
    fn a_lower_generation_that_is_stopped_is_stale() {
        // Office restored from a backup taken before the move to home (g2).
        let office = claim("office", 1, true, false);
        let home = claim("home", 2, true, true);
        assert_eq!(
            judge(&office, &home),
            Verdict::MineStale {
                owner: Head::new(2, "home")
            }
        );
        assert_eq!(judge(&home, &office), Verdict::TheirsStale);
    }

    #[test]
    fn a_lower_generation_that_runs_is_split_brain() {
        // Same, but office started the VM before it heard of home: two writers.
        let office = claim("office", 1, true, true);
        let home = claim("home", 2, true, true);
        assert_eq!(judge(&office, &home), Verdict::SplitBrain);
        assert_eq!(judge(&home, &office), Verdict::SplitBrain);
    }

    #[test]
    fn two_owners_of_one_generation_is_split_brain() {
        // force-primary on both sides of a partition, from generation 2.
        let a = claim("office", 3, true, false);
        let b = claim("home", 3, true, false);
        assert_eq!(judge(&a, &b), Verdict::SplitBrain);
        assert_eq!(judge(&b, &a), Verdict::SplitBrain);
    }

    #[test]
    fn an_explicit_override_wins_even_over_a_running_copy() {
        // home resolves a split brain: force-primary names office's head.
        let mut home = claim("home", 4, true, false);
        home.overrides = vec![Head::new(3, "office")];
        let office = claim("office", 3, true, true);
        assert_eq!(
            judge(&office, &home),
            Verdict::MineStale {
                owner: Head::new(4, "home")
            }
        );
        assert_eq!(judge(&home, &office), Verdict::TheirsStale);
        // Both overrode each other: still split brain.
        let mut office2 = office.clone();
        office2.overrides = vec![Head::new(4, "home")];
        assert_eq!(judge(&office2, &home), Verdict::SplitBrain);
    }

    #[test]
    fn a_tombstone_teaches_a_newer_generation() {
        // Office (restored, primary at 1) hears from laptop, whose record says the VM
        // moved on to home at generation 5.
        let office = claim("office", 1, true, false);
        let laptop = claim("laptop", 5, false, false);
        assert!(matches!(
            judge(&office, &laptop),
            Verdict::MineStale { owner } if owner.generation == 5
        ));
        assert_eq!(judge(&laptop, &office), Verdict::Agree);
        assert_eq!(
            judge(&claim("office", 6, true, false), &laptop),
            Verdict::Agree
        );
    }

    #[test]
    fn two_vms_that_share_a_name_are_not_one_vm() {
        let mut a = claim("office", 1, true, true);
        let mut b = claim("home", 1, true, true);
        assert_eq!(judge(&a, &b), Verdict::SplitBrain);
        a.id = Some("52:54:00:00:00:01".into());
        b.id = Some("52:54:00:00:00:02".into());
        assert_eq!(judge(&a, &b), Verdict::Agree);
        b.id = a.id.clone();
        assert_eq!(judge(&a, &b), Verdict::SplitBrain);
    }

    #[test]
    fn replicas_and_other_vms_agree() {
        let a = claim("office", 2, false, false);
        let b = claim("home", 2, true, true);
        assert_eq!(judge(&a, &b), Verdict::Agree);
        let mut c = claim("home", 9, true, true);
        c.vm = "other".into();
        assert_eq!(judge(&claim("office", 1, true, false), &c), Verdict::Agree);
    }

    #[test]
    fn judge_is_symmetric() {
        // Every combination of generations, roles, running and overrides.
        let mut n = 0;
        for gm in 1..4 {
            for gt in 1..4 {
                for bits in 0..64u32 {
                    let bit = |i: u32| bits & (1 << i) != 0;
                    let mut a = claim("a", gm, bit(0), bit(0) && bit(1));
                    let mut b = claim("b", gt, bit(2), bit(2) && bit(3));
                    if bit(4) {
                        a.overrides.push(b.head.clone());
                    }
                    if bit(5) {
                        b.overrides.push(a.head.clone());
                    }
                    if !(a.primary && b.primary) {
                        continue; // a non-primary side never acts on its own verdict
                    }
                    let (x, y) = (judge(&a, &b), judge(&b, &a));
                    assert!(same_kind(&x, &mirror(&y)), "{a:?} {b:?}: {x:?} vs {y:?}");
                    n += 1;
                }
            }
        }
        assert!(n > 100);
    }

    #[test]
    fn forced_generation_is_above_every_known_one() {
        assert_eq!(forced_generation([3, 7, 2]), 8);
        assert_eq!(forced_generation([]), 1);
        assert_eq!(forced_generation([u64::MAX]), u64::MAX);
        let o = overrides([
            Head::new(3, "office"),
            Head::new(5, "home"),
            Head::new(3, "office"),
        ]);
        assert_eq!(o, vec![Head::new(5, "home"), Head::new(3, "office")]);
    }

    #[test]
    fn oversized_claim_batches_are_refused() {
        let c = claim("a", 1, true, false);
        assert!(check_claims(&vec![c.clone(); MAX_CLAIMS]).is_ok());
        assert!(check_claims(&vec![c.clone(); MAX_CLAIMS + 1]).is_err());
        let mut big = c;
        big.overrides = vec![Head::new(1, "x"); MAX_OVERRIDES + 1];
        assert!(check_claims(&[big]).is_err());
    }
}
