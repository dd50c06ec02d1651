//! Command line and environment, validated into a [`Config`].
//!
//! Every setting is a flag with an environment variable as fallback (clap does both). Values
//! are checked here, once, so that an invalid setting stops the program at start with one
//! line naming the setting, instead of failing later in a request. The README's
//! configuration table mirrors [`ServeArgs`]; keep them in step.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use ipnet::IpNet;
use jsonwebtoken::Algorithm;

use crate::auth::jwks::JwksConfig;
use crate::auth::{VerifierConfig, VerifyKey};
use crate::ingest::client::PublishRequest;
use crate::ingest::keys::{KeySet, KeysFile};
use crate::ops::http::Peer;
use crate::presence::Caps;
use crate::protocol::{EventName, OrgId, UserId};

#[derive(Debug, Parser)]
#[command(
    name = "fanout",
    version,
    about = "Realtime Socket.IO fan-out for dashboards, scaled through Redis",
    args_conflicts_with_subcommands = true
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Option<Command>,
    #[command(flatten)]
    pub serve: ServeArgs,
}

// Parsed once at start: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a replica (the default when no command is given).
    Serve(ServeArgs),
    /// Mint a token signed with JWT_SECRET, for testing and demos.
    Token(TokenArgs),
    /// Apply the database schema (replicas also do it at start) and exit.
    Migrate(MigrateArgs),
    /// Publish one event through a replica's ingest API and print its answer.
    Publish(PublishArgs),
    /// Print the OpenAPI 3.1 document of the HTTP APIs (as served at /openapi.json on the
    /// internal listener) and exit.
    Openapi,
}

#[derive(Debug, Clone, Args)]
pub struct JwtArgs {
    /// HMAC secret the backend signs tokens with (HS256 unless JWT_ALGORITHM says otherwise).
    #[arg(long, env = "JWT_SECRET", hide_env_values = true)]
    pub jwt_secret: Option<String>,
    /// The HMAC secret the backend signed with before JWT_SECRET: its tokens stay valid
    /// until they expire (a rotation without a restart of the backend's sessions).
    #[arg(long, env = "JWT_SECRET_PREVIOUS", hide_env_values = true)]
    pub jwt_secret_previous: Option<String>,
    /// Public key for RS*/PS*/ES*/EdDSA tokens: a PEM file path or the PEM text itself.
    #[arg(long, env = "JWT_PUBLIC_KEY", allow_hyphen_values = true)]
    pub jwt_public_key: Option<String>,
    /// A JWKS endpoint whose keys (by `kid`) verify tokens, refreshed while running; instead
    /// of JWT_SECRET or JWT_PUBLIC_KEY.
    #[arg(long, env = "JWT_JWKS_URL")]
    pub jwt_jwks_url: Option<String>,
    /// How often JWT_JWKS_URL is fetched again.
    #[arg(long, env = "JWT_JWKS_REFRESH", default_value = "5m")]
    pub jwt_jwks_refresh: String,
    /// The least time between two fetches caused by tokens naming an unknown `kid`.
    #[arg(long, env = "JWT_JWKS_MIN_REFRESH", default_value = "10s")]
    pub jwt_jwks_min_refresh: String,
    /// The one accepted algorithm. Default HS256 with JWT_SECRET, RS256 with JWT_PUBLIC_KEY
    /// or JWT_JWKS_URL.
    #[arg(long, env = "JWT_ALGORITHM")]
    pub jwt_algorithm: Option<String>,
    /// Required `iss` claim.
    #[arg(long, env = "JWT_ISSUER")]
    pub jwt_issuer: Option<String>,
    /// Required `aud` claim.
    #[arg(long, env = "JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,
    /// Clock skew tolerated on `exp`, in seconds.
    #[arg(
        long,
        env = "JWT_LEEWAY_SECONDS",
        default_value = "0",
        allow_hyphen_values = true
    )]
    pub jwt_leeway_seconds: String,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Public listener: Socket.IO under /socket.io/ only.
    #[arg(long, env = "FANOUT_LISTEN", default_value = "0.0.0.0:3000")]
    pub listen: String,
    /// Internal listener: ingest API, /metrics, /healthz, /readyz.
    #[arg(long, env = "FANOUT_INTERNAL_LISTEN", default_value = "0.0.0.0:3001")]
    pub internal_listen: String,
    /// Redis for fan-out across replicas.
    #[arg(long, env = "REDIS_URL")]
    pub redis_url: Option<String>,
    /// Seed nodes of a Redis Cluster (comma-separated `redis://HOST:PORT`): sharded pub/sub,
    /// `SSUBSCRIBE` at the master of each channel's slot, `SPUBLISH`.
    #[arg(long, env = "REDIS_CLUSTER_URLS")]
    pub redis_cluster_urls: Option<String>,
    /// Redis Sentinels (comma-separated `redis://HOST:PORT`) that say where the master
    /// named REDIS_SENTINEL_MASTER is; publishers and the subscriber follow its failovers.
    #[arg(long, env = "REDIS_SENTINEL_URLS")]
    pub redis_sentinel_urls: Option<String>,
    /// The master's name in the sentinels' configuration (`sentinel monitor <name> ...`).
    #[arg(long, env = "REDIS_SENTINEL_MASTER")]
    pub redis_sentinel_master: Option<String>,
    /// `memory`: the in-process bus, for a single replica (each replica on it delivers only
    /// its own messages). Needed outside dev mode when no Redis is set, so that a mistyped
    /// variable cannot split a fleet silently.
    #[arg(long, env = "FANOUT_BUS")]
    pub bus: Option<String>,
    /// How often each bus subscription connection sends itself a probe message; one that
    /// does not come back within this interval gets the connection torn down and
    /// re-subscribed.
    #[arg(long, env = "FANOUT_BUS_PROBE_INTERVAL", default_value = "5s")]
    pub bus_probe_interval: String,
    /// Prefix of the Redis channels (`{prefix}org:{organizationId}`).
    #[arg(long, env = "FANOUT_REDIS_PREFIX", default_value = "fanout:")]
    pub redis_prefix: String,
    /// PostgreSQL for durable event history; without it, nothing is stored.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    /// Most durable events replayed to one reconnecting client; further behind, it gets
    /// `resync-required` and refetches over REST.
    #[arg(long, env = "FANOUT_REPLAY_MAX", default_value = "1000")]
    pub replay_max: String,
    /// Replay reads from PostgreSQL at once (one organization takes at most half); 0: no
    /// bound.
    #[arg(long, env = "FANOUT_REPLAY_CONCURRENCY", default_value = "4")]
    pub replay_concurrency: String,
    /// Age after which durable events are deleted (e.g. 7d, 12h).
    #[arg(long, env = "FANOUT_EVENT_RETENTION", default_value = "7d")]
    pub event_retention: String,
    #[command(flatten)]
    pub jwt: JwtArgs,
    /// Comma-separated bearer keys accepted by the ingest API (several, for rotation).
    #[arg(long, env = "FANOUT_INGEST_KEYS", hide_env_values = true)]
    pub ingest_keys: Option<String>,
    /// A file of named ingest keys scoped to organizations, one per line: `name key org1,org2`
    /// or `name key *`; re-read when it changes.
    #[arg(long, env = "FANOUT_INGEST_KEYS_FILE")]
    pub ingest_keys_file: Option<PathBuf>,
    /// Origins allowed by CORS: `*` or a comma-separated list of origins.
    #[arg(long, env = "FANOUT_CORS_ORIGINS", default_value = "*")]
    pub cors_origins: String,
    /// Serve the example dashboard under /dashboard/ on the public listener: `1` or `0`.
    /// Default: on in dev mode (no JWT key set), off otherwise.
    #[arg(long, env = "FANOUT_SERVE_DASHBOARD", num_args = 0..=1, default_missing_value = "1")]
    pub serve_dashboard: Option<String>,
    /// Dev mode only: a simulated worker in the process publishes executions to the dev
    /// organization through the ingest API, for the dashboard to show.
    #[arg(long, env = "FANOUT_DEMO", num_args = 0..=1, default_missing_value = "1")]
    pub demo: Option<String>,
    /// Largest accepted ingest body or bus envelope, in bytes.
    #[arg(long, env = "FANOUT_MAX_PAYLOAD_BYTES", default_value = "65536")]
    pub max_payload_bytes: String,
    /// Messages queued for one socket before it counts as a slow consumer and is dropped.
    #[arg(long, env = "FANOUT_SOCKET_BUFFER", default_value = "1024")]
    pub socket_buffer: String,
    /// Time allowed for a graceful shutdown (e.g. 10s, 500ms, 1m).
    #[arg(long, env = "FANOUT_SHUTDOWN_TIMEOUT", default_value = "10s")]
    pub shutdown_timeout: String,
    /// Engine.IO ping interval.
    #[arg(long, env = "FANOUT_PING_INTERVAL", default_value = "25s")]
    pub ping_interval: String,
    /// Engine.IO ping timeout.
    #[arg(long, env = "FANOUT_PING_TIMEOUT", default_value = "20s")]
    pub ping_timeout: String,
    /// Most open connections on the public listener; `auto`: the open-file limit less a
    /// reserve (a tenth of it, 256 to 4096) for the internal listener, Redis and PostgreSQL.
    #[arg(long, env = "FANOUT_MAX_CONNECTIONS", default_value = "auto")]
    pub max_connections: String,
    /// Time a client has to send a request's head (request line and headers), on both
    /// listeners; also how long an idle keep-alive connection stays open.
    #[arg(long, env = "FANOUT_HEADER_READ_TIMEOUT", default_value = "10s")]
    pub header_read_timeout: String,
    /// Most Engine.IO sessions opened and not yet authenticated; beyond, a handshake is
    /// answered 503.
    #[arg(long, env = "FANOUT_MAX_PENDING_SESSIONS", default_value = "4096")]
    pub max_pending_sessions: String,
    /// Time a new session has to send its Socket.IO CONNECT (with its token).
    #[arg(long, env = "FANOUT_HANDSHAKE_TIMEOUT", default_value = "10s")]
    pub handshake_timeout: String,
    /// Most authenticated sockets one user (of one organization) may hold on this
    /// replica; beyond, `auth-error` "Too many connections". 0: no limit.
    #[arg(long, env = "FANOUT_MAX_CONNECTIONS_PER_USER", default_value = "100")]
    pub max_connections_per_user: String,
    /// Most authenticated sockets one organization may hold on this replica; beyond,
    /// `auth-error` "Too many connections". 0: no limit.
    #[arg(long, env = "FANOUT_MAX_CONNECTIONS_PER_ORG", default_value = "0")]
    pub max_connections_per_org: String,
    /// Messages per second each ingest key may publish to this replica (a burst of one
    /// second's worth); beyond, 429 with `Retry-After`. 0: no limit.
    #[arg(long, env = "FANOUT_INGEST_RATE", default_value = "0")]
    pub ingest_rate: String,
    /// New sessions per second one client host may open on this replica (a burst of one
    /// second's worth); beyond, 429 with `Retry-After`. 0: no limit.
    #[arg(long, env = "FANOUT_HANDSHAKE_RATE_PER_HOST", default_value = "0")]
    pub handshake_rate_per_host: String,
    /// REST reads per second one user may make on this replica (a burst of one second's
    /// worth); beyond, 429 with `Retry-After`. 0: no limit.
    #[arg(long, env = "FANOUT_REST_RATE_PER_USER", default_value = "50")]
    pub rest_rate_per_user: String,
    /// Packets per second one client may send on its connection (a burst of one second's
    /// worth); beyond, it is disconnected. 0: no limit.
    #[arg(long, env = "FANOUT_MAX_PACKETS_PER_SECOND", default_value = "100")]
    pub max_packets_per_second: String,
    /// Proxies whose `X-Forwarded-For` names the client host: comma-separated addresses or
    /// CIDR ranges (`10.0.0.0/8`).
    #[arg(long, env = "FANOUT_TRUSTED_PROXIES", default_value = "")]
    pub trusted_proxies: String,
    /// Log format: `text` or `json` (level from RUST_LOG).
    #[arg(long, env = "FANOUT_LOG_FORMAT", default_value = "text")]
    pub log_format: String,
}

