//! Users: devices whose records link each other.
//!
//! A link counts only when both records name each other. Mutual links form
//! an undirected graph over devices; a user is one connected component of
//! it. So a new device joins a user by linking with any one of its devices.

use std::collections::BTreeMap;

use crate::ids::{DeviceId, Handle};
use crate::record::DeviceRecord;

/// Whether `a` and `b` name each other, which makes them one user.
pub fn mutually_linked(a: &DeviceRecord, b: &DeviceRecord) -> bool {
    a.device_id() != b.device_id() && a.links_to(&b.device_id()) && b.links_to(&a.device_id())
}

/// The devices of one user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    devices: Vec<DeviceRecord>,
}

impl User {
    /// The user's devices, ordered by device id.
    pub fn devices(&self) -> &[DeviceRecord] {
        &self.devices
    }

    /// Every handle any of the user's devices is sponsored under, sorted and
    /// without repeats.
    pub fn handles(&self) -> Vec<Handle> {
        let mut handles: Vec<Handle> = self
            .devices
            .iter()
            .flat_map(DeviceRecord::handles)
            .collect();
        handles.sort();
        handles.dedup();
        handles
    }
}

/// Groups verified records into users. Records of one device appear once
/// (the caller keeps only the current record per device); users come out
/// ordered by their smallest device id.
pub fn group_users(records: &[DeviceRecord]) -> Vec<User> {
    let by_id: BTreeMap<DeviceId, &DeviceRecord> =
        records.iter().map(|r| (r.device_id(), r)).collect();
    let mut component: BTreeMap<DeviceId, usize> = BTreeMap::new();
    let mut users: Vec<User> = Vec::new();
    for (&start, _) in by_id.iter() {
        if component.contains_key(&start) {
            continue;
        }
        let index = users.len();
        let mut devices = Vec::new();
        let mut stack = vec![start];
        component.insert(start, index);
        while let Some(id) = stack.pop() {
            let Some(record) = by_id.get(&id) else {
                continue;
            };
            devices.push((*record).clone());
            for next in record.links() {
                if component.contains_key(&next) {
                    continue;
                }
                if let Some(other) = by_id.get(&next)
                    && mutually_linked(record, other)
                {
                    component.insert(next, index);
                    stack.push(next);
                }
            }
        }
        devices.sort_by_key(DeviceRecord::device_id);
        users.push(User { devices });
    }
    users
}
