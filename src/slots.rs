//! Slots and slot ownership.
//!
//! Every stream (tenant, or source when there is no tenant) maps to one of [`SLOTS`] slots with
//! `slot = fnv1a64(stream UTF-8 bytes) mod 1024` (FNV-1a, 64-bit, offset basis
//! 0xcbf29ce484222325, prime 0x100000001b3; see spool-format.md). Because a whole stream lands
//! in one slot and one worker owns a slot at a time, one worker sequences each stream and its
//! chain stays gapless without cross-worker coordination.
//!
//! Ownership is a data structure, not arithmetic scattered around the consumer: a table of
//! (primary, secondary) worker per slot, with the current owner derived from which workers are
//! alive. The single-node daemon fills it round-robin; a multi-node form can fill it from a
//! shared store without the consumer changing.

/// Number of slots. A power of two, fixed by the on-disk format (envelopes store their slot).
pub const SLOTS: u16 = 1024;

const FNV_OFFSET_BASIS: u64 = 0xcbf2_9ce4_8422_2325;
const FNV_PRIME: u64 = 0x0000_0100_0000_01b3;

/// FNV-1a 64-bit hash of `bytes`.
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    let mut hash = FNV_OFFSET_BASIS;
    for &b in bytes {
        hash ^= u64::from(b);
        hash = hash.wrapping_mul(FNV_PRIME);
    }
    hash
}

/// The slot a stream belongs to.
pub fn slot_of(stream: &str) -> u16 {
    (fnv1a64(stream.as_bytes()) % u64::from(SLOTS)) as u16
}

/// Which worker owns which slot: a primary and a secondary per slot, and which workers are up.
#[derive(Debug, Clone)]
pub struct Ownership {
    primary: Vec<usize>,
    secondary: Vec<usize>,
    alive: Vec<bool>,
}

impl Ownership {
    /// Round-robin primaries over `workers`; each slot's secondary is the next worker.
    pub fn round_robin(workers: usize) -> Ownership {
        assert!(workers >= 1, "at least one worker");
        let primary: Vec<usize> = (0..SLOTS as usize).map(|s| s % workers).collect();
        let secondary = primary.iter().map(|p| (p + 1) % workers).collect();
        Ownership {
            primary,
            secondary,
            alive: vec![true; workers],
        }
    }

    pub fn workers(&self) -> usize {
        self.alive.len()
    }

    /// The worker that processes `slot` now: its primary if alive, else its secondary if alive,
    /// else `None` (the slot waits until a worker is back).
    pub fn owner(&self, slot: u16) -> Option<usize> {
        let s = slot as usize;
        let p = self.primary[s];
        if self.alive[p] {
            return Some(p);
        }
        let q = self.secondary[s];
        if self.alive[q] {
            return Some(q);
        }
        None
    }

    pub fn primary(&self, slot: u16) -> usize {
        self.primary[slot as usize]
    }

    pub fn secondary(&self, slot: u16) -> usize {
        self.secondary[slot as usize]
    }

    pub fn is_alive(&self, worker: usize) -> bool {
        self.alive[worker]
    }

    /// Marks `worker` down and returns the slots whose owner changed because of it.
    pub fn mark_down(&mut self, worker: usize) -> Vec<u16> {
        let before: Vec<Option<usize>> = (0..SLOTS).map(|s| self.owner(s)).collect();
        self.alive[worker] = false;
        (0..SLOTS)
            .filter(|&s| self.owner(s) != before[s as usize])
            .collect()
    }

    /// Marks `worker` up again and returns the slots it owns again as primary.
    pub fn mark_up(&mut self, worker: usize) -> Vec<u16> {
        let before: Vec<Option<usize>> = (0..SLOTS).map(|s| self.owner(s)).collect();
        self.alive[worker] = true;
        (0..SLOTS)
            .filter(|&s| self.owner(s) != before[s as usize])
            .collect()
    }

    /// Slots `worker` currently owns.
    pub fn slots_of(&self, worker: usize) -> Vec<u16> {
        (0..SLOTS)
            .filter(|&s| self.owner(s) == Some(worker))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a64_matches_published_vectors() {
        assert_eq!(fnv1a64(b""), 0xcbf29ce484222325);
        assert_eq!(fnv1a64(b"a"), 0xaf63dc4c8601ec8c);
        assert_eq!(fnv1a64(b"foobar"), 0x85944171f73967e8);
    }

    #[test]
    fn a_stream_always_lands_in_the_same_slot() {
        assert_eq!(slot_of("acme"), slot_of("acme"));
        assert!(slot_of("acme") < SLOTS);
        assert_eq!(slot_of("foobar"), (0x85944171f73967e8u64 % 1024) as u16);
    }

    #[test]
    fn every_slot_has_exactly_one_owner_while_all_workers_are_up() {
        let o = Ownership::round_robin(4);
        let total: usize = (0..4).map(|w| o.slots_of(w).len()).sum();
        assert_eq!(total, SLOTS as usize);
    }

    #[test]
    fn a_dead_workers_slots_move_to_their_secondary_and_back() {
        let mut o = Ownership::round_robin(3);
        let mine = o.slots_of(1);
        let moved = o.mark_down(1);
        assert_eq!(moved, mine);
        for &s in &moved {
            assert_eq!(o.owner(s), Some(o.secondary(s)));
        }
        assert!(o.slots_of(1).is_empty());
        let back = o.mark_up(1);
        assert_eq!(back, mine);
    }

    #[test]
    fn a_single_worker_that_dies_leaves_its_slots_unowned() {
        let mut o = Ownership::round_robin(1);
        o.mark_down(0);
        assert_eq!(o.owner(5), None);
    }
}
