//! Certificates: every way a certificate can be wrong is named.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use kith_order::{
    CertificateError, CommitHash, OrderingCertificate, OrderingCertificateIn, Vote, VoterSet,
};
use kith_proto::codec::encode;
use kith_proto::{ChannelId, DecodeError, SecretKey, ServerName, SignaturePublicKey};
use tls_codec::{TlsSerializeBytes, TlsSize, VLBytes};

fn channel() -> ChannelId {
    ChannelId::from_bytes([5; 16])
}
const COMMIT: &[u8] = b"commit";

struct Voter {
    name: ServerName,
    key: SecretKey,
}

fn voters(n: u8) -> Vec<Voter> {
    (0..n)
        .map(|i| Voter {
            name: format!("s{i}.test").parse().unwrap(),
            key: SecretKey::from_seed([i + 1; 32]),
        })
        .collect()
}

fn set(voters: &[Voter]) -> VoterSet {
    VoterSet::new(
        voters
            .iter()
            .map(|v| (v.name.clone(), vec![v.key.public()])),
    )
}

fn vote(v: &Voter) -> Vote {
    Vote::sign(&v.key, v.name.clone(), channel(), 4, CommitHash::of(COMMIT))
}

// Mirrors of the wire layout, to build certificates the library would never
// emit.
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

