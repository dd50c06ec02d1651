//! Wires the parts into a running replica and runs it until shutdown.
//!
//! Start-up binds both listeners before serving anything, so a taken port fails fast.
//! Shutdown (SIGTERM/SIGINT): `/readyz` turns 503, the public listener stops accepting,
//! every Socket.IO transport is closed (clients reconnect through the load balancer to
//! another replica), and the internal listener stays up until the end so the drain can
//! be watched; all within `FANOUT_SHUTDOWN_TIMEOUT`.

use std::sync::Arc;
use std::time::Duration;

use axum::http::{HeaderValue, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Json};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use socketioxide::SocketIo;
use tokio::net::TcpListener;
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::admin::{self, AdminState};
use crate::api::{self, ApiState};
use crate::auth::Verifier;
use crate::bus::{Bus, ClusterSettings, RedisSettings, RedisTarget};
use crate::config::{BusBackend, Config, CorsOrigins};
use crate::dashboard;
use crate::delivery::{Delivery, ReplayLimits};
use crate::demo;
use crate::gateway::{self, Expiry, Gateway, Handshakes, TrustedProxies};
use crate::ingest::durable::Writer;
use crate::ingest::keys::Keys;
use crate::ingest::{self, IngestState};
use crate::openapi;
use crate::ops;
use crate::ops::shutdown::Shutdown;
use crate::presence::Presence;
use crate::rates::Budgets;
use crate::store::{Store, retention};
use crate::tasks::{Policy, Tasks};
use crate::transport::serve::{self, Internal};
use crate::transport::{self, Listener, Transports};

