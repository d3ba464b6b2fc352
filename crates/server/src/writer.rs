//! The batching message writer: channel messages posted at the same time
//! are stored together ([`Store::store_messages`]: in SQLite one
//! transaction, one `COMMIT`, one disk sync), and each poster is answered
//! once its own message is durable.
//!
//! Why: a message to many devices appends one event to each recipient's
//! log, and each of those rows dirties a leaf of the per-device index. One
//! transaction per message wrote those same leaves to the WAL again for
//! every message (profiled: storing was 44% of `kithd`'s CPU in fan-out);
//! one transaction for the messages waiting together writes each leaf once
//! for all of them. It also takes one trip through the blocking pool per
//! batch instead of two per message.
//!
//! How: a poster queues its message and, if no drain task is running,
//! starts one. The drain task takes everything queued (up to
//! [`MAX_BATCH`] messages or [`MAX_BATCH_BYTES`]), stores it on the
//! blocking pool, hands the stored events to the live streams in log order
//! (one [`EventHub::hand_off`] for the batch), answers each poster with its
//! own result, and goes on until the queue is empty. Messages that arrive while a batch is being
//! written form the next one, so batches grow with the load and a lone
//! message waits for nothing. The drain task is not the poster's future,
//! so a poster that goes away (its client disconnected) cannot strand the
//! others.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use kith_proto::ChannelId;
use tokio::sync::oneshot;

use crate::error::ApiError;
use crate::state::EventHub;
use crate::store::{MessageRow, NewMessage, Store, StoreError, StoredMessage};

/// The most messages stored in one transaction.
pub(crate) const MAX_BATCH: usize = 64;

/// The most message bytes stored in one transaction (a larger message is
/// still stored, alone).
pub(crate) const MAX_BATCH_BYTES: usize = 4 << 20;

/// How a message's event payload is made from its stored row.
pub(crate) type Payload = fn(&ChannelId, &MessageRow) -> String;

/// See the module docs.
pub(crate) struct MessageWriter {
    store: Arc<dyn Store>,
    hub: Arc<EventHub>,
    payload: Payload,
    queue: Arc<Mutex<Queue>>,
}

#[derive(Default)]
struct Queue {
    posts: VecDeque<Post>,
    /// Whether a drain task is running (it empties the queue before it
    /// ends, and clears this under the same lock).
    draining: bool,
}

struct Post {
    channel: ChannelId,
    message: NewMessage,
    reply: oneshot::Sender<Result<StoredMessage, StoreError>>,
}

impl MessageWriter {
    pub(crate) fn new(store: Arc<dyn Store>, hub: Arc<EventHub>, payload: Payload) -> Self {
        Self {
            store,
            hub,
            payload,
            queue: Arc::default(),
        }
    }

    /// Stores `message` in `channel` (as [`Store::store_message`]) with
    /// whatever else is waiting, and returns once it is durable and its
    /// events are handed to the live streams ([`EventHub::hand_off`]; the
    /// caller must not hand them off again).
    pub(crate) async fn store(
        &self,
        channel: ChannelId,
        message: NewMessage,
    ) -> Result<StoredMessage, ApiError> {
        let (reply, answer) = oneshot::channel();
        let start = {
            let mut queue = lock(&self.queue);
            queue.posts.push_back(Post {
                channel,
                message,
                reply,
            });
            !std::mem::replace(&mut queue.draining, true)
        };
        if start {
            tokio::spawn(drain(
                Arc::clone(&self.queue),
                Arc::clone(&self.store),
                Arc::clone(&self.hub),
                self.payload,
            ));
        }
        answer
            .await
            .map_err(|_| ApiError::internal("the message writer stopped; nothing was accepted"))?
            .map_err(ApiError::from)
    }
}

fn lock(queue: &Mutex<Queue>) -> MutexGuard<'_, Queue> {
    // Every update of the queue is whole, so a panic elsewhere cannot
    // leave it half-changed.
    queue.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Stores batches until the queue is empty.
async fn drain(
    queue: Arc<Mutex<Queue>>,
    store: Arc<dyn Store>,
    hub: Arc<EventHub>,
    payload: Payload,
) {
    loop {
        let posts = {
            let mut queue = lock(&queue);
            if queue.posts.is_empty() {
                queue.draining = false;
                return;
            }
            take_batch(&mut queue.posts)
        };
        let (batch, replies): (Vec<_>, Vec<_>) = posts
            .into_iter()
            .map(|p| ((p.channel, p.message), p.reply))
            .unzip();
        let store = Arc::clone(&store);
        let count = batch.len();
        let results =
            tokio::task::spawn_blocking(move || store.store_messages(&batch, &payload)).await;
        match results {
            Ok(results) if results.len() == count => {
                // On disk: handed to the streams in log order, all of the
                // batch in one call, before any poster hears back.
                let events: Vec<_> = results
                    .iter()
                    .flatten()
                    .flat_map(|(_, events)| events.iter().cloned())
                    .collect();
                hub.hand_off(&events);
                for (reply, result) in replies.into_iter().zip(results) {
                    // A poster that went away is not told; its message
                    // stands (a retry with the same id finds it).
                    let _ = reply.send(result);
                }
            }
            Ok(_) => {
                tracing::error!("the store answered a batch with the wrong number of results");
                for reply in replies {
                    let _ = reply.send(Err(StoreError::Corrupt(
                        "the store lost track of a batch of messages".into(),
                    )));
                }
            }
            // The replies are dropped: each poster gets a 500 saying
            // nothing was accepted.
            Err(e) => tracing::error!(error = %e, "storing a batch of messages failed"),
        }
    }
}

/// The oldest posts, up to [`MAX_BATCH`] messages and [`MAX_BATCH_BYTES`]
/// (at least one).
fn take_batch(posts: &mut VecDeque<Post>) -> Vec<Post> {
    let mut bytes = 0;
    let mut count = 0;
    for post in posts.iter() {
        bytes += post.message.message.len();
        if count == MAX_BATCH || (count > 0 && bytes > MAX_BATCH_BYTES) {
            break;
        }
        count += 1;
    }
    posts.drain(..count).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn post(bytes: usize) -> Post {
        Post {
            channel: ChannelId::from_bytes([1; 16]),
            message: NewMessage {
                id: [0; 32],
                epoch: 0,
                sender: kith_proto::DeviceId::from_bytes([2; 32]),
                message: vec![0; bytes],
                received_at: 0,
            },
            reply: oneshot::channel().0,
        }
    }

    #[test]
    fn a_batch_is_bounded_in_count_and_bytes_and_never_empty() {
        let mut posts: VecDeque<Post> = (0..100).map(|_| post(10)).collect();
        assert_eq!(take_batch(&mut posts).len(), MAX_BATCH);
        assert_eq!(take_batch(&mut posts).len(), 100 - MAX_BATCH);
        assert!(take_batch(&mut posts).is_empty());

        let big = MAX_BATCH_BYTES / 2 + 1;
        let mut posts: VecDeque<Post> = [post(big), post(big), post(1)].into();
        assert_eq!(take_batch(&mut posts).len(), 1);
        assert_eq!(take_batch(&mut posts).len(), 2);
        // A message larger than the bound still goes, alone.
        let mut posts: VecDeque<Post> = [post(MAX_BATCH_BYTES * 2), post(1)].into();
        assert_eq!(take_batch(&mut posts).len(), 1);
        assert_eq!(take_batch(&mut posts).len(), 1);
    }
}