#[derive(Debug, Clone, Args)]
pub struct TokenArgs {
    /// organizationId claim.
    #[arg(long)]
    pub org: String,
    /// userId claim.
    #[arg(long)]
    pub user: String,
    /// role claim.
    #[arg(long, default_value = "member")]
    pub role: String,
    /// Lifetime (e.g. 1h, 30m, 90s).
    #[arg(long, default_value = "1h")]
    pub ttl: String,
    #[command(flatten)]
    pub jwt: JwtArgs,
}

#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// PostgreSQL to migrate: postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE.
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
}

#[derive(Debug, Clone, Args)]
pub struct PublishArgs {
    /// The organization whose members receive the event.
    #[arg(long)]
    pub org: String,
    /// The event name, e.g. execution-updated.
    #[arg(long)]
    pub event: String,
    /// The event's data: JSON text, sent as written.
    #[arg(long)]
    pub data: String,
    /// Only this user's sockets (in that organization) receive it.
    #[arg(long)]
    pub user: Option<String>,
    /// The replica's internal listener.
    #[arg(
        long,
        env = "FANOUT_INGEST_URL",
        default_value = "http://127.0.0.1:3001"
    )]
    pub url: String,
    /// The ingest key [default: the first of FANOUT_INGEST_KEYS].
    #[arg(long, env = "FANOUT_INGEST_KEY", hide_env_values = true)]
    pub key: Option<String>,
    #[arg(long, env = "FANOUT_INGEST_KEYS", hide = true, hide_env_values = true)]
    pub keys: Option<String>,
    /// How long to wait for the answer.
    #[arg(long, default_value = "10s")]
    pub timeout: String,
}

/// Validates the arguments of `fanout publish` as the replica would, naming the flag that
/// is wrong.
pub fn publish_request(args: &PublishArgs) -> Result<PublishRequest, ConfigError> {
    let org = OrgId::parse(args.org.trim())
        .map_err(|e| invalid("--org", format!("{:?}: {e}", args.org)))?;
    let event = EventName::parse(args.event.trim())
        .map_err(|e| invalid("--event", format!("{:?}: {e}", args.event)))?;
    let data =
        serde_json::from_str::<Box<serde_json::value::RawValue>>(&args.data).map_err(|e| {
            invalid(
                "--data",
                format!(
                    "is not JSON ({e}); quote it for the shell, e.g. --data '{{\"taskId\":\"t1\"}}'"
                ),
            )
        })?;
    let user = match &args.user {
        None => None,
        Some(user) => {
            Some(UserId::parse(user).map_err(|e| invalid("--user", format!("{user:?}: {e}")))?)
        }
    };
    let peer = Peer::new(&args.url).map_err(|e| invalid("--url", e))?;
    let key = args
        .key
        .clone()
        .filter(|k| !k.trim().is_empty())
        .or_else(|| {
            args.keys.as_deref().and_then(|keys| {
                keys.split(',')
                    .map(str::trim)
                    .find(|k| !k.is_empty())
                    .map(String::from)
            })
        })
        .ok_or_else(|| {
            invalid(
                "--key",
                "is not set: pass --key, or set FANOUT_INGEST_KEY (or FANOUT_INGEST_KEYS, whose first key is used)",
            )
        })?;
    let timeout = parse_duration("--timeout", &args.timeout)?;
    Ok(PublishRequest {
        peer,
        key: key.trim().to_owned(),
        org,
        event,
        data,
        user,
        timeout,
    })
}

