//! Pipelined sending to one channel: a [`Sender`] keeps one multi-message
//! send (spec §6.7) in flight while it encrypts the next batch, for bots,
//! bridges and anything else that sends more than one request's worth.
//!
//! The rules (docs/architecture.md, "Pipelined sending"):
//!
//! - **Order.** A batch is posted only after the server accepted the one
//!   before it, so the server's order is the order of the calls; with one
//!   request in flight, no two of this device's requests race.
//! - **Ratchet first.** A batch's sending-ratchet steps are durable in the
//!   MLS store before it is posted (as in [`Client::send_many`]): after a
//!   crash the ratchet never steps back, and a batch encrypted but never
//!   posted only leaves a gap of at most [`MAX_BATCH`] generations that
//!   members skip over (spec §9.7).
//! - **Copies after the answer.** This device stores its own copies of a
//!   batch once the server has accepted it, while the next batch is in
//!   flight; a crash in between loses those local copies only (the server
//!   and the other members have the messages), as with [`Client::send`].
//! - **A new epoch.** If the channel moved on, the server refuses the
//!   batch in flight whole (`wrong_epoch`); the batch encrypted behind it
//!   is at the same old epoch and is never posted. The refused batch is
//!   sent again the way [`Client::send_many`] sends (catching up before
//!   every attempt, the first included: it is not posted again at the old
//!   epoch; at most [`crate::channels::MAX_SEND_ATTEMPTS`] times), and the
//!   one behind it is encrypted again at the new epoch.
//! - **Dropped.** A `Sender` dropped with a batch in flight (no
//!   [`Sender::finish`]) leaves it to the client, which waits for its
//!   answer before its next post or sync: copies stored if accepted,
//!   payloads reported in [`crate::SyncReport::unacknowledged`] if not.
//!
//! [`MAX_BATCH`]: crate::channels::MAX_BATCH

use std::sync::Arc;

use kith_proto::ChannelId;
use tokio::task::JoinHandle;
use tracing::Instrument;

use crate::channels::{batches, is_wrong_epoch};
use crate::{Client, ClientError};

/// The server's answer to one posted batch: each message's id, `seq` and
/// `received_at`, in the batch's order.
type Answer = Result<Vec<(String, u64, u64)>, ClientError>;

/// A batch posted and not yet answered.
pub(crate) struct InFlight {
    channel: ChannelId,
    epoch: u64,
    payloads: Vec<Vec<u8>>,
    /// Kept to post it again after a new login (HTTP 401).
    messages: Arc<Vec<Vec<u8>>>,
    answer: JoinHandle<Answer>,
}

/// A [`Sender`]'s failure: why, and which payloads the server did not
/// acknowledge.
#[derive(Debug, thiserror::Error)]
#[error("{error} ({} payloads not acknowledged)", unacknowledged.len())]
pub struct SendError {
    /// What failed.
    #[source]
    pub error: ClientError,
    /// The payloads of this call and of the batch that was in flight that
    /// the server did not acknowledge, in order: refused, never posted, or
    /// (when the homeserver became unreachable with a request in flight)
    /// of unknown fate, exactly as for [`Client::send_many`]. Everything
    /// before them was acknowledged and stored here. Empty when the server
    /// accepted the batch in flight but this device failed to store its
    /// copies; this call's batch may then be in flight still, and the next
    /// call or [`Sender::finish`] reports it.
    pub unacknowledged: Vec<Vec<u8>>,
}

impl SendError {
    fn new(error: ClientError, unacknowledged: Vec<Vec<u8>>) -> Self {
        Self {
            error,
            unacknowledged,
        }
    }
}

/// Sends to one channel with one multi-message send in flight while the
/// next batch is encrypted (see the [module](self) for the rules). Made by
/// [`Client::sender`]; it holds the client for its lifetime, so nothing
/// else changes the channel's MLS state meanwhile.
///
/// Call [`Sender::finish`] at the end: it waits for the last batch and
/// stores its copies. A `Sender` dropped with a batch in flight (without
/// `finish`, or while a call was under way) hands that batch to the
/// client, whose next send, `Sender` or sync waits for its answer first
/// (so two requests of this device never race) and settles it: its copies
/// stored if the server accepted it, else its payloads reported as not
/// acknowledged ([`crate::SyncReport::unacknowledged`]).
pub struct Sender<'c> {
    client: &'c mut Client,
    channel: ChannelId,
    in_flight: Option<InFlight>,
}

impl Client {
    /// A pipelined [`Sender`] for channel `id`.
    pub fn sender(&mut self, id: ChannelId) -> Sender<'_> {
        Sender {
            client: self,
            channel: id,
            in_flight: None,
        }
    }
}

impl Drop for Sender<'_> {
    fn drop(&mut self) {
        if let Some(flying) = self.in_flight.take() {
            // Settled by the client's next send, `Sender` or sync. There
            // is never one already: each of those settles it first.
            self.client.dropped_batch = Some(flying);
        }
    }
}

