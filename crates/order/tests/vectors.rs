//! Known-answer vectors in `test-vectors/ordering.json`: the exact bytes of
//! votes and certificates from fixed keys, certificates that must be
//! rejected with a named error, and a log of submissions with the outcome
//! the apply rule gives each. Another implementation checks itself against
//! the same file.
//!
//! Run with `KITH_WRITE_VECTORS=1` to rewrite the file after a deliberate
//! change to the wire format or the apply rule.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use kith_order::{
    CertificateError, ChannelOrder, CommitHash, OrderingCertificate, OrderingCertificateIn,
    Outcome, Submission, Submitter, Vote, VoteIn, VoterSet,
};
use kith_proto::codec::encode;
use kith_proto::{ChannelId, DeviceId, SecretKey, ServerName, SignaturePublicKey};
use serde_json::{Value, json};
use tls_codec::{TlsSerializeBytes, TlsSize, VLBytes};

const PATH: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../../test-vectors/ordering.json"
);

fn channel() -> ChannelId {
    ChannelId::from_bytes(*b"kith test chan 1")
}

const EPOCH: u64 = 41;
const COMMIT: &[u8] = b"an encoded MLS commit";

fn voters() -> Vec<(ServerName, SecretKey)> {
    ["a.example", "b.example:8448", "c.example"]
        .iter()
        .enumerate()
        .map(|(i, name)| {
            (
                name.parse().unwrap(),
                SecretKey::from_seed([i as u8 + 1; 32]),
            )
        })
        .collect()
}

fn voter_set() -> VoterSet {
    VoterSet::new(voters().into_iter().map(|(s, k)| (s, vec![k.public()])))
}

fn vote(i: usize, hash: CommitHash) -> Vote {
    let (server, key) = &voters()[i];
    Vote::sign(key, server.clone(), channel(), EPOCH, hash)
}

#[derive(TlsSize, TlsSerializeBytes)]
struct RawVoteSig {
    server: ServerName,
    server_key: SignaturePublicKey,
    signature: VLBytes,
}

#[derive(TlsSize, TlsSerializeBytes)]
struct RawCert {
    version: u16,
    channel: ChannelId,
    epoch: u64,
    commit_hash: [u8; 32],
    votes: Vec<RawVoteSig>,
}

fn raw_cert(votes: &[Vote]) -> Vec<u8> {
    raw_cert_for(CommitHash::of(COMMIT), votes)
}

fn raw_cert_for(hash: CommitHash, votes: &[Vote]) -> Vec<u8> {
    encode(&RawCert {
        version: 0,
        channel: channel(),
        epoch: EPOCH,
        commit_hash: *hash.as_bytes(),
        votes: votes
            .iter()
            .map(|v| RawVoteSig {
                server: v.server().clone(),
                server_key: v.server_key().clone(),
                signature: VLBytes::new(v.signature().to_vec()),
            })
            .collect(),
    })
}

fn category(e: &CertificateError) -> &'static str {
    match e {
        CertificateError::TooFewVotes { .. } => "too-few-votes",
        CertificateError::NotAVoter(_) => "not-a-voter",
        CertificateError::DuplicateVoter(_) => "duplicate-voter",
        CertificateError::NotSorted(_) => "not-sorted",
        CertificateError::KeyNotAccepted(_) => "key-not-accepted",
        CertificateError::BadSignature { .. } => "bad-signature",
        CertificateError::MismatchedHash { .. } => "mismatched-hash",
        CertificateError::WrongChannel { .. } => "wrong-channel",
        CertificateError::WrongEpoch { .. } => "wrong-epoch",
        CertificateError::Decode(_) => "malformed",
        CertificateError::MismatchedVote { .. } => "mismatched-vote",
    }
}

fn outcome_json(o: &Outcome) -> Value {
    match o {
        Outcome::Accepted { epoch, commit_hash } => {
            json!({"accepted": {"epoch": epoch, "commit_hash": commit_hash.to_string()}})
        }
        Outcome::WrongEpoch { current, winner } => json!({"wrong_epoch": {
            "current": current,
            "winner": winner.as_ref().map(|w| w.commit_hash.to_string()),
        }}),
        Outcome::Rejected { reason } => json!({"rejected": reason}),
    }
}

fn log_entries() -> Vec<(u64, &'static str)> {
    vec![
        (0, "commit A"),
        (0, "commit B"),  // loses epoch 0 to A
        (0, "commit A"),  // A again: idempotent
        (2, "commit C"),  // future epoch
        (1, "invalid D"), // the validator refuses it
        (1, "commit C"),
        (0, "commit E"),
    ]
}

fn apply_log() -> Vec<Outcome> {
    let mut order = ChannelOrder::new(channel(), 0);
    let mut validator = |s: &Submission| {
        if s.commit.starts_with(b"invalid") {
            Err("invalid commit".to_string())
        } else {
            Ok(())
        }
    };
    log_entries()
        .into_iter()
        .map(|(epoch, commit)| {
            let s = Submission {
                channel: channel(),
                epoch,
                commit: commit.as_bytes().to_vec(),
                welcome: None,
                group_info: vec![],
                ratchet_tree: None,
                submitter: Submitter {
                    server: "a.example".parse().unwrap(),
                    device: DeviceId::from_bytes([0; 32]),
                },
                records: Vec::new(),
            };
            order.apply(s, &mut validator)
        })
        .collect()
}

