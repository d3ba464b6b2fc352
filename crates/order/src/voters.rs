//! Which servers vote on a channel's order.

use std::collections::BTreeMap;

use kith_proto::ServerName;

/// Most voters a channel's ordering group has. Raft with dozens of voters
/// is slow and fragile; the other sponsoring servers follow as learners.
pub const MAX_VOTERS: usize = 7;

/// The votes needed out of `n` voters: a strict majority, `n / 2 + 1`.
pub fn majority(n: usize) -> usize {
    n / 2 + 1
}

/// The voters for a channel, given how many member devices each server
/// sponsors: every server with at least one member device, and when there
/// are more than [`MAX_VOTERS`], the ones with the most member devices,
/// ties going to the name that sorts first (bytewise on the canonical
/// text). The result is sorted ascending by name, so it is the same on
/// every machine whatever the input order.
pub fn select_voters(member_device_counts: &BTreeMap<ServerName, u32>) -> Vec<ServerName> {
    let mut ranked: Vec<(&ServerName, u32)> = member_device_counts
        .iter()
        .filter(|(_, count)| **count > 0)
        .map(|(server, count)| (server, *count))
        .collect();
    ranked.sort_by(|(a, ca), (b, cb)| {
        cb.cmp(ca)
            .then_with(|| a.as_str().as_bytes().cmp(b.as_str().as_bytes()))
    });
    ranked.truncate(MAX_VOTERS);
    let mut voters: Vec<ServerName> = ranked.into_iter().map(|(s, _)| s.clone()).collect();
    voters.sort_by(|a, b| a.as_str().as_bytes().cmp(b.as_str().as_bytes()));
    voters
}

