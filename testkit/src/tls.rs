//! A throwaway certificate authority for the TLS variants of the Redis harnesses
//! ([`crate::RedisServer::start_tls`], [`crate::RedisCluster::start_tls`],
//! [`crate::RedisSentinel::start_tls`]).
//!
//! fanout trusts no test certificate of its own accord: it takes the system's roots, or the
//! file named by `SSL_CERT_FILE`. So the harness makes a CA and one server certificate signed
//! by it, and a replica on a TLS Redis is started with `SSL_CERT_FILE` = [`TestCa::ca_file`]
//! ([`crate::ReplicaBuilder::redis_tls`] and its siblings). The server certificate names
//! `IP:127.0.0.1` and `DNS:localhost`, the addresses the harnesses hand out, so that the
//! client's name check passes as it would in production: nothing is switched off.
//!
//! One CA per process, made on first use ([`test_ca`]): every TLS server of the process
//! serves the same certificate, so one `SSL_CERT_FILE` fits them all. Its files go into a
//! directory of their own in the temporary directory, readable by this user only, which is
//! deleted when the process exits normally (a process killed by a signal leaves it behind,
//! a few kilobytes). The CA's private key is never written: nothing else can be signed by
//! it.
//!
//! Redis serves TLS on a port of its own beside its plain one, and clients need no
//! certificate (`tls-auth-clients no`). The harnesses keep using the plain ports for their
//! own admin commands, so that everything they check means the same with or without TLS;
//! only the URLs a replica gets are `rediss://`.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::OnceLock;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};

/// The PEM files of the test CA: its certificate, and a server certificate signed by it with
/// the server's private key.
#[derive(Debug)]
pub struct TestCa {
    /// The CA's certificate: what a client trusts (`SSL_CERT_FILE`, `redis-cli --cacert`).
    pub ca_file: PathBuf,
    /// The server certificate (`IP:127.0.0.1`, `DNS:localhost`), signed by the CA; cluster
    /// nodes present it as their client certificate to each other too.
    pub cert_file: PathBuf,
    /// The server certificate's private key (PKCS#8).
    pub key_file: PathBuf,
    /// The directory of the three files.
    dir: PathBuf,
}

/// The process's test CA, once made.
static CA: OnceLock<TestCa> = OnceLock::new();

/// The process's test CA, made on first use; panics if its files cannot be written.
pub fn test_ca() -> &'static TestCa {
    CA.get_or_init(|| {
        let ca = TestCa::create().unwrap_or_else(|e| panic!("making the test CA: {e:#}"));
        // SAFETY: atexit only records the function, which runs at exit, once `CA` is set.
        unsafe { libc::atexit(remove_at_exit) };
        ca
    })
}

/// Deletes the test CA's directory (registered with `atexit`).
extern "C" fn remove_at_exit() {
    if let Some(ca) = CA.get() {
        let _ = std::fs::remove_dir_all(&ca.dir);
    }
}

impl TestCa {
    fn create() -> anyhow::Result<Self> {
        let mut ca_params = CertificateParams::new(Vec::new())?;
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "fanout test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let mut server_params =
            CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".to_string()])?;
        server_params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        server_params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        // Client authentication too: the cluster bus is mutual TLS, each node presenting this
        // certificate to the other as a client (with server authentication alone, OpenSSL
        // refuses it there and `CLUSTER MEET` never completes its handshake, seen with 7.0).
        server_params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        server_params.use_authority_key_identifier_extension = true;
        let server_key = KeyPair::generate()?;
        let server = server_params.signed_by(&server_key, &ca)?;

        let dir = std::env::temp_dir().join(format!(
            "fanout-test-ca-{}-{:08x}",
            std::process::id(),
            crate::random_u64() as u32
        ));
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new().mode(0o700).create(&dir)?;
        }
        let files = Self {
            ca_file: dir.join("ca.pem"),
            cert_file: dir.join("cert.pem"),
            key_file: dir.join("key.pem"),
            dir,
        };
        std::fs::write(&files.ca_file, ca.pem())?;
        std::fs::write(&files.cert_file, server.pem())?;
        std::fs::write(&files.key_file, server_key.serialize_pem())?;
        Ok(files)
    }
}

