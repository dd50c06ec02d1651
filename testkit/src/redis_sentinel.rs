//! A private Redis Sentinel group on ports of 127.0.0.1, with no persistence: one master,
//! one replica and three sentinels, for tests of a bus that finds its master through the
//! sentinels and must follow a failover.
//!
//! [`RedisSentinel::start`] runs two `redis-server` processes (the program named by
//! `REDIS_SERVER`, else `redis-server` from PATH), the second with `--replicaof` the first,
//! and three sentinels (`redis-server <sentinel.conf> --sentinel`, the same program), each
//! in its own directory of one temporary directory. Every sentinel has a configuration file
//! of its own: Sentinel rewrites it as it learns the topology, and refuses to start without
//! a writable one. They monitor the master with quorum 2, `down-after-milliseconds 1000`,
//! `failover-timeout 3000` and `parallel-syncs 1`; they announce 127.0.0.1 and do not
//! resolve host names, so what they say is an address a test can connect to.
//!
//! The group is ready when it has *settled*: the sentinels agree on the master, which says
//! `role:master`; every other running node is its replica with its link up; and every
//! sentinel knows each of those replicas and the two other sentinels, none of them down or
//! disconnected. Less than that and a failover cannot be authorised (quorum, leader
//! election) or has no replica to promote. Start and failover wait for that, never for a
//! fixed time. Data nodes run with `--repl-diskless-sync-delay 0`: a replica's full sync
//! begins at once instead of after 5 s.
//!
//! Timings seen with Redis 7.0 on a 2-core machine: the group settles in about 2 s (the
//! sentinels find each other through hello messages, sent every 2 s); a killed master is
//! replaced in 2 to 2.5 s (1 s to be seen down, a random delay of up to 1 s before a
//! sentinel asks for votes, the election, the promotion). A restarted old master comes back
//! as a master and stays one for about 10 s: Sentinel converts a node that claims the wrong
//! role only once the claim is 8 s old, and asks a healthy node for `INFO` every 10 s.
//! Meanwhile clients that connect to it find an empty master of its own. There is no
//! restart here: on a loaded machine the sentinels sometimes took the returning node for the
//! master again within the 30 s a test can wait, so a test of it would be flaky.
//!
//! What Sentinel does to clients, as seen with Redis 7.0 (what tests of the bus can rely
//! on): every reconfiguration it makes of a node (`REPLICAOF NO ONE` on the replica it
//! promotes, `REPLICAOF <master>` on a node it converts to a replica, such as the old master
//! when it returns) comes with `CLIENT KILL TYPE normal` and `CLIENT KILL TYPE pubsub` on
//! that node: its subscribers are disconnected, they are not left subscribed to a node that
//! changed role. Nodes it does not reconfigure keep their clients. `PUBLISH` at a replica is
//! accepted and reaches the subscribers of that replica only; `PUBLISH` at the master
//! reaches its subscribers and, through replication, those of its replicas (its answer
//! counts its own subscribers only).
//!
//! [`RedisSentinel::start_tls`] makes a group whose five processes serve TLS too, each on a
//! second port, with the certificate of the [test CA](crate::tls): replicas get
//! [`RedisSentinel::tls_sentinel_urls`]. Unlike a cluster node, a sentinel knows one address
//! per node, the same for every client: with `tls-replication yes` the replica follows its
//! master at the master's TLS port and announces its own TLS port, the sentinels monitor the
//! master at its TLS port, reach the nodes over TLS and announce their own TLS ports to each
//! other. So `SENTINEL get-master-addr-by-name` answers a TLS port, to plain clients too, as
//! do `SENTINEL replicas`, `SENTINEL sentinels` and the replica's `INFO replication`. The
//! methods here still connect to the plain ports and take and return plain ports, the TLS
//! ports Redis answers mapped back to them, so they mean the same as without TLS.
//!
//! Dropping the value kills every process (SIGKILL) and deletes the directory.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;