impl Client {
    /// Settles the batch a dropped [`Sender`] left in flight, if any: waits
    /// for the server's answer, then stores this device's copies if it
    /// accepted the batch, and otherwise keeps its payloads for
    /// [`crate::SyncReport::unacknowledged`] (refused, or of unknown fate
    /// when the homeserver could not be reached). Before anything else
    /// that posts, so that two of this device's requests never race.
    pub(crate) async fn settle_dropped_batch(&mut self) -> Result<(), ClientError> {
        let Some(flying) = self.dropped_batch.take() else {
            return Ok(());
        };
        let (channel, epoch, payloads) = (flying.channel, flying.epoch, flying.payloads.clone());
        match answer_of(self, flying).await {
            Ok(answers) => {
                let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
                let rows = self.sent_rows(epoch, answers, &refs);
                self.store.save_messages(&channel, &rows)
            }
            Err(e) => {
                tracing::warn!(%channel, messages = payloads.len(), "a dropped sender's last batch was not acknowledged: {e}");
                self.unacknowledged
                    .extend(payloads.into_iter().map(|p| (channel, p)));
                Ok(())
            }
        }
    }

    /// The payloads of batches that dropped [`Sender`]s left in flight
    /// and that the server did not acknowledge, in order, each with its
    /// channel; taken (a sync reports them in
    /// [`crate::SyncReport::unacknowledged`]).
    pub fn take_unacknowledged(&mut self) -> Vec<(ChannelId, Vec<u8>)> {
        std::mem::take(&mut self.unacknowledged)
    }
}

/// The server's answer to a batch in flight; posted again once after a new
/// login if the session had expired.
async fn answer_of(client: &mut Client, flying: InFlight) -> Answer {
    let answer = match flying.answer.await {
        Ok(answer) => answer,
        Err(e) => Err(ClientError::Protocol(format!("the send task failed: {e}"))),
    };
    match answer {
        Err(ClientError::Server { status: 401, .. }) => {
            let (text, epoch, m) = (flying.channel.to_string(), flying.epoch, flying.messages);
            client
                .authed(|api| {
                    let (c, m) = (text.clone(), Arc::clone(&m));
                    async move { api.send_messages_binary(&c, epoch, &m).await }
                })
                .await
        }
        other => other,
    }
}