/// The settings that make a Redis process (server or sentinel) serve TLS on `tls_port`
/// beside its plain port, with the test CA's server certificate, as `(name, value)` pairs.
///
/// `tls-replication yes` too: a replica then reaches its master over TLS, and a sentinel the
/// nodes it monitors, since the TLS port is the one they know a master by (a sentinel
/// monitors it there, a cluster replica finds it there). It also makes a replica and a
/// sentinel announce their TLS port to the others. A node that replicates nothing ignores it.
fn settings(tls_port: u16) -> Vec<(&'static str, OsString)> {
    let ca = test_ca();
    vec![
        ("tls-port", tls_port.to_string().into()),
        ("tls-cert-file", ca.cert_file.clone().into()),
        ("tls-key-file", ca.key_file.clone().into()),
        ("tls-ca-cert-file", ca.ca_file.clone().into()),
        ("tls-auth-clients", "no".into()),
        ("tls-replication", "yes".into()),
    ]
}

/// [`settings`] as `redis-server` command-line arguments.
pub(crate) fn server_args(tls_port: u16) -> Vec<OsString> {
    settings(tls_port)
        .into_iter()
        .flat_map(|(name, value)| [format!("--{name}").into(), value])
        .collect()
}

/// [`settings`] as lines of a configuration file (a sentinel's), values quoted.
pub(crate) fn config_lines(tls_port: u16) -> String {
    settings(tls_port)
        .into_iter()
        .map(|(name, value)| format!("{name} \"{}\"\n", value.to_string_lossy()))
        .collect()
}

/// `rediss://127.0.0.1:<port>`.
pub(crate) fn url(port: u16) -> String {
    format!("rediss://127.0.0.1:{port}")
}

#[cfg(test)]
mod tests {
    //! The TLS harnesses against real servers, seen through `redis-cli --tls`: what a client
    //! that trusts the test CA gets, and that one that does not is refused.

    use std::process::Command;

    use super::test_ca;
    use crate::redis_cluster::{RedisCluster, cli_program};
    use crate::redis_sentinel::RedisSentinel;
    use crate::redis_server::RedisServer;

    /// How `redis-cli` connects.
    #[derive(Clone, Copy)]
    enum Via {
        Plain,
        /// TLS, trusting the test CA.
        Tls,
        /// TLS, trusting the system's roots only.
        TlsWithoutTheCa,
    }
    use Via::*;