use crate::process::{Logs, Proc};
use crate::redis_cluster::{query, until};
use crate::{SOON, free_port};

/// How long a start, a failover or a rejoin may take on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);
/// The number of sentinels.
const SENTINELS: usize = 3;
/// How many sentinels must see the master down for a failover (a majority of them must
/// then elect the one that carries it out).
const QUORUM: usize = 2;

pub struct RedisSentinel {
    /// The temporary directory, with one directory per process.
    root: PathBuf,
    program: OsString,
    /// Whether the processes serve TLS too ([`RedisSentinel::start_tls`]).
    tls: bool,
    master_name: String,
    /// The master and the replica, in the order they were started.
    nodes: Vec<Instance>,
    sentinels: Vec<Instance>,
}

/// A data node or a sentinel.
struct Instance {
    port: u16,
    /// The TLS port, in a group with TLS.
    tls_port: Option<u16>,
    /// `None` once killed.
    proc: Option<Proc>,
}

impl RedisSentinel {
    /// Starts a master, its replica and three sentinels monitoring it as `master_name`, and
    /// waits until the group has settled; panics if it cannot.
    pub async fn start(master_name: &str) -> Self {
        Self::start_with(master_name, false).await
    }

    /// [`start`](Self::start), with every process serving TLS too and the nodes and
    /// sentinels talking to each other over TLS (see the module doc): replicas get
    /// [`tls_sentinel_urls`](Self::tls_sentinel_urls).
    pub async fn start_tls(master_name: &str) -> Self {
        Self::start_with(master_name, true).await
    }

    async fn start_with(master_name: &str, tls: bool) -> Self {
        assert!(
            !master_name.is_empty()
                && master_name
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_.:".contains(c)),
            "a Sentinel master name is one word of letters, digits and -_.: ({master_name:?})"
        );
        let root = std::env::temp_dir().join(format!(
            "fanout-redis-sentinel-{}-{:08x}",
            std::process::id(),
            crate::random_u64() as u32
        ));
        std::fs::create_dir(&root).expect("creating the Redis Sentinel temp dir");
        let mut group = Self {
            root,
            program: std::env::var_os("REDIS_SERVER").unwrap_or_else(|| "redis-server".into()),
            tls,
            master_name: master_name.to_string(),
            nodes: Vec::new(),
            sentinels: Vec::new(),
        };
        group.nodes.push(group.add("node0", Member::Master).await);
        let master_port = group.nodes[0].port;
        // Where the others find the master: its TLS port, in a group with TLS.
        let master_addr = group.nodes[0].tls_port.unwrap_or(master_port);
        let replica = group.add("node1", Member::ReplicaOf(master_addr)).await;
        group.nodes.push(replica);
        for i in 0..SENTINELS {
            let sentinel = group
                .add(&format!("sentinel{i}"), Member::Sentinel(master_addr))
                .await;
            group.sentinels.push(sentinel);
        }
        until(
            "the new Redis Sentinel group to settle",
            PATIENCE,
            || async {
                match group.settled().await? {
                    port if port == master_port => Ok(()),
                    port => Err(format!(
                        "the sentinels name {port} as the master, not {master_port}"
                    )),
                }
            },
        )
        .await;
        group
    }