/// An invalid setting: which one, the value, and what was expected.
#[derive(Debug, thiserror::Error)]
#[error("invalid {setting}: {message}")]
pub struct ConfigError {
    pub setting: &'static str,
    pub message: String,
}

fn invalid(setting: &'static str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        setting,
        message: message.into(),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CorsOrigins {
    Any,
    List(Vec<String>),
}

/// Settings the operator did not give, generated for a local demo.
#[derive(Debug, Clone)]
pub struct DevMode {
    pub secret: String,
    pub ingest_key: String,
    /// `--demo`: the simulated worker runs.
    pub demo: bool,
}

/// A validated configuration of `fanout serve`, in sections.
#[derive(Debug, Clone)]
pub struct Config {
    pub listeners: Listeners,
    pub bus: BusSettings,
    pub store: StoreSettings,
    pub auth: AuthSettings,
    pub engine: EngineSettings,
    pub limits: Limits,
    /// Time allowed for a graceful shutdown.
    pub shutdown_timeout: Duration,
    pub log_format: LogFormat,
}

/// Where a replica listens, and who may call its public port from a browser.
#[derive(Debug, Clone)]
pub struct Listeners {
    pub public: SocketAddr,
    pub internal: SocketAddr,
    pub cors_origins: CorsOrigins,
    /// The example dashboard is served under `/dashboard/` on the public listener.
    pub dashboard: bool,
}

/// The bus between replicas.
#[derive(Debug, Clone)]
pub struct BusSettings {
    pub backend: BusBackend,
    pub redis_prefix: String,
    /// Interval of the liveness probes through each subscription connection.
    pub probe_interval: Duration,
}

/// Which bus a replica runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusBackend {
    /// In-process: one replica only. Chosen with `FANOUT_BUS=memory`, or by dev mode.
    Memory,
    /// One Redis (`REDIS_URL`).
    Redis { url: String },
    /// A Redis Cluster (`REDIS_CLUSTER_URLS`): its seed nodes.
    Cluster { seeds: Vec<String> },
    /// The master the sentinels name (`REDIS_SENTINEL_URLS`, `REDIS_SENTINEL_MASTER`).
    Sentinel {
        sentinels: Vec<String>,
        master: String,
    },
}

impl BusBackend {
    /// The name `/readyz` and the logs give it.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Memory => "memory",
            Self::Redis { .. } => "redis",
            Self::Cluster { .. } => "redis-cluster",
            Self::Sentinel { .. } => "redis-sentinel",
        }
    }
}

/// The durable history, if any.
#[derive(Debug, Clone)]
pub struct StoreSettings {
    /// The PostgreSQL of the event history, if any.
    pub database: Option<tokio_postgres::Config>,
    /// Most events replayed to one client before it is told to resync.
    pub replay_max: u64,
    /// Replay reads from the store at once (`None`: no bound).
    pub replay_concurrency: Option<usize>,
    /// Age after which durable events are deleted.
    pub event_retention: Duration,
}

/// Who may connect and who may publish.
#[derive(Debug, Clone)]
pub struct AuthSettings {
    pub jwt: JwtSettings,
    /// `FANOUT_INGEST_KEYS`: unscoped.
    pub ingest_keys: Vec<String>,
    /// `FANOUT_INGEST_KEYS_FILE`, as read at start.
    pub ingest_keys_file: Option<KeysFile>,
    /// Set when no JWT key was configured and fanout generated a secret and an ingest key.
    pub dev_mode: Option<DevMode>,
}

/// The Socket.IO engine's timings and queues.
#[derive(Debug, Clone)]
pub struct EngineSettings {
    pub ping_interval: Duration,
    pub ping_timeout: Duration,
    /// Messages queued per socket before it counts as a slow consumer.
    pub socket_buffer: usize,
}

/// What a client may make a replica spend.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest ingest body or bus envelope (and, doubled, the Engine.IO `maxPayload`).
    pub max_payload_bytes: usize,
    /// Cap on public connections; `None`: derived from the open-file limit at start.
    pub max_connections: Option<usize>,
    pub header_read_timeout: Duration,
    pub max_pending_sessions: usize,
    pub handshake_timeout: Duration,
    /// Caps on one user's and one organization's authenticated sockets.
    pub caps: Caps,
    /// Messages per second per ingest key; `None`: no limit.
    pub ingest_rate: Option<NonZeroU32>,
    /// New sessions per second per client host; `None`: no limit.
    pub handshake_rate_per_host: Option<NonZeroU32>,
    /// REST reads per second per user; `None`: no limit.
    pub rest_rate_per_user: Option<NonZeroU32>,
    /// Packets per second a client may send; `None`: no limit.
    pub max_packets_per_second: Option<NonZeroU32>,
    /// Proxies whose `X-Forwarded-For` is believed.
    pub trusted_proxies: Vec<IpNet>,
}

/// JWT settings in a form that can build a verifier (and be cloned, unlike the verifier).
#[derive(Debug, Clone)]
pub struct JwtSettings {
    pub secret: Option<String>,
    pub previous_secret: Option<String>,
    pub public_pem: Option<String>,
    pub jwks: Option<JwksConfig>,
    pub algorithm: Algorithm,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    pub leeway_seconds: u64,
}

impl JwtSettings {
    pub fn verifier_config(&self) -> VerifierConfig {
        VerifierConfig {
            key: match (&self.secret, &self.public_pem, &self.jwks) {
                (_, _, Some(jwks)) => VerifyKey::Jwks(jwks.clone()),
                (_, Some(pem), None) => VerifyKey::PublicPem(pem.clone()),
                (Some(secret), None, None) => VerifyKey::Secret(secret.clone().into_bytes()),
                (None, None, None) => unreachable!("validated: one key is always set"),
            },
            algorithm: self.algorithm,
            issuer: self.issuer.clone(),
            audience: self.audience.clone(),
            leeway_seconds: self.leeway_seconds,
            previous_secret: self.previous_secret.clone().map(String::into_bytes),
        }
    }

