//! The command line: settings are checked before anything starts, `fanout token` mints
//! tokens the replicas accept, and with no key configured fanout runs in a dev mode that
//! prints everything needed to try it.

use fanout_testkit::replica::run_to_end;
use fanout_testkit::*;
use jsonwebtoken::{DecodingKey, Validation};
use serde_json::{Value, json};

/// A valid environment for `fanout serve`, on ports nothing listens on.
fn base_env() -> Vec<(String, String)> {
    vec![
        ("FANOUT_LISTEN".into(), format!("127.0.0.1:{}", free_port())),
        (
            "FANOUT_INTERNAL_LISTEN".into(),
            format!("127.0.0.1:{}", free_port()),
        ),
        ("JWT_SECRET".into(), SECRET.into()),
        ("FANOUT_INGEST_KEYS".into(), INGEST_KEY.into()),
        ("FANOUT_BUS".into(), "memory".into()),
    ]
}

/// Runs `fanout` with `args` and the base environment changed by `changes` (an empty value
/// removes the variable); checks that it refused to start naming `setting`.
fn assert_refused(args: &[&str], changes: &[(&str, &str)], setting: &str) -> String {
    let env = env_with(changes);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = run_to_end(args, &env);
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_eq!(
        out.status.code(),
        Some(2),
        "{changes:?} {args:?}: {}\n{stderr}",
        out.status
    );
    let prefix = format!("fanout: invalid {setting}: ");
    assert!(
        stderr.starts_with(&prefix) && stderr.trim_end().lines().count() == 1,
        "{changes:?} {args:?}: expected one line starting with {prefix:?}, got {stderr:?}"
    );
    assert!(out.stdout.is_empty(), "{changes:?}: nothing on stdout");
    stderr
}

/// The base environment changed by `changes` (an empty value removes the variable).
fn env_with(changes: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = base_env();
    for (key, value) in changes {
        env.retain(|(k, _)| k != key);
        if !value.is_empty() {
            env.push((key.to_string(), value.to_string()));
        }
    }
    env
}

