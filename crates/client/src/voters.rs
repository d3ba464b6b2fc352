//! The sponsorships in members' records that make a channel's voter set
//! (spec §10.2), remembered between commits.
//!
//! A voter set is computed for every commit from every member's record:
//! at 1,000 members that was 1,000 store reads and cache checks, about
//! 11 ms per commit, though the records rarely change. What a record
//! gives is remembered per device, under the same rule as
//! [`kith_proto::VerifiedRecords`] (the clock has not gone back before it
//! was verified, and none of its sponsorships has expired), and only while
//! the store holds the same record: every change the store reports
//! ([`crate::store::Store::record_changes`]) drops what it may have made
//! stale. So a voter set is always the one the stored records give now.

use std::collections::{BTreeSet, HashMap};

use kith_order::VoterSet;
use kith_proto::{DeviceId, DeviceRecord, ServerName, SignaturePublicKey};

use crate::store::RecordChanges;

/// One member's sponsors, from its verified record.
#[derive(Debug)]
struct Sponsors {
    /// Each sponsoring server with the key its sponsorship names.
    servers: Vec<(ServerName, SignaturePublicKey)>,
    /// When the record was verified: before that (a clock set back) it
    /// is verified again.
    verified_at: u64,
    /// When its first sponsorship expires: from then on it is verified
    /// again.
    expires_at: u64,
}

/// Members' sponsors, by device, for the records the store holds now.
#[derive(Debug)]
pub(crate) struct MemberSponsors {
    entries: HashMap<DeviceId, Sponsors>,
    capacity: usize,
}

impl MemberSponsors {
    /// Remembers at most `capacity` devices (and starts over when full).
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            entries: HashMap::new(),
            capacity,
        }
    }

    /// Forgets what `changes` to the store's records may have made stale.
    pub(crate) fn forget(&mut self, changes: RecordChanges) {
        match changes {
            RecordChanges::All => self.entries.clear(),
            RecordChanges::Devices(devices) => {
                for device in devices {
                    self.entries.remove(&device);
                }
            }
        }
    }

    /// The sponsors of `device` if its record was remembered and is still
    /// valid at `now`.
    pub(crate) fn get(
        &self,
        device: &DeviceId,
        now: u64,
    ) -> Option<&[(ServerName, SignaturePublicKey)]> {
        self.entries
            .get(device)
            .filter(|s| s.verified_at <= now && now < s.expires_at)
            .map(|s| s.servers.as_slice())
    }

    /// Remembers the sponsors of `record`, verified at `now` and the one the
    /// store holds for its device.
    pub(crate) fn remember(&mut self, record: &DeviceRecord, now: u64) {
        if self.entries.len() >= self.capacity {
            self.entries.clear();
        }
        let sponsorships = record.sponsorships();
        self.entries.insert(
            record.device_id(),
            Sponsors {
                servers: sponsorships
                    .iter()
                    .map(|s| (s.server().clone(), s.server_key().clone()))
                    .collect(),
                verified_at: now,
                expires_at: sponsorships
                    .iter()
                    .map(|s| s.expires_at())
                    .min()
                    .unwrap_or(u64::MAX),
            },
        );
    }
}

/// The distinct (server, key) pairs of a voter set being gathered: most
/// members of a channel share their server and its key.
#[derive(Debug, Default)]
pub(crate) struct Gathered(BTreeSet<(ServerName, SignaturePublicKey)>);

impl Gathered {
    /// Adds a member's sponsors, remembered from its record.
    pub(crate) fn add(&mut self, servers: &[(ServerName, SignaturePublicKey)]) {
        for pair in servers {
            if !self.0.contains(pair) {
                self.0.insert(pair.clone());
            }
        }
    }

    /// Adds the sponsors in a member's verified record.
    pub(crate) fn add_record(&mut self, record: &DeviceRecord) {
        for s in record.sponsorships() {
            self.0.insert((s.server().clone(), s.server_key().clone()));
        }
    }