    /// Validates the JWT flags. `None` when neither a secret nor a public key is set.
    fn from_args(args: &JwtArgs) -> Result<Option<Self>, ConfigError> {
        let secret = args.jwt_secret.clone().filter(|s| !s.is_empty());
        let public = args.jwt_public_key.clone().filter(|s| !s.trim().is_empty());
        let public_pem = match public {
            None => None,
            Some(value) if value.trim_start().starts_with("-----BEGIN") => Some(value),
            Some(path) => Some(std::fs::read_to_string(&path).map_err(|e| {
                invalid(
                    "JWT_PUBLIC_KEY",
                    format!(
                        "cannot read {path:?} ({e}); expected a PEM file path or inline PEM text starting with \"-----BEGIN PUBLIC KEY-----\""
                    ),
                )
            })?),
        };
        let jwks_url = args.jwt_jwks_url.clone().filter(|s| !s.trim().is_empty());
        if secret.is_some() && public_pem.is_some() {
            return Err(invalid(
                "JWT_SECRET",
                "both JWT_SECRET and JWT_PUBLIC_KEY are set; set only the one your backend signs with",
            ));
        }
        if jwks_url.is_some() && (secret.is_some() || public_pem.is_some()) {
            return Err(invalid(
                "JWT_JWKS_URL",
                format!(
                    "is set with {}; set only the one your backend signs with",
                    if secret.is_some() {
                        "JWT_SECRET"
                    } else {
                        "JWT_PUBLIC_KEY"
                    }
                ),
            ));
        }
        let jwks = match jwks_url {
            None => None,
            Some(url) => {
                let refresh = parse_duration("JWT_JWKS_REFRESH", &args.jwt_jwks_refresh)?;
                if refresh < Duration::from_secs(1) {
                    return Err(invalid(
                        "JWT_JWKS_REFRESH",
                        "must be at least 1s (the default, 5m, suits most identity providers)",
                    ));
                }
                let min_refresh =
                    parse_duration("JWT_JWKS_MIN_REFRESH", &args.jwt_jwks_min_refresh)?;
                if min_refresh > refresh {
                    return Err(invalid(
                        "JWT_JWKS_MIN_REFRESH",
                        "must not be longer than JWT_JWKS_REFRESH",
                    ));
                }
                Some(JwksConfig {
                    url,
                    refresh,
                    min_refresh,
                })
            }
        };
        if secret.is_none()
            && args
                .jwt_secret_previous
                .as_ref()
                .is_some_and(|s| !s.is_empty())
        {
            return Err(invalid(
                "JWT_SECRET_PREVIOUS",
                "is set without JWT_SECRET: it is the secret before the current one, which JWT_SECRET must name",
            ));
        }
        if secret.is_none() && public_pem.is_none() && jwks.is_none() {
            if let Some(alg) = &args.jwt_algorithm {
                return Err(invalid(
                    "JWT_ALGORITHM",
                    format!(
                        "{alg:?} is set but none of JWT_SECRET, JWT_PUBLIC_KEY and JWT_JWKS_URL is"
                    ),
                ));
            }
            return Ok(None);
        }
        let algorithm = match &args.jwt_algorithm {
            Some(name) => name.trim().parse::<Algorithm>().map_err(|_| {
                invalid(
                    "JWT_ALGORITHM",
                    format!(
                        "{name:?} is not an algorithm; expected one of HS256, HS384, HS512, RS256, RS384, RS512, PS256, PS384, PS512, ES256, ES384, EdDSA"
                    ),
                )
            })?,
            None if secret.is_some() => Algorithm::HS256,
            None => Algorithm::RS256,
        };
        let leeway_seconds = args.jwt_leeway_seconds.trim().parse::<u64>().map_err(|_| {
            invalid(
                "JWT_LEEWAY_SECONDS",
                format!(
                    "{:?} is not a whole number of seconds",
                    args.jwt_leeway_seconds
                ),
            )
        })?;
        let settings = Self {
            secret,
            previous_secret: args.jwt_secret_previous.clone().filter(|s| !s.is_empty()),
            public_pem,
            jwks,
            algorithm,
            issuer: args.jwt_issuer.clone().filter(|s| !s.is_empty()),
            audience: args.jwt_audience.clone().filter(|s| !s.is_empty()),
            leeway_seconds,
        };
        // Build a verifier once so that a bad key or a key/algorithm mismatch stops start-up.
        crate::auth::Verifier::new(settings.verifier_config()).map_err(|e| {
            // "invalid JWT_ALGORITHM: RS256 needs ...", not "...: JWT_ALGORITHM=RS256 needs".
            let text = e.to_string();
            let message = text
                .strip_prefix(e.setting())
                .map_or(text.as_str(), |rest| rest.trim_start_matches(['=', ' ']))
                .to_string();
            invalid(e.setting(), message)
        })?;
        Ok(Some(settings))
    }
}

