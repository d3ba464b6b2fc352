//! The in-memory backend: for tests and throwaway servers. Nothing survives
//! the process.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use kith_proto::{DeviceId, LocalName};

use super::{Claimed, DeviceRow, Event, InboxItem, Millis, Registered, Store, StoreError};

/// A [`Store`] that keeps everything in memory.
#[derive(Debug, Default)]
pub struct MemoryStore {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    devices: HashMap<DeviceId, DeviceRow>,
    /// Registration order, for `devices_named`.
    order: Vec<DeviceId>,
    names: HashMap<LocalName, DeviceId>,
    challenges: HashMap<[u8; 32], (DeviceId, Millis, u64)>,
    challenge_seq: u64,
    sessions: HashMap<[u8; 32], (DeviceId, Millis)>,
    key_packages: HashMap<DeviceId, VecDeque<Vec<u8>>>,
    last_resort: HashMap<DeviceId, Vec<u8>>,
    inbox: HashMap<DeviceId, BTreeMap<u64, InboxItem>>,
    next_inbox_id: u64,
    events: HashMap<DeviceId, BTreeMap<u64, Event>>,
    next_cursor: u64,
    acked: HashMap<DeviceId, u64>,
}

impl MemoryStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    fn lock(&self) -> Result<MutexGuard<'_, State>, StoreError> {
        self.state.lock().map_err(|_| StoreError::Poisoned)
    }
}

impl State {
    fn append(&mut self, device: &DeviceId, kind: &str, payload: String, now: Millis) -> Event {
        self.next_cursor += 1;
        let event = Event {
            cursor: self.next_cursor,
            kind: kind.to_owned(),
            payload,
            created_at: now,
        };
        self.events
            .entry(*device)
            .or_default()
            .insert(event.cursor, event.clone());
        event
    }
}

impl Store for MemoryStore {
    fn register(&self, row: &DeviceRow) -> Result<Registered, StoreError> {
        let mut s = self.lock()?;
        if let Some(existing) = s.devices.get(&row.device) {
            return if existing.name == row.name {
                Ok(Registered::Existing)
            } else {
                Err(StoreError::DeviceHasOtherName(existing.name.clone()))
            };
        }
        if s.names.contains_key(&row.name) {
            return Err(StoreError::NameTaken(row.name.clone()));
        }
        s.names.insert(row.name.clone(), row.device);
        s.devices.insert(row.device, row.clone());
        s.order.push(row.device);
        Ok(Registered::New)
    }

    fn device(&self, device: &DeviceId) -> Result<Option<DeviceRow>, StoreError> {
        Ok(self.lock()?.devices.get(device).cloned())
    }

    fn devices_named(&self, name: &LocalName) -> Result<Vec<DeviceRow>, StoreError> {
        let s = self.lock()?;
        Ok(s.order
            .iter()
            .filter_map(|d| s.devices.get(d))
            .filter(|row| &row.name == name)
            .cloned()
            .collect())
    }

    fn device_count(&self) -> Result<u64, StoreError> {
        Ok(self.lock()?.devices.len() as u64)
    }

    fn replace_record(
        &self,
        device: &DeviceId,
        expected: &[u8],
        new: &[u8],
        now: Millis,
    ) -> Result<bool, StoreError> {
        let mut s = self.lock()?;
        let row = s
            .devices
            .get_mut(device)
            .ok_or(StoreError::UnknownDevice(*device))?;
        if row.record != expected {
            return Ok(false);
        }
        row.record = new.to_vec();
        row.record_at = now;
        Ok(true)
    }

    fn put_challenge(
        &self,
        device: &DeviceId,
        challenge: &[u8; 32],
        expires_at: Millis,
        now: Millis,
        max_per_device: usize,
    ) -> Result<(), StoreError> {
        let mut s = self.lock()?;
        s.challenges.retain(|_, (_, exp, _)| *exp > now);
        let mut mine: Vec<([u8; 32], u64)> = s
            .challenges
            .iter()
            .filter(|(_, (d, _, _))| d == device)
            .map(|(c, (_, _, seq))| (*c, *seq))
            .collect();
        mine.sort_by_key(|(_, seq)| *seq);
        let excess = (mine.len() + 1).saturating_sub(max_per_device);
        for (c, _) in mine.into_iter().take(excess) {
            s.challenges.remove(&c);
        }
        s.challenge_seq += 1;
        let seq = s.challenge_seq;
        s.challenges.insert(*challenge, (*device, expires_at, seq));
        Ok(())
    }

    fn take_challenge(
        &self,
        device: &DeviceId,
        challenge: &[u8; 32],
    ) -> Result<Option<Millis>, StoreError> {
        let mut s = self.lock()?;
        match s.challenges.get(challenge) {
            Some((d, _, _)) if d == device => {
                Ok(s.challenges.remove(challenge).map(|(_, exp, _)| exp))
            }
            _ => Ok(None),
        }
    }