    /// The voter set: each server with every key gathered for it.
    pub(crate) fn voter_set(self) -> VoterSet {
        VoterSet::new(self.0.into_iter().map(|(server, key)| (server, vec![key])))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::indexing_slicing)]

    use kith_proto::{DeviceRecordFields, InboxKey, SecretKey, Sponsorship};

    use super::*;
    use crate::store::Store;

    const NOW: u64 = 1_790_000_000_000;
    const LIFETIME: u64 = 60_000;

    /// A record of the device of `device_key`, sponsored by `server` with
    /// `server_key`, issued at `NOW`.
    fn record(
        device_key: &SecretKey,
        sequence: u64,
        server: &str,
        server_key: &SecretKey,
    ) -> DeviceRecord {
        let device = DeviceId::of(&device_key.public());
        let sponsorship = Sponsorship::issue(
            server_key,
            server.parse().unwrap(),
            "member".parse().unwrap(),
            device,
            NOW,
            NOW + LIFETIME,
        );
        DeviceRecord::sign(
            device_key,
            DeviceRecordFields {
                sequence,
                inbox_key: InboxKey::x25519([9; 32]),
                display_name: "member".into(),
                links: vec![],
                sponsorships: vec![sponsorship],
                created_at: NOW,
                updated_at: NOW,
            },
            NOW,
        )
        .unwrap()
    }

    fn voters_of(sponsors: &MemberSponsors, device: &DeviceId, now: u64) -> Option<VoterSet> {
        let mut gathered = Gathered::default();
        gathered.add(sponsors.get(device, now)?);
        Some(gathered.voter_set())
    }

    /// Saves `record` as the store's record of its device and remembers it,
    /// as `Client::voter_set` does after fetching a member's record.
    fn fetched(store: &Store, sponsors: &mut MemberSponsors, record: &DeviceRecord) {
        store
            .save_record(&record.device_id(), &record.encode())
            .unwrap();
        sponsors.forget(store.record_changes().unwrap());
        sponsors.remember(record, NOW);
    }

    #[test]
    fn a_newer_record_of_a_member_replaces_what_was_remembered() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("client.db")).unwrap();
        let mut sponsors = MemberSponsors::new(16);
        let (member, a, b) = (
            SecretKey::generate(),
            SecretKey::generate(),
            SecretKey::generate(),
        );
        let first = record(&member, 1, "a.test", &a);
        let device = first.device_id();
        fetched(&store, &mut sponsors, &first);
        sponsors.forget(store.record_changes().unwrap());
        let voters = voters_of(&sponsors, &device, NOW).unwrap();
        assert!(voters.accepts(&"a.test".parse().unwrap(), &a.public()));

        // Another device's record changes: this one stays.
        let other = record(&SecretKey::generate(), 1, "a.test", &a);
        store
            .save_record(&other.device_id(), &other.encode())
            .unwrap();
        sponsors.forget(store.record_changes().unwrap());
        assert!(sponsors.get(&device, NOW).is_some());

        // The member's own record is replaced (now sponsored by b.test):
        // the one remembered is gone, so b.test's is read.
        let second = record(&member, 2, "b.test", &b);
        store.save_record(&device, &second.encode()).unwrap();
        sponsors.forget(store.record_changes().unwrap());
        assert!(sponsors.get(&device, NOW).is_none());
    }

    #[test]
    fn a_rolled_back_record_is_not_used() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("client.db")).unwrap();
        let mut sponsors = MemberSponsors::new(16);
        let (member, a, b) = (
            SecretKey::generate(),
            SecretKey::generate(),
            SecretKey::generate(),
        );
        let first = record(&member, 1, "a.test", &a);
        let device = first.device_id();
        fetched(&store, &mut sponsors, &first);

        // Saved and remembered inside a transaction that is then rolled
        // back: the store holds the first record again.
        let tx = store.begin().unwrap();
        let second = record(&member, 2, "b.test", &b);
        fetched(&store, &mut sponsors, &second);
        assert!(
            voters_of(&sponsors, &device, NOW)
                .unwrap()
                .contains(&"b.test".parse().unwrap())
        );
        store.rollback(tx);
        assert_eq!(store.record_changes().unwrap(), RecordChanges::All);

        sponsors.forget(RecordChanges::All);
        assert!(sponsors.get(&device, NOW).is_none());
        assert_eq!(store.record(&device).unwrap().unwrap(), first.encode());
    }

    #[test]
    fn another_connection_writing_records_forgets_everything() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("client.db");
        let store = Store::open(&path).unwrap();
        let mut sponsors = MemberSponsors::new(16);
        let (member, a, b) = (
            SecretKey::generate(),
            SecretKey::generate(),
            SecretKey::generate(),
        );
        let first = record(&member, 1, "a.test", &a);
        fetched(&store, &mut sponsors, &first);
        assert_eq!(
            store.record_changes().unwrap(),
            RecordChanges::Devices(vec![])
        );

        // The same device's store opened by another process.
        let other = Store::open(&path).unwrap();
        let second = record(&member, 2, "b.test", &b);
        other
            .save_record(&second.device_id(), &second.encode())
            .unwrap();
        assert_eq!(store.record_changes().unwrap(), RecordChanges::All);
    }

    #[test]
    fn a_remembered_record_is_used_only_while_it_is_valid() {
        let mut sponsors = MemberSponsors::new(16);
        let a = SecretKey::generate();
        let first = record(&SecretKey::generate(), 1, "a.test", &a);
        let device = first.device_id();
        sponsors.remember(&first, NOW + 10);
        assert!(sponsors.get(&device, NOW + 10).is_some());
        assert!(sponsors.get(&device, NOW + LIFETIME - 1).is_some());
        // Its sponsorship expired.
        assert!(sponsors.get(&device, NOW + LIFETIME).is_none());
        // The clock went back before it was verified.
        assert!(sponsors.get(&device, NOW + 9).is_none());
    }
}