impl Sender<'_> {
    /// Encrypts `payloads` (in order, cut into requests as
    /// [`Client::send_many`] cuts them) and posts them, each request once
    /// the one before it is accepted. Returns the ids of the messages the
    /// server acknowledged during this call, in order: those of the batch
    /// that was in flight and of every request of this call but the last,
    /// which stays in flight (its ids come from the next call or from
    /// [`Sender::finish`]).
    pub async fn send(&mut self, payloads: &[&[u8]]) -> Result<Vec<String>, SendError> {
        let mut acked = Vec::new();
        let batches = batches(payloads);
        for (i, batch) in batches.iter().enumerate() {
            match self.step(batch).await {
                Ok(ids) => acked.extend(ids),
                Err(mut e) => {
                    // `step` returned the batch in flight's and this one's.
                    for later in batches.iter().skip(i + 1) {
                        e.unacknowledged.extend(later.iter().map(|p| p.to_vec()));
                    }
                    return Err(e);
                }
            }
        }
        Ok(acked)
    }

    /// Waits for the batch in flight and stores its copies. Returns the ids
    /// it was given.
    pub async fn finish(mut self) -> Result<Vec<String>, SendError> {
        self.drain().await
    }

    /// One request's batch: encrypted while the one before is in flight,
    /// then posted once that one is accepted.
    async fn step(&mut self, batch: &[&[u8]]) -> Result<Vec<String>, SendError> {
        let id = self.channel;
        let unsent = |b: &[&[u8]]| b.iter().map(|p| p.to_vec()).collect::<Vec<_>>();
        if self.in_flight.is_none() {
            // An earlier sender's batch still in flight is answered first.
            self.client
                .settle_dropped_batch()
                .await
                .map_err(|e| SendError::new(e, unsent(batch)))?;
            // Nothing of this device's is in flight, and nothing else can
            // commit while this `Sender` holds the client: only here can a
            // commit of its own be pending. Then the sequential path
            // catches up first.
            let pending = self.client.mls.has_pending_commit(id);
            if pending.map_err(|e| SendError::new(e.into(), unsent(batch)))? {
                return self.send_now(batch, false).await;
            }
        }
        // The overlap: this batch's encryption (and its ratchet's sync)
        // runs while the batch in flight is posted and stored by the server.
        let encrypted = tracing::debug_span!("sender.encrypt", messages = batch.len())
            .in_scope(|| self.client.encrypt_batch(id, batch));
        let Some(flying) = self.in_flight.take() else {
            let (epoch, messages) = encrypted.map_err(|e| SendError::new(e, unsent(batch)))?;
            self.post(epoch, batch, messages);
            return Ok(Vec::new());
        };
        let epoch = flying.epoch;
        let payloads = flying.payloads.clone();
        let answer = self
            .answer(flying)
            .instrument(tracing::debug_span!("sender.wait"))
            .await;
        match answer {
            Ok(answers) => {
                // Post this batch first, then store the copies of the one
                // just accepted while this one is in flight.
                let (next_epoch, messages) = match encrypted {
                    Ok(done) => done,
                    Err(e) => {
                        let stored = self.store_sent(epoch, answers, &payloads);
                        return Err(match stored {
                            Ok(_) => SendError::new(e, unsent(batch)),
                            Err(stored) => stored,
                        });
                    }
                };
                self.post(next_epoch, batch, messages);
                tracing::debug_span!("sender.copies")
                    .in_scope(|| self.store_sent(epoch, answers, &payloads))
            }
            Err(e) if is_wrong_epoch(&e) => {
                // The channel moved on: the refused batch goes again the
                // sequential way, catching up before it is encrypted again
                // (not posted once more at the old epoch), and this one,
                // made at the old epoch, is encrypted again at the new one.
                tracing::debug!(channel = %id, epoch, "behind the channel's epoch; catching up");
                let refused: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
                let acked = self.send_now(&refused, true).await.map_err(|mut e| {
                    e.unacknowledged.extend(unsent(batch));
                    e
                })?;
                let (epoch, messages) = self
                    .client
                    .encrypt_batch(id, batch)
                    .map_err(|e| SendError::new(e, unsent(batch)))?;
                self.post(epoch, batch, messages);
                Ok(acked)
            }
            Err(e) => {
                let mut lost = payloads;
                lost.extend(unsent(batch));
                Err(SendError::new(e, lost))
            }
        }
    }

    /// Posts a batch encrypted at `epoch` in a task of its own, so that the
    /// request goes out while this device encrypts the next one.
    fn post(&mut self, epoch: u64, payloads: &[&[u8]], messages: Vec<Vec<u8>>) {
        let messages = Arc::new(messages);
        let (api, text, m) = (
            self.client.api.clone(),
            self.channel.to_string(),
            Arc::clone(&messages),
        );
        let answer = tokio::spawn(async move { api.send_messages_binary(&text, epoch, &m).await });
        self.in_flight = Some(InFlight {
            channel: self.channel,
            epoch,
            payloads: payloads.iter().map(|p| p.to_vec()).collect(),
            messages,
            answer,
        });
    }

    /// The server's answer to a batch in flight ([`answer_of`]).
    async fn answer(&mut self, flying: InFlight) -> Answer {
        answer_of(self.client, flying).await
    }

    /// Waits for the batch in flight, if any, and stores its copies.
    async fn drain(&mut self) -> Result<Vec<String>, SendError> {
        let Some(flying) = self.in_flight.take() else {
            return Ok(Vec::new());
        };
        let (epoch, payloads) = (flying.epoch, flying.payloads.clone());
        match self.answer(flying).await {
            Ok(answers) => self.store_sent(epoch, answers, &payloads),
            Err(e) if is_wrong_epoch(&e) => {
                let refused: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
                self.send_now(&refused, true).await
            }
            Err(e) => Err(SendError::new(e, payloads)),
        }
    }

    /// Sends `batch` the sequential way ([`Client::send_many`]'s request:
    /// catching up and encrypting again as often as the epoch moves; first
    /// of all when `behind`, the server having refused this device's
    /// epoch) and stores its copies.
    async fn send_now(&mut self, batch: &[&[u8]], behind: bool) -> Result<Vec<String>, SendError> {
        let unsent = || batch.iter().map(|p| p.to_vec()).collect::<Vec<_>>();
        let rows = self
            .client
            .send_batch(self.channel, batch, behind)
            .await
            .map_err(|e| SendError::new(e, unsent()))?;
        self.client
            .store
            .save_messages(&self.channel, &rows)
            .map_err(|e| SendError::new(e, Vec::new()))?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }

    /// Stores this device's copies of a batch the server accepted.
    fn store_sent(
        &mut self,
        epoch: u64,
        answers: Vec<(String, u64, u64)>,
        payloads: &[Vec<u8>],
    ) -> Result<Vec<String>, SendError> {
        let refs: Vec<&[u8]> = payloads.iter().map(Vec::as_slice).collect();
        let rows = self.client.sent_rows(epoch, answers, &refs);
        self.client
            .store
            .save_messages(&self.channel, &rows)
            .map_err(|e| SendError::new(e, Vec::new()))?;
        Ok(rows.into_iter().map(|r| r.id).collect())
    }
}