/// Parses `10s`, `500ms`, `2m`, `1h`, or a bare number of seconds.
pub fn parse_duration(setting: &'static str, text: &str) -> Result<Duration, ConfigError> {
    let t = text.trim();
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let value: f64 = num.parse().map_err(|_| {
        invalid(
            setting,
            format!("{text:?} is not a duration; expected e.g. 500ms, 10s, 5m, 1h"),
        )
    })?;
    let secs = match unit.trim() {
        "ms" => value / 1000.0,
        "" | "s" => value,
        "m" => value * 60.0,
        "h" => value * 3600.0,
        "d" => value * 86400.0,
        other => {
            return Err(invalid(
                setting,
                format!("unknown unit {other:?} in {text:?}; expected ms, s, m, h or d"),
            ));
        }
    };
    if !secs.is_finite() || secs > 1e9 {
        return Err(invalid(setting, format!("{text:?} is out of range")));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn parse_addr(setting: &'static str, text: &str) -> Result<SocketAddr, ConfigError> {
    text.trim().parse().map_err(|_| {
        invalid(
            setting,
            format!(
                "{text:?} is not an address; expected IP:PORT such as 0.0.0.0:3000 or [::]:3000"
            ),
        )
    })
}

fn parse_count(
    setting: &'static str,
    text: &str,
    min: usize,
    max: usize,
) -> Result<usize, ConfigError> {
    match text.trim().parse::<usize>() {
        Ok(n) if (min..=max).contains(&n) => Ok(n),
        _ => Err(invalid(
            setting,
            format!("{text:?} is not a whole number from {min} to {max}"),
        )),
    }
}

/// `text` with any password replaced by `***`: in the user info of a URL
/// (`postgres://user:secret@host`) and in `password=` parameters (URL query or key=value
/// form). Used for every message that shows a `DATABASE_URL`.
pub fn redact_url(text: &str) -> String {
    let mut out = text.to_string();
    if let Some(scheme_end) = out.find("://") {
        let rest = scheme_end + 3;
        let authority_end = out[rest..].find(['/', '?']).map_or(out.len(), |i| rest + i);
        if let Some(at) = out[rest..authority_end].rfind('@') {
            let userinfo = rest..rest + at;
            if let Some(colon) = out[userinfo.clone()].find(':') {
                out.replace_range(userinfo.start + colon + 1..userinfo.end, "***");
            }
        }
    }
    let mut from = 0;
    while let Some(i) = out[from..].to_ascii_lowercase().find("password=") {
        let start = from + i + "password=".len();
        let end = out[start..]
            .find(|c: char| c == '&' || c.is_whitespace())
            .map_or(out.len(), |j| start + j);
        out.replace_range(start..end, "***");
        from = start + 3;
    }
    out
}

/// Validates `DATABASE_URL`: `None` when unset or empty.
pub fn parse_database_url(
    url: Option<&str>,
) -> Result<Option<tokio_postgres::Config>, ConfigError> {
    let url = match url.map(str::trim) {
        None | Some("") => return Ok(None),
        Some(url) => url,
    };
    let expected = "expected postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE";
    let config: tokio_postgres::Config = url.parse().map_err(|e| {
        invalid(
            "DATABASE_URL",
            format!(
                "{:?} is not a PostgreSQL URL ({}); {expected}",
                redact_url(url),
                crate::store::describe(&e)
            ),
        )
    })?;
    if config.get_hosts().is_empty() {
        return Err(invalid(
            "DATABASE_URL",
            format!("{:?} names no host; {expected}", redact_url(url)),
        ));
    }
    Ok(Some(config))
}

fn random_hex(bytes: usize) -> String {
    use rand::Rng;
    let mut rng = rand::rng();
    (0..bytes)
        .map(|_| format!("{:02x}", rng.random::<u8>()))
        .collect()
}

impl Config {
    pub fn from_args(args: &ServeArgs) -> Result<Self, ConfigError> {
        let log_format = match args.log_format.trim() {
            "text" => LogFormat::Text,
            "json" => LogFormat::Json,
            other => {
                return Err(invalid(
                    "FANOUT_LOG_FORMAT",
                    format!("{other:?} is not a log format; expected text or json"),
                ));
            }
        };
        let store = StoreSettings::from_args(args)?;
        let auth = AuthSettings::from_args(args)?;
        let listeners = Listeners::from_args(args, auth.dev_mode.is_some())?;
        let engine = EngineSettings::from_args(args)?;
        let limits = Limits::from_args(args)?;
        let shutdown_timeout = parse_duration("FANOUT_SHUTDOWN_TIMEOUT", &args.shutdown_timeout)?;
        // Last: whether a bus is missing depends on dev mode, and a bad setting elsewhere
        // is the more useful message.
        let bus = BusSettings::from_args(args, auth.dev_mode.is_some())?;
        Ok(Self {
            listeners,
            bus,
            store,
            auth,
            engine,
            limits,
            shutdown_timeout,
            log_format,
        })
    }
}

impl Listeners {
    fn from_args(args: &ServeArgs, dev_mode: bool) -> Result<Self, ConfigError> {
        let public = parse_addr("FANOUT_LISTEN", &args.listen)?;
        let internal = parse_addr("FANOUT_INTERNAL_LISTEN", &args.internal_listen)?;
        if public == internal {
            return Err(invalid(
                "FANOUT_INTERNAL_LISTEN",
                format!(
                    "{internal} is also FANOUT_LISTEN; the internal port must differ from the public one"
                ),
            ));
        }
        let dashboard = match &args.serve_dashboard {
            Some(text) => parse_switch("FANOUT_SERVE_DASHBOARD", text)?,
            None => dev_mode,
        };
        Ok(Self {
            public,
            internal,
            cors_origins: cors_origins(&args.cors_origins)?,
            dashboard,
        })
    }
}

/// An on/off setting: `1`, `true`, `yes`, `on` or `0`, `false`, `no`, `off`.
fn parse_switch(setting: &'static str, text: &str) -> Result<bool, ConfigError> {
    match text.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "0" | "false" | "no" | "off" | "" => Ok(false),
        other => Err(invalid(
            setting,
            format!("{other:?} is not a switch; expected 1 or 0 (true/false, yes/no, on/off)"),
        )),
    }
}

fn cors_origins(text: &str) -> Result<CorsOrigins, ConfigError> {
    let list = match text.trim() {
        "*" => return Ok(CorsOrigins::Any),
        list => list,
    };
    let origins: Vec<String> = list
        .split(',')
        .map(str::trim)
        .filter(|o| !o.is_empty())
        .map(String::from)
        .collect();
    if origins.is_empty() {
        return Err(invalid(
            "FANOUT_CORS_ORIGINS",
            "is empty; use * or a list of origins",
        ));
    }
    for o in &origins {
        let ok = (o.starts_with("http://") || o.starts_with("https://"))
            && !o.ends_with('/')
            && o.parse::<axum::http::HeaderValue>().is_ok();
        if !ok {
            return Err(invalid(
                "FANOUT_CORS_ORIGINS",
                format!(
                    "{o:?} is not an origin; expected scheme://host[:port] with no path, e.g. https://app.example.com"
                ),
            ));
        }
    }
    Ok(CorsOrigins::List(origins))
}

impl BusSettings {
    /// Exactly one bus: Redis when its URL is set, memory when asked for (or in dev mode,
    /// when nothing is set). Anything else stops the start, naming the settings.
    fn from_args(args: &ServeArgs, dev_mode: bool) -> Result<Self, ConfigError> {
        let redis_url = match args.redis_url.as_deref().map(str::trim) {
            None | Some("") => None,
            Some(url) => {
                redis::Client::open(url).map_err(|e| {
                    invalid(
                        "REDIS_URL",
                        format!(
                            "{url:?} is not a Redis URL ({e}); expected redis://HOST:PORT[/DB] (rediss:// for TLS)"
                        ),
                    )
                })?;
                Some(url.to_string())
            }
        };
        if args
            .redis_prefix
            .chars()
            .any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "FANOUT_REDIS_PREFIX",
                format!("{:?} contains whitespace", args.redis_prefix),
            ));
        }
        let memory = match args.bus.as_deref().map(str::trim) {
            None | Some("") => false,
            Some("memory") => true,
            Some(other) => {
                return Err(invalid(
                    "FANOUT_BUS",
                    format!(
                        "{other:?} is not a bus; expected memory (for Redis, set REDIS_URL instead)"
                    ),
                ));
            }
        };
        let probe_interval = parse_duration("FANOUT_BUS_PROBE_INTERVAL", &args.bus_probe_interval)?;
        if probe_interval < Duration::from_millis(100) || probe_interval > Duration::from_secs(600)
        {
            return Err(invalid(
                "FANOUT_BUS_PROBE_INTERVAL",
                "must be from 100ms to 10m",
            ));
        }
        let cluster = cluster_seeds(args.redis_cluster_urls.as_deref())?;
        let mut chosen: Vec<(&'static str, BusBackend)> = Vec::new();
        if let Some(url) = redis_url {
            chosen.push(("REDIS_URL", BusBackend::Redis { url }));
        }
        if let Some(seeds) = cluster {
            chosen.push(("REDIS_CLUSTER_URLS", BusBackend::Cluster { seeds }));
        }
        if let Some((sentinels, master)) = sentinel(args)? {
            chosen.push((
                "REDIS_SENTINEL_URLS",
                BusBackend::Sentinel { sentinels, master },
            ));
        }
        if memory {
            chosen.push(("FANOUT_BUS=memory", BusBackend::Memory));
        }
        let backend = match chosen.len() {
            1 => chosen.pop().expect("one").1,
            0 if dev_mode => BusBackend::Memory,
            0 => {
                return Err(invalid(
                    "REDIS_URL",
                    "is not set, and neither is REDIS_CLUSTER_URLS, REDIS_SENTINEL_URLS or FANOUT_BUS=memory; set REDIS_URL (one Redis), REDIS_SENTINEL_URLS with REDIS_SENTINEL_MASTER (Sentinel) or REDIS_CLUSTER_URLS (a Redis Cluster) so that the replicas share one bus, or FANOUT_BUS=memory to run a single replica on its in-process bus (replicas on it do not see each other's messages)",
                ));
            }
            _ => {
                let names: Vec<&str> = chosen.iter().map(|(name, _)| *name).collect();
                return Err(invalid(
                    chosen
                        .last()
                        .expect("several")
                        .0
                        .trim_end_matches("=memory"),
                    format!(
                        "{} are all set; set only one bus: REDIS_URL (one Redis), REDIS_SENTINEL_URLS (Sentinel), REDIS_CLUSTER_URLS (a Redis Cluster) or FANOUT_BUS=memory (a single replica)",
                        names.join(" and ")
                    ),
                ));
            }
        };
        Ok(Self {
            backend,
            redis_prefix: args.redis_prefix.clone(),
            probe_interval,
        })
    }
}

/// Validates `REDIS_CLUSTER_URLS`: `None` when unset or empty.
fn cluster_seeds(text: Option<&str>) -> Result<Option<Vec<String>>, ConfigError> {
    redis_urls("REDIS_CLUSTER_URLS", "seed nodes", text)
}

/// Validates `REDIS_SENTINEL_URLS` and `REDIS_SENTINEL_MASTER`, set together or not at all.
fn sentinel(args: &ServeArgs) -> Result<Option<(Vec<String>, String)>, ConfigError> {
    let sentinels = redis_urls(
        "REDIS_SENTINEL_URLS",
        "sentinels",
        args.redis_sentinel_urls.as_deref(),
    )?;
    let master = args
        .redis_sentinel_master
        .as_deref()
        .map(str::trim)
        .filter(|m| !m.is_empty());
    match (sentinels, master) {
        (None, None) => Ok(None),
        (Some(sentinels), Some(master)) => Ok(Some((sentinels, master.to_string()))),
        (Some(_), None) => Err(invalid(
            "REDIS_SENTINEL_MASTER",
            "is not set; with REDIS_SENTINEL_URLS, name the master the sentinels monitor (e.g. mymaster)",
        )),
        (None, Some(_)) => Err(invalid(
            "REDIS_SENTINEL_URLS",
            "is not set; with REDIS_SENTINEL_MASTER, list the sentinels (redis://HOST:26379,...)",
        )),
    }
}

