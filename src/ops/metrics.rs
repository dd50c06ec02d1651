//! Metric names and the Prometheus recorder.
//!
//! Names follow Prometheus conventions (`_total` counters, base units) and every label has a
//! small fixed set of values: organization and user ids never become labels, so the number
//! of series stays bounded however many tenants there are.

use metrics::{describe_counter, describe_gauge, describe_histogram};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONNECTIONS: &str = "fanout_connections";
pub const CONNECTIONS_TOTAL: &str = "fanout_connections_total";
pub const AUTH_FAILURES: &str = "fanout_auth_failures_total";
pub const PUBLISHED: &str = "fanout_messages_published_total";
pub const DELIVERED: &str = "fanout_messages_delivered_total";
pub const DROPPED: &str = "fanout_messages_dropped_total";
pub const LATENCY: &str = "fanout_delivery_latency_seconds";
pub const REDIS_SUBSCRIPTIONS: &str = "fanout_redis_subscriptions";
pub const REDIS_UP: &str = "fanout_redis_up";
pub const REDIS_RECONNECTS: &str = "fanout_redis_reconnects_total";
pub const BUS_PROBE_FAILURES: &str = "fanout_bus_probe_failures_total";
pub const BUS_PROBE_RTT: &str = "fanout_bus_probe_rtt_seconds";
pub const BUS_MISSED: &str = "fanout_bus_missed_total";
pub const BUS_DUPLICATES: &str = "fanout_bus_duplicates_total";
pub const MALFORMED: &str = "fanout_malformed_messages_total";
pub const SLOW_CONSUMERS: &str = "fanout_slow_consumer_disconnects_total";
pub const HTTP_REQUESTS: &str = "fanout_http_requests_total";
pub const READY: &str = "fanout_ready";
pub const STORE_UP: &str = "fanout_store_up";
pub const DURABLE_EVENTS: &str = "fanout_durable_events_total";
pub const COMMIT_BATCH: &str = "fanout_commit_batch_size";
pub const COMMIT_DURATION: &str = "fanout_commit_duration_seconds";
pub const UNPUBLISHED: &str = "fanout_durable_unpublished_total";
pub const GAP_FILLS: &str = "fanout_gap_fills_total";
pub const REPLAYS: &str = "fanout_replays_total";
pub const REPLAYED_EVENTS: &str = "fanout_replayed_events_total";
pub const REPLAYS_WAITING: &str = "fanout_replays_waiting";
pub const RESYNCS: &str = "fanout_resyncs_total";
pub const RETENTION_DELETED: &str = "fanout_events_deleted_total";
pub const PUBLIC_CONNECTIONS: &str = "fanout_public_connections";
pub const PUBLIC_CONNECTIONS_LIMIT: &str = "fanout_public_connections_limit";
pub const PENDING_SESSIONS: &str = "fanout_pending_sessions";
pub const CONNECTIONS_REFUSED: &str = "fanout_connections_refused_total";
pub const INGEST_RATE_LIMITED: &str = "fanout_ingest_rate_limited_total";
pub const INGEST_FORBIDDEN: &str = "fanout_ingest_forbidden_total";
pub const INGEST_KEY_USED: &str = "fanout_ingest_key_requests_total";
pub const INGEST_KEYS: &str = "fanout_ingest_keys";
pub const INGEST_KEYS_RELOADS: &str = "fanout_ingest_keys_reloads_total";
pub const INGEST_KEYS_FILE_STALE: &str = "fanout_ingest_keys_file_stale";
pub const REST_RATE_LIMITED: &str = "fanout_rest_rate_limited_total";
pub const AUTH_PREVIOUS_SECRET: &str = "fanout_auth_previous_secret_total";
pub const JWKS_REFRESHES: &str = "fanout_jwks_refreshes_total";
pub const JWKS_KEYS: &str = "fanout_jwks_keys";
pub const JWKS_LOADED_AT: &str = "fanout_jwks_loaded_timestamp_seconds";
pub const ACCEPT_ERRORS: &str = "fanout_accept_errors_total";
pub const TASK_FAILURES: &str = "fanout_task_failures_total";
pub const RUNTIME_TASKS: &str = "fanout_runtime_tasks";

