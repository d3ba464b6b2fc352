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

    #[test]
    fn small_groups_take_everyone() {
        let counts = BTreeMap::from([(name("one.test"), 5), (name("two.test"), 0)]);
        assert_eq!(select_voters(&counts), vec![name("one.test")]);
        assert!(select_voters(&BTreeMap::new()).is_empty());
    }
}