/// Comma-separated `redis://` URLs of `what`: `None` when unset or empty.
fn redis_urls(
    setting: &'static str,
    what: &str,
    text: Option<&str>,
) -> Result<Option<Vec<String>>, ConfigError> {
    let urls: Vec<String> = text
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect();
    if urls.is_empty() {
        return Ok(None);
    }
    for url in &urls {
        let info = redis::IntoConnectionInfo::into_connection_info(url.as_str());
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) || info.is_err() {
            let why = info.err().map(|e| format!(" ({e})")).unwrap_or_default();
            return Err(invalid(
                setting,
                format!(
                    "{url:?} is not a Redis URL{why}; expected comma-separated redis://HOST:PORT (or rediss:// for TLS) {what}"
                ),
            ));
        }
    }
    let tls = urls.iter().filter(|u| u.starts_with("rediss://")).count();
    if tls != 0 && tls != urls.len() {
        return Err(invalid(
            setting,
            "mixes redis:// and rediss://; use rediss:// for all of them (TLS) or for none",
        ));
    }
    Ok(Some(urls))
}

impl StoreSettings {
    fn from_args(args: &ServeArgs) -> Result<Self, ConfigError> {
        let event_retention = parse_duration("FANOUT_EVENT_RETENTION", &args.event_retention)?;
        if event_retention < Duration::from_secs(60) {
            return Err(invalid(
                "FANOUT_EVENT_RETENTION",
                "must be at least 1m: clients replay from the retained events",
            ));
        }
        Ok(Self {
            database: parse_database_url(args.database_url.as_deref())?,
            replay_max: parse_count("FANOUT_REPLAY_MAX", &args.replay_max, 0, 1_000_000)? as u64,
            replay_concurrency: parse_cap("FANOUT_REPLAY_CONCURRENCY", &args.replay_concurrency)?,
            event_retention,
        })
    }
}

/// The ingest keys make one set: none in both places, at least one in all.
fn check_keys(unscoped: &[String], file: Option<&KeysFile>) -> Result<(), ConfigError> {
    let named = file.map(|f| f.keys.as_slice()).unwrap_or_default();
    KeySet::new(unscoped, named)
        .map(drop)
        .map_err(|e| invalid("FANOUT_INGEST_KEYS_FILE", e.to_string()))
}

impl AuthSettings {
    /// A JWT key and ingest keys; with no JWT key at all, dev mode: a random secret, and
    /// a random ingest key unless some were given.
    fn from_args(args: &ServeArgs) -> Result<Self, ConfigError> {
        let mut ingest_keys: Vec<String> = args
            .ingest_keys
            .as_deref()
            .unwrap_or("")
            .split(',')
            .map(str::trim)
            .filter(|k| !k.is_empty())
            .map(String::from)
            .collect();
        let ingest_keys_file = match &args.ingest_keys_file {
            Some(path) => Some(KeysFile::load(path.clone()).map_err(|e| {
                invalid(
                    "FANOUT_INGEST_KEYS_FILE",
                    format!("({}) {e}", path.display()),
                )
            })?),
            None => None,
        };
        let demo = match &args.demo {
            Some(text) => parse_switch("FANOUT_DEMO", text)?,
            None => false,
        };
        if let Some(jwt) = JwtSettings::from_args(&args.jwt)? {
            if demo {
                return Err(invalid(
                    "FANOUT_DEMO",
                    "is for dev mode only (no JWT key set): its simulated worker would publish made-up executions into a real deployment; unset FANOUT_DEMO (or drop --demo)",
                ));
            }
            if ingest_keys.is_empty() && ingest_keys_file.is_none() {
                return Err(invalid(
                    "FANOUT_INGEST_KEYS",
                    "is empty; with a JWT key configured, set at least one ingest key (comma-separated) for workers, or FANOUT_INGEST_KEYS_FILE",
                ));
            }
            check_keys(&ingest_keys, ingest_keys_file.as_ref())?;
            return Ok(Self {
                jwt,
                ingest_keys,
                ingest_keys_file,
                dev_mode: None,
            });
        }
        let dev = DevMode {
            secret: random_hex(32),
            ingest_key: ingest_keys
                .first()
                .cloned()
                .unwrap_or_else(|| random_hex(16)),
            demo,
        };
        if ingest_keys.is_empty() {
            ingest_keys.push(dev.ingest_key.clone());
        }
        let jwt = JwtSettings {
            secret: Some(dev.secret.clone()),
            previous_secret: None,
            public_pem: None,
            jwks: None,
            algorithm: Algorithm::HS256,
            issuer: None,
            audience: None,
            leeway_seconds: 0,
        };
        check_keys(&ingest_keys, ingest_keys_file.as_ref())?;
        Ok(Self {
            jwt,
            ingest_keys,
            ingest_keys_file,
            dev_mode: Some(dev),
        })
    }
}

impl EngineSettings {
    fn from_args(args: &ServeArgs) -> Result<Self, ConfigError> {
        let ping_interval = parse_duration("FANOUT_PING_INTERVAL", &args.ping_interval)?;
        let ping_timeout = parse_duration("FANOUT_PING_TIMEOUT", &args.ping_timeout)?;
        for (setting, d) in [
            ("FANOUT_PING_INTERVAL", ping_interval),
            ("FANOUT_PING_TIMEOUT", ping_timeout),
        ] {
            if d < Duration::from_millis(100) {
                return Err(invalid(setting, "must be at least 100ms"));
            }
        }
        Ok(Self {
            ping_interval,
            ping_timeout,
            socket_buffer: parse_count("FANOUT_SOCKET_BUFFER", &args.socket_buffer, 8, 1 << 20)?,
        })
    }
}

impl Limits {
    fn from_args(args: &ServeArgs) -> Result<Self, ConfigError> {
        let max_connections = match args.max_connections.trim() {
            "auto" => None,
            text => Some(parse_count("FANOUT_MAX_CONNECTIONS", text, 1, 10_000_000)?),
        };
        let header_read_timeout =
            parse_duration("FANOUT_HEADER_READ_TIMEOUT", &args.header_read_timeout)?;
        let handshake_timeout =
            parse_duration("FANOUT_HANDSHAKE_TIMEOUT", &args.handshake_timeout)?;
        for (setting, d) in [
            ("FANOUT_HEADER_READ_TIMEOUT", header_read_timeout),
            ("FANOUT_HANDSHAKE_TIMEOUT", handshake_timeout),
        ] {
            if d < Duration::from_millis(100) || d > Duration::from_secs(600) {
                return Err(invalid(setting, "must be from 100ms to 10m"));
            }
        }
        Ok(Self {
            max_payload_bytes: parse_count(
                "FANOUT_MAX_PAYLOAD_BYTES",
                &args.max_payload_bytes,
                256,
                64 << 20,
            )?,
            max_connections,
            header_read_timeout,
            max_pending_sessions: parse_count(
                "FANOUT_MAX_PENDING_SESSIONS",
                &args.max_pending_sessions,
                1,
                10_000_000,
            )?,
            handshake_timeout,
            caps: Caps {
                per_user: parse_cap(
                    "FANOUT_MAX_CONNECTIONS_PER_USER",
                    &args.max_connections_per_user,
                )?,
                per_org: parse_cap(
                    "FANOUT_MAX_CONNECTIONS_PER_ORG",
                    &args.max_connections_per_org,
                )?,
            },
            ingest_rate: parse_rate("FANOUT_INGEST_RATE", &args.ingest_rate)?,
            handshake_rate_per_host: parse_rate(
                "FANOUT_HANDSHAKE_RATE_PER_HOST",
                &args.handshake_rate_per_host,
            )?,
            trusted_proxies: parse_proxies(&args.trusted_proxies)?,
            max_packets_per_second: parse_rate(
                "FANOUT_MAX_PACKETS_PER_SECOND",
                &args.max_packets_per_second,
            )?,
            rest_rate_per_user: parse_rate("FANOUT_REST_RATE_PER_USER", &args.rest_rate_per_user)?,
        })
    }
}