/// Why a replica could not start, or stopped.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("cannot listen on {setting}={addr}: {source}")]
    Bind {
        setting: &'static str,
        addr: std::net::SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error(transparent)]
    Bus(#[from] crate::bus::BusSetupError),
    #[error(transparent)]
    Key(#[from] crate::auth::KeyError),
    #[error("FANOUT_INGEST_KEYS_FILE: {0}")]
    IngestKeys(#[from] crate::ingest::keys::KeysError),
    #[error("task {0} failed (see the log above); the replica stopped")]
    TaskFailed(&'static str),
}

/// Runs a replica until `shutdown` is triggered (the binary triggers it on SIGTERM/SIGINT),
/// or a task it cannot do without fails, then drains it.
pub async fn run(
    config: Config,
    metrics: PrometheusHandle,
    shutdown: Shutdown,
) -> Result<(), StartError> {
    let listeners = bind(&config).await?;
    let tasks = Tasks::new(shutdown.clone());
    let replica = build(&config, metrics, &tasks)?;
    let serving = replica.serve(listeners, &config, &tasks);
    let fatal = tokio::select! {
        _ = shutdown.wait() => None,
        task = tasks.fatal() => {
            shutdown.trigger();
            Some(task)
        }
    };
    replica.drain(&config, &tasks, serving).await;
    match fatal {
        Some(task) => Err(StartError::TaskFailed(task)),
        None => Ok(()),
    }
}

/// Both listeners, bound before anything is served: a taken port fails fast.
struct Listeners {
    public: TcpListener,
    internal: TcpListener,
}

async fn bind(config: &Config) -> Result<Listeners, StartError> {
    let public = bind_with_backlog(config.listeners.public).map_err(|source| StartError::Bind {
        setting: "FANOUT_LISTEN",
        addr: config.listeners.public,
        source,
    })?;
    let internal = TcpListener::bind(config.listeners.internal)
        .await
        .map_err(|source| StartError::Bind {
            setting: "FANOUT_INTERNAL_LISTEN",
            addr: config.listeners.internal,
            source,
        })?;
    Ok(Listeners { public, internal })
}

/// A replica's parts, wired, before it serves.
struct Replica {
    io: SocketIo,
    presence: Arc<Presence>,
    transports: Transports,
    public_app: axum::Router,
    internal_app: axum::Router,
}

/// Builds every part and starts their tasks. The store connects and migrates in the
/// background (then retention runs there too), so a replica starting while PostgreSQL is
/// down still serves fan-out.
fn build(config: &Config, metrics: PrometheusHandle, tasks: &Tasks) -> Result<Replica, StartError> {
    let descriptor_limit = transport::raise_descriptor_limit();
    let max_connections = config
        .limits
        .max_connections
        .unwrap_or_else(|| transport::default_max_connections(descriptor_limit));
    // The largest Engine.IO payload, advertised to clients as `maxPayload`. Also the size of
    // one long-polling response, so it must fit the largest message we accept with its
    // Socket.IO framing; and the most a client may send in one request or WebSocket
    // message (or frame), before authentication or after: a bigger one closes the
    // connection before it is buffered.
    let max_payload = (2 * config.limits.max_payload_bytes + 4096).max(100_000);
    let (sio_layer, io) = SocketIo::builder()
        .ping_interval(config.engine.ping_interval)
        .ping_timeout(config.engine.ping_timeout)
        .max_buffer_size(config.engine.socket_buffer)
        // Every connection keeps its read buffer. Clients send pongs and the odd
        // auth-refresh (a token: a few hundred bytes); a bigger frame grows it while read.
        .ws_read_buffer_size(512)
        .max_payload(max_payload as u64)
        .ws_max_message_size(max_payload)
        .ws_max_frame_size(max_payload)
        .connect_timeout(config.limits.handshake_timeout)
        .build_layer();
    let presence = Arc::new(Presence::new());
    let transports = Transports::new(max_connections);
    let store = match &config.store.database {
        Some(db) => {
            let store = Store::start(db, tasks)?;
            retention::start(store.clone(), config.store.event_retention, tasks);
            Some(store)
        }
        None => None,
    };
    let mut delivery = Delivery::new(io.clone(), presence.clone(), transports.clone());
    if let Some(store) = &store {
        delivery = delivery.with_history(
            store.clone(),
            ReplayLimits {
                max_events: config.store.replay_max,
                concurrency: config.store.replay_concurrency,
            },
            tasks,
        );
    }
    let delivery = Arc::new(delivery);
    let redis = |target| {
        let settings = RedisSettings {
            target,
            prefix: config.bus.redis_prefix.clone(),
            max_payload_bytes: config.limits.max_payload_bytes,
            probe_interval: config.bus.probe_interval,
        };
        Bus::redis(settings, presence.clone(), delivery.clone(), tasks)
    };
    let bus = Arc::new(match &config.bus.backend {
        BusBackend::Redis { url } => redis(RedisTarget::Url(url.clone()))?,
        BusBackend::Sentinel { sentinels, master } => redis(RedisTarget::Sentinel {
            sentinels: sentinels.clone(),
            master: master.clone(),
        })?,
        BusBackend::Cluster { seeds } => Bus::cluster(
            ClusterSettings {
                seeds: seeds.clone(),
                prefix: config.bus.redis_prefix.clone(),
                max_payload_bytes: config.limits.max_payload_bytes,
                probe_interval: config.bus.probe_interval,
            },
            presence.clone(),
            delivery.clone(),
            tasks,
        )?,
        BusBackend::Memory => Bus::memory(delivery.clone()),
    });
    let writer = store
        .as_ref()
        .map(|store| Writer::start(store.clone(), bus.clone(), tasks));
    let verifier = Arc::new(Verifier::new(config.auth.jwt.verifier_config())?);
    let jwks = verifier.jwks().cloned();
    if let Some(jwks) = &jwks {
        // Restarted if it fails: the keys in force stay meanwhile.
        let jwks = jwks.clone();
        tasks.spawn("jwks-refresh", Policy::Restart, move |shutdown| {
            jwks.clone().run(shutdown)
        });
    }
    Arc::new(Gateway {
        verifier: verifier.clone(),
        leeway_ms: config.auth.jwt.leeway_seconds * 1000,
        bus: bus.clone(),
        delivery: delivery.clone(),
        presence: presence.clone(),
        caps: config.limits.caps,
        expiry: Expiry::start(io.clone(), transports.clone(), tasks),
        transports: transports.clone(),
        tasks: tasks.clone(),
    })
    .attach(&io);
    // Restarted if it fails: it keeps no state.
    tasks.spawn("memory-trim", Policy::Restart, ops::memory::run);

    let mut public_app = api::router(ApiState::new(
        verifier,
        store.clone(),
        config.limits.rest_rate_per_user,
    ));
    if config.listeners.dashboard {
        public_app = public_app.merge(dashboard::router());
    }
    let public_app = public_app
        .fallback(not_found)
        .layer(sio_layer)
        .layer(cors(&config.listeners.cors_origins))
        .layer(middleware::from_fn_with_state(
            Handshakes::new(transports.clone(), config.limits.max_pending_sessions)
                .per_host(
                    config.limits.handshake_rate_per_host,
                    TrustedProxies(config.limits.trusted_proxies.clone()),
                )
                .packets_per_second(config.limits.max_packets_per_second),
            gateway::middleware,
        ));
    let keys = Arc::new(Keys::new(
        config.auth.ingest_keys.clone(),
        config.auth.ingest_keys_file.clone(),
    )?);
    if keys.has_file() {
        // Restarted if it fails: it rereads the file; the set in force stays meanwhile.
        let keys = keys.clone();
        tasks.spawn("ingest-keys-reload", Policy::Restart, move |shutdown| {
            keys.clone().watch(shutdown)
        });
    }
    let rates = config
        .limits
        .ingest_rate
        .map(|rate| Arc::new(Budgets::new(rate)));
    let internal_app = ingest::router(IngestState {
        bus: bus.clone(),
        keys,
        rates,
        max_payload_bytes: config.limits.max_payload_bytes,
        writer,
    })
    .merge(admin::router(AdminState {
        store,
        jwks,
        bus,
        transports: transports.clone(),
        tasks: tasks.clone(),
        metrics,
    }))
    .merge(openapi::router())
    .fallback(not_found)
    .layer(middleware::from_fn(ops::count_requests));

    if let Some(dev) = config.auth.dev_mode.as_ref().filter(|d| d.demo) {
        demo::start(config.listeners.internal, dev.ingest_key.clone(), tasks);
    }

    tracing::info!(
        public = %config.listeners.public,
        internal = %config.listeners.internal,
        bus = config.bus.backend.name(),
        store = if config.store.database.is_some() { "postgres" } else { "none" },
        max_connections,
        descriptor_limit,
        "fanout is listening"
    );
    Ok(Replica {
        io,
        presence,
        transports,
        public_app,
        internal_app,
    })
}

/// The listeners being served: when the public one is done, and how to stop the internal
/// one.
struct Serving {
    public_done: tokio::sync::oneshot::Receiver<()>,
    internal_stop: Shutdown,
}

impl Replica {
    /// Serves both listeners. The public one stops on the shutdown signal; the internal
    /// one at the very end of the drain, so the drain can be watched (`/readyz`,
    /// `/metrics`) and ingest keeps working meanwhile. Both are fatal if they end
    /// otherwise.
    fn serve(&self, listeners: Listeners, config: &Config, tasks: &Tasks) -> Serving {
        let timeout = config.limits.header_read_timeout;
        let internal_stop = Shutdown::new();
        let mut internal = Some((listeners.internal, self.internal_app.clone()));
        let stop = internal_stop.clone();
        tasks.spawn("internal-listener", Policy::Fatal, move |_| {
            let (tcp, app) = internal.take().expect("a fatal task starts once");
            serve::serve(Internal(tcp), app, timeout, stop.clone())
        });
        let (done, public_done) = tokio::sync::oneshot::channel();
        let mut public = Some((
            Listener::new(listeners.public, self.transports.clone()),
            self.public_app.clone(),
            done,
        ));
        tasks.spawn("public-listener", Policy::Fatal, move |shutdown| {
            let (listener, app, done) = public.take().expect("a fatal task starts once");
            async move {
                serve::serve(listener, app, timeout, shutdown).await;
                let _ = done.send(());
            }
        });
        Serving {
            public_done,
            internal_stop,
        }
    }

    /// After the shutdown signal: closes every Socket.IO transport (clients reconnect
    /// through the load balancer to another replica) and waits for the public listener's
    /// last requests, then stops the internal listener and waits for every task, all within
    /// `FANOUT_SHUTDOWN_TIMEOUT`.
    async fn drain(self, config: &Config, tasks: &Tasks, serving: Serving) {
        tracing::info!(
            connections = self.presence.total_sockets(),
            timeout = ?config.shutdown_timeout,
            "shutting down: not ready, closing every connection"
        );
        let deadline = tokio::time::Instant::now() + config.shutdown_timeout;
        let public = async {
            self.io.close().await;
            let _ = serving.public_done.await;
        };
        if tokio::time::timeout_at(deadline, public).await.is_err() {
            tracing::warn!(
                "FANOUT_SHUTDOWN_TIMEOUT reached with connections still open; exiting anyway"
            );
        }
        serving.internal_stop.trigger();
        drop(self);
        let left = deadline
            .saturating_duration_since(tokio::time::Instant::now())
            .max(Duration::from_millis(200));
        if !tasks.wait(left).await {
            tracing::warn!(
                running = tasks.running(),
                "tasks still running at the end of the shutdown; exiting anyway"
            );
        }
        tracing::info!("shutdown complete");
    }
}

/// Connection attempts the kernel queues while the replica is busy accepting. tokio's
/// default (128) overflows when a replica restarts and thousands of clients reconnect at
/// once: dropped SYNs are retried only after a second. The kernel caps it at somaxconn.
const PUBLIC_BACKLOG: u32 = 4096;

fn bind_with_backlog(addr: std::net::SocketAddr) -> std::io::Result<TcpListener> {
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(PUBLIC_BACKLOG)
}

fn cors(origins: &CorsOrigins) -> CorsLayer {
    // Preflights allow GET only: the REST API is read-only, and Socket.IO's polling POSTs
    // are simple requests (text/plain), which browsers send without a preflight.
    let layer = CorsLayer::new()
        .allow_methods([axum::http::Method::GET])
        .allow_headers([
            axum::http::header::CONTENT_TYPE,
            axum::http::header::AUTHORIZATION,
        ]);
    match origins {
        CorsOrigins::Any => layer.allow_origin(AllowOrigin::any()),
        CorsOrigins::List(list) => layer
            .allow_origin(AllowOrigin::list(
                list.iter().filter_map(|o| HeaderValue::from_str(o).ok()),
            ))
            .allow_credentials(true),
    }
}

async fn not_found() -> impl IntoResponse {
    (StatusCode::NOT_FOUND, Json(json!({"error": "not found"})))
}
