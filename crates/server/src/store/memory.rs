//! The in-memory backend: for tests and throwaway servers. Nothing survives
//! the process.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard};

use kith_proto::{ChannelId, DeviceId, LocalName, ServerName};

use super::{
    ChannelRow, Claimed, CommitRow, DeviceRow, EpochState, Event, InboxItem, MessageRow, Millis,
    NewCommit, NewMessage, OutboxItem, Registered, RemoteRecord, Removal, RemovedDevice, Store,
    StoreError,
};

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
    removed: HashMap<DeviceId, RemovedDevice>,
    challenges: HashMap<[u8; 32], (DeviceId, Millis, u64)>,
    challenge_seq: u64,
    sessions: HashMap<[u8; 32], (DeviceId, Millis)>,
    key_packages: HashMap<DeviceId, VecDeque<Vec<u8>>>,
    last_resort: HashMap<DeviceId, Vec<u8>>,
    inbox: HashMap<DeviceId, BTreeMap<u64, InboxItem>>,
    next_inbox_id: u64,
    events: HashMap<DeviceId, BTreeMap<u64, Event>>,
    /// The newest cursor ever appended to each device's log.
    tails: HashMap<DeviceId, u64>,
    next_cursor: u64,
    acked: HashMap<DeviceId, u64>,
    channels: BTreeMap<ChannelId, ChannelState>,
    remote_records: HashMap<DeviceId, RemoteRecord>,
    remote_removed: HashMap<DeviceId, Millis>,
    outbox: BTreeMap<u64, OutboxItem>,
    next_outbox_id: u64,
    remote_deposits: HashMap<(ServerName, [u8; 16]), u64>,
}

#[derive(Debug)]
struct ChannelState {
    row: ChannelRow,
    epochs: BTreeMap<u64, EpochState>,
    commits: BTreeMap<u64, CommitRow>,
    ever: BTreeSet<DeviceId>,
    messages: BTreeMap<u64, MessageRow>,
    message_ids: HashMap<[u8; 32], u64>,
}