#[test]
fn invalid_settings_stop_the_start_naming_the_setting() {
    let same = format!("127.0.0.1:{}", free_port());
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("FANOUT_LISTEN", "nope")], "FANOUT_LISTEN"),
        (
            &[("FANOUT_LISTEN", &same), ("FANOUT_INTERNAL_LISTEN", &same)],
            "FANOUT_INTERNAL_LISTEN",
        ),
        (&[("REDIS_URL", "http://localhost")], "REDIS_URL"),
        // Outside dev mode, no bus is an error, never a silent in-process bus.
        (&[("FANOUT_BUS", "")], "REDIS_URL"),
        (&[("FANOUT_BUS", "redis")], "FANOUT_BUS"),
        (&[("REDIS_URL", "redis://127.0.0.1:1")], "FANOUT_BUS"),
        (&[("FANOUT_REDIS_PREFIX", "a b")], "FANOUT_REDIS_PREFIX"),
        (
            &[("FANOUT_MAX_PAYLOAD_BYTES", "lots")],
            "FANOUT_MAX_PAYLOAD_BYTES",
        ),
        (
            &[("FANOUT_MAX_PAYLOAD_BYTES", "10")],
            "FANOUT_MAX_PAYLOAD_BYTES",
        ),
        (&[("FANOUT_SOCKET_BUFFER", "4")], "FANOUT_SOCKET_BUFFER"),
        (
            &[("FANOUT_MAX_CONNECTIONS_PER_USER", "-1")],
            "FANOUT_MAX_CONNECTIONS_PER_USER",
        ),
        (
            &[("FANOUT_MAX_CONNECTIONS_PER_ORG", "many")],
            "FANOUT_MAX_CONNECTIONS_PER_ORG",
        ),
        (&[("FANOUT_INGEST_RATE", "1.5")], "FANOUT_INGEST_RATE"),
        (
            &[("FANOUT_REST_RATE_PER_USER", "-3")],
            "FANOUT_REST_RATE_PER_USER",
        ),
        (
            &[("FANOUT_HANDSHAKE_RATE_PER_HOST", "fast")],
            "FANOUT_HANDSHAKE_RATE_PER_HOST",
        ),
        (
            &[("FANOUT_TRUSTED_PROXIES", "10.0.0.0/8, proxy.local")],
            "FANOUT_TRUSTED_PROXIES",
        ),
        (
            &[("FANOUT_SHUTDOWN_TIMEOUT", "soon")],
            "FANOUT_SHUTDOWN_TIMEOUT",
        ),
        (&[("FANOUT_PING_INTERVAL", "1ms")], "FANOUT_PING_INTERVAL"),
        (&[("FANOUT_PING_TIMEOUT", "3 weeks")], "FANOUT_PING_TIMEOUT"),
        (&[("FANOUT_LOG_FORMAT", "xml")], "FANOUT_LOG_FORMAT"),
        (
            &[("FANOUT_CORS_ORIGINS", "example.com")],
            "FANOUT_CORS_ORIGINS",
        ),
        (&[("JWT_LEEWAY_SECONDS", "-1")], "JWT_LEEWAY_SECONDS"),
        (
            &[("JWT_SECRET", ""), ("JWT_SECRET_PREVIOUS", "old")],
            "JWT_SECRET_PREVIOUS",
        ),
        (
            &[
                ("JWT_SECRET", ""),
                ("JWT_PUBLIC_KEY", include_str!("keys/rsa_public.pem")),
                ("JWT_SECRET_PREVIOUS", "old"),
            ],
            "JWT_SECRET_PREVIOUS",
        ),
        (&[("JWT_ALGORITHM", "HS257")], "JWT_ALGORITHM"),
        (
            &[("JWT_JWKS_URL", "https://idp.example/jwks.json")],
            "JWT_JWKS_URL",
        ),
        (
            &[
                ("JWT_SECRET", ""),
                ("JWT_JWKS_URL", "ftp://idp.example/jwks"),
            ],
            "JWT_JWKS_URL",
        ),
        (
            &[
                ("JWT_SECRET", ""),
                ("JWT_JWKS_URL", "https://idp.example/jwks.json"),
                ("JWT_ALGORITHM", "HS256"),
            ],
            "JWT_ALGORITHM",
        ),
        (
            &[
                ("JWT_SECRET", ""),
                ("JWT_JWKS_URL", "https://idp.example/jwks.json"),
                ("JWT_JWKS_REFRESH", "0s"),
            ],
            "JWT_JWKS_REFRESH",
        ),
        (
            &[
                ("JWT_SECRET", ""),
                ("JWT_JWKS_URL", "https://idp.example/jwks.json"),
                ("JWT_JWKS_MIN_REFRESH", "1h"),
            ],
            "JWT_JWKS_MIN_REFRESH",
        ),
        (&[("FANOUT_INGEST_KEYS", "")], "FANOUT_INGEST_KEYS"),
        (&[("FANOUT_INGEST_KEYS", " , ")], "FANOUT_INGEST_KEYS"),
        (
            &[
                ("JWT_SECRET", ""),
                ("JWT_PUBLIC_KEY", "/nonexistent/key.pem"),
            ],
            "JWT_PUBLIC_KEY",
        ),
        (
            &[("JWT_PUBLIC_KEY", include_str!("keys/rsa_public.pem"))],
            "JWT_SECRET",
        ),
    ];
    for (changes, setting) in cases {
        assert_refused(&[], changes, setting);
    }
    // Flags are checked like their environment variables, and named the same way.
    assert_refused(
        &["serve", "--socket-buffer", "0"],
        &[],
        "FANOUT_SOCKET_BUFFER",
    );
    assert_refused(&["--listen", "1.2.3.4"], &[], "FANOUT_LISTEN");
    // The demo's made-up executions never go into a deployment (a JWT key is set here).
    let stderr = assert_refused(&["--demo"], &[], "FANOUT_DEMO");
    assert!(stderr.contains("dev mode only"), "{stderr}");
    assert_refused(&[], &[("FANOUT_DEMO", "1")], "FANOUT_DEMO");
    assert_refused(
        &[],
        &[("FANOUT_SERVE_DASHBOARD", "sure")],
        "FANOUT_SERVE_DASHBOARD",
    );
}

/// A keys file that cannot be used stops the start, naming the setting and the line, never
/// showing a key.
#[test]
fn a_bad_ingest_keys_file_stops_the_start_naming_the_line() {
    let dir = std::env::temp_dir().join(format!("fanout-cli-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let secret = "a-key-of-twenty-characters";
    let missing = dir.join("missing").display().to_string();
    let bad_line = file("bad-line", &format!("# workers\nci {secret} acme extra\n"));
    let in_both = file("in-both", &format!("ci {INGEST_KEY}-0123456789 acme\n"));
    let empty = file("empty", "# nothing yet\n");
    let cases: &[(&[(&str, &str)], &str)] = &[
        (&[("FANOUT_INGEST_KEYS_FILE", &missing)], "cannot read it"),
        (
            &[("FANOUT_INGEST_KEYS_FILE", &bad_line)],
            "line 2: has 4 fields",
        ),
        (
            &[
                ("FANOUT_INGEST_KEYS_FILE", &in_both),
                ("FANOUT_INGEST_KEYS", &format!("{INGEST_KEY}-0123456789")),
            ],
            "also in FANOUT_INGEST_KEYS",
        ),
        (
            &[
                ("FANOUT_INGEST_KEYS_FILE", &empty),
                ("FANOUT_INGEST_KEYS", ""),
            ],
            "holds no key",
        ),
    ];
    for (changes, expected) in cases {
        let stderr = assert_refused(&[], changes, "FANOUT_INGEST_KEYS_FILE");
        assert!(stderr.contains(expected), "{changes:?}: {stderr}");
        assert!(
            !stderr.contains(secret) && !stderr.contains(INGEST_KEY),
            "{stderr}"
        );
    }
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_taken_port_stops_the_start() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let mut env = base_env();
    env[0].1 = addr.clone();
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let out = run_to_end(&[], &env);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("cannot listen on FANOUT_LISTEN={addr}")),
        "{stderr}"
    );
}