    fn put_session(
        &self,
        token_hash: &[u8; 32],
        device: &DeviceId,
        expires_at: Millis,
    ) -> Result<(), StoreError> {
        self.lock()?
            .sessions
            .insert(*token_hash, (*device, expires_at));
        Ok(())
    }

    fn session(&self, token_hash: &[u8; 32]) -> Result<Option<(DeviceId, Millis)>, StoreError> {
        Ok(self.lock()?.sessions.get(token_hash).copied())
    }

    fn add_key_packages(
        &self,
        device: &DeviceId,
        packages: &[Vec<u8>],
        last_resort: Option<&[u8]>,
        max_stored: usize,
    ) -> Result<usize, StoreError> {
        let mut s = self.lock()?;
        let stored = s.key_packages.get(device).map_or(0, VecDeque::len);
        if stored + packages.len() > max_stored {
            return Err(StoreError::TooManyKeyPackages {
                limit: max_stored,
                stored,
            });
        }
        let queue = s.key_packages.entry(*device).or_default();
        queue.extend(packages.iter().cloned());
        let now_stored = queue.len();
        if let Some(lr) = last_resort {
            s.last_resort.insert(*device, lr.to_vec());
        }
        Ok(now_stored)
    }

    fn key_package_count(&self, device: &DeviceId) -> Result<(usize, bool), StoreError> {
        let s = self.lock()?;
        Ok((
            s.key_packages.get(device).map_or(0, VecDeque::len),
            s.last_resort.contains_key(device),
        ))
    }

    fn claim_key_package(&self, device: &DeviceId) -> Result<Claimed, StoreError> {
        let mut s = self.lock()?;
        if let Some(p) = s.key_packages.get_mut(device).and_then(VecDeque::pop_front) {
            return Ok(Claimed::Package(p));
        }
        Ok(match s.last_resort.get(device) {
            Some(lr) => Claimed::LastResort(lr.clone()),
            None => Claimed::Exhausted,
        })
    }

    fn deposit_inbox(
        &self,
        recipient: &DeviceId,
        envelope: &[u8],
        received_at: Millis,
        max_items: usize,
        payload: &dyn Fn(&InboxItem) -> String,
    ) -> Result<(InboxItem, Event), StoreError> {
        let mut s = self.lock()?;
        if s.inbox.get(recipient).map_or(0, BTreeMap::len) >= max_items {
            return Err(StoreError::InboxFull { limit: max_items });
        }
        s.next_inbox_id += 1;
        let item = InboxItem {
            id: s.next_inbox_id,
            envelope: envelope.to_vec(),
            received_at,
        };
        s.inbox
            .entry(*recipient)
            .or_default()
            .insert(item.id, item.clone());
        let event = s.append(recipient, "inbox", payload(&item), received_at);
        Ok((item, event))
    }

    fn inbox(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<InboxItem>, StoreError> {
        let s = self.lock()?;
        Ok(s.inbox
            .get(device)
            .map(|items| {
                items
                    .range(after.saturating_add(1)..)
                    .take(limit)
                    .map(|(_, i)| i.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    fn delete_inbox(&self, device: &DeviceId, id: u64) -> Result<bool, StoreError> {
        let mut s = self.lock()?;
        Ok(s.inbox
            .get_mut(device)
            .is_some_and(|items| items.remove(&id).is_some()))
    }

    fn append_event(
        &self,
        device: &DeviceId,
        kind: &str,
        payload: &str,
        now: Millis,
    ) -> Result<Event, StoreError> {
        Ok(self.lock()?.append(device, kind, payload.to_owned(), now))
    }

    fn events(
        &self,
        device: &DeviceId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<Event>, StoreError> {
        let s = self.lock()?;
        Ok(s.events
            .get(device)
            .map(|log| {
                log.range(after.saturating_add(1)..)
                    .take(limit)
                    .map(|(_, e)| e.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    fn ack_events(&self, device: &DeviceId, cursor: u64) -> Result<u64, StoreError> {
        let mut s = self.lock()?;
        let acked = s.acked.get(device).copied().unwrap_or(0);
        let newest = s
            .events
            .get(device)
            .and_then(|log| log.keys().next_back().copied())
            .unwrap_or(0);
        let new_ack = acked.max(cursor.min(newest));
        s.acked.insert(*device, new_ack);
        if let Some(log) = s.events.get_mut(device) {
            log.retain(|c, _| *c > new_ack);
        }
        Ok(new_ack)
    }

    fn acked_cursor(&self, device: &DeviceId) -> Result<u64, StoreError> {
        Ok(self.lock()?.acked.get(device).copied().unwrap_or(0))
    }
}