/// The draft spec's `sticky_most_devices` rule (§10.2): the voters after a
/// commit, given the voters before it (`previous`; empty at creation) and
/// the member-device counts after it. Keeps previous voters where it can,
/// so Raft membership changes seldom:
///
/// 1. if at most `max_voters` servers have members, all of them vote;
/// 2. otherwise start from the previous voters that still have members,
///    drop the worst while there are too many, add the best non-voters
///    while there are too few;
/// 3. then, once, the best non-voter displaces the worst voter if it has
///    more than twice its member devices.
///
/// *Best* is the most member devices, ties to the name sorting first. The
/// result is sorted ascending. With no previous voters it equals
/// [`select_voters`] (for `max_voters` = [`MAX_VOTERS`]).
pub fn next_voters(
    previous: &[ServerName],
    member_device_counts: &BTreeMap<ServerName, u32>,
    max_voters: usize,
) -> Vec<ServerName> {
    let count = |s: &ServerName| member_device_counts.get(s).copied().unwrap_or(0);
    // Ordering from best to worst.
    let rank = |a: &ServerName, b: &ServerName| {
        count(b)
            .cmp(&count(a))
            .then_with(|| a.as_str().as_bytes().cmp(b.as_str().as_bytes()))
    };
    let group: Vec<&ServerName> = member_device_counts
        .iter()
        .filter(|(_, c)| **c > 0)
        .map(|(s, _)| s)
        .collect();
    let mut voters: Vec<ServerName> = if group.len() <= max_voters {
        group.into_iter().cloned().collect()
    } else {
        let mut voters: Vec<ServerName> = group
            .iter()
            .filter(|s| previous.contains(s))
            .map(|s| (*s).clone())
            .collect();
        voters.sort_by(rank);
        voters.dedup();
        voters.truncate(max_voters);
        let mut others: Vec<&ServerName> =
            group.into_iter().filter(|s| !voters.contains(s)).collect();
        others.sort_by(|a, b| rank(a, b));
        let missing = max_voters.saturating_sub(voters.len());
        voters.extend(others.drain(..missing.min(others.len())).cloned());
        voters.sort_by(rank);
        if let (Some(worst), Some(best)) = (voters.last_mut(), others.first())
            && u64::from(count(best)) > 2 * u64::from(count(worst))
        {
            *worst = (*best).clone();
        }
        voters
    };
    voters.sort_by(|a, b| a.as_str().as_bytes().cmp(b.as_str().as_bytes()));
    voters
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> ServerName {
        s.parse().unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn majorities() {
        assert_eq!([1, 2, 3, 4, 5, 6, 7].map(majority), [1, 2, 2, 3, 3, 4, 4]);
    }

    #[test]
    fn caps_at_seven_by_count_then_name() {
        let mut counts = BTreeMap::new();
        for (i, s) in ["a", "b", "c", "d", "e", "f", "g", "h", "i"]
            .iter()
            .enumerate()
        {
            counts.insert(name(&format!("{s}.test")), 1 + (i as u32 % 3));
        }
        counts.insert(name("zero.test"), 0);
        // counts: a1 b2 c3 d1 e2 f3 g1 h2 i3 → 3s: c f i; 2s: b e h; 1s: a (first by name)
        let v = select_voters(&counts);
        let names: Vec<&str> = v.iter().map(ServerName::as_str).collect();
        assert_eq!(
            names,
            [
                "a.test", "b.test", "c.test", "e.test", "f.test", "h.test", "i.test"
            ]
        );
    }

    fn counts(pairs: &[(&str, u32)]) -> BTreeMap<ServerName, u32> {
        pairs.iter().map(|(s, c)| (name(s), *c)).collect()
    }

    fn names(v: &[ServerName]) -> Vec<&str> {
        v.iter().map(ServerName::as_str).collect()
    }

    #[test]
    fn sticky_rule() {
        // Three seats. Everyone fits: everyone votes.
        let c = counts(&[("a.t", 1), ("b.t", 1), ("c.t", 0)]);
        assert_eq!(names(&next_voters(&[], &c, 3)), ["a.t", "b.t"]);

        // Previous voters keep their seats against a slightly bigger server.
        let prev = [name("a.t"), name("b.t"), name("c.t")];
        let c = counts(&[("a.t", 2), ("b.t", 2), ("c.t", 2), ("d.t", 4)]);
        assert_eq!(names(&next_voters(&prev, &c, 3)), ["a.t", "b.t", "c.t"]);

        // More than twice the worst voter's devices displaces it (the
        // worst among equals is the name sorting last).
        let c = counts(&[("a.t", 2), ("b.t", 2), ("c.t", 2), ("d.t", 5), ("e.t", 5)]);
        assert_eq!(names(&next_voters(&prev, &c, 3)), ["a.t", "b.t", "d.t"]);

        // A voter that lost its members leaves; the best non-voter takes
        // the seat.
        let c = counts(&[("a.t", 2), ("b.t", 0), ("c.t", 2), ("d.t", 1), ("e.t", 3)]);
        assert_eq!(names(&next_voters(&prev, &c, 3)), ["a.t", "c.t", "e.t"]);

        // Fewer seats than sticky voters: the worst go.
        let c = counts(&[("a.t", 1), ("b.t", 3), ("c.t", 2), ("d.t", 1)]);
        assert_eq!(names(&next_voters(&prev, &c, 2)), ["b.t", "c.t"]);
    }

    #[test]
    fn sticky_rule_from_nothing_is_select_voters() {
        let mut c = BTreeMap::new();
        for i in 0..12u32 {
            c.insert(name(&format!("s{i}.t")), (i * 7) % 5);
        }
        assert_eq!(next_voters(&[], &c, MAX_VOTERS), select_voters(&c));
    }

    #[test]
    fn small_groups_take_everyone() {
        let counts = BTreeMap::from([(name("one.test"), 5), (name("two.test"), 0)]);
        assert_eq!(select_voters(&counts), vec![name("one.test")]);
        assert!(select_voters(&BTreeMap::new()).is_empty());
    }
}
