//! Every Prometheus metric the server exports, declared in one place and
//! rendered in the text exposition format at `GET /metrics`.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::time::Duration;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabels {
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ViolationLabels {
    /// `unplanned_event`, `invalid_event` or `omitted_property`.
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsentLabels {
    pub destination: String,
    pub category: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DeliveryLabels {
    pub destination: String,
    /// `delivered`, `failed` (every failed attempt), `retrying` or `dead`.
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DestinationLabels {
    pub destination: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StageLabels {
    /// `resolve`, `audience` or `outbox`.
    pub stage: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs to about 6.5 s.
    Histogram::new(exponential_buckets(0.0001, 2.0, 17))
}

/// How long an event or item took to get somewhere: 1 ms to about 5 s,
/// each bucket half as wide again as the last, fine enough to read a p99
/// from.
fn pipeline_age_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.001, 1.5, 22))
}

fn commit_size_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 4.0, 9))
}

/// The server's metrics; cheap to clone (one shared handle, since the
/// state every request clones holds it).
#[derive(Clone)]
pub struct Metrics(std::sync::Arc<MetricHandles>);

impl std::ops::Deref for Metrics {
    type Target = MetricHandles;

    fn deref(&self) -> &MetricHandles {
        &self.0
    }
}

/// Every metric the server keeps, registered in one registry.
pub struct MetricHandles {
    registry: Registry,
    pub http_requests: Family<RequestLabels, Counter>,
    pub http_request_duration: HistogramFamily<RouteLabels>,
    pub ingest_events: Family<OutcomeLabels, Counter>,
    pub log_commits: Counter,
    pub log_commit_events: Histogram,
    pub log_commit_duration: Histogram,
    pub log_commit_failures: Counter,
    pub log_queue_depth: Gauge,
    pub log_head: Gauge,
    pub resolver_position: Gauge,
    pub resolver_lag_events: Gauge,
    /// 1 while this node holds the resolver's stage lease, else 0.
    pub resolver_lease_held: Gauge,
    pub resolver_batch_duration: Histogram,
    /// Time to write one resolver batch's transaction (on the commit thread).
    pub resolver_commit_duration: Histogram,
    pub resolver_profiles: Gauge,
    pub resolver_unusable_events: Counter,
    pub resolver_cache_hits: Counter,
    pub resolver_cache_misses: Counter,
    pub resolver_cached_profiles: Gauge,
    pub resolver_record_profiles: Gauge,
    pub resolver_record_bytes: Gauge,
    pub audience_lag_events: Gauge,
    pub audience_membership_changes: Counter,
    pub computed_trait_writes: Counter,
    /// Items per destination by what became of their attempt.
    pub destination_items: Family<DeliveryLabels, Counter>,
    /// Items per destination waiting in its outbox (new or retrying).
    pub destination_lag_items: Family<DestinationLabels, Gauge>,
    /// How long the next item of each destination has waited, in seconds.
    pub destination_lag_seconds: Family<DestinationLabels, Gauge>,
    pub outbox_lag_events: Gauge,
    /// Per stage: each event's age (since the tracking API received it)
    /// when the stage's commit that applied it was durable.
    pub stage_event_age: HistogramFamily<StageLabels>,
    /// Per destination: how long each delivered item waited in the outbox,
    /// from its enqueue to the receiver's acceptance.
    pub destination_delivery_wait: HistogramFamily<DestinationLabels>,
    /// Messages the drain stage appended from the event stream into the log.
    pub drain_messages: Counter,
    /// Drained events the log already held (the 24-hour or permanent dedup).
    pub drain_duplicates: Counter,
    /// Drain commits (one transaction each).
    pub drain_commits: Counter,
    /// Drain commits that failed or were refused as stale.
    pub drain_commit_failures: Counter,
    /// The last stream sequence the drain stage committed.
    pub drain_sequence: Gauge,
    /// Stream messages not drained yet, as of the last fetch.
    pub drain_lag_messages: Gauge,
    /// 1 while this node holds the drain stage's lease, else 0.
    pub drain_lease_held: Gauge,
    /// Events published to the stream that got JetStream's acknowledgement.
    pub stream_published: Counter,
    /// Publishes to the stream that failed or got no acknowledgement.
    pub stream_publish_failures: Counter,
    /// Tracking-plan violations found at ingestion, by kind.
    pub plan_violations: Family<ViolationLabels, Counter>,
    /// Events and audience changes not delivered for want of consent.
    pub consent_withheld: Family<ConsentLabels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("tandem");
        let http_requests = Family::<RequestLabels, Counter>::default();
        registry.register("http_requests", "HTTP requests by route and status", http_requests.clone());
        let http_request_duration: HistogramFamily<RouteLabels> = Family::new_with_constructor(latency_histogram);
        registry.register(
            "http_request_duration_seconds",
            "Time from request to response, including the durable commit",
            http_request_duration.clone(),
        );
        let ingest_events = Family::<OutcomeLabels, Counter>::default();
        registry.register(
            "ingest_events",
            "Tracked messages by outcome: stored, duplicate or rejected",
            ingest_events.clone(),
        );
        let log_commits = Counter::default();
        registry.register("log_commits", "Group commits to the event log", log_commits.clone());
        let log_commit_events = commit_size_histogram();
        registry.register("log_commit_events", "Events per group commit", log_commit_events.clone());
        let log_commit_duration = latency_histogram();
        registry.register(
            "log_commit_duration_seconds",
            "Time to write and fsync one group commit",
            log_commit_duration.clone(),
        );
        let log_commit_failures = Counter::default();
        registry.register("log_commit_failures", "Group commits that failed", log_commit_failures.clone());
        let log_queue_depth = Gauge::default();
        registry.register("log_queue_depth", "Requests waiting for the log writer", log_queue_depth.clone());
        let log_head = Gauge::default();
        registry.register("log_head", "Position of the newest committed event", log_head.clone());
        let resolver_position = Gauge::default();
        registry.register("resolver_position", "Last log position the resolver committed", resolver_position.clone());
        let resolver_lag_events = Gauge::default();
        registry.register(
            "resolver_lag_events",
            "Events in the log the resolver has not committed yet",
            resolver_lag_events.clone(),
        );
        let resolver_lease_held = Gauge::default();
        registry.register(
            "resolver_lease_held",
            "1 while this node holds the resolver's stage lease and runs the resolver, else 0",
            resolver_lease_held.clone(),
        );
        let resolver_batch_duration = latency_histogram();
        registry.register(
            "resolver_batch_duration_seconds",
            "Time to resolve one batch of events (before its commit)",
            resolver_batch_duration.clone(),
        );
        let resolver_commit_duration = latency_histogram();
        registry.register(
            "resolver_commit_duration_seconds",
            "Time to write one resolver batch to storage (while the next batch is resolved)",
            resolver_commit_duration.clone(),
        );
        let resolver_profiles = Gauge::default();
        registry.register("resolver_profiles", "Live profiles in the identity graph", resolver_profiles.clone());
        let resolver_unusable_events = Counter::default();
        registry.register(
            "resolver_unusable_events",
            "Events the resolver could not use (kept in the unresolved list, never silently skipped)",
            resolver_unusable_events.clone(),
        );
        let resolver_cache_hits = Counter::default();
        registry.register(
            "resolver_cache_hits",
            "Identifiers the resolver found in memory with their profile (in its graph or as a compact record)",
            resolver_cache_hits.clone(),
        );
        let resolver_cache_misses = Counter::default();
        registry.register(
            "resolver_cache_misses",
            "Identifiers the resolver did not find in memory: new ones, and ones read from storage unless memory holds every stored profile",
            resolver_cache_misses.clone(),
        );
        let resolver_cached_profiles = Gauge::default();
        registry.register(
            "resolver_cached_profiles",
            "Profiles the resolver holds in memory (bounded by its cache size)",
            resolver_cached_profiles.clone(),
        );
        let resolver_record_profiles = Gauge::default();
        registry.register(
            "resolver_record_profiles",
            "Profiles the resolver keeps as compact records beside its graph (bounded by its record cache)",
            resolver_record_profiles.clone(),
        );
        let resolver_record_bytes = Gauge::default();
        registry.register(
            "resolver_record_bytes",
            "Memory the resolver's compact records and their index take, about",
            resolver_record_bytes.clone(),
        );
        let audience_lag_events = Gauge::default();
        registry.register(
            "audience_lag_events",
            "Events the resolver committed that the audience stage has not applied yet",
            audience_lag_events.clone(),
        );
        let audience_membership_changes = Counter::default();
        registry.register(
            "audience_membership_changes",
            "Profiles that entered or left an audience (by event, by timer, by backfill or merge)",
            audience_membership_changes.clone(),
        );
        let computed_trait_writes = Counter::default();
        registry.register(
            "computed_trait_writes",
            "Computed-trait states or values the audience stage stored or removed (by event, timer, backfill or merge)",
            computed_trait_writes.clone(),
        );
        let destination_items = Family::<DeliveryLabels, Counter>::default();
        registry.register(
            "destination_items",
            "Outbox items per destination: delivered, failed (each failed attempt), kept for a retry, or moved to the dead letters",
            destination_items.clone(),
        );
        let destination_lag_items = Family::<DestinationLabels, Gauge>::default();
        registry.register(
            "destination_lag_items",
            "Items waiting in each destination's outbox, new or retrying",
            destination_lag_items.clone(),
        );
        let destination_lag_seconds = Family::<DestinationLabels, Gauge>::default();
        registry.register(
            "destination_lag_seconds",
            "How long the next item of each destination's outbox has waited since it was enqueued (0 when empty)",
            destination_lag_seconds.clone(),
        );
        let outbox_lag_events = Gauge::default();
        registry.register(
            "outbox_lag_events",
            "Events the resolver committed that the outbox stage has not enqueued yet",
            outbox_lag_events.clone(),
        );
        let stage_event_age: HistogramFamily<StageLabels> = Family::new_with_constructor(pipeline_age_histogram);
        registry.register(
            "stage_event_age_seconds",
            "Age of each event (since the tracking API received it) when a stage's commit that applied it was durable: resolve, audience, outbox",
            stage_event_age.clone(),
        );
        let destination_delivery_wait: HistogramFamily<DestinationLabels> =
            Family::new_with_constructor(pipeline_age_histogram);
        registry.register(
            "destination_delivery_wait_seconds",
            "Time each delivered item spent in its destination's outbox, from enqueue to the receiver's acceptance",
            destination_delivery_wait.clone(),
        );
        let drain_messages = Counter::default();
        registry.register(
            "drain_messages",
            "Stream messages the drain stage appended into the log (events and refusals)",
            drain_messages.clone(),
        );
        let drain_duplicates = Counter::default();
        registry.register(
            "drain_duplicates",
            "Drained events the log already held within the dedup window (or for good)",
            drain_duplicates.clone(),
        );
        let drain_commits = Counter::default();
        registry.register("drain_commits", "Drain transactions committed", drain_commits.clone());
        let drain_commit_failures = Counter::default();
        registry.register(
            "drain_commit_failures",
            "Drain transactions that failed or were refused because another node had drained further",
            drain_commit_failures.clone(),
        );
        let drain_sequence = Gauge::default();
        registry.register("drain_sequence", "Last stream sequence the drain stage committed", drain_sequence.clone());
        let drain_lag_messages = Gauge::default();
        registry.register(
            "drain_lag_messages",
            "Stream messages the drain stage has not committed yet (stream last sequence minus drained sequence)",
            drain_lag_messages.clone(),
        );
        let drain_lease_held = Gauge::default();
        registry.register(
            "drain_lease_held",
            "1 while this node holds the drain stage's lease and drains the stream, else 0",
            drain_lease_held.clone(),
        );
        let stream_published = Counter::default();
        registry.register(
            "stream_published",
            "Messages published to the event stream and acknowledged by JetStream",
            stream_published.clone(),
        );
        let stream_publish_failures = Counter::default();
        registry.register(
            "stream_publish_failures",
            "Messages whose publish to the event stream failed or was not acknowledged",
            stream_publish_failures.clone(),
        );
        let plan_violations = Family::<ViolationLabels, Counter>::default();
        registry.register(
            "plan_violations",
            "Tracking-plan violations found at ingestion: unplanned events, schema failures, omitted properties",
            plan_violations.clone(),
        );
        let consent_withheld = Family::<ConsentLabels, Counter>::default();
        registry.register(
            "consent_withheld",
            "Events and audience changes withheld from a destination because a consent category was not granted",
            consent_withheld.clone(),
        );
        Metrics(std::sync::Arc::new(MetricHandles {
            drain_messages,
            drain_duplicates,
            drain_commits,
            drain_commit_failures,
            drain_sequence,
            drain_lag_messages,
            drain_lease_held,
            stream_published,
            stream_publish_failures,
            consent_withheld,
            plan_violations,
            computed_trait_writes,
            registry,
            destination_items,
            destination_lag_items,
            destination_lag_seconds,
            outbox_lag_events,
            stage_event_age,
            destination_delivery_wait,
            audience_lag_events,
            audience_membership_changes,
            resolver_cache_hits,
            resolver_cache_misses,
            resolver_cached_profiles,
            resolver_record_profiles,
            resolver_record_bytes,
            log_head,
            resolver_position,
            resolver_lag_events,
            resolver_lease_held,
            resolver_batch_duration,
            resolver_commit_duration,
            resolver_profiles,
            resolver_unusable_events,
            http_requests,
            http_request_duration,
            ingest_events,
            log_commits,
            log_commit_events,
            log_commit_duration,
            log_commit_failures,
            log_queue_depth,
        }))
    }

    pub fn observe_request(&self, route: &'static str, status: u16, elapsed: Duration) {
        self.http_requests.get_or_create(&RequestLabels { route, status }).inc();
        self.http_request_duration.get_or_create(&RouteLabels { route }).observe(elapsed.as_secs_f64());
    }

    /// Counts deliveries withheld from `destination` for want of `category`.
    pub fn count_consent_withheld(&self, destination: &str, category: &str, count: u64) {
        if count > 0 {
            self.consent_withheld
                .get_or_create(&ConsentLabels { destination: destination.to_owned(), category: category.to_owned() })
                .inc_by(count);
        }
    }

    /// Counts one tracking-plan violation of this kind.
    pub fn count_plan_violation(&self, kind: &'static str) {
        self.plan_violations.get_or_create(&ViolationLabels { kind }).inc();
    }

    pub fn count_events(&self, outcome: &'static str, count: u64) {
        if count > 0 {
            self.ingest_events.get_or_create(&OutcomeLabels { outcome }).inc_by(count);
        }
    }

    /// Counts `count` items of `destination` with this outcome.
    pub fn count_destination_items(&self, destination: &str, outcome: &'static str, count: u64) {
        if count > 0 {
            self.destination_items
                .get_or_create(&DeliveryLabels { destination: destination.to_owned(), outcome })
                .inc_by(count);
        }
    }

    /// Records the age, at `now_ms`, of events received at `received_at_ms`
    /// that `stage` has just committed.
    pub fn observe_event_ages(&self, stage: &'static str, now_ms: i64, received_at_ms: impl IntoIterator<Item = i64>) {
        let histogram = self.stage_event_age.get_or_create(&StageLabels { stage });
        for received in received_at_ms {
            histogram.observe(now_ms.saturating_sub(received).max(0) as f64 / 1_000.0);
        }
    }

    /// Records how long items enqueued at `enqueued_at_ms` waited until
    /// `destination` accepted them at `now_ms`.
    pub fn observe_delivery_waits(
        &self,
        destination: &str,
        now_ms: i64,
        enqueued_at_ms: impl IntoIterator<Item = i64>,
    ) {
        let histogram =
            self.destination_delivery_wait.get_or_create(&DestinationLabels { destination: destination.to_owned() });
        for enqueued in enqueued_at_ms {
            histogram.observe(now_ms.saturating_sub(enqueued).max(0) as f64 / 1_000.0);
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut text = String::new();
        prometheus_client::encoding::text::encode(&mut text, &self.registry).expect("writing to a String cannot fail");
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_counters_and_histograms_in_text_format() {
        let metrics = Metrics::new();
        metrics.observe_request("/v1/batch", 200, Duration::from_millis(3));
        metrics.count_events("stored", 100);
        let text = metrics.render();
        assert!(text.contains("tandem_http_requests_total{route=\"/v1/batch\",status=\"200\"} 1"), "{text}");
        assert!(text.contains("tandem_ingest_events_total{outcome=\"stored\"} 100"), "{text}");
        assert!(
            text.contains("tandem_http_request_duration_seconds_bucket{le=\"0.0032\",route=\"/v1/batch\"} 0")
                || text.contains("tandem_http_request_duration_seconds_count{route=\"/v1/batch\"} 1"),
            "{text}"
        );
        assert!(text.ends_with("# EOF\n"));
    }
}