#[derive(serde::Deserialize, Debug)]
struct Claims {
    #[serde(rename = "organizationId")]
    organization_id: Value,
    #[serde(rename = "userId")]
    user_id: Value,
    role: String,
    iat: u64,
    exp: u64,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_token_command_mints_tokens_the_replicas_accept() {
    let args = [
        "token", "--org", "acme", "--user", "u1", "--role", "admin", "--ttl", "2h",
    ];
    let out = run_to_end(&args, &[("JWT_SECRET", SECRET)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert_eq!(stdout.lines().count(), 1, "{stdout:?}");
    let token = stdout.trim();

    let claims = jsonwebtoken::decode::<Claims>(
        token,
        &DecodingKey::from_secret(SECRET.as_bytes()),
        &Validation::new(jsonwebtoken::Algorithm::HS256),
    )
    .expect("the token verifies with JWT_SECRET")
    .claims;
    assert_eq!(
        (&claims.organization_id, &claims.user_id),
        (&json!("acme"), &json!("u1"))
    );
    assert_eq!(claims.role, "admin");
    assert_eq!(claims.exp - claims.iat, 7200);
    assert!(claims.exp.abs_diff(now_secs() + 7200) <= 5, "{claims:?}");

    let r = Replica::builder().start().await;
    let (_, hello) = Client::authenticated(r.public, token).await;
    assert_eq!(hello["role"], json!("admin"));
    let default_role = run_to_end(
        &["token", "--org", "acme", "--user", "u2"],
        &[("JWT_SECRET", SECRET)],
    );
    let (_, hello) = Client::authenticated(
        r.public,
        String::from_utf8_lossy(&default_role.stdout).trim(),
    )
    .await;
    assert_eq!(hello["role"], json!("member"));
}

/// Arguments, environment, and the setting the error must name.
type Case<'a> = (&'a [&'a str], &'a [(&'a str, &'a str)], &'a str);

#[test]
fn the_token_command_refuses_bad_input() {
    let cases: &[Case] = &[
        (&["--org", "acme", "--user", "u"], &[], "JWT_SECRET"),
        (
            &["--org", "a:b", "--user", "u"],
            &[("JWT_SECRET", SECRET)],
            "--org",
        ),
        (
            &["--org", "acme", "--user", ""],
            &[("JWT_SECRET", SECRET)],
            "--user",
        ),
        (
            &["--org", "acme", "--user", "u", "--ttl", "soon"],
            &[("JWT_SECRET", SECRET)],
            "--ttl",
        ),
        (
            &["--org", "acme", "--user", "u", "--ttl", "0s"],
            &[("JWT_SECRET", SECRET)],
            "--ttl",
        ),
        (
            &["--org", "acme", "--user", "u", "--role", " "],
            &[("JWT_SECRET", SECRET)],
            "--role",
        ),
    ];
    for (args, env, setting) in cases {
        let mut argv = vec!["token"];
        argv.extend_from_slice(args);
        let out = run_to_end(&argv, env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{argv:?}: {stderr}");
        assert!(
            stderr.starts_with(&format!("fanout: invalid {setting}: ")),
            "{argv:?}: {stderr}"
        );
        assert!(out.stdout.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dev_mode_prints_a_working_token_and_ingest_key() {
    let r = Replica::builder()
        .unset("JWT_SECRET")
        .unset("FANOUT_INGEST_KEYS")
        .start()
        .await;
    let banner = eventually("the dev banner", QUICK, || async {
        let out = r.stdout();
        out.contains("Ingest key: ").then_some(out)
    })
    .await;
    assert!(banner.contains("NOT FOR PRODUCTION"), "{banner}");
    assert!(r.stderr().contains("DEV MODE"), "a warning in the logs too");
    let mut lines = banner.lines();
    lines
        .find(|l| l.starts_with("Dev token"))
        .expect("a dev token line");
    let token = lines
        .next()
        .expect("the token, on the next line")
        .trim()
        .to_string();
    let key = banner
        .lines()
        .find_map(|l| l.strip_prefix("Ingest key: "))
        .unwrap()
        .trim()
        .to_string();

    let (mut client, hello) = Client::authenticated(r.public, &token).await;
    assert_eq!(
        hello,
        json!({"message": "Connected to organization channel", "organizationId": "demo", "userId": "dev", "role": "admin"})
    );
    let body =
        json!({"organizationId": "demo", "taskId": "task-1", "status": "RUNNING"}).to_string();
    assert_eq!(
        r.post_raw("/executions/update", body.clone(), Some(INGEST_KEY))
            .await
            .status,
        401
    );
    let reply = r.post_raw("/executions/update", body, Some(&key)).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(
        client.expect("execution-updated", QUICK).await["taskId"],
        json!("task-1")
    );

    // The secret is random: tokens signed with any other secret are refused.
    let mut stranger = Client::with_token(r.public, &valid_token("demo", "dev")).await;
    assert_eq!(
        stranger.expect("auth-error", QUICK).await,
        json!({"error": "Invalid or expired token"})
    );
}
