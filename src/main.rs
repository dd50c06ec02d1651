//! The `fanout` binary: parses arguments, sets up logging and metrics, and calls the library.

use std::process::ExitCode;

use clap::Parser;
use fanout::auth::Verifier;
use fanout::config::{Cli, Command, Config, DevMode, LogFormat, TokenRequest};
use fanout::ops::shutdown::{self, Shutdown};

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Some(Command::Token(args)) => mint(&args),
        Some(Command::Migrate(args)) => migrate(&args),
        Some(Command::Publish(args)) => publish(&args),
        Some(Command::Openapi) => {
            println!("{}", fanout::openapi::json());
            ExitCode::SUCCESS
        }
        Some(Command::Serve(args)) => serve(&args),
        None => serve(&cli.serve),
    }
}

/// Exit code of an invalid setting.
const BAD_CONFIG: u8 = 2;

fn mint(args: &fanout::config::TokenArgs) -> ExitCode {
    let result = || -> anyhow::Result<String> {
        let req = TokenRequest::from_args(args)?;
        let verifier = Verifier::new(req.jwt.verifier_config())?;
        Ok(verifier.mint(&req.org, &req.user, &req.role, req.ttl)?)
    }();
    match result {
        Ok(token) => {
            println!("{token}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fanout: {e}");
            ExitCode::from(BAD_CONFIG)
        }
    }
}

/// An invalid setting of a one-shot command: said on stderr, exit 2.
fn bad_config(e: &fanout::config::ConfigError) -> ExitCode {
    eprintln!("fanout: {e}");
    ExitCode::from(BAD_CONFIG)
}

/// The runtime of a one-shot command (`migrate`, `publish`): one thread is plenty.
fn one_shot() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime")
}

/// `fanout publish`: exit 0 with the answer on stdout when the replica accepted the event,
/// 1 with its refusal (or why no answer came) on stderr, 2 on a bad flag.
fn publish(args: &fanout::config::PublishArgs) -> ExitCode {
    use fanout::ingest::client::Outcome;
    let request = match fanout::config::publish_request(args) {
        Ok(r) => r,
        Err(e) => return bad_config(&e),
    };
    match one_shot().block_on(request.send()) {
        Ok(Outcome::Accepted(answer)) => {
            println!("{answer}");
            ExitCode::SUCCESS
        }
        Ok(Outcome::Refused(status, error)) => {
            eprintln!("fanout publish: refused with {status}: {error}");
            ExitCode::FAILURE
        }
        Err(e) => {
            eprintln!("fanout publish: no answer from {}: {e}", request.peer.url());
            ExitCode::FAILURE
        }
    }
}

/// `fanout migrate`: exit 0 once the schema is current, 2 on a bad `DATABASE_URL`, 1 when
/// the database cannot be reached or migrated.
fn migrate(args: &fanout::config::MigrateArgs) -> ExitCode {
    let target = match fanout::config::migrate_target(args) {
        Ok(t) => t,
        Err(e) => return bad_config(&e),
    };
    match one_shot().block_on(fanout::store::migrate_once(&target)) {
        Ok(applied) if applied.is_empty() => {
            println!("database is up to date");
            ExitCode::SUCCESS
        }
        Ok(applied) => {
            println!("applied migrations: {}", fanout::store::summary(&applied));
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("fanout: {e}");
            ExitCode::FAILURE
        }
    }
}

fn serve(args: &fanout::config::ServeArgs) -> ExitCode {
    let config = match Config::from_args(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("fanout: {e}");
            return ExitCode::from(BAD_CONFIG);
        }
    };
    init_logging(config.log_format);
    let metrics = match fanout::ops::metrics::install() {
        Ok(h) => h,
        Err(e) => {
            eprintln!("fanout: {e}");
            return ExitCode::FAILURE;
        }
    };
    if let Some(dev) = &config.auth.dev_mode {
        print_dev_banner(&config, dev);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("building the tokio runtime");
    let result = runtime.block_on(async {
        let stop = Shutdown::new();
        tokio::spawn({
            let stop = stop.clone();
            async move {
                shutdown::signal().await;
                stop.trigger();
            }
        });
        fanout::server::run(config, metrics, stop).await
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("fanout: {e}");
            ExitCode::FAILURE
        }
    }
}

fn init_logging(format: LogFormat) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder.init(),
    }
}

/// Dev mode: everything needed to try fanout, on stdout, with a warning that this is
/// not a production configuration.
fn print_dev_banner(config: &Config, dev: &DevMode) {
    let verifier = Verifier::new(config.auth.jwt.verifier_config()).expect("dev secret is valid");
    let org = fanout::protocol::OrgId::parse("demo").unwrap();
    let user = fanout::protocol::UserId::parse("dev").unwrap();
    let token = verifier
        .mint(
            &org,
            &user,
            "admin",
            std::time::Duration::from_secs(24 * 3600),
        )
        .expect("HS256 can mint");
    let host = |addr: std::net::SocketAddr| {
        if addr.ip().is_unspecified() {
            format!("localhost:{}", addr.port())
        } else {
            addr.to_string()
        }
    };
    let public = host(config.listeners.public);
    let internal = host(config.listeners.internal);
    tracing::warn!(
        "DEV MODE: no JWT_SECRET, JWT_PUBLIC_KEY or JWT_JWKS_URL set; using a random secret and ingest key. Do not run this in production."
    );
    // As it was invoked (`target/release/fanout` under `cargo run`), so the line runs as shown.
    let program = std::env::args().next().unwrap_or_else(|| "fanout".into());
    // The token goes in the link's fragment: browsers never send it, so no log keeps it.
    let dashboard = if config.listeners.dashboard {
        let worker = if dev.demo {
            format!(
                "the demo worker is publishing executions to org \"{}\"",
                fanout::demo::ORG
            )
        } else {
            "add --demo (or FANOUT_DEMO=1) for a simulated worker, or publish as below".into()
        };
        format!(
            "Open the dashboard ({worker}):\n  http://{public}{}#token={token}\n\n",
            fanout::dashboard::PATH
        )
    } else {
        String::new()
    };
    println!(
        r#"
=== fanout dev mode: NOT FOR PRODUCTION (set JWT_SECRET and FANOUT_INGEST_KEYS) ===
{dashboard}Dev token (org "demo", user "dev", 24h; JWT secret of this run only: {secret}):
{token}

Socket.IO:  io("http://{public}", {{ auth: {{ token: "<dev token>" }} }})
HTTP APIs:  http://{internal}/openapi.json (OpenAPI 3.1)
Ingest key: {key}
Publish an update:
  {program} publish --url http://{internal} --key {key} \
    --org demo --event execution-updated --data '{{"taskId":"task-1","status":"RUNNING"}}'
or:
  curl -sS -X POST http://{internal}/executions/update \
    -H 'Authorization: Bearer {key}' -H 'Content-Type: application/json' \
    -d '{{"organizationId":"demo","taskId":"task-1","status":"RUNNING"}}'
"#,
        secret = dev.secret,
        key = dev.ingest_key,
    );
}