impl ChannelState {
    fn current_members(&self) -> &[DeviceId] {
        self.epochs
            .get(&self.row.epoch)
            .map_or(&[], |e| e.members.as_slice())
    }
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
        let prev = self
            .tails
            .insert(*device, self.next_cursor)
            .unwrap_or_default();
        let event = Event {
            cursor: self.next_cursor,
            kind: kind.to_owned(),
            payload,
            created_at: now,
            prev: Some(prev),
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
        if s.removed.contains_key(&row.device) {
            return Err(StoreError::DeviceRemoved(row.device));
        }
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

    fn register_linked(&self, row: &DeviceRow) -> Result<Registered, StoreError> {
        let mut s = self.lock()?;
        if s.removed.contains_key(&row.device) {
            return Err(StoreError::DeviceRemoved(row.device));
        }
        if let Some(existing) = s.devices.get(&row.device) {
            return if existing.name == row.name {
                Ok(Registered::Existing)
            } else {
                Err(StoreError::DeviceHasOtherName(existing.name.clone()))
            };
        }
        s.names.entry(row.name.clone()).or_insert(row.device);
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

    fn remove_device(
        &self,
        device: &DeviceId,
        by: Option<&DeviceId>,
        now: Millis,
        payload: &str,
    ) -> Result<Option<Removal>, StoreError> {
        let mut s = self.lock()?;
        let Some(name) = s.devices.get(device).map(|row| row.name.clone()) else {
            return Ok(None);
        };
        if let Some(by) = by
            && s.devices.get(by).is_none_or(|row| row.name != name)
        {
            return Err(StoreError::RemoverGone(*by));
        }
        let Some(row) = s.devices.remove(device) else {
            return Ok(None);
        };
        s.order.retain(|d| d != device);
        s.sessions.retain(|_, (d, _)| d != device);
        s.challenges.retain(|_, (d, _, _)| d != device);
        s.key_packages.remove(device);
        s.last_resort.remove(device);
        s.inbox.remove(device);
        s.events.remove(device);
        s.acked.remove(device);
        s.removed.insert(
            *device,
            RemovedDevice {
                row: row.clone(),
                removed_at: now,
            },
        );
        let remaining: Vec<DeviceId> = s
            .order
            .iter()
            .filter(|d| s.devices.get(d).is_some_and(|r| r.name == name))
            .copied()
            .collect();
        let events = remaining
            .into_iter()
            .map(|d| (d, s.append(&d, "device_removed", payload.to_owned(), now)))
            .collect();
        Ok(Some((row, events)))
    }

    fn removed_device(&self, device: &DeviceId) -> Result<Option<RemovedDevice>, StoreError> {
        Ok(self.lock()?.removed.get(device).cloned())
    }

    fn release_name(&self, name: &LocalName) -> Result<bool, StoreError> {
        let mut s = self.lock()?;
        if s.devices.values().any(|row| &row.name == name) {
            return Ok(false);
        }
        Ok(s.names.remove(name).is_some())
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
        let mut s = self.lock()?;
        if !s.devices.contains_key(device) {
            return Err(StoreError::UnknownDevice(*device));
        }
        s.sessions.insert(*token_hash, (*device, expires_at));
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
        if !s.devices.contains_key(recipient) {
            return Err(StoreError::UnknownDevice(*recipient));
        }
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
        let mut s = self.lock()?;
        if !s.devices.contains_key(device) {
            return Err(StoreError::UnknownDevice(*device));
        }
        Ok(s.append(device, kind, payload.to_owned(), now))
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
                    .map(|(_, e)| Event {
                        prev: None,
                        ..e.clone()
                    })
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

    fn create_channel(&self, row: &ChannelRow, state: &EpochState) -> Result<(), StoreError> {
        let mut s = self.lock()?;
        if s.channels.contains_key(&row.channel) {
            return Err(StoreError::ChannelExists(row.channel));
        }
        s.channels.insert(
            row.channel,
            ChannelState {
                row: row.clone(),
                epochs: BTreeMap::from([(state.epoch, state.clone())]),
                commits: BTreeMap::new(),
                ever: state.members.iter().copied().collect(),
                messages: BTreeMap::new(),
                message_ids: HashMap::new(),
            },
        );
        Ok(())
    }

    fn channel(&self, channel: &ChannelId) -> Result<Option<ChannelRow>, StoreError> {
        Ok(self.lock()?.channels.get(channel).map(|c| c.row.clone()))
    }

    fn channels_of(&self, device: &DeviceId) -> Result<Vec<ChannelRow>, StoreError> {
        Ok(self
            .lock()?
            .channels
            .values()
            .filter(|c| c.current_members().contains(device))
            .map(|c| c.row.clone())
            .collect())
    }

    fn is_member(&self, channel: &ChannelId, device: &DeviceId) -> Result<bool, StoreError> {
        Ok(self
            .lock()?
            .channels
            .get(channel)
            .is_some_and(|c| c.current_members().contains(device)))
    }

    fn was_member(&self, channel: &ChannelId, device: &DeviceId) -> Result<bool, StoreError> {
        Ok(self
            .lock()?
            .channels
            .get(channel)
            .is_some_and(|c| c.ever.contains(device)))
    }

    fn epoch_state(
        &self,
        channel: &ChannelId,
        epoch: u64,
    ) -> Result<Option<EpochState>, StoreError> {
        Ok(self
            .lock()?
            .channels
            .get(channel)
            .and_then(|c| c.epochs.get(&epoch).cloned()))
    }

    fn store_commit(&self, commit: &NewCommit) -> Result<(), StoreError> {
        let mut s = self.lock()?;
        let c = s
            .channels
            .get_mut(&commit.channel)
            .ok_or(StoreError::UnknownChannel(commit.channel))?;
        let epoch = commit.commit.epoch;
        if c.row.epoch != epoch || commit.next.epoch != epoch.wrapping_add(1) {
            return Err(StoreError::EpochConflict {
                channel: commit.channel,
                current: c.row.epoch,
                got: epoch,
            });
        }
        c.commits.insert(epoch, commit.commit.clone());
        c.epochs.insert(commit.next.epoch, commit.next.clone());
        c.ever.extend(commit.next.members.iter().copied());
        c.row.epoch = commit.next.epoch;
        c.row.name.clone_from(&commit.name);
        c.row.content_type.clone_from(&commit.content_type);
        Ok(())
    }

    fn commit(&self, channel: &ChannelId, epoch: u64) -> Result<Option<CommitRow>, StoreError> {
        Ok(self
            .lock()?
            .channels
            .get(channel)
            .and_then(|c| c.commits.get(&epoch).cloned()))
    }

    fn commits(
        &self,
        channel: &ChannelId,
        from_epoch: u64,
        limit: usize,
    ) -> Result<Vec<CommitRow>, StoreError> {
        Ok(self
            .lock()?
            .channels
            .get(channel)
            .map(|c| {
                c.commits
                    .range(from_epoch..)
                    .take(limit)
                    .map(|(_, r)| r.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    fn certify_commit(
        &self,
        channel: &ChannelId,
        epoch: u64,
        certificate: &[u8],
        payload: &str,
        now: Millis,
    ) -> Result<Option<Vec<(DeviceId, Event)>>, StoreError> {
        let mut s = self.lock()?;
        let c = s
            .channels
            .get_mut(channel)
            .ok_or(StoreError::UnknownChannel(*channel))?;
        // Events go to the members registered here; the others are other
        // servers' to notify.
        let recipients: Vec<DeviceId> = c
            .epochs
            .get(&epoch)
            .map(|e| e.members.clone())
            .unwrap_or_default();
        let row = c
            .commits
            .get_mut(&epoch)
            .ok_or_else(|| StoreError::Corrupt(format!("no commit stored for epoch {epoch}")))?;
        if row.certificate.is_some() {
            return Ok(None);
        }
        row.certificate = Some(certificate.to_vec());
        let recipients: Vec<DeviceId> = recipients
            .into_iter()
            .filter(|d| s.devices.contains_key(d))
            .collect();
        let events = recipients
            .iter()
            .map(|d| (*d, s.append(d, "commit", payload.to_owned(), now)))
            .collect();
        Ok(Some(events))
    }

    fn store_message(
        &self,
        channel: &ChannelId,
        message: &NewMessage,
        payload: &dyn Fn(&MessageRow) -> String,
    ) -> Result<(MessageRow, Vec<(DeviceId, Event)>), StoreError> {
        let mut s = self.lock()?;
        let c = s
            .channels
            .get_mut(channel)
            .ok_or(StoreError::UnknownChannel(*channel))?;
        if let Some(row) = c
            .message_ids
            .get(&message.id)
            .and_then(|seq| c.messages.get(seq))
        {
            return Ok((row.clone(), Vec::new()));
        }
        let seq = c.messages.keys().next_back().copied().unwrap_or(0) + 1;
        let row = MessageRow {
            seq,
            id: message.id,
            epoch: message.epoch,
            sender: message.sender,
            message: message.message.clone(),
            received_at: message.received_at,
        };
        c.messages.insert(seq, row.clone());
        c.message_ids.insert(message.id, seq);
        let recipients: Vec<DeviceId> = c
            .current_members()
            .iter()
            .filter(|d| **d != message.sender)
            .copied()
            .collect();
        let recipients: Vec<DeviceId> = recipients
            .into_iter()
            .filter(|d| s.devices.contains_key(d))
            .collect();
        let text = payload(&row);
        let events = recipients
            .iter()
            .map(|d| {
                (
                    *d,
                    s.append(d, "message", text.clone(), message.received_at),
                )
            })
            .collect();
        Ok((row, events))
    }

    fn messages(
        &self,
        channel: &ChannelId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<MessageRow>, StoreError> {
        Ok(self
            .lock()?
            .channels
            .get(channel)
            .map(|c| {
                c.messages
                    .range(after.saturating_add(1)..)
                    .take(limit)
                    .map(|(_, r)| r.clone())
                    .collect()
            })
            .unwrap_or_default())
    }

    fn put_remote_record(&self, row: &RemoteRecord) -> Result<(), StoreError> {
        self.lock()?.remote_records.insert(row.device, row.clone());
        Ok(())
    }

    fn remote_records_from(&self, server: &ServerName) -> Result<Vec<RemoteRecord>, StoreError> {
        Ok(self
            .lock()?
            .remote_records
            .values()
            .filter(|r| &r.server == server)
            .cloned()
            .collect())
    }

    fn mark_remote_removed(&self, device: &DeviceId, removed_at: Millis) -> Result<(), StoreError> {
        self.lock()?
            .remote_removed
            .entry(*device)
            .or_insert(removed_at);
        Ok(())
    }

    fn forget_remote_records(&self, server: &ServerName) -> Result<usize, StoreError> {
        let mut s = self.lock()?;
        let before = s.remote_records.len();
        s.remote_records.retain(|_, r| &r.server != server);
        Ok(before - s.remote_records.len())
    }

    fn remote_removed(&self, device: &DeviceId) -> Result<Option<Millis>, StoreError> {
        Ok(self.lock()?.remote_removed.get(device).copied())
    }

    fn remote_record(&self, device: &DeviceId) -> Result<Option<RemoteRecord>, StoreError> {
        Ok(self.lock()?.remote_records.get(device).cloned())
    }

    fn enqueue_outbox(
        &self,
        destination: &ServerName,
        path: &str,
        body: &[u8],
        now: Millis,
    ) -> Result<u64, StoreError> {
        let mut s = self.lock()?;
        s.next_outbox_id += 1;
        let id = s.next_outbox_id;
        s.outbox.insert(
            id,
            OutboxItem {
                id,
                destination: destination.clone(),
                path: path.to_owned(),
                body: body.to_vec(),
                attempts: 0,
                next_at: now,
                created_at: now,
            },
        );
        Ok(id)
    }

    fn due_outbox(&self, now: Millis, limit: usize) -> Result<Vec<OutboxItem>, StoreError> {
        Ok(self
            .lock()?
            .outbox
            .values()
            .filter(|i| i.next_at <= now)
            .take(limit)
            .cloned()
            .collect())
    }

    fn next_outbox_due(&self) -> Result<Option<Millis>, StoreError> {
        Ok(self.lock()?.outbox.values().map(|i| i.next_at).min())
    }

    fn retry_outbox(&self, id: u64, attempts: u32, next_at: Millis) -> Result<(), StoreError> {
        if let Some(item) = self.lock()?.outbox.get_mut(&id) {
            item.attempts = attempts;
            item.next_at = next_at;
        }
        Ok(())
    }

    fn remove_outbox(&self, id: u64) -> Result<bool, StoreError> {
        Ok(self.lock()?.outbox.remove(&id).is_some())
    }

    fn deposit_remote_inbox(
        &self,
        origin: &ServerName,
        deposit_id: &[u8; 16],
        recipient: &DeviceId,
        envelope: &[u8],
        received_at: Millis,
        max_items: usize,
        payload: &dyn Fn(&InboxItem) -> String,
    ) -> Result<(u64, Option<Event>), StoreError> {
        let mut s = self.lock()?;
        let key = (origin.clone(), *deposit_id);
        if let Some(id) = s.remote_deposits.get(&key) {
            return Ok((*id, None));
        }
        if !s.devices.contains_key(recipient) {
            return Err(StoreError::UnknownDevice(*recipient));
        }
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
        s.remote_deposits.insert(key, item.id);
        let event = s.append(recipient, "inbox", payload(&item), received_at);
        Ok((item.id, Some(event)))
    }
}