fn raw(votes: &[Vote]) -> Vec<u8> {
    encode(&RawCert {
        version: 0,
        channel: channel(),
        epoch: 4,
        commit_hash: *CommitHash::of(COMMIT).as_bytes(),
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

fn check(bytes: &[u8], set: &VoterSet) -> Result<OrderingCertificate, CertificateError> {
    OrderingCertificateIn::decode(bytes)?.verify_for(channel(), 4, COMMIT, set)
}

#[test]
fn majority_certifies_and_round_trips() {
    let vs = voters(5);
    let set = set(&vs);
    // Votes in any order; the certificate sorts them.
    let votes = [vote(&vs[4]), vote(&vs[0]), vote(&vs[2])];
    let cert =
        OrderingCertificate::assemble(channel(), 4, CommitHash::of(COMMIT), votes, &set).unwrap();
    assert_eq!(cert.votes().len(), 3);
    assert_eq!(check(&cert.encode(), &set), Ok(cert.clone()));
    let names: Vec<_> = cert.votes().iter().map(|v| v.server().as_str()).collect();
    assert_eq!(names, ["s0.test", "s2.test", "s4.test"]);
}

#[test]
fn too_few_votes() {
    let vs = voters(4);
    let set = set(&vs);
    let bytes = raw(&[vote(&vs[0]), vote(&vs[1])]);
    assert_eq!(
        check(&bytes, &set),
        Err(CertificateError::TooFewVotes {
            have: 2,
            need: 3,
            voters: 4
        })
    );
    assert!(matches!(
        OrderingCertificate::assemble(channel(), 4, CommitHash::of(COMMIT), [vote(&vs[0])], &set),
        Err(CertificateError::TooFewVotes { .. })
    ));
}

#[test]
fn vote_from_non_voter() {
    let vs = voters(4);
    let set = set(&vs[..3]);
    let bytes = raw(&[vote(&vs[0]), vote(&vs[1]), vote(&vs[3])]);
    assert_eq!(
        check(&bytes, &set),
        Err(CertificateError::NotAVoter(vs[3].name.clone()))
    );
}

#[test]
fn duplicate_voter() {
    let vs = voters(3);
    let set = set(&vs);
    let bytes = raw(&[vote(&vs[0]), vote(&vs[0]), vote(&vs[1])]);
    assert_eq!(
        check(&bytes, &set),
        Err(CertificateError::DuplicateVoter(vs[0].name.clone()))
    );
    // A second accepted key does not make a second voter.
    let other = SecretKey::from_seed([99; 32]);
    let set2 = VoterSet::new([
        (vs[0].name.clone(), vec![vs[0].key.public(), other.public()]),
        (vs[1].name.clone(), vec![vs[1].key.public()]),
        (vs[2].name.clone(), vec![vs[2].key.public()]),
    ]);
    let second = Vote::sign(
        &other,
        vs[0].name.clone(),
        channel(),
        4,
        CommitHash::of(COMMIT),
    );
    assert_eq!(
        check(&raw(&[vote(&vs[0]), second]), &set2),
        Err(CertificateError::DuplicateVoter(vs[0].name.clone()))
    );
}

#[test]
fn unsorted_votes() {
    let vs = voters(3);
    let bytes = raw(&[vote(&vs[1]), vote(&vs[0])]);
    assert_eq!(
        check(&bytes, &set(&vs)),
        Err(CertificateError::NotSorted(vs[0].name.clone()))
    );
}

#[test]
fn key_not_accepted() {
    let vs = voters(3);
    let stranger = SecretKey::from_seed([77; 32]);
    let forged = Vote::sign(
        &stranger,
        vs[1].name.clone(),
        channel(),
        4,
        CommitHash::of(COMMIT),
    );
    assert_eq!(
        check(&raw(&[vote(&vs[0]), forged]), &set(&vs)),
        Err(CertificateError::KeyNotAccepted(vs[1].name.clone()))
    );
}

#[test]
fn bad_signature() {
    let vs = voters(3);
    // A vote for another commit, with its signature moved into this one.
    let other = Vote::sign(
        &vs[1].key,
        vs[1].name.clone(),
        channel(),
        4,
        CommitHash::of(b"x"),
    );
    let mut bytes = raw(&[vote(&vs[0]), vote(&vs[1])]);
    let good = vote(&vs[1]);
    let at = bytes.len() - 64;
    assert_eq!(&bytes[at..], good.signature());
    bytes[at..].copy_from_slice(other.signature());
    assert!(matches!(
        check(&bytes, &set(&vs)),
        Err(CertificateError::BadSignature { server, .. }) if server == vs[1].name
    ));
}

#[test]
fn mismatched_commit_channel_or_epoch() {
    let vs = voters(1);
    let set = set(&vs);
    let bytes = raw(&[vote(&vs[0])]);
    let decode = || OrderingCertificateIn::decode(&bytes).unwrap();
    assert!(matches!(
        decode().verify_for(channel(), 4, b"another commit", &set),
        Err(CertificateError::MismatchedHash { .. })
    ));
    assert!(matches!(
        decode().verify_for(ChannelId::from_bytes([0; 16]), 4, COMMIT, &set),
        Err(CertificateError::WrongChannel { .. })
    ));
    assert!(matches!(
        decode().verify_for(channel(), 5, COMMIT, &set),
        Err(CertificateError::WrongEpoch { .. })
    ));
    // Assembling refuses votes for something else.
    let stray = Vote::sign(
        &vs[0].key,
        vs[0].name.clone(),
        channel(),
        4,
        CommitHash::of(b"x"),
    );
    assert!(matches!(
        OrderingCertificate::assemble(channel(), 4, CommitHash::of(COMMIT), [stray], &set),
        Err(CertificateError::MismatchedHash { .. })
    ));
    let late = Vote::sign(
        &vs[0].key,
        vs[0].name.clone(),
        channel(),
        5,
        CommitHash::of(COMMIT),
    );
    assert!(matches!(
        OrderingCertificate::assemble(channel(), 4, CommitHash::of(COMMIT), [late], &set),
        Err(CertificateError::MismatchedVote { epoch: 5, .. })
    ));
}

#[test]
fn decoding_limits() {
    assert!(matches!(
        OrderingCertificateIn::decode(&vec![0; 100_000]),
        Err(DecodeError::Oversize { .. })
    ));
    let vs = voters(1);
    let mut bytes = raw(&[vote(&vs[0])]);
    bytes.push(0);
    assert!(matches!(
        OrderingCertificateIn::decode(&bytes),
        Err(DecodeError::TrailingBytes { count: 1, .. })
    ));
    assert!(matches!(
        OrderingCertificateIn::decode(&bytes[..bytes.len() - 10]),
        Err(DecodeError::Malformed { .. })
    ));
}

#[test]
fn collector_certifies_at_a_majority() {
    use kith_order::VoteCollector;
    let vs = voters(5);
    let mut collector = VoteCollector::new(channel(), 4, CommitHash::of(COMMIT), set(&vs));
    assert_eq!(collector.add(vote(&vs[3])), Ok(None));
    assert_eq!(
        collector.add(vote(&vs[3])),
        Ok(None),
        "a repeat counts once"
    );
    let stray = Vote::sign(
        &vs[1].key,
        vs[1].name.clone(),
        channel(),
        4,
        CommitHash::of(b"x"),
    );
    assert!(matches!(
        collector.add(stray),
        Err(CertificateError::MismatchedHash { .. })
    ));
    let outsider = Vote::sign(
        &SecretKey::from_seed([50; 32]),
        "z.test".parse().unwrap(),
        channel(),
        4,
        CommitHash::of(COMMIT),
    );
    assert!(matches!(
        collector.add(outsider),
        Err(CertificateError::NotAVoter(_))
    ));
    assert_eq!(collector.add(vote(&vs[0])), Ok(None));
    let cert = collector.add(vote(&vs[4])).unwrap().unwrap();
    assert_eq!(collector.count(), 3);
    assert_eq!(check(&cert.encode(), &set(&vs)), Ok(cert));
    let bigger = collector.add(vote(&vs[1])).unwrap().unwrap();
    assert_eq!(bigger.votes().len(), 4);
}
