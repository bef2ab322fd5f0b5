//! Counters indexed by an enum, so a counter can only be filed under a variant that exists.
//!
//! [`Stats`](crate::Stats) used to hold positional arrays indexed by
//! `ALL.iter().position(..).unwrap_or(0)`: a variant missing from `ALL` was silently counted
//! under the first one, and metrics and tests repeated the index mapping. Here the mapping is
//! made once per enum by `counter_key!`, which checks at compile time that the list names
//! every variant (an exhaustive `match`) in declaration order (a `const` assertion), and a
//! [`Counters`] table checks at compile time that it has one slot per variant.

use std::fmt;
use std::marker::PhantomData;

/// A fieldless enum whose variants index a [`Counters`] table.
pub trait CounterKey: Copy + Eq + fmt::Debug + 'static {
    /// Number of variants.
    const COUNT: usize;
    /// The variant's slot, below [`COUNT`](Self::COUNT); distinct for distinct variants.
    fn index(self) -> usize;
    /// The variant in slot `i`.
    fn from_index(i: usize) -> Option<Self>;
}

/// Pairs index a table of `A::COUNT * B::COUNT` slots (for example invalid packets by
/// transport and by reason).
impl<A: CounterKey, B: CounterKey> CounterKey for (A, B) {
    const COUNT: usize = A::COUNT * B::COUNT;
    fn index(self) -> usize {
        self.0.index() * B::COUNT + self.1.index()
    }
    fn from_index(i: usize) -> Option<Self> {
        Some((A::from_index(i / B::COUNT)?, B::from_index(i % B::COUNT)?))
    }
}

/// Implements [`CounterKey`] and an `ALL` constant for a fieldless enum.
///
/// The variant list must name every variant in declaration order; both are checked when the
/// crate compiles, so adding a variant without listing it is a build error, not a misfiled
/// count.
macro_rules! counter_key {
    ($name:ident { $($var:ident),+ $(,)? }) => {
        impl $name {
            /// Every variant, in declaration order (the counter slot order).
            pub const ALL: [$name; [$($name::$var),+].len()] = [$($name::$var),+];
        }

        // The list is in declaration order: slot `i` holds the variant with discriminant `i`.
        const _: () = {
            let all = $name::ALL;
            let mut i = 0;
            while i < all.len() {
                assert!(all[i] as usize == i, "variant list out of declaration order");
                i += 1;
            }
        };

        impl $crate::counters::CounterKey for $name {
            const COUNT: usize = $name::ALL.len();
            fn index(self) -> usize {
                // Exhaustive: a variant missing from the list does not compile.
                match self {
                    $($name::$var => $name::$var as usize),+
                }
            }
            fn from_index(i: usize) -> Option<Self> {
                $name::ALL.get(i).copied()
            }
        }
    };
}
pub(crate) use counter_key;

/// One `u64` per variant of `K` (`N` must be `K::COUNT`, checked at compile time).
///
/// ```
/// use ddpush_proto::{counters::Counters, Kind};
///
/// let mut pending: Counters<Kind, 3> = Counters::new();
/// pending.incr(Kind::Bits);
/// pending.add(Kind::Payload, 2);
/// assert_eq!(pending.get(Kind::Bits), 1);
/// assert_eq!(pending.total(), 3);
/// assert_eq!(
///     pending.iter().collect::<Vec<_>>(),
///     vec![(Kind::Notify, 0), (Kind::Bits, 1), (Kind::Payload, 2)]
/// );
/// ```
///
/// A table with the wrong number of slots does not build:
///
/// ```compile_fail
/// use ddpush_proto::{counters::Counters, Kind};
/// let short: Counters<Kind, 2> = Counters::new();
/// ```
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Counters<K, const N: usize> {
    v: [u64; N],
    _k: PhantomData<K>,
}

impl<K: CounterKey, const N: usize> Counters<K, N> {
    /// All zero.
    pub const fn new() -> Self {
        const { assert!(N == K::COUNT, "a Counters table needs one slot per variant") };
        Counters {
            v: [0; N],
            _k: PhantomData,
        }
    }

    /// The count for `k`.
    pub fn get(&self, k: K) -> u64 {
        self.v[k.index()]
    }

    /// Adds one.
    pub fn incr(&mut self, k: K) {
        self.add(k, 1);
    }

    /// Adds `n` (wrapping, like every monotonic counter exported to Prometheus).
    pub fn add(&mut self, k: K, n: u64) {
        let c = &mut self.v[k.index()];
        *c = c.wrapping_add(n);
    }

    /// Removes `n` from a gauge, saturating at zero.
    pub fn sub(&mut self, k: K, n: u64) {
        let c = &mut self.v[k.index()];
        *c = c.saturating_sub(n);
    }

    /// Every variant with its count, in slot order (zeros included, so metrics show a series
    /// for every label).
    pub fn iter(&self) -> impl Iterator<Item = (K, u64)> + '_ {
        self.v
            .iter()
            .enumerate()
            .filter_map(|(i, &c)| Some((K::from_index(i)?, c)))
    }

    /// The sum over every variant.
    pub fn total(&self) -> u64 {
        self.v.iter().fold(0u64, |a, &c| a.wrapping_add(c))
    }
}

impl<K: CounterKey, const N: usize> Default for Counters<K, N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<K: CounterKey, const N: usize> fmt::Debug for Counters<K, N> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_map().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{InvalidPacket, Kind, Limited, Port, PushReject, Transport};

    fn round_trips<K: CounterKey>() {
        for i in 0..K::COUNT {
            let k = K::from_index(i).expect("every slot has a variant");
            assert_eq!(k.index(), i, "{k:?}");
        }
        assert_eq!(K::from_index(K::COUNT), None);
    }

    #[test]
    fn every_key_maps_each_slot_to_one_variant() {
        round_trips::<Kind>();
        round_trips::<InvalidPacket>();
        round_trips::<PushReject>();
        round_trips::<Limited>();
        round_trips::<Transport>();
        round_trips::<Port>();
        round_trips::<(Transport, InvalidPacket)>();
        assert_eq!(<(Transport, InvalidPacket)>::COUNT, 15);
    }

    #[test]
    fn pairs_are_counted_apart() {
        let mut c: Counters<(Transport, InvalidPacket), 15> = Counters::new();
        c.incr((Transport::Tcp, InvalidPacket::Length));
        c.add((Transport::Udp, InvalidPacket::Short), 4);
        assert_eq!(c.get((Transport::Tcp, InvalidPacket::Length)), 1);
        assert_eq!(c.get((Transport::Udp, InvalidPacket::Length)), 0);
        assert_eq!(c.get((Transport::Tcp, InvalidPacket::Short)), 0);
        assert_eq!(c.get((Transport::Udp, InvalidPacket::Short)), 4);
        assert_eq!(c.total(), 5);
        assert_eq!(c.iter().count(), 15);
    }

    #[test]
    fn gauges_go_down_but_not_below_zero() {
        let mut c: Counters<Kind, 3> = Counters::new();
        c.add(Kind::Notify, 2);
        c.sub(Kind::Notify, 1);
        c.sub(Kind::Bits, 1);
        assert_eq!(c.get(Kind::Notify), 1);
        assert_eq!(c.get(Kind::Bits), 0);
    }
}
