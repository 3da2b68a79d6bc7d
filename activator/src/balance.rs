//! Which replica serves the next request: power of two choices on in-flight count,
//! among replicas below their concurrency limit.
//!
//! Two replicas drawn at random, the less busy one wins: close to "least loaded"
//! without every request reading every replica, and without the herd that pure
//! least-loaded causes when many activators read the same stale numbers.

/// How many requests one activator may send one replica at once.
///
/// A function's `containerConcurrency` is shared out among the activators: each takes
/// `max(1, containerConcurrency / activators)` (rounded down), so together they never
/// exceed the limit unless there are more activators than the limit allows — then each
/// keeps one, because a function with a limit must still be reachable through every
/// activator. `activators` is the count of ready endpoints of the activator Service
/// (at least 1: this one).
pub fn share_of_limit(container_concurrency: Option<u32>, activators: usize) -> Option<usize> {
    let limit = container_concurrency? as usize;
    Some((limit / activators.max(1)).max(1))
}

/// Picks one of `n` replicas below `limit`, or `None` if none has room (or there is
/// none). `load` gives a replica's in-flight count, or `None` for one that takes
/// nothing now (it refused a connection and sits out until it accepts one). `random`
/// returns a number in `0..m` for the `m` it is given.
pub fn pick(
    n: usize,
    load: impl Fn(usize) -> Option<usize>,
    limit: Option<usize>,
    mut random: impl FnMut(usize) -> usize,
) -> Option<usize> {
    // The in-flight count of a replica with room.
    let room = |i: usize| load(i).filter(|&l| limit.is_none_or(|limit| l < limit));
    match n {
        0 => None,
        1 => room(0).map(|_| 0),
        n => {
            let a = random(n);
            let b = (a + 1 + random(n - 1)) % n;
            match (room(a), room(b)) {
                (Some(la), Some(lb)) => return Some(if lb < la { b } else { a }),
                (Some(_), None) => return Some(a),
                (None, Some(_)) => return Some(b),
                (None, None) => {}
            }
            // Both draws were full: the least loaded with room, if any (rare, so a scan).
            (0..n)
                .filter_map(|i| room(i).map(|l| (i, l)))
                .min_by_key(|&(_, l)| l)
                .map(|(i, _)| i)
        }
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    #[test]
    fn shares() {
        for (limit, activators, expected) in [
            (None, 3, None),
            (Some(10), 1, Some(10)),
            (Some(10), 3, Some(3)),
            (Some(1), 3, Some(1)),
            (Some(10), 0, Some(10)),
        ] {
            assert_eq!(
                share_of_limit(limit, activators),
                expected,
                "{limit:?}/{activators}"
            );
        }
    }

    #[test]
    fn table() {
        // (loads, limit, the two draws, expected); `None`: sitting out.
        type Case<'a> = (
            &'a [Option<usize>],
            Option<usize>,
            [usize; 2],
            Option<usize>,
        );
        let cases: &[Case] = &[
            (&[], None, [0, 0], None),
            (&[Some(5)], None, [0, 0], Some(0)),
            (&[Some(5)], Some(5), [0, 0], None),
            (&[None], None, [0, 0], None),
            (&[Some(3), Some(1)], None, [0, 0], Some(1)),
            (&[Some(1), Some(3)], None, [0, 0], Some(0)),
            (&[None, Some(3)], None, [0, 0], Some(1)),
            (&[Some(0), None], None, [1, 0], Some(0)),
            (&[Some(2), Some(2), Some(0)], None, [0, 0], Some(0)),
            (&[Some(2), Some(2), Some(0)], Some(2), [0, 0], Some(2)),
            (&[Some(2), Some(2), Some(2)], Some(2), [0, 0], None),
            (&[None, None, Some(4)], Some(5), [0, 0], Some(2)),
            (&[None, None, None], None, [0, 0], None),
        ];
        for (loads, limit, draws, expected) in cases {
            let mut draws = draws.iter().copied();
            let got = pick(
                loads.len(),
                |i| loads[i],
                *limit,
                |n| draws.next().unwrap_or(0) % n,
            );
            assert_eq!(got, *expected, "{loads:?} limit {limit:?}");
        }
    }

    proptest! {
        /// A pick is never over the limit nor sitting out, and there is one whenever any
        /// replica has room.
        #[test]
        fn respects_the_limit(loads in proptest::collection::vec(proptest::option::of(0usize..5), 0..8), limit in proptest::option::of(1usize..5), seed in any::<u64>()) {
            let mut state = seed;
            let got = pick(loads.len(), |i| loads[i], limit, |n| { state = state.wrapping_mul(6364136223846793005).wrapping_add(1); (state >> 33) as usize % n });
            let room = |i: usize| loads[i].is_some_and(|load| limit.is_none_or(|l| load < l));
            match got {
                Some(i) => prop_assert!(room(i)),
                None => prop_assert!(!(0..loads.len()).any(room)),
            }
        }

        /// The two draws are distinct, so with two replicas the idler always wins.
        #[test]
        fn two_replicas_idler_wins(a in 0usize..10, b in 0usize..10, seed in any::<u64>()) {
            prop_assume!(a != b);
            let mut state = seed;
            let got = pick(2, |i| Some([a, b][i]), None, |n| { state = state.wrapping_add(0x9E37_79B9_7F4A_7C15); (state >> 40) as usize % n });
            prop_assert_eq!(got, Some(if a < b { 0 } else { 1 }));
        }
    }
}
