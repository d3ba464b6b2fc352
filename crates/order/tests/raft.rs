//! The ordering machine under openraft: one node, three in-process nodes,
//! and a leader lost. No timing assertions: every wait is bounded and only
//! fails the test when it runs out.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing
)]

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use kith_order::raft::{MemLogStore, OrderStateMachine, Router, SqliteLogStore, TypeConfig};
use kith_order::{
    AcceptAll, ChannelOrder, ChannelOrderer, CommitHash, OrderConfig, OrderError, Outcome,
    Submission, Submitter, Winner,
};
use kith_proto::{ChannelId, DeviceId, ServerName};

fn channel() -> ChannelId {
    ChannelId::from_bytes([0xc4; 16])
}

fn server(i: usize) -> ServerName {
    format!("s{i}.test").parse().unwrap()
}

fn submission(epoch: u64, commit: &str) -> Submission {
    Submission {
        channel: channel(),
        epoch,
        commit: commit.as_bytes().to_vec(),
        welcome: Some(b"welcome".to_vec()),
        group_info: b"group info".to_vec(),
        ratchet_tree: None,
        submitter: Submitter {
            server: server(0),
            device: DeviceId::from_bytes([1; 32]),
        },
        records: Vec::new(),
    }
}

/// Fast timers so that failover in tests takes well under a second; the
/// tests never assert on time.
fn fast() -> OrderConfig {
    OrderConfig {
        heartbeat_ms: 50,
        election_timeout_min_ms: 200,
        election_timeout_max_ms: 400,
    }
}

#[tokio::test]
async fn single_node_orders() {
    let refuse_bad = |s: &Submission| {
        if s.commit.starts_with(b"bad") {
            Err("commit does not validate".to_string())
        } else {
            Ok(())
        }
    };
    let orderer = ChannelOrderer::start_single(&fast(), server(0), channel(), 0, refuse_bad)
        .await
        .unwrap();
    assert!(orderer.is_leader());

    let a = submission(0, "commit a");
    let accepted = Outcome::Accepted {
        epoch: 0,
        commit_hash: CommitHash::of(b"commit a"),
    };
    assert_eq!(orderer.submit(a.clone()).await, Ok(accepted.clone()));
    // The same commit again: same answer, nothing changes.
    assert_eq!(orderer.submit(a).await, Ok(accepted));
    // A rival for the same epoch loses and learns the winner.
    assert_eq!(
        orderer.submit(submission(0, "commit b")).await,
        Ok(Outcome::WrongEpoch {
            current: 1,
            winner: Some(Winner {
                epoch: 0,
                commit_hash: CommitHash::of(b"commit a"),
                commit: b"commit a".to_vec(),
            }),
        })
    );
    assert_eq!(
        orderer.submit(submission(1, "bad commit")).await,
        Ok(Outcome::Rejected {
            reason: "commit does not validate".into()
        })
    );
    assert!(matches!(
        orderer.submit(submission(1, "commit c")).await,
        Ok(Outcome::Accepted { epoch: 1, .. })
    ));
    let order = orderer.order().await;
    assert_eq!(order.current_epoch(), 2);
    assert_eq!(order.accepted_commits().len(), 2);
    assert_eq!(
        order.accepted(0).unwrap().submission.welcome.as_deref(),
        Some(&b"welcome"[..])
    );
    orderer.shutdown().await.unwrap();
}

type Node = Arc<ChannelOrderer<AcceptAll>>;

async fn cluster(router: &Router, n: usize) -> Vec<Node> {
    let mut nodes = Vec::new();
    for i in 0..n {
        let orderer = ChannelOrderer::start(
            &fast(),
            server(i),
            ChannelOrder::new(channel(), 0),
            AcceptAll,
            MemLogStore::new(),
            router.network(channel()),
        )
        .await
        .unwrap();
        router.register(channel(), orderer.node_id(), orderer.raft().clone());
        nodes.push(Arc::new(orderer));
    }
    nodes[0].initialize((0..n).map(server)).await.unwrap();
    nodes
}