    /// `redis://127.0.0.1:<port>` of every sentinel, separated by commas: a
    /// `REDIS_SENTINEL_URLS`.
    pub fn sentinel_urls(&self) -> String {
        self.sentinels
            .iter()
            .map(|s| format!("redis://127.0.0.1:{}", s.port))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// `rediss://127.0.0.1:<TLS port>` of every sentinel, separated by commas: the
    /// `REDIS_SENTINEL_URLS` of replicas on TLS. Panics unless the group was started with
    /// [`start_tls`](Self::start_tls).
    pub fn tls_sentinel_urls(&self) -> String {
        assert!(
            self.tls,
            "tls_sentinel_urls: the group was not started with RedisSentinel::start_tls"
        );
        self.sentinels
            .iter()
            .filter_map(|s| s.tls_port.map(crate::tls::url))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The ports of the sentinels.
    pub fn sentinel_ports(&self) -> Vec<u16> {
        self.sentinels.iter().map(|s| s.port).collect()
    }

    /// The name the sentinels monitor the master as.
    pub fn master_name(&self) -> &str {
        &self.master_name
    }

    /// The client port of every data node (master and replica), killed ones included.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The port of the master, as the sentinels agree (waits up to [`SOON`] for that). Right
    /// after a kill, that is the dead master until the failover: see
    /// [`wait_failover`](Self::wait_failover).
    pub async fn master_port(&self) -> u16 {
        until("the sentinels to agree on the master", SOON, || {
            self.try_master_port()
        })
        .await
    }

    /// Kills the current master (SIGKILL, like a crash) and reaps it; returns its port. The
    /// sentinels promote the replica once a quorum of them sees it down: see
    /// [`wait_failover`](Self::wait_failover).
    pub async fn kill_master(&mut self) -> u16 {
        let port = self.master_port().await;
        let node = self.node_mut(port);
        assert!(
            node.proc.is_some(),
            "kill_master: the master the sentinels name, {port}, is not running"
        );
        // Dropping the process kills it with SIGKILL and waits for it.
        node.proc = None;
        port
    }

    /// Waits until the sentinels agree on a master other than `old_port` that says
    /// `role:master`, and the group has settled around it; returns its port.
    pub async fn wait_failover(&self, old_port: u16) -> u16 {
        until(
            &format!("a Sentinel failover away from {old_port}"),
            PATIENCE,
            || async {
                match self.settled().await? {
                    port if port == old_port => {
                        Err(format!("the sentinels still name {old_port} as the master"))
                    }
                    port => Ok(port),
                }
            },
        )
        .await
    }

    /// A new connection to the data node on `port`.
    pub async fn node_conn(&self, port: u16) -> MultiplexedConnection {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connecting to the Redis node on {port}: {e}"))
    }

    /// `PUBLISH channel payload` at the master the sentinels name; returns how many of its
    /// subscribers received it (subscribers of the replica receive it too, uncounted).
    /// Retries for up to [`SOON`] while that master does not answer.
    pub async fn publish(&self, channel: &str, payload: impl AsRef<[u8]>) -> i64 {
        let mut cmd = redis::cmd("PUBLISH");
        cmd.arg(channel).arg(payload.as_ref());
        self.at_master(&format!("PUBLISH {channel}"), &cmd).await
    }

    /// `PUBSUB NUMSUB channel` at the master the sentinels name: how many of its
    /// connections subscribe to it (subscribers of the replica are not counted).
    pub async fn numsub(&self, channel: &str) -> i64 {
        let mut cmd = redis::cmd("PUBSUB");
        cmd.arg("NUMSUB").arg(channel);
        let pairs: Vec<(String, i64)> = self
            .at_master(&format!("PUBSUB NUMSUB {channel}"), &cmd)
            .await;
        pairs.first().map_or(0, |(_, n)| *n)
    }

    /// Creates the directory `name` and starts `member` in it on a free port (up to five
    /// ports, should another process take one first); panics if it cannot.
    async fn add(&self, name: &str, member: Member) -> Instance {
        let dir = self.root.join(name);
        std::fs::create_dir(&dir).expect("creating a Redis Sentinel group member's dir");
        let mut failures = Vec::new();
        for _ in 0..5 {
            let (port, tls_port) = (free_port(), self.tls.then(free_port));
            let spawned = match member {
                Member::Master => spawn_node(&self.program, &dir, port, tls_port, None).await,
                Member::ReplicaOf(master) => {
                    spawn_node(&self.program, &dir, port, tls_port, Some(master)).await
                }
                Member::Sentinel(master) => {
                    let name = &self.master_name;
                    spawn_sentinel(&self.program, &dir, port, tls_port, name, master).await
                }
            };
            match spawned {
                Ok(proc) => {
                    return Instance {
                        port,
                        tls_port,
                        proc: Some(proc),
                    };
                }
                Err(e) => failures.push(format!("{e:#}")),
            }
        }
        panic!(
            "redis-server did not start as {name} of a Sentinel group (is it installed and on \
             PATH, or named by REDIS_SERVER?):\n{}",
            failures.join("\n")
        );
    }

    /// Whether the group has settled (see the module doc); the master's port if so, what is
    /// missing if not.
    async fn settled(&self) -> Result<u16, String> {
        let master = self.try_master_port().await?;
        let running = self.running();
        if !running.contains(&master) {
            return Err(format!("the sentinels name {master}, which is not running"));
        }
        let role = replication(master).await?;
        if role.role != "master" {
            return Err(format!(
                "{master}, named by the sentinels, says role:{}",
                role.role
            ));
        }
        let replicas: Vec<u16> = running.into_iter().filter(|&p| p != master).collect();
        for &port in &replicas {
            let r = replication(port).await?;
            let master_port = r.master_port.map(|p| self.plain(p));
            if r.role != "slave" || master_port != Some(master) || !r.link_up {
                return Err(format!(
                    "{port} is not an up-to-date replica of {master}: role:{}, master_port \
                     {:?}, link up: {}",
                    r.role, master_port, r.link_up
                ));
            }
        }
        for s in self.running_sentinels() {
            let known = self.sentinel_table(s, "replicas").await?;
            for &port in &replicas {
                let entry = known
                    .iter()
                    .find(|e| e.port == Some(port))
                    .ok_or_else(|| format!("sentinel {s} does not know replica {port}"))?;
                // Not its `master-link-status`: a sentinel refreshes what a replica says of
                // its link only every 10 s (every second while the master is down, in time
                // for a failover); the replica's own word is checked above.
                if !entry.healthy() {
                    return Err(format!("sentinel {s} sees replica {port} as {entry:?}"));
                }
            }
            let mut others: Vec<u16> = self
                .running_sentinels()
                .into_iter()
                .filter(|&p| p != s)
                .collect();
            others.sort_unstable();
            let peers = self.sentinel_table(s, "sentinels").await?;
            let mut seen: Vec<u16> = peers
                .iter()
                .filter(|e| e.healthy())
                .filter_map(|e| e.port)
                .collect();
            seen.sort_unstable();
            if seen != others {
                return Err(format!(
                    "sentinel {s} sees sentinels {seen:?} up, not {others:?} ({peers:?})"
                ));
            }
        }
        Ok(master)
    }

    /// The master's port, if every running sentinel names the same one.
    async fn try_master_port(&self) -> Result<u16, String> {
        let mut answer: Option<(u16, u16)> = None;
        for s in self.running_sentinels() {
            let mut cmd = redis::cmd("SENTINEL");
            cmd.arg("GET-MASTER-ADDR-BY-NAME").arg(&self.master_name);
            let addr: Option<(String, String)> = query(s, &cmd)
                .await
                .map_err(|e| format!("sentinel {s}: {e:#}"))?;
            let (host, port) = addr
                .ok_or_else(|| format!("sentinel {s} does not know master {}", self.master_name))?;
            let port: u16 = port
                .parse()
                .map(|p| self.plain(p))
                .map_err(|_| format!("sentinel {s} names the master {host}:{port}"))?;
            match answer {
                Some((first, p)) if p != port => {
                    return Err(format!(
                        "sentinels {first} and {s} disagree on the master: {p} / {port}"
                    ));
                }
                Some(_) => {}
                None => answer = Some((s, port)),
            }
        }
        answer
            .map(|(_, port)| port)
            .ok_or_else(|| "no sentinel runs".to_string())
    }

    /// `SENTINEL <what> <master name>` (`replicas`, `sentinels`) at sentinel `port`.
    async fn sentinel_table(&self, port: u16, what: &str) -> Result<Vec<TableEntry>, String> {
        let mut cmd = redis::cmd("SENTINEL");
        cmd.arg(what).arg(&self.master_name);
        let rows: Vec<Vec<String>> = query(port, &cmd)
            .await
            .map_err(|e| format!("sentinel {port}: SENTINEL {what}: {e:#}"))?;
        Ok(rows
            .into_iter()
            .map(|row| {
                let mut entry = TableEntry::new(row);
                entry.port = entry.port.map(|p| self.plain(p));
                entry
            })
            .collect())
    }

    /// The plain port of the process whose TLS port is `port`; `port` itself if it is none's
    /// (a plain port already). Sentinels and replicas answer TLS ports in a group with TLS.
    fn plain(&self, port: u16) -> u16 {
        self.nodes
            .iter()
            .chain(&self.sentinels)
            .find(|i| i.tls_port == Some(port))
            .map_or(port, |i| i.port)
    }

    /// The answer to `cmd` at the master the sentinels name, retried for up to [`SOON`].
    async fn at_master<T: redis::FromRedisValue>(&self, what: &str, cmd: &redis::Cmd) -> T {
        until(what, SOON, || async {
            let port = self.try_master_port().await?;
            query(port, cmd)
                .await
                .map_err(|e| format!("master {port}: {e:#}"))
        })
        .await
    }

    fn running(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.proc.is_some())
            .map(|n| n.port)
            .collect()
    }

    fn running_sentinels(&self) -> Vec<u16> {
        self.sentinels
            .iter()
            .filter(|s| s.proc.is_some())
            .map(|s| s.port)
            .collect()
    }

    fn node_mut(&mut self, port: u16) -> &mut Instance {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no data node of the Sentinel group on port {port}"))
    }
}

impl Drop for RedisSentinel {
    fn drop(&mut self) {
        // Dropping the processes kills them (and prints their output if a test panics).
        self.sentinels.clear();
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// What a process of the group is, when it starts.
#[derive(Clone, Copy)]
enum Member {
    Master,
    /// A replica of the master on that port (its TLS port, in a group with TLS).
    ReplicaOf(u16),
    /// A sentinel monitoring the master on that port (its TLS port, in a group with TLS).
    Sentinel(u16),
}

/// Spawns a data node in `dir` (serving TLS on `tls_port` too, if given; a replica of
/// `replica_of`, if given) and waits until it answers as itself.
async fn spawn_node(
    program: &OsString,
    dir: &Path,
    port: u16,
    tls_port: Option<u16>,
    replica_of: Option<u16>,
) -> anyhow::Result<Proc> {
    let mut command = Command::new(program);
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .args(["--repl-diskless-sync-delay", "0"])
        .arg("--dir")
        .arg(dir)
        .args(["--loglevel", "notice"]);
    if let Some(tls_port) = tls_port {
        command.args(crate::tls::server_args(tls_port));
    }
    if let Some(master) = replica_of {
        command.args(["--replicaof", "127.0.0.1", &master.to_string()]);
    }
    let proc = Proc::spawn(&format!("redis-{port}"), command, Logs::Memory).map_err(|e| {
        e.context("install redis-server (apt-get install redis-server), or name it")
    })?;
    answering(proc, port).await
}

/// Writes a fresh `sentinel.conf` in `dir` (Sentinel rewrites it as it learns), spawns a
/// sentinel on it (serving TLS on `tls_port` too, if given) monitoring `master_name` on
/// 127.0.0.1 at `master_port`, and waits until it answers as itself.
async fn spawn_sentinel(
    program: &OsString,
    dir: &Path,
    port: u16,
    tls_port: Option<u16>,
    master_name: &str,
    master_port: u16,
) -> anyhow::Result<Proc> {
    let conf = dir.join("sentinel.conf");
    std::fs::write(
        &conf,
        format!(
            "port {port}\n\
             {tls}\
             bind 127.0.0.1\n\
             protected-mode no\n\
             dir \"{dir}\"\n\
             loglevel notice\n\
             sentinel resolve-hostnames no\n\
             sentinel announce-ip 127.0.0.1\n\
             sentinel monitor {master_name} 127.0.0.1 {master_port} {QUORUM}\n\
             sentinel down-after-milliseconds {master_name} 1000\n\
             sentinel failover-timeout {master_name} 3000\n\
             sentinel parallel-syncs {master_name} 1\n",
            dir = dir.display(),
            tls = tls_port.map(crate::tls::config_lines).unwrap_or_default(),
        ),
    )?;
    let mut command = Command::new(program);
    command.arg(&conf).arg("--sentinel");
    let proc = Proc::spawn(&format!("sentinel-{port}"), command, Logs::Memory).map_err(|e| {
        e.context("install redis-server (apt-get install redis-server), or name it")
    })?;
    answering(proc, port).await
}

/// `proc` once the server on `port` answers as that process; fails if it exited first (the
/// port was taken) or never answered.
async fn answering(mut proc: Proc, port: u16) -> anyhow::Result<Proc> {
    let url = format!("redis://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(status) = proc.exited() {
            anyhow::bail!("{} exited ({status})\n{}", proc.name, proc.log_tail(20));
        }
        if crate::redis_server::served_by(&url, proc.pid()).await {
            return Ok(proc);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!(
        "{} did not answer within 5 s\n{}",
        proc.name,
        proc.log_tail(20)
    )
}

/// What `INFO replication` of a data node says.
struct Replication {
    /// `master` or `slave`.
    role: String,
    /// A replica's master.
    master_port: Option<u16>,
    /// `master_link_status:up` (replicas only).
    link_up: bool,
}

async fn replication(port: u16) -> Result<Replication, String> {
    let mut cmd = redis::cmd("INFO");
    cmd.arg("replication");
    let info: String = query(port, &cmd)
        .await
        .map_err(|e| format!("node {port}: {e:#}"))?;
    let field = |name: &str| {
        info.lines()
            .find_map(|l| l.trim().strip_prefix(name)?.strip_prefix(':'))
            .map(str::to_string)
    };
    Ok(Replication {
        role: field("role").unwrap_or_default(),
        master_port: field("master_port").and_then(|p| p.parse().ok()),
        link_up: field("master_link_status").as_deref() == Some("up"),
    })
}

/// An entry of `SENTINEL replicas` or `SENTINEL sentinels`: field names and values.
struct TableEntry {
    port: Option<u16>,
    fields: Vec<(String, String)>,
}

impl TableEntry {
    fn new(flat: Vec<String>) -> Self {
        let mut flat = flat.into_iter();
        let mut fields = Vec::new();
        while let (Some(k), Some(v)) = (flat.next(), flat.next()) {
            fields.push((k, v));
        }
        let mut entry = Self { port: None, fields };
        entry.port = entry.get("port").and_then(|p| p.parse().ok());
        entry
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Neither down (subjectively or objectively) nor disconnected.
    fn healthy(&self) -> bool {
        self.get("flags").is_some_and(|flags| {
            !flags
                .split(',')
                .any(|f| matches!(f, "s_down" | "o_down" | "disconnected"))
        })
    }
}

impl std::fmt::Debug for TableEntry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown = ["name", "flags", "master-link-status", "master-port"];
        f.debug_map()
            .entries(
                self.fields
                    .iter()
                    .filter(|(k, _)| shown.contains(&k.as_str()))
                    .map(|(k, v)| (k, v)),
            )
            .finish()
    }
}
