//! Prometheus metrics, served at `GET /metrics` in the text format.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// Labels of `kith_http_requests_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RequestLabels {
    pub(crate) method: String,
    pub(crate) status: String,
}

/// Labels of `kith_raft_requests_sent_total`.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct RaftRequestLabels {
    /// `append`, `vote`, `snapshot`, `quiet` or `wake`.
    pub(crate) kind: &'static str,
}

/// The server's metrics.
pub(crate) struct Metrics {
    registry: Registry,
    pub(crate) requests: Family<RequestLabels, Counter>,
    pub(crate) registered_devices: Gauge,
    pub(crate) inbox_deposits: Counter,
    pub(crate) event_streams: Gauge,
    pub(crate) event_stream_handed: Counter,
    pub(crate) event_stream_reads: Counter,
    pub(crate) storage_seconds: Histogram,
    pub(crate) commits_accepted: Counter,
    pub(crate) commits_rejected: Counter,
    pub(crate) channel_messages: Counter,
    pub(crate) raft_requests_sent: Family<RaftRequestLabels, Counter>,
    pub(crate) raft_groups_quiet: Gauge,
    pub(crate) raft_groups_leading: Gauge,
    pub(crate) raft_quiesced: Counter,
}

impl Metrics {
    pub(crate) fn new() -> Self {
        let mut registry = Registry::with_prefix("kith");
        let requests = Family::<RequestLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests answered, by method and status",
            requests.clone(),
        );
        let registered_devices = Gauge::default();
        registry.register(
            "registered_devices",
            "Devices registered on this server",
            registered_devices.clone(),
        );
        let inbox_deposits = Counter::default();
        registry.register(
            "inbox_deposits",
            "Envelopes accepted into device inboxes",
            inbox_deposits.clone(),
        );
        let event_streams = Gauge::default();
        registry.register(
            "event_streams_connected",
            "Event-stream WebSockets currently open",
            event_streams.clone(),
        );
        let event_stream_handed = Counter::default();
        registry.register(
            "event_stream_handed",
            "Events event streams sent as the hub handed them, without a store read",
            event_stream_handed.clone(),
        );
        let event_stream_reads = Counter::default();
        registry.register(
            "event_stream_reads",
            "Times an event stream read its device's log from the store",
            event_stream_reads.clone(),
        );
        // 50 µs to about 3.3 s.
        let storage_seconds = Histogram::new(exponential_buckets(0.000_05, 2.0, 17));
        registry.register(
            "storage_seconds",
            "Time taken by storage operations",
            storage_seconds.clone(),
        );
        let commits_accepted = Counter::default();
        registry.register(
            "commits_accepted",
            "Channel commits ordered and certified",
            commits_accepted.clone(),
        );
        let commits_rejected = Counter::default();
        registry.register(
            "commits_rejected",
            "Channel commits refused (invalid, or for a wrong epoch)",
            commits_rejected.clone(),
        );
        let channel_messages = Counter::default();
        registry.register(
            "channel_messages",
            "Channel messages accepted",
            channel_messages.clone(),
        );
        let raft_requests_sent = Family::<RaftRequestLabels, Counter>::default();
        registry.register(
            "raft_requests_sent",
            "Raft requests sent to other servers (RPCs, quiesce and wake), by kind",
            raft_requests_sent.clone(),
        );
        let raft_groups_quiet = Gauge::default();
        registry.register(
            "raft_groups_quiet",
            "Channels' Raft nodes running here with their timers stopped (quiesced)",
            raft_groups_quiet.clone(),
        );
        let raft_groups_leading = Gauge::default();
        registry.register(
            "raft_groups_leading",
            "Channels with peers whose Raft node here is the leader",
            raft_groups_leading.clone(),
        );
        let raft_quiesced = Counter::default();
        registry.register(
            "raft_quiesced",
            "Times this server, as leader, quiesced an idle shared channel",
            raft_quiesced.clone(),
        );
        Self {
            registry,
            raft_requests_sent,
            raft_groups_quiet,
            raft_groups_leading,
            raft_quiesced,
            commits_accepted,
            commits_rejected,
            channel_messages,
            requests,
            registered_devices,
            inbox_deposits,
            event_streams,
            event_stream_handed,
            event_stream_reads,
            storage_seconds,
        }
    }

    /// The text exposition.
    pub(crate) fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry)?;
        Ok(out)
    }
}
