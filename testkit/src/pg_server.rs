//! A private PostgreSQL server per test, for tests that stop and restart PostgreSQL.
//!
//! Most store tests share one server and create a database each ([`crate::postgres`]); a test that
//! takes the server down cannot share it. This one runs `initdb` into a temporary directory
//! and serves it on a free port of 127.0.0.1, with trust auth, no fsync and small buffers:
//! a throwaway cluster that starts in about a second.
//!
//! `stop` is PostgreSQL's fast shutdown (SIGINT: sessions are ended, the data is kept) and
//! `start_again` serves the same data directory on the same port, which is what a replica's
//! reconnects must cope with. Dropping the value ends the server (immediate shutdown, then
//! SIGKILL) and deletes the directory.
//!
//! `initdb` and `postgres` refuse to run as root. As root, the helper runs them as the
//! `postgres` system user (the owner of the temporary directory): the child switches user
//! itself before `exec`, so the process we signal is the postmaster, not a wrapper such as
//! `runuser`, which forks and would outlive a SIGKILL.

use std::net::TcpStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::free_port;
use crate::process::{Logs, Proc};

/// How long a start (recovery included) or a fast shutdown may take on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);
/// The system user that owns the cluster when the tests run as root.
const SYSTEM_USER: &str = "postgres";

pub struct PgServer {
    /// The temporary directory: `data/` (the cluster), the Unix socket, `server.log`.
    root: PathBuf,
    port: u16,
    postmaster: Option<Proc>,
}

/// `(uid, gid)` to run PostgreSQL as: the `postgres` user when we are root, else ourselves.
fn run_as() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id")
            .args([flag, SYSTEM_USER])
            .output()
            .expect("running id");
        assert!(
            out.status.success(),
            "the tests run as root, and PostgreSQL refuses to: they need a `{SYSTEM_USER}` \
             system user to run it as (the `postgresql` package creates it; scripts/test \
             installs it)"
        );
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("a numeric id")
    };
    Some((id("-u"), id("-g")))
}

/// The directory holding `initdb` and `postgres`: `FANOUT_PG_BINDIR` (set by scripts/test),
/// else `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin` (Debian keeps the
/// server binaries off PATH).
fn bindir() -> &'static Path {
    static BINDIR: OnceLock<PathBuf> = OnceLock::new();
    BINDIR.get_or_init(|| {
        let has_server =
            |dir: &Path| dir.join("initdb").is_file() && dir.join("postgres").is_file();
        if let Some(dir) = std::env::var_os("FANOUT_PG_BINDIR").map(PathBuf::from) {
            assert!(
                has_server(&dir),
                "FANOUT_PG_BINDIR={} has no initdb and postgres",
                dir.display()
            );
            return dir;
        }
        let from_pg_config = Command::new("pg_config")
            .arg("--bindir")
            .output()
            .ok()
            .filter(|out| out.status.success())
            .map(|out| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
            .filter(|dir| has_server(dir));
        if let Some(dir) = from_pg_config {
            return dir;
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|entry| {
                let version = entry.file_name().to_str()?.parse().ok()?;
                Some((version, entry.path().join("bin")))
            })
            .filter(|(_, dir)| has_server(dir))
            .collect();
        versions.sort();
        match versions.pop() {
            Some((_, dir)) => dir,
            None => panic!(
                "no PostgreSQL server binaries (initdb, postgres): neither `pg_config --bindir` \
                 nor /usr/lib/postgresql/*/bin has them; install the `postgresql` package \
                 (scripts/test does)"
            ),
        }
    })
}

/// `bin` from the server binaries, run as the cluster's owner.
fn command(bin: &str, root: &Path, user: Option<(u32, u32)>) -> Command {
    let mut cmd = Command::new(bindir().join(bin));
    cmd.current_dir(root)
        .env_remove("PGDATA")
        .env_remove("PGPORT")
        .env_remove("PGHOST")
        .stdin(Stdio::null());
    if let Some((uid, gid)) = user {
        // std also drops the supplementary groups when switching user as root.
        cmd.uid(uid).gid(gid);
    }
    cmd
}