fn generate() -> Value {
    let hash = CommitHash::of(COMMIT);
    let set = voter_set();
    let votes: Vec<Vote> = (0..3).map(|i| vote(i, hash)).collect();
    let cert = OrderingCertificate::assemble(
        channel(),
        EPOCH,
        hash,
        [votes[2].clone(), votes[0].clone()],
        &set,
    )
    .unwrap();
    let stranger = SecretKey::from_seed([9; 32]);
    let forged = Vote::sign(&stranger, voters()[1].0.clone(), channel(), EPOCH, hash);
    let outsider = Vote::sign(
        &stranger,
        "d.example".parse().unwrap(),
        channel(),
        EPOCH,
        hash,
    );
    let mut bad_sig = raw_cert(&votes[..2]);
    *bad_sig.last_mut().unwrap() ^= 1;
    let other = vote(1, CommitHash::of(b"another commit"));
    let mut swapped = raw_cert(&votes[..2]);
    let at = swapped.len() - 64;
    swapped[at..].copy_from_slice(other.signature());

    let invalid: Vec<(&str, Vec<u8>)> = vec![
        ("one vote of three", raw_cert(&votes[..1])),
        (
            "vote from a server that is not a voter",
            raw_cert(&[votes[0].clone(), outsider]),
        ),
        (
            "the same voter twice",
            raw_cert(&[votes[0].clone(), votes[0].clone()]),
        ),
        (
            "votes out of order",
            raw_cert(&[votes[1].clone(), votes[0].clone()]),
        ),
        (
            "vote signed with a key not accepted for its server",
            raw_cert(&[votes[0].clone(), forged]),
        ),
        ("a flipped signature bit", bad_sig),
        ("a signature over another commit", swapped),
        (
            "a valid certificate for another commit",
            raw_cert_for(
                other.commit_hash(),
                &[vote(0, other.commit_hash()), other.clone()],
            ),
        ),
    ];
    let invalid: Vec<Value> = invalid
        .into_iter()
        .map(|(what, bytes)| {
            let err = OrderingCertificateIn::decode(&bytes)
                .unwrap()
                .verify_for(channel(), EPOCH, COMMIT, &set)
                .unwrap_err();
            json!({"description": what, "certificate": hex::encode(bytes), "error": category(&err)})
        })
        .collect();

    json!({
        "description": "Kith v0 ordering objects. Keys are Ed25519 seeds; bytes are lowercase hex. commit_hash = SHA-256(SignContent-style RefHashInput{\"kith-v0 MessageId\", commit}). Every 'invalid' certificate must be rejected, when checked for (channel, epoch, commit) against the voters, with the named error. 'log' applies each submission in order to a fresh channel at epoch 0 whose validator refuses commits starting with 'invalid'.",
        "channel": channel().to_string(),
        "epoch": EPOCH,
        "commit": hex::encode(COMMIT),
        "commit_hash": hash.to_string(),
        "voters": voters().iter().map(|(s, k)| json!({
            "server": s.as_str(),
            "seed": hex::encode(k.to_seed()),
            "public_key": hex::encode(encode(&k.public())),
        })).collect::<Vec<_>>(),
        "votes": votes.iter().map(|v| hex::encode(v.encode())).collect::<Vec<_>>(),
        "certificate": hex::encode(cert.encode()),
        "invalid_certificates": invalid,
        "log": log_entries().iter().zip(apply_log()).map(|((epoch, commit), outcome)| json!({
            "epoch": epoch,
            "commit": hex::encode(commit.as_bytes()),
            "outcome": outcome_json(&outcome),
        })).collect::<Vec<_>>(),
    })
}

#[test]
fn vectors_match_the_code() {
    let generated = generate();
    if std::env::var_os("KITH_WRITE_VECTORS").is_some() {
        let text = serde_json::to_string_pretty(&generated).unwrap() + "\n";
        std::fs::write(PATH, text).unwrap();
    }
    let text = std::fs::read_to_string(PATH).expect("test-vectors/ordering.json is missing");
    let stored: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(
        stored, generated,
        "encoding or apply rule changed: the vectors no longer match the code"
    );
}

/// Checks the stored file the way another implementation would.
#[test]
fn stored_vectors_verify() {
    let text = std::fs::read_to_string(PATH).unwrap();
    let v: Value = serde_json::from_str(&text).unwrap();
    let bytes = |v: &Value| hex::decode(v.as_str().unwrap()).unwrap();
    let commit = bytes(&v["commit"]);
    assert_eq!(
        CommitHash::of(&commit).to_string(),
        v["commit_hash"].as_str().unwrap()
    );
    let set = voter_set();
    for vote in v["votes"].as_array().unwrap() {
        let vote = VoteIn::decode(&bytes(vote)).unwrap().verify().unwrap();
        assert!(set.accepts(vote.server(), vote.server_key()));
    }
    let cert = OrderingCertificateIn::decode(&bytes(&v["certificate"]))
        .unwrap()
        .verify_for(channel(), EPOCH, &commit, &set)
        .unwrap();
    assert_eq!(cert.votes().len(), 2);
    for bad in v["invalid_certificates"].as_array().unwrap() {
        let err = OrderingCertificateIn::decode(&bytes(&bad["certificate"]))
            .map_err(CertificateError::from)
            .and_then(|c| c.verify_for(channel(), EPOCH, &commit, &set))
            .unwrap_err();
        assert_eq!(
            category(&err),
            bad["error"].as_str().unwrap(),
            "{}",
            bad["description"]
        );
    }
}