/// Submits through whichever live node is leader, retrying (boundedly)
/// while there is none.
async fn submit(nodes: &[Node], s: Submission) -> Outcome {
    for attempt in 0..400 {
        let target = nodes
            .iter()
            .find(|n| n.is_leader())
            .unwrap_or(&nodes[attempt % nodes.len()]);
        match tokio::time::timeout(Duration::from_secs(5), target.submit(s.clone())).await {
            Ok(Ok(outcome)) => return outcome,
            Ok(Err(OrderError::NotLeader { .. } | OrderError::Raft(_))) | Err(_) => {}
            Ok(Err(e)) => panic!("{e}"),
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no leader accepted the submission");
}

/// Waits until every node has applied everything in the most advanced log.
async fn settle(nodes: &[Node]) {
    let last = nodes
        .iter()
        .filter_map(|n| n.last_log_index())
        .max()
        .unwrap();
    for n in nodes {
        n.wait_applied(last, Duration::from_secs(20)).await.unwrap();
    }
}

fn check_one_winner_per_epoch(results: &[(Submission, Outcome)]) -> BTreeMap<u64, CommitHash> {
    let mut winners = BTreeMap::new();
    for (s, outcome) in results {
        if let Outcome::Accepted { epoch, commit_hash } = outcome {
            assert_eq!(*epoch, s.epoch);
            let first = *winners.entry(*epoch).or_insert(*commit_hash);
            assert_eq!(first, *commit_hash, "two winners for epoch {epoch}");
        }
    }
    for (s, outcome) in results {
        match outcome {
            Outcome::Accepted { .. } => {}
            Outcome::WrongEpoch {
                winner: Some(w), ..
            } => assert_eq!(Some(&w.commit_hash), winners.get(&s.epoch)),
            // Submitted for an epoch the channel had not reached yet.
            Outcome::WrongEpoch {
                current,
                winner: None,
            } => assert!(s.epoch > *current, "{s:?} lost without a winner"),
            other => panic!("unexpected {other:?} for {s:?}"),
        }
    }
    winners
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_agree_and_survive_losing_the_leader() {
    let router = Router::new();
    let nodes = cluster(&router, 3).await;

    // Three servers race for each of epochs 0, 1 and 2.
    let mut tasks = Vec::new();
    for epoch in 0..3u64 {
        for rival in 0..3 {
            let nodes = nodes.clone();
            let s = submission(epoch, &format!("epoch {epoch} rival {rival}"));
            tasks.push(tokio::spawn(async move {
                let outcome = submit(&nodes, s.clone()).await;
                (s, outcome)
            }));
        }
    }
    let mut results = Vec::new();
    for t in tasks {
        results.push(t.await.unwrap());
    }
    let winners = check_one_winner_per_epoch(&results);
    // Epoch 0 always has a winner; later epochs only if a rival for them
    // arrived after the previous epoch was won.
    assert!(winners.contains_key(&0));
    assert_eq!(
        winners.keys().copied().collect::<Vec<_>>(),
        (0..winners.len() as u64).collect::<Vec<_>>()
    );

    // Finish the epochs that nobody won in the race, one by one.
    let mut epoch = winners.len() as u64;
    while epoch < 3 {
        let outcome = submit(&nodes, submission(epoch, &format!("late {epoch}"))).await;
        assert!(matches!(outcome, Outcome::Accepted { .. }), "{outcome:?}");
        epoch += 1;
    }

    settle(&nodes).await;
    let state = nodes[0].order().await;
    assert_eq!(state.current_epoch(), 3);
    for n in &nodes[1..] {
        assert_eq!(n.order().await, state, "node {} disagrees", n.server());
    }

    // Lose the leader: the other two elect a new one and keep ordering.
    let leader = nodes.iter().position(|n| n.is_leader()).unwrap_or(0);
    let lost = nodes[leader].clone();
    router.unregister(channel(), lost.node_id());
    lost.shutdown().await.unwrap();
    let survivors: Vec<Node> = nodes
        .iter()
        .filter(|n| n.node_id() != lost.node_id())
        .cloned()
        .collect();

    let rivals = [
        submission(3, "after failover a"),
        submission(3, "after failover b"),
    ];
    let mut results = Vec::new();
    for s in rivals {
        let outcome = submit(&survivors, s.clone()).await;
        results.push((s, outcome));
    }
    let winners = check_one_winner_per_epoch(&results);
    assert_eq!(winners.len(), 1);
    assert!(matches!(results[0].1, Outcome::Accepted { epoch: 3, .. }));
    assert!(matches!(
        results[1].1,
        Outcome::WrongEpoch { current: 4, .. }
    ));

    settle(&survivors).await;
    let state = survivors[0].order().await;
    assert_eq!(state.current_epoch(), 4);
    assert_eq!(survivors[1].order().await, state);
    for n in &survivors {
        n.shutdown().await.unwrap();
    }
}

/// openraft's own conformance suite for log stores and state machines.
#[test]
fn openraft_storage_suite() {
    struct Builder;
    impl openraft::testing::StoreBuilder<TypeConfig, MemLogStore, OrderStateMachine<AcceptAll>>
        for Builder
    {
        async fn build(
            &self,
        ) -> Result<((), MemLogStore, OrderStateMachine<AcceptAll>), openraft::StorageError<u64>>
        {
            Ok((
                (),
                MemLogStore::new(),
                OrderStateMachine::new(ChannelOrder::new(channel(), 0), AcceptAll),
            ))
        }
    }
    openraft::testing::Suite::test_all(Builder).unwrap();
}

/// The same suite over the SQLite log store.
#[test]
fn openraft_storage_suite_sqlite() {
    struct Builder;
    impl openraft::testing::StoreBuilder<TypeConfig, SqliteLogStore, OrderStateMachine<AcceptAll>>
        for Builder
    {
        async fn build(
            &self,
        ) -> Result<((), SqliteLogStore, OrderStateMachine<AcceptAll>), openraft::StorageError<u64>>
        {
            Ok((
                (),
                SqliteLogStore::open_in_memory(channel()).unwrap(),
                OrderStateMachine::new(ChannelOrder::new(channel(), 0), AcceptAll),
            ))
        }
    }
    openraft::testing::Suite::test_all(Builder).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sqlite_log_survives_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("order.sqlite");
    let start = || async {
        ChannelOrderer::start_single_with(
            &fast(),
            server(0),
            ChannelOrder::new(channel(), 0),
            AcceptAll,
            SqliteLogStore::open(&path, channel()).unwrap(),
            Router::new().network(channel()),
        )
        .await
        .unwrap()
    };

    let orderer = start().await;
    for (epoch, commit) in ["first", "second"].iter().enumerate() {
        let outcome = orderer.submit(submission(epoch as u64, commit)).await;
        assert!(
            matches!(outcome, Ok(Outcome::Accepted { .. })),
            "{outcome:?}"
        );
    }
    let before = orderer.order().await;
    orderer.shutdown().await.unwrap();
    drop(orderer);

    // A new process: the state machine is rebuilt from the log on disk.
    let orderer = start().await;
    let last = orderer.last_log_index().unwrap();
    orderer
        .wait_applied(last, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(orderer.order().await, before);
    assert!(matches!(
        orderer.submit(submission(1, "rival")).await,
        Ok(Outcome::WrongEpoch {
            current: 2,
            winner: Some(_)
        })
    ));
    assert!(matches!(
        orderer.submit(submission(2, "third")).await,
        Ok(Outcome::Accepted { epoch: 2, .. })
    ));
    orderer.shutdown().await.unwrap();
}

async fn start_node(router: &Router, i: usize) -> Node {
    let orderer = ChannelOrderer::start(
        &fast(),
        server(i),
        ChannelOrder::new(channel(), 0),
        AcceptAll,
        MemLogStore::new(),
        router.network(channel()),
    )
    .await
    .unwrap();
    router.register(channel(), orderer.node_id(), orderer.raft().clone());
    Arc::new(orderer)
}

async fn on_leader(nodes: &[Node]) -> Node {
    for _ in 0..400 {
        if let Some(n) = nodes.iter().find(|n| n.is_leader()) {
            return n.clone();
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    panic!("no leader");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn membership_follows_the_ordering_group() {
    let router = Router::new();
    let mut nodes = cluster(&router, 3).await;
    let outcome = submit(&nodes, submission(0, "before")).await;
    assert!(matches!(outcome, Outcome::Accepted { epoch: 0, .. }));

    // s3 joins the ordering group and s2 leaves: s3 catches up as a
    // learner, then becomes a voter; s4 follows as a learner.
    nodes.push(start_node(&router, 3).await);
    nodes.push(start_node(&router, 4).await);
    let voters = [0, 1, 3].map(server).into_iter().collect();
    let learners = [server(4)].into_iter().collect();
    on_leader(&nodes[..3])
        .await
        .set_members(&voters, &learners)
        .await
        .unwrap();

    let members: Vec<Node> = [0, 1, 3, 4].iter().map(|i| nodes[*i].clone()).collect();
    let outcome = submit(&members[..3], submission(1, "after")).await;
    assert!(matches!(outcome, Outcome::Accepted { epoch: 1, .. }));
    settle(&members).await;
    let state = members[0].order().await;
    assert_eq!(state.current_epoch(), 2);
    for n in &members[1..] {
        assert_eq!(n.order().await, state, "{} disagrees", n.server());
    }
    let config = members[0]
        .raft()
        .metrics()
        .borrow()
        .membership_config
        .clone();
    let voter_ids: Vec<u64> = config.voter_ids().collect();
    let mut expected: Vec<u64> = [0, 1, 3].iter().map(|i| nodes[*i].node_id()).collect();
    expected.sort_unstable();
    assert_eq!(voter_ids, expected);
    assert_eq!(
        config.nodes().count(),
        4,
        "s2 is removed, s4 stays a learner"
    );
    for n in &nodes {
        n.shutdown().await.unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_single_server_group_grows() {
    let router = Router::new();
    let alone = ChannelOrderer::start_single_with(
        &fast(),
        server(0),
        ChannelOrder::new(channel(), 0),
        AcceptAll,
        MemLogStore::new(),
        router.network(channel()),
    )
    .await
    .unwrap();
    router.register(channel(), alone.node_id(), alone.raft().clone());
    let alone = Arc::new(alone);
    let outcome = alone.submit(submission(0, "alone")).await;
    assert!(matches!(outcome, Ok(Outcome::Accepted { epoch: 0, .. })));

    // A member from s1 joins: s1 becomes a second voter.
    let joined = start_node(&router, 1).await;
    let voters = [0, 1].map(server).into_iter().collect();
    alone
        .set_members(&voters, &Default::default())
        .await
        .unwrap();
    let nodes = [alone, joined];
    let outcome = submit(&nodes, submission(1, "together")).await;
    assert!(matches!(outcome, Outcome::Accepted { epoch: 1, .. }));
    settle(&nodes).await;
    assert_eq!(nodes[0].order().await, nodes[1].order().await);
    assert_eq!(nodes[1].order().await.current_epoch(), 2);
    for n in &nodes {
        n.shutdown().await.unwrap();
    }
}

/// A validator whose storage is down for its first `outages` calls: it
/// cannot decide, and says so through `take_failure`.
struct Flaky {
    outages: usize,
    failure: Option<String>,
}

impl kith_order::CommitValidator for Flaky {
    fn validate(&mut self, _: &Submission) -> Result<(), String> {
        if self.outages > 0 {
            self.outages -= 1;
            self.failure = Some("storage unavailable".into());
            return Err("storage unavailable".into());
        }
        Ok(())
    }

    fn take_failure(&mut self) -> Option<String> {
        self.failure.take()
    }
}

#[tokio::test]
async fn a_validator_that_cannot_decide_stops_the_node_instead_of_rejecting() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("order.sqlite");
    let start = |outages| {
        let path = path.clone();
        async move {
            ChannelOrderer::start_single_with(
                &fast(),
                server(0),
                ChannelOrder::new(channel(), 0),
                Flaky {
                    outages,
                    failure: None,
                },
                SqliteLogStore::open(&path, channel()).unwrap(),
                Router::new().network(channel()),
            )
            .await
            .unwrap()
        }
    };
    let orderer = start(1).await;
    // No outcome is recorded for the entry: the node stops.
    let outcome = orderer.submit(submission(0, "first")).await;
    assert!(
        matches!(outcome, Err(OrderError::Stopped(_))),
        "a storage failure became a verdict: {outcome:?}"
    );
    let _ = orderer.shutdown().await;
    drop(orderer);

    // Restarted with its storage back, the node applies the same entry
    // again and accepts it, as every other server would have.
    let orderer = start(0).await;
    let last = orderer.last_log_index().unwrap();
    orderer
        .wait_applied(last, Duration::from_secs(20))
        .await
        .unwrap();
    assert_eq!(orderer.order().await.current_epoch(), 1);
    orderer.shutdown().await.unwrap();
}