    /// `redis-cli` at `port` of 127.0.0.1: its output, or what it said when it failed.
    fn cli(port: u16, via: Via, args: &[&str]) -> Result<String, String> {
        let program = std::env::var_os("REDIS_SERVER").unwrap_or_else(|| "redis-server".into());
        let mut command = Command::new(cli_program(&program));
        match via {
            Plain => {}
            Tls => {
                command.arg("--tls").arg("--cacert").arg(&test_ca().ca_file);
            }
            TlsWithoutTheCa => {
                command.arg("--tls");
            }
        }
        let out = command
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(args)
            .output()
            .expect("running redis-cli");
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).trim().to_string();
        if out.status.success() && stderr.is_empty() {
            Ok(stdout)
        } else {
            Err(format!("{stdout}\n{stderr}"))
        }
    }

    /// The ports of `rediss://127.0.0.1:<port>` URLs separated by commas.
    fn tls_ports(urls: &str) -> Vec<u16> {
        urls.split(',')
            .map(|u| {
                u.strip_prefix("rediss://127.0.0.1:")
                    .and_then(|p| p.parse().ok())
                    .unwrap_or_else(|| panic!("not a rediss:// URL of 127.0.0.1: {u}"))
            })
            .collect()
    }

    /// The `run_id` of the server at `port`: the same on its plain and its TLS port.
    fn run_id(port: u16, via: Via) -> String {
        let info = cli(port, via, &["INFO", "server"]).unwrap();
        info.lines()
            .find_map(|l| l.trim().strip_prefix("run_id:"))
            .unwrap_or_else(|| panic!("no run_id in INFO server of {port}: {info}"))
            .to_string()
    }

    #[tokio::test]
    async fn a_server_serves_tls_with_a_certificate_of_the_test_ca() {
        let ca = test_ca();
        for file in [&ca.ca_file, &ca.cert_file, &ca.key_file] {
            let pem = std::fs::read_to_string(file).unwrap();
            assert!(pem.starts_with("-----BEGIN "), "{}: {pem}", file.display());
        }
        assert!(std::ptr::eq(ca, test_ca()), "one CA per process");

        let mut redis = RedisServer::start_tls().await;
        let [tls_port] = tls_ports(&redis.tls_url())[..] else {
            panic!("{}", redis.tls_url())
        };
        assert_ne!(tls_port, redis.port());
        assert_eq!(cli(tls_port, Tls, &["PING"]).as_deref(), Ok("PONG"));
        assert_eq!(run_id(tls_port, Tls), run_id(redis.port(), Plain));
        let refused = cli(tls_port, TlsWithoutTheCa, &["PING"]).unwrap_err();
        assert!(refused.contains("certificate verify failed"), "{refused}");
        // The plain port, and the methods on it, as without TLS.
        assert_eq!(redis.publish("a-channel", "x").await, 0);

        redis.restart().await;
        assert_eq!(cli(tls_port, Tls, &["PING"]).as_deref(), Ok("PONG"));
    }

    #[tokio::test]
    async fn a_cluster_answers_tls_ports_to_tls_clients_and_fails_over() {
        let mut cluster = RedisCluster::start_tls(3, 1).await;
        let plain = cluster.ports();
        let tls = tls_ports(&cluster.tls_seed_urls());
        assert_eq!(tls.len(), plain.len());
        let tls_of = |port: u16| tls[plain.iter().position(|&p| p == port).unwrap()];
        for &port in &plain {
            assert_eq!(run_id(tls_of(port), Tls), run_id(port, Plain));
        }

        // CLUSTER SLOTS names the TLS ports to a TLS client, the plain ones to a plain one
        // (the masters, at least: Redis 7.0 leaves out replicas that have replicated nothing
        // yet, as in an empty cluster).
        let slots = |port: u16, via: Via| -> Vec<u16> {
            let out = cli(port, via, &["CLUSTER", "SLOTS"]).unwrap();
            let mut ports: Vec<u16> = out.lines().filter_map(|l| l.trim().parse().ok()).collect();
            ports.retain(|p| plain.contains(p) || tls.contains(p));
            ports.sort_unstable();
            ports.dedup();
            ports
        };
        let masters = cluster.masters().await;
        assert_eq!(masters.len(), 3);
        let over_tls = slots(tls[0], Tls);
        let over_plain = slots(plain[0], Plain);
        for &master in &masters {
            assert!(over_tls.contains(&tls_of(master)), "{over_tls:?}");
            assert!(over_plain.contains(&master), "{over_plain:?}");
        }
        assert!(over_tls.iter().all(|p| tls.contains(p)), "{over_tls:?}");
        assert!(
            over_plain.iter().all(|p| plain.contains(p)),
            "{over_plain:?}"
        );
        // So does a redirection.
        let slot = RedisCluster::slot("a-key");
        let owner = cluster.owner(slot).await;
        let other = *masters.iter().find(|&&m| m != owner).unwrap();
        let moved = cli(tls_of(other), Tls, &["SET", "a-key", "x"]).unwrap_or_else(|e| e);
        let to = format!("MOVED {slot} 127.0.0.1:{}", tls_of(owner));
        assert!(moved.contains(&to), "{moved}");

        // The admin methods keep to the plain ports, through a failover too (the replica
        // replicates over TLS).
        let slot = RedisCluster::slot("a-channel");
        let owner = cluster.owner(slot).await;
        assert_eq!(cluster.spublish("a-channel", "x").await, 0);
        cluster.kill_master(owner).await;
        let promoted = cluster.wait_failover(slot, owner).await;
        assert!(plain.contains(&promoted) && promoted != owner);
        let over_tls = slots(tls_of(promoted), Tls);
        assert!(over_tls.contains(&tls_of(promoted)), "{over_tls:?}");
        assert!(!over_tls.contains(&tls_of(owner)), "{over_tls:?}");
    }

    #[tokio::test]
    async fn sentinels_name_the_master_by_its_tls_port_and_fail_over() {
        let mut group = RedisSentinel::start_tls("tls-test").await;
        let sentinels = tls_ports(&group.tls_sentinel_urls());
        assert_eq!(sentinels.len(), 3);
        let master_over_tls = |sentinel: u16| -> u16 {
            let answer = cli(
                sentinel,
                Tls,
                &["SENTINEL", "GET-MASTER-ADDR-BY-NAME", "tls-test"],
            )
            .unwrap();
            match answer.lines().collect::<Vec<_>>()[..] {
                ["127.0.0.1", port] => port.parse().unwrap(),
                _ => panic!("sentinel {sentinel} answered {answer:?}"),
            }
        };

        let master = group.master_port().await;
        assert!(group.ports().contains(&master));
        let tls_master = master_over_tls(sentinels[0]);
        assert!(
            !group.ports().contains(&tls_master),
            "a TLS port: {tls_master}"
        );
        assert_eq!(run_id(tls_master, Tls), run_id(master, Plain));
        assert_eq!(group.publish("a-channel", "x").await, 0);

        let old = group.kill_master().await;
        assert_eq!(old, master);
        let new = group.wait_failover(old).await;
        assert!(group.ports().contains(&new) && new != old);
        for &sentinel in &sentinels {
            let tls_new = master_over_tls(sentinel);
            assert_eq!(run_id(tls_new, Tls), run_id(new, Plain));
        }
    }
}