/// `FANOUT_TRUSTED_PROXIES`: addresses and CIDR ranges, comma-separated.
fn parse_proxies(text: &str) -> Result<Vec<IpNet>, ConfigError> {
    text.split(',')
        .map(str::trim)
        .filter(|item| !item.is_empty())
        .map(|item| {
            item.parse::<IpNet>()
                .or_else(|_| item.parse::<IpAddr>().map(IpNet::from))
                .map_err(|_| {
                    invalid(
                        "FANOUT_TRUSTED_PROXIES",
                        format!(
                            "{item:?} is not an IP address or a CIDR range (such as 10.0.0.0/8)"
                        ),
                    )
                })
        })
        .collect()
}

/// A rate (per second): a whole number, 0 for no limit.
fn parse_rate(setting: &'static str, text: &str) -> Result<Option<NonZeroU32>, ConfigError> {
    let n = parse_count(setting, text, 0, 10_000_000)?;
    Ok(NonZeroU32::new(n as u32))
}

/// A cap on connections: a whole number, 0 for none.
fn parse_cap(setting: &'static str, text: &str) -> Result<Option<usize>, ConfigError> {
    let n = parse_count(setting, text, 0, 10_000_000)?;
    Ok((n > 0).then_some(n))
}

/// Validates the arguments of `fanout migrate`: the database is required.
pub fn migrate_target(args: &MigrateArgs) -> Result<tokio_postgres::Config, ConfigError> {
    parse_database_url(args.database_url.as_deref())?.ok_or_else(|| {
        invalid(
            "DATABASE_URL",
            "is not set; `fanout migrate` needs the PostgreSQL to migrate, e.g. postgres://USER:PASSWORD@HOST:5432/DATABASE",
        )
    })
}

/// Validated arguments of `fanout token`.
pub struct TokenRequest {
    pub jwt: JwtSettings,
    pub org: OrgId,
    pub user: UserId,
    pub role: String,
    pub ttl: Duration,
}