impl PgServer {
    /// Creates a cluster in a fresh temporary directory and serves it on a free port; waits
    /// until it accepts connections.
    pub async fn start() -> Self {
        let user = run_as();
        let root = std::env::temp_dir().join(format!(
            "fanout-pg-{}-{:08x}",
            std::process::id(),
            crate::random_u64() as u32
        ));
        std::fs::create_dir(&root).expect("creating the PostgreSQL temp dir");
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))
                .expect("chmod of the PostgreSQL temp dir");
        }
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(&root, Some(uid), Some(gid))
                .expect("giving the PostgreSQL temp dir to the postgres user");
        }
        let mut server = Self {
            root,
            port: 0,
            postmaster: None,
        };
        let out = command("initdb", &server.root, user)
            .arg("-D")
            .arg(server.data())
            .args(["-U", "postgres", "-A", "trust", "-E", "UTF8"])
            .args(["--no-locale", "--no-sync"])
            .output()
            .expect("running initdb");
        assert!(
            out.status.success(),
            "initdb failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // Another process may take the port between the check and the bind: try others.
        for _ in 0..5 {
            server.port = free_port();
            if server.spawn().await {
                return server;
            }
        }
        panic!(
            "PostgreSQL did not start on any of 5 ports:\n{}",
            server.log()
        );
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`, a `DATABASE_URL`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    /// A new connection to the `postgres` database.
    pub async fn connect(&self) -> tokio_postgres::Client {
        crate::postgres::connect(&self.url()).await
    }

    /// Fast shutdown (SIGINT: sessions are ended, the data is kept); waits until the
    /// process has exited and the port is closed.
    pub async fn stop(&mut self) {
        let Some(mut postmaster) = self.postmaster.take() else {
            return;
        };
        postmaster.signal(libc::SIGINT);
        let deadline = Instant::now() + PATIENCE;
        while postmaster.exited().is_none() {
            assert!(
                Instant::now() < deadline,
                "PostgreSQL on port {} did not shut down within {PATIENCE:?}:\n{}",
                self.port,
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        while self.port_open() {
            assert!(
                Instant::now() < deadline,
                "port {} still accepts connections after PostgreSQL exited",
                self.port
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Serves the same data directory on the same port again; waits until it accepts
    /// connections.
    pub async fn start_again(&mut self) {
        assert!(
            self.postmaster.is_none(),
            "start_again on a running PgServer"
        );
        assert!(
            self.spawn().await,
            "PostgreSQL did not start again on port {} (taken by another process?):\n{}",
            self.port,
            self.log()
        );
    }

    fn data(&self) -> PathBuf {
        self.root.join("data")
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.root.join("server.log")).unwrap_or_default()
    }

    fn port_open(&self) -> bool {
        TcpStream::connect_timeout(
            &([127, 0, 0, 1], self.port).into(),
            Duration::from_millis(200),
        )
        .is_ok()
    }

    /// Starts the postmaster on `self.port` and waits until it answers a query. False if it
    /// exited first (the port was taken) or is not ours.
    async fn spawn(&mut self) -> bool {
        let mut command = command("postgres", &self.root, run_as());
        command
            .arg("-D")
            .arg(self.data())
            .arg("-p")
            .arg(self.port.to_string())
            // The socket in our directory: never next to the system server's.
            .arg("-k")
            .arg(&self.root)
            .args(["-c", "listen_addresses=127.0.0.1"])
            .args(["-c", "fsync=off", "-c", "synchronous_commit=off"])
            .args(["-c", "full_page_writes=off", "-c", "shared_buffers=16MB"])
            .args(["-c", "max_connections=50"]);
        // `server.log` in our directory, appended to by every start.
        let mut postmaster = Proc::spawn("server", command, Logs::File(self.root.clone()))
            .expect("spawning postgres");
        let deadline = Instant::now() + PATIENCE;
        while Instant::now() < deadline {
            if postmaster.exited().is_some() {
                return false;
            }
            if self.serves_our_data().await {
                self.postmaster = Some(postmaster);
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        postmaster.signal(libc::SIGQUIT);
        postmaster.wait_exit(Duration::from_secs(5)).await;
        false
    }

    /// Whether the server on our port answers, from our data directory (not another test's
    /// server that took the port).
    async fn serves_our_data(&self) -> bool {
        let Ok(config) = self.url().parse::<tokio_postgres::Config>() else {
            return false;
        };
        let connect = config.connect(tokio_postgres::NoTls);
        let Ok(Ok((client, connection))) =
            tokio::time::timeout(Duration::from_secs(1), connect).await
        else {
            return false;
        };
        tokio::spawn(connection);
        let Ok(row) = client.query_one("SHOW data_directory", &[]).await else {
            return false;
        };
        Path::new(row.get::<_, &str>(0)) == self.data()
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut postmaster) = self.postmaster.take() {
            // Immediate shutdown: the postmaster ends its backends and frees its shared memory.
            postmaster.signal(libc::SIGQUIT);
            let deadline = Instant::now() + Duration::from_secs(5);
            while postmaster.exited().is_none() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            // Dropping it kills what is left.
        }
        if std::thread::panicking() {
            eprintln!(
                "----- PostgreSQL (port {}) log -----\n{}",
                self.port,
                self.log()
            );
        }
        let _ = std::fs::remove_dir_all(&self.root);
    }
}
