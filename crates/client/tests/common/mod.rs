//! Helpers shared by the integration tests that act as a hostile or
//! impatient federation peer, or wait for federated delivery (`mod common;` in each test file).
#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::indexing_slicing,
    clippy::panic
)]

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use std::time::Duration;

use kith_client::{Client, ClientError};
use kith_proto::SecretKey;
use serde_json::Value;

/// The signing key of a server, read from its data directory.
pub(crate) fn server_key(dir: &Path) -> SecretKey {
    let text = std::fs::read_to_string(dir.join("server-key.toml")).unwrap();
    let table: toml::Table = toml::from_str(&text).unwrap();
    let mut seed = [0u8; 32];
    hex::decode_to_slice(table["seed"].as_str().unwrap(), &mut seed).unwrap();
    SecretKey::from_seed(seed)
}

/// POSTs `body` to `path` on `to`, signed by `from` with `key`.
pub(crate) async fn signed_post(
    key: &SecretKey,
    from: &str,
    to: &str,
    base: &str,
    path: &str,
    body: &[u8],
) -> (u16, Value) {
    let now = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis(),
    )
    .unwrap();
    let mut nonce = [0u8; 16];
    nonce[..8].copy_from_slice(&now.to_be_bytes());
    nonce[8..].copy_from_slice(&(body.len() as u64).to_be_bytes());
    let request = kith_proto::FederationRequest::new(
        from.parse().unwrap(),
        to.parse().unwrap(),
        "POST",
        path,
        body,
        now,
        nonce,
    );
    let answer = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .header("Kith-Origin", from)
        .header(
            "Kith-Signature",
            URL_SAFE_NO_PAD.encode(request.sign(key).encode()),
        )
        .header("Content-Type", "application/json")
        .body(body.to_vec())
        .send()
        .await
        .unwrap();
    let status = answer.status().as_u16();
    (status, answer.json().await.unwrap_or(Value::Null))
}

/// Syncs until `done` holds, at most ~30 s (federated delivery is
/// asynchronous). A sync may fail meanwhile because a server is down or
/// not ready; a local failure ends the test.
pub(crate) async fn sync_until(client: &mut Client, what: &str, done: impl Fn(&Client) -> bool) {
    sync_until_within(client, what, 300, done).await;
}

/// [`sync_until`] with at most `attempts` syncs, 100 ms apart.
pub(crate) async fn sync_until_within(
    client: &mut Client,
    what: &str,
    attempts: u32,
    done: impl Fn(&Client) -> bool,
) {
    for _ in 0..attempts {
        match client.sync().await {
            Ok(_) | Err(ClientError::Unreachable(..)) | Err(ClientError::Server { .. }) => {}
            Err(e) => panic!("{what}: sync failed: {e}"),
        }
        if done(client) {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{what}: not reached");
}
