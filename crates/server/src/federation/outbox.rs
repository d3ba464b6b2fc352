//! The durable outbox (spec §12.4): federation POSTs that must arrive even
//! if the destination is down or this server restarts. An item is written
//! to the store before the client hears "accepted", and leaves it only on a
//! 2xx answer, on a permanent refusal (a 4xx other than 401, 408 and 429),
//! or when it is older than the configured maximum age; each drop is
//! logged. Destinations are served in parallel, each one's due items in
//! order; a failed send ends its destination's round (the rest would most
//! likely fail too). Strict per-channel order, which fan-out will need, is
//! not kept across retries yet. Failed sends back off exponentially (base doubling up to a
//! maximum, with jitter). Each send is signed afresh, so a retry is never a
//! replay; receivers deduplicate by what the body names (inbox deposits by
//! origin and `deposit_id`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kith_proto::ServerName;

use crate::error::ApiError;
use crate::state::{Shared, now_ms};
use crate::store::OutboxItem;

/// Items sent per round.
const BATCH: usize = 32;
/// The longest the task sleeps without looking at the store.
const IDLE_POLL: Duration = Duration::from_secs(5);

/// Queues a POST of `body` to `path` on `destination`, durably, and wakes
/// the delivery task. Returns the item's id.
pub(crate) async fn enqueue(
    state: &Shared,
    destination: ServerName,
    path: String,
    body: Vec<u8>,
) -> Result<u64, ApiError> {
    let now = now_ms();
    let id = state
        .db(move |s| s.enqueue_outbox(&destination, &path, &body, now))
        .await?;
    state.federation.outbox_wake.notify_one();
    Ok(id)
}

/// The delay before attempt `attempts + 1`: `base * 2^attempts`, at most
/// `max`, plus up to a quarter of it at random.
pub(crate) fn backoff(base: u64, max: u64, attempts: u32) -> u64 {
    use rand_core::RngCore as _;
    let delay = base
        .saturating_mul(1u64.checked_shl(attempts.min(62)).unwrap_or(u64::MAX))
        .min(max);
    let jitter = rand_core::OsRng.next_u64() % (delay / 4 + 1);
    delay.saturating_add(jitter)
}

/// Delivers due items until the server shuts down.
pub(crate) async fn run(state: Shared) {
    let mut shutdown = state.shutdown.clone();
    loop {
        if *shutdown.borrow() {
            break;
        }
        let wait = match round(&state).await {
            Ok(wait) => wait,
            Err(e) => {
                tracing::warn!(error = %e.message, "outbox round failed");
                IDLE_POLL
            }
        };
        tokio::select! {
            _ = shutdown.changed() => {}
            () = state.federation.outbox_wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Sends every due item once, destinations in parallel and each
/// destination's items in order; returns how long to sleep.
async fn round(state: &Shared) -> Result<Duration, ApiError> {
    let now = now_ms();
    let due = state.db(move |s| s.due_outbox(now, BATCH)).await?;
    let full = due.len() == BATCH;
    let mut by_destination: BTreeMap<ServerName, Vec<OutboxItem>> = BTreeMap::new();
    for item in due {
        by_destination
            .entry(item.destination.clone())
            .or_default()
            .push(item);
    }
    let mut sends = tokio::task::JoinSet::new();
    for (_, items) in by_destination {
        let state = Arc::clone(state);
        sends.spawn(async move { send_in_order(&state, items).await });
    }
    while let Some(done) = sends.join_next().await {
        match done {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e.message, "outbox storage failed"),
            Err(e) => tracing::error!(error = %e, "outbox send task failed"),
        }
    }
    if full {
        return Ok(Duration::ZERO);
    }
    let next = state.db(|s| s.next_outbox_due()).await?;
    Ok(match next {
        Some(at) => Duration::from_millis(at.saturating_sub(now_ms())).min(IDLE_POLL),
        None => IDLE_POLL,
    })
}

/// Sends one destination's due items in order, stopping at the first that
/// must wait (the others would most likely fail too).
async fn send_in_order(state: &Shared, items: Vec<OutboxItem>) -> Result<(), ApiError> {
    let settings = &state.config.federation;
    for item in items {
        if *state.shutdown.borrow() {
            return Ok(());
        }
        let id = item.id;
        let result = state
            .federation
            .client
            .post(&item.destination, &item.path, item.body.clone())
            .await;
        let now = now_ms();
        match result {
            Ok(answer) => {
                state.db(move |s| s.remove_outbox(id)).await?;
                tracing::debug!(id, destination = %item.destination, status = answer.status.as_u16(), "outbox item delivered");
            }
            Err(e)
                if e.is_transient()
                    && now.saturating_sub(item.created_at) < settings.outbox_max_age_ms =>
            {
                let attempts = item.attempts.saturating_add(1);
                let next = now.saturating_add(backoff(
                    settings.retry_base_ms,
                    settings.retry_max_ms,
                    item.attempts,
                ));
                tracing::info!(id, destination = %item.destination, attempts, error = %e, "outbox send failed; will retry");
                state
                    .db(move |s| s.retry_outbox(id, attempts, next))
                    .await?;
                return Ok(());
            }
            Err(e) => {
                tracing::warn!(id, destination = %item.destination, path = %item.path, error = %e, "outbox item dropped");
                state.db(move |s| s.remove_outbox(id)).await?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::backoff;

    #[test]
    fn backoff_doubles_and_is_capped() {
        for attempts in 0..70 {
            let d = backoff(1000, 3_600_000, attempts);
            let base = (1000u64 << attempts.min(12)).min(3_600_000);
            assert!(d >= base && d <= base + base / 4, "{attempts}: {d}");
        }
    }
}