/// Why the metrics recorder could not be installed.
#[derive(Debug, thiserror::Error)]
#[error("cannot install the metrics recorder: {0}")]
pub struct InstallError(#[from] metrics_exporter_prometheus::BuildError);

/// Installs the process-wide recorder. Call once, before any metric is touched.
pub fn install() -> Result<PrometheusHandle, InstallError> {
    let handle = PrometheusBuilder::new()
        .set_buckets_for_metric(
            Matcher::Full(LATENCY.into()),
            &[
                0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
            ],
        )
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(COMMIT_DURATION.into()),
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
                ],
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(BUS_PROBE_RTT.into()),
                &[
                    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                ],
            )
        })
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(COMMIT_BATCH.into()),
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0],
            )
        })
        .and_then(|b| b.install_recorder())?;
    describe();
    Ok(handle)
}

fn describe() {
    describe_gauge!(
        CONNECTIONS,
        "Authenticated Socket.IO connections held by this replica."
    );
    describe_counter!(
        CONNECTIONS_TOTAL,
        "Socket.IO connection attempts, by result (accepted, rejected)."
    );
    describe_counter!(
        AUTH_FAILURES,
        "Rejected tokens and ended sessions, by reason."
    );
    describe_counter!(
        PUBLISHED,
        "Messages accepted for publishing, by source (http: ingest API; redis: direct PUBLISH, counted by each replica that receives it)."
    );
    describe_counter!(
        DELIVERED,
        "Messages handed to sockets (one per socket per message)."
    );
    describe_counter!(DROPPED, "Deliveries that could not be made, by reason.");
    describe_histogram!(
        LATENCY,
        metrics::Unit::Seconds,
        "From the publish time (`ts`) to the hand-off to sockets."
    );
    describe_gauge!(
        REDIS_SUBSCRIPTIONS,
        "Organization channels this replica is subscribed to."
    );
    describe_gauge!(
        REDIS_UP,
        "1 while the Redis subscriber connection is up, else 0."
    );
    describe_counter!(
        REDIS_RECONNECTS,
        "Times the Redis subscriber connection was re-established."
    );
    describe_counter!(
        BUS_PROBE_FAILURES,
        "Liveness probes of a bus subscription connection that failed, by reason (lost: sent but not received in time, and the connection was re-made; not_subscribed: the server had no subscriber for it; publish: it could not be sent)."
    );
    describe_histogram!(
        BUS_PROBE_RTT,
        metrics::Unit::Seconds,
        "Round trip of a liveness probe: PUBLISH by this replica to its arrival on its own subscription connection."
    );
    describe_counter!(
        BUS_MISSED,
        "Ephemeral messages published by a replica (this one or another) for an organization this replica held throughout, that never arrived on its subscription: a gap in the publisher's numbering."
    );
    describe_counter!(
        BUS_DUPLICATES,
        "Ephemeral messages that arrived on this replica's subscriptions a second time (a publish the Redis client retried across a failover): dropped, not delivered again."
    );
    describe_counter!(MALFORMED, "Bus messages dropped as malformed, by reason.");
    describe_counter!(
        SLOW_CONSUMERS,
        "Sockets disconnected because their send buffer overflowed."
    );
    describe_counter!(
        HTTP_REQUESTS,
        "HTTP requests (internal listener and REST API), by route and status code."
    );
    describe_gauge!(
        READY,
        "1 while /readyz answers 200, else 0 (Redis subscriber down, public connection limit reached, or shutting down)."
    );
    describe_gauge!(
        STORE_UP,
        "1 while PostgreSQL answers and the schema is current, else 0 (only with DATABASE_URL)."
    );
    describe_counter!(
        DURABLE_EVENTS,
        "Events committed to the history (each with its sequence number)."
    );
    describe_histogram!(COMMIT_BATCH, "Events per group-commit transaction.");
    describe_histogram!(
        COMMIT_DURATION,
        metrics::Unit::Seconds,
        "Duration of one group-commit transaction, from BEGIN to COMMIT."
    );
    describe_counter!(
        UNPUBLISHED,
        "Committed events whose publish to the bus failed; replicas deliver them from the history instead."
    );
    describe_counter!(
        GAP_FILLS,
        "Durable events a replica read back from the history because the bus had not delivered them (reordering, lost publishes, bus outages)."
    );
    describe_counter!(
        REPLAYS,
        "Reconnecting clients whose missed events were replayed."
    );
    describe_counter!(
        REPLAYED_EVENTS,
        "Durable events sent to reconnecting clients by replay."
    );
    describe_counter!(RESYNCS, "resync-required sent to clients, by reason.");
    describe_counter!(RETENTION_DELETED, "Durable events deleted by retention.");
    describe_gauge!(
        PUBLIC_CONNECTIONS,
        "Open TCP connections on the public listener (FANOUT_MAX_CONNECTIONS caps them)."
    );
    describe_gauge!(
        PUBLIC_CONNECTIONS_LIMIT,
        "The cap on public connections (FANOUT_MAX_CONNECTIONS, or the open-file limit less a reserve)."
    );
    describe_gauge!(
        PENDING_SESSIONS,
        "Engine.IO sessions opened and not yet authenticated (FANOUT_MAX_PENDING_SESSIONS caps them)."
    );
    describe_counter!(
        AUTH_PREVIOUS_SECRET,
        "Tokens accepted because they were signed with JWT_SECRET_PREVIOUS: when it stays at zero for longer than tokens live, the previous secret can go."
    );
    describe_counter!(
        JWKS_REFRESHES,
        "Fetches of JWT_JWKS_URL, by trigger (schedule: the first and every JWT_JWKS_REFRESH; unknown_kid: a token named a key the set lacks) and result (ok; error: the set in force stays; skipped: an unknown kid within JWT_JWKS_MIN_REFRESH of the last fetch)."
    );
    describe_gauge!(JWKS_KEYS, "Keys of JWT_JWKS_URL in force.");
    describe_gauge!(
        JWKS_LOADED_AT,
        "When the JWKS keys in force were fetched (Unix seconds): time() minus it is their age while fetches fail."
    );
    describe_gauge!(
        REPLAYS_WAITING,
        "Replay reads waiting for one of the FANOUT_REPLAY_CONCURRENCY slots (or their organization's share of them): a reconnect storm in progress."
    );
    describe_counter!(
        REST_RATE_LIMITED,
        "REST requests answered 429 because their user was over FANOUT_REST_RATE_PER_USER."
    );
    describe_counter!(
        INGEST_RATE_LIMITED,
        "Ingest requests answered 429 because their key was over FANOUT_INGEST_RATE, by key (its name in FANOUT_INGEST_KEYS_FILE or its position in FANOUT_INGEST_KEYS, never the key)."
    );
    describe_counter!(
        INGEST_FORBIDDEN,
        "Ingest requests answered 403 because their key's scope (FANOUT_INGEST_KEYS_FILE) does not cover the message's organization, by key name."
    );
    describe_counter!(
        INGEST_KEY_USED,
        "Ingest requests that presented a valid key, by key name: which keys are still in use before one is retired."
    );
    describe_gauge!(
        INGEST_KEYS,
        "Ingest keys in force (FANOUT_INGEST_KEYS and FANOUT_INGEST_KEYS_FILE)."
    );
    describe_counter!(
        INGEST_KEYS_RELOADS,
        "Changes of FANOUT_INGEST_KEYS_FILE read while running, by result (ok: in force; error: refused, the previous keys stay)."
    );
    describe_gauge!(
        INGEST_KEYS_FILE_STALE,
        "1 while FANOUT_INGEST_KEYS_FILE holds a version that could not be loaded (the previous keys are in force), else 0."
    );
    describe_counter!(
        CONNECTIONS_REFUSED,
        "Connections and handshakes refused or closed by a limit, by reason (max_connections, max_pending, header_timeout, host_rate: handshakes over FANOUT_HANDSHAKE_RATE_PER_HOST; packet_rate: clients closed for sending over FANOUT_MAX_PACKETS_PER_SECOND; user_limit, org_limit: authenticated sockets over FANOUT_MAX_CONNECTIONS_PER_USER or _PER_ORG)."
    );
    describe_counter!(
        TASK_FAILURES,
        "Tasks that panicked or ended unexpectedly, by task (each is then restarted, or the replica exits)."
    );
    describe_gauge!(
        RUNTIME_TASKS,
        "Tasks alive in the tokio runtime, sampled at each scrape: it follows the connections; a count that climbs while they are flat is a task leak."
    );
    describe_counter!(
        ACCEPT_ERRORS,
        "Failed accept() calls on either listener (out of file descriptors, most likely)."
    );
}
