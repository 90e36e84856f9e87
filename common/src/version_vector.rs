//! Version vectors: one counter per client that modified an object.
//!
//! Comparing two vectors tells whether one history contains the other
//! (equal, newer, older) or whether they diverged (concurrent = conflict).
//! Pure data, no I/O, so the laws are tested right here.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;
use uuid::Uuid;

/// How two version vectors relate.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum VvOrder {
    Equal,
    /// `self` has seen everything `other` has, and more.
    Dominates,
    /// `other` has seen everything `self` has, and more.
    Dominated,
    /// Each has seen something the other has not: a conflict.
    Concurrent,
}

/// A version vector. Absent entries count as zero.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct VersionVector(BTreeMap<Uuid, u64>);

impl VersionVector {
    pub fn new() -> Self {
        Self::default()
    }

    /// The counter of `who`, zero when absent.
    pub fn get(&self, who: &Uuid) -> u64 {
        self.0.get(who).copied().unwrap_or(0)
    }

    /// Records one more modification by `who`.
    pub fn increment(&mut self, who: Uuid) {
        *self.0.entry(who).or_insert(0) += 1;
    }

    /// The least upper bound: every entry is the larger of the two.
    pub fn merge(&mut self, other: &VersionVector) {
        for (who, &n) in &other.0 {
            let e = self.0.entry(*who).or_insert(0);
            *e = (*e).max(n);
        }
    }

    /// Sum of all counters: a cheap, monotonic summary for logs.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    pub fn is_empty(&self) -> bool {
        self.0.values().all(|&n| n == 0)
    }

    pub fn compare(&self, other: &VersionVector) -> VvOrder {
        let mut greater = false;
        let mut less = false;
        for who in self.0.keys().chain(other.0.keys()) {
            let (a, b) = (self.get(who), other.get(who));
            greater |= a > b;
            less |= a < b;
        }
        match (greater, less) {
            (false, false) => VvOrder::Equal,
            (true, false) => VvOrder::Dominates,
            (false, true) => VvOrder::Dominated,
            (true, true) => VvOrder::Concurrent,
        }
    }

    /// True when `self` has seen everything in `other` (equal or newer).
    pub fn descends_from(&self, other: &VersionVector) -> bool {
        matches!(self.compare(other), VvOrder::Equal | VvOrder::Dominates)
    }
}

impl fmt::Display for VersionVector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "[")?;
        for (i, (who, n)) in self.0.iter().filter(|(_, n)| **n > 0).enumerate() {
            if i > 0 {
                write!(f, " ")?;
            }
            let short = &who.simple().to_string()[..8];
            write!(f, "{short}:{n}")?;
        }
        write!(f, "]")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny deterministic generator so the laws run over many vectors
    /// without a property-testing dependency.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn vv(&mut self, clients: &[Uuid]) -> VersionVector {
            let mut v = VersionVector::new();
            for c in clients {
                for _ in 0..self.next() % 4 {
                    v.increment(*c);
                }
            }
            v
        }
    }

    fn clients() -> Vec<Uuid> {
        (1..=3u128).map(Uuid::from_u128).collect()
    }

    #[test]
    fn compare_is_antisymmetric_and_reflexive() {
        let mut rng = Rng(0x9e3779b97f4a7c15);
        let cs = clients();
        for _ in 0..2000 {
            let (a, b) = (rng.vv(&cs), rng.vv(&cs));
            assert_eq!(a.compare(&a), VvOrder::Equal);
            let expected = match a.compare(&b) {
                VvOrder::Equal => VvOrder::Equal,
                VvOrder::Dominates => VvOrder::Dominated,
                VvOrder::Dominated => VvOrder::Dominates,
                VvOrder::Concurrent => VvOrder::Concurrent,
            };
            assert_eq!(b.compare(&a), expected, "{a} vs {b}");
        }
    }

    #[test]
    fn merge_is_least_upper_bound() {
        let mut rng = Rng(42);
        let cs = clients();
        for _ in 0..2000 {
            let (a, b, c) = (rng.vv(&cs), rng.vv(&cs), rng.vv(&cs));
            let mut ab = a.clone();
            ab.merge(&b);
            assert!(ab.descends_from(&a) && ab.descends_from(&b));
            // commutative
            let mut ba = b.clone();
            ba.merge(&a);
            assert_eq!(ab.compare(&ba), VvOrder::Equal);
            // associative
            let mut ab_c = ab.clone();
            ab_c.merge(&c);
            let mut bc = b.clone();
            bc.merge(&c);
            let mut a_bc = a.clone();
            a_bc.merge(&bc);
            assert_eq!(ab_c.compare(&a_bc), VvOrder::Equal);
            // idempotent
            let mut aa = a.clone();
            aa.merge(&a);
            assert_eq!(aa.compare(&a), VvOrder::Equal);
            // least: any upper bound of a and b dominates or equals the merge
            if c.descends_from(&a) && c.descends_from(&b) {
                assert!(c.descends_from(&ab));
            }
        }
    }

    #[test]
    fn increment_dominates_and_independent_increments_conflict() {
        let mut rng = Rng(7);
        let cs = clients();
        for _ in 0..500 {
            let base = rng.vv(&cs);
            let mut x = base.clone();
            x.increment(cs[0]);
            let mut y = base.clone();
            y.increment(cs[1]);
            assert_eq!(x.compare(&base), VvOrder::Dominates);
            assert_eq!(base.compare(&x), VvOrder::Dominated);
            assert_eq!(x.compare(&y), VvOrder::Concurrent);
            let mut m = x.clone();
            m.merge(&y);
            m.increment(cs[2]);
            assert_eq!(m.compare(&x), VvOrder::Dominates);
            assert_eq!(m.compare(&y), VvOrder::Dominates);
        }
    }

    #[test]
    fn dominance_is_transitive() {
        let mut rng = Rng(99);
        let cs = clients();
        for _ in 0..3000 {
            let (a, b, c) = (rng.vv(&cs), rng.vv(&cs), rng.vv(&cs));
            if a.descends_from(&b) && b.descends_from(&c) {
                assert!(a.descends_from(&c));
            }
        }
    }
}