impl TokenRequest {
    pub fn from_args(args: &TokenArgs) -> Result<Self, ConfigError> {
        let jwt = JwtSettings::from_args(&args.jwt)?.ok_or_else(|| {
            invalid("JWT_SECRET", "is not set; `fanout token` signs with the same JWT_SECRET the replicas verify with")
        })?;
        let org =
            OrgId::parse(&args.org).map_err(|e| invalid("--org", format!("{:?} {e}", args.org)))?;
        let user = UserId::parse(&args.user)
            .map_err(|e| invalid("--user", format!("{:?} {e}", args.user)))?;
        if args.role.trim().is_empty() {
            return Err(invalid("--role", "is empty"));
        }
        let ttl = parse_duration("--ttl", &args.ttl)?;
        if ttl < Duration::from_secs(1) {
            return Err(invalid("--ttl", "must be at least 1s"));
        }
        Ok(Self {
            jwt,
            org,
            user,
            role: args.role.clone(),
            ttl,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn serve(args: &[&str]) -> Result<Config, ConfigError> {
        let mut argv = vec!["fanout", "serve"];
        argv.extend_from_slice(args);
        let cli = Cli::try_parse_from(argv).expect("clap accepts the flags");
        match cli.command {
            Some(Command::Serve(a)) => Config::from_args(&a),
            _ => unreachable!(),
        }
    }

    fn setting_of(args: &[&str]) -> &'static str {
        serve(args).expect_err("must be refused").setting
    }

    const KEYS: [&str; 4] = ["--jwt-secret", "s3cret", "--ingest-keys", "k1, k2 ,"];

    #[test]
    fn defaults_are_dev_mode() {
        let c = serve(&[]).unwrap();
        assert_eq!(c.listeners.public.to_string(), "0.0.0.0:3000");
        assert_eq!(c.listeners.internal.to_string(), "0.0.0.0:3001");
        assert_eq!(c.bus.backend, BusBackend::Memory);
        assert_eq!(c.bus.redis_prefix, "fanout:");
        assert_eq!(c.bus.probe_interval, Duration::from_secs(5));
        assert_eq!(c.limits.max_payload_bytes, 65536);
        assert_eq!(c.shutdown_timeout, Duration::from_secs(10));
        assert_eq!(c.listeners.cors_origins, CorsOrigins::Any);
        let dev = c.auth.dev_mode.expect("no JWT config means dev mode");
        assert_eq!(c.auth.ingest_keys, vec![dev.ingest_key.clone()]);
        assert_eq!(c.auth.jwt.secret.as_deref(), Some(dev.secret.as_str()));
        assert!(c.listeners.dashboard, "dev mode serves the dashboard");
        assert!(!dev.demo, "the demo worker is asked for");
    }

    #[test]
    fn the_dashboard_and_the_demo() {
        let dev = serve(&["--demo"]).unwrap();
        assert!(dev.auth.dev_mode.unwrap().demo);
        let off = serve(&["--demo", "--serve-dashboard", "0"]).unwrap();
        assert!(!off.listeners.dashboard);
        // Production: never unless asked.
        let mut production = KEYS.to_vec();
        production.extend(["--bus", "memory"]);
        assert!(!serve(&production).unwrap().listeners.dashboard);
        let mut asked = production.clone();
        asked.push("--serve-dashboard");
        assert!(serve(&asked).unwrap().listeners.dashboard);
        // The demo publishes made-up executions: never into a deployment.
        let mut demo = production.clone();
        demo.push("--demo");
        let e = serve(&demo).expect_err("--demo outside dev mode");
        assert_eq!(e.setting, "FANOUT_DEMO");
        assert!(e.message.contains("dev mode only"), "{e}");
        assert_eq!(
            setting_of(&["--serve-dashboard", "maybe"]),
            "FANOUT_SERVE_DASHBOARD"
        );
        assert_eq!(setting_of(&["--demo=2"]), "FANOUT_DEMO");
    }

    #[test]
    fn configured() {
        let mut args = KEYS.to_vec();
        args.extend([
            "--redis-url",
            "redis://127.0.0.1:6390/0",
            "--cors-origins",
            "https://a.example.com, http://localhost:5173",
            "--shutdown-timeout",
            "1500ms",
        ]);
        let c = serve(&args).unwrap();
        assert!(c.auth.dev_mode.is_none());
        assert_eq!(
            c.bus.backend,
            BusBackend::Redis {
                url: "redis://127.0.0.1:6390/0".into()
            }
        );
        assert_eq!(c.auth.ingest_keys, vec!["k1", "k2"]);
        assert_eq!(c.auth.jwt.algorithm, Algorithm::HS256);
        assert_eq!(c.shutdown_timeout, Duration::from_millis(1500));
        assert_eq!(
            c.listeners.cors_origins,
            CorsOrigins::List(vec![
                "https://a.example.com".into(),
                "http://localhost:5173".into()
            ])
        );
    }

    #[test]
    fn each_bad_setting_is_named() {
        let with = |extra: &[&'static str]| {
            let mut a = KEYS.to_vec();
            a.extend_from_slice(extra);
            setting_of(&a)
        };
        let cases: &[(&[&'static str], &str)] = &[
            (&["--listen", "nope"], "FANOUT_LISTEN"),
            (&["--internal-listen", "1.2.3.4"], "FANOUT_INTERNAL_LISTEN"),
            (
                &[
                    "--listen",
                    "127.0.0.1:9",
                    "--internal-listen",
                    "127.0.0.1:9",
                ],
                "FANOUT_INTERNAL_LISTEN",
            ),
            (&["--redis-url", "http://x"], "REDIS_URL"),
            (&["--bus", "redis"], "FANOUT_BUS"),
            (
                &["--bus-probe-interval", "10ms"],
                "FANOUT_BUS_PROBE_INTERVAL",
            ),
            (
                &["--bus", "memory", "--redis-url", "redis://r"],
                "FANOUT_BUS",
            ),
            (
                &[
                    "--redis-url",
                    "redis://r",
                    "--redis-cluster-urls",
                    "redis://a:1",
                ],
                "REDIS_CLUSTER_URLS",
            ),
            (
                &["--redis-cluster-urls", "http://a:1"],
                "REDIS_CLUSTER_URLS",
            ),
            (
                &["--redis-cluster-urls", "rediss://a:1,redis://b:2"],
                "REDIS_CLUSTER_URLS",
            ),
            (
                &["--redis-sentinel-urls", "redis://s:26379"],
                "REDIS_SENTINEL_MASTER",
            ),
            (&["--redis-sentinel-master", "m"], "REDIS_SENTINEL_URLS"),
            (
                &[
                    "--redis-sentinel-urls",
                    "redis://s:26379",
                    "--redis-sentinel-master",
                    "m",
                    "--redis-url",
                    "redis://r",
                ],
                "REDIS_SENTINEL_URLS",
            ),
            (&["--redis-prefix", "a b"], "FANOUT_REDIS_PREFIX"),
            (
                &["--database-url", "postgres://u@h:port/db"],
                "DATABASE_URL",
            ),
            (&["--database-url", "nonsense"], "DATABASE_URL"),
            (&["--cors-origins", "example.com"], "FANOUT_CORS_ORIGINS"),
            (&["--cors-origins", "https://a.com/"], "FANOUT_CORS_ORIGINS"),
            (&["--max-payload-bytes", "abc"], "FANOUT_MAX_PAYLOAD_BYTES"),
            (&["--max-payload-bytes", "10"], "FANOUT_MAX_PAYLOAD_BYTES"),
            (&["--socket-buffer", "0"], "FANOUT_SOCKET_BUFFER"),
            (&["--shutdown-timeout", "soon"], "FANOUT_SHUTDOWN_TIMEOUT"),
            (
                &["--shutdown-timeout", "5 parsecs"],
                "FANOUT_SHUTDOWN_TIMEOUT",
            ),
            (&["--ping-interval", "1ms"], "FANOUT_PING_INTERVAL"),
            (&["--log-format", "xml"], "FANOUT_LOG_FORMAT"),
            (&["--jwt-algorithm", "HS257"], "JWT_ALGORITHM"),
            (&["--jwt-algorithm", "RS256"], "JWT_ALGORITHM"),
            (&["--jwt-leeway-seconds", "-1"], "JWT_LEEWAY_SECONDS"),
            (&["--jwt-public-key", "/nonexistent.pem"], "JWT_PUBLIC_KEY"),
        ];
        for (args, setting) in cases {
            assert_eq!(with(args), *setting, "{args:?}");
        }
        assert_eq!(setting_of(&["--jwt-secret", "s"]), "FANOUT_INGEST_KEYS");
        // Outside dev mode the in-process bus is never a fallback.
        assert_eq!(setting_of(&KEYS), "REDIS_URL");
        let both = serve(&["--bus", "memory", "--redis-url", "redis://r"])
            .unwrap_err()
            .to_string();
        assert!(
            both.contains("REDIS_URL and FANOUT_BUS=memory are all set"),
            "{both}"
        );
        let mut cluster = KEYS.to_vec();
        cluster.extend([
            "--redis-cluster-urls",
            " redis://10.0.0.1:7000, redis://10.0.0.2:7000 ",
        ]);
        assert_eq!(
            serve(&cluster).unwrap().bus.backend,
            BusBackend::Cluster {
                seeds: vec![
                    "redis://10.0.0.1:7000".into(),
                    "redis://10.0.0.2:7000".into()
                ]
            }
        );
        assert_eq!(setting_of(&["--jwt-algorithm", "RS256"]), "JWT_ALGORITHM");
        let err = serve(&[
            "--jwt-public-key",
            "-----BEGIN PUBLIC KEY-----\nx\n-----END PUBLIC KEY-----",
            "--ingest-keys",
            "k",
        ])
        .unwrap_err();
        assert_eq!(err.setting, "JWT_PUBLIC_KEY");
        assert!(
            err.to_string().starts_with("invalid JWT_PUBLIC_KEY: "),
            "{err}"
        );
    }

    #[test]
    fn public_key_from_file_or_inline() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/keys/rsa_public.pem");
        let c = serve(&[
            "--jwt-public-key",
            path,
            "--ingest-keys",
            "k",
            "--bus",
            "memory",
        ])
        .unwrap();
        assert_eq!(c.auth.jwt.algorithm, Algorithm::RS256);
        assert_eq!(c.bus.backend, BusBackend::Memory);
        let inline = std::fs::read_to_string(path).unwrap();
        let c = serve(&[
            "--jwt-public-key",
            &inline,
            "--ingest-keys",
            "k",
            "--bus",
            "memory",
        ])
        .unwrap();
        assert!(c.auth.jwt.public_pem.is_some());
    }

    #[test]
    fn durations() {
        let d = |t| parse_duration("X", t).unwrap();
        assert_eq!(d("10s"), Duration::from_secs(10));
        assert_eq!(d("10"), Duration::from_secs(10));
        assert_eq!(d("250ms"), Duration::from_millis(250));
        assert_eq!(d("2m"), Duration::from_secs(120));
        assert_eq!(d("1h"), Duration::from_secs(3600));
        assert_eq!(d("1.5s"), Duration::from_millis(1500));
        assert!(parse_duration("X", "").is_err());
        assert!(parse_duration("X", "s").is_err());
        assert!(parse_duration("X", "3 weeks").is_err());
    }

    #[test]
    fn token_request() {
        let parse = |args: &[&str]| {
            let mut argv = vec!["fanout", "token"];
            argv.extend_from_slice(args);
            match Cli::try_parse_from(argv).unwrap().command {
                Some(Command::Token(t)) => TokenRequest::from_args(&t),
                _ => unreachable!(),
            }
        };
        let ok = parse(&[
            "--org",
            "acme",
            "--user",
            "u1",
            "--jwt-secret",
            "s",
            "--ttl",
            "2h",
        ])
        .unwrap();
        assert_eq!(ok.ttl, Duration::from_secs(7200));
        assert_eq!(ok.role, "member");
        assert_eq!(
            parse(&["--org", "acme", "--user", "u1"])
                .err()
                .unwrap()
                .setting,
            "JWT_SECRET"
        );
        assert_eq!(
            parse(&["--org", "a:b", "--user", "u", "--jwt-secret", "s"])
                .err()
                .unwrap()
                .setting,
            "--org"
        );
    }

    #[test]
    fn database_url() {
        let c = serve(&[
            "--database-url",
            "postgres://fanout:pw@db.internal:6543/events",
        ])
        .unwrap();
        let db = c.store.database.expect("DATABASE_URL is set");
        assert_eq!(db.get_dbname(), Some("events"));
        assert_eq!(db.get_ports(), &[6543]);
        assert!(
            serve(&["--database-url", ""])
                .unwrap()
                .store
                .database
                .is_none()
        );

        let err = parse_database_url(Some("postgres://fanout:hunter2@db:notaport/events"))
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("invalid DATABASE_URL: "), "{err}");
        assert!(!err.contains("hunter2"), "{err}");
        assert!(
            err.contains("postgres://fanout:***@db:notaport/events"),
            "{err}"
        );

        let migrate = |url: Option<&str>| {
            migrate_target(&MigrateArgs {
                database_url: url.map(String::from),
            })
        };
        assert!(migrate(Some("postgres://postgres@127.0.0.1/postgres")).is_ok());
        assert_eq!(migrate(None).unwrap_err().setting, "DATABASE_URL");
    }

    #[test]
    fn passwords_are_redacted() {
        assert_eq!(
            redact_url("postgres://u:p@ss@h:5432/db?sslmode=disable&password=x"),
            "postgres://u:***@h:5432/db?sslmode=disable&password=***"
        );
        assert_eq!(redact_url("postgres://u@h/db"), "postgres://u@h/db");
        assert_eq!(
            redact_url("host=h PASSWORD=secret user=u"),
            "host=h PASSWORD=*** user=u"
        );
    }
}
