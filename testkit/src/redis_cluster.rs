//! A private Redis Cluster on ports of 127.0.0.1, with no persistence: the multi-node
//! counterpart of [`crate::redis_server`], for tests of the cluster bus (sharded pub/sub,
//! slot migrations, failovers).
//!
//! [`RedisCluster::start`] runs `masters × (1 + replicas)` `redis-server` processes (the
//! program named by `REDIS_SERVER`, else `redis-server` from PATH), each with its own
//! directory and `nodes.conf` in one temporary directory, and joins them with
//! `redis-cli --cluster create` (`REDIS_CLI`, else the `redis-cli` next to `REDIS_SERVER`,
//! else from PATH). Each node gets two free ports: its client port and its cluster bus port
//! (`--cluster-port`). The default bus port, client port + 10,000, would land in the
//! kernel's ephemeral range or on a port [`free_port`] hands to another test.
//!
//! The cluster is ready when it has *settled*: every running node answers, says
//! `cluster_state:ok`, sees all 16,384 slots covered, suspects no running node, and agrees
//! with the others on the slot map and on who replicates whom; every replica's link to its
//! master is up. Start, migration and restart wait for that (or for what they changed to be
//! seen everywhere), never for a fixed time. With `--cluster-node-timeout 1000`, a killed
//! master is replaced in two or three seconds.
//!
//! Nodes run with `--cluster-allow-replica-migration no` (replicas stay with the master
//! they were given, the topology changes only when a test changes it) and
//! `--cluster-replica-validity-factor 0` (a replica always takes over from a dead master,
//! however long ago it last heard from it), and `--repl-diskless-sync-delay 0` (a replica's
//! full sync, at start and after a restart, begins at once instead of after 5 s).
//!
//! Sharded pub/sub as seen with Redis 7.0 (what tests of the cluster bus can rely on):
//!
//! - a slot migrated away (`CLUSTER SETSLOT <slot> NODE <other>` on its old master): the old
//!   master *and its replicas* unsubscribe their clients from the shard channels of that
//!   slot, a `sunsubscribe` push per channel, the connection left open; while the slot is
//!   only `MIGRATING`, `SSUBSCRIBE` and `SPUBLISH` there are still served (no `ASK`: shard
//!   channels are not keys), and the `IMPORTING` node answers them `MOVED` to the owner;
//! - a failover after a crash: the promoted replica keeps its shard subscribers, who receive
//!   what is published on it from then on; a manual failover (`CLUSTER FAILOVER`): the
//!   demoted master unsubscribes its clients (`sunsubscribe`), the promoted one keeps its;
//! - `SPUBLISH` counts the receivers on the node it is sent to, though replicas of the shard
//!   deliver it to theirs too;
//! - plain `SUBSCRIBE` channels are not affected by any of this.
//!
//! [`RedisCluster::start_tls`] makes a cluster whose nodes serve TLS too, each on a third
//! port, with the certificate of the [test CA](crate::tls), and talk to each other over TLS
//! (`--tls-cluster yes`, `--tls-replication yes`): replicas get
//! [`RedisCluster::tls_seed_urls`]. With both ports open, Redis 7.0 answers each client with
//! the ports of its kind: `CLUSTER SLOTS`, `CLUSTER NODES` and `MOVED` name the TLS ports to a
//! TLS client and the plain ports to a plain one. So the admin methods here, which connect to
//! the plain ports, keep taking and returning plain ports, and mean the same as without TLS.
//! `redis-cli --cluster create` joins the nodes over TLS, at their TLS ports; a node added
//! later is met at its plain port, which gossip soon pairs with its TLS one. A replica finds
//! its master at the master's TLS port, hence `--tls-replication yes` (its
//! `INFO replication` names that port).
//!
//! Dropping the value kills every node (SIGKILL) and deletes the directory.

use std::ffi::OsString;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, FromRedisValue};

use crate::process::{Logs, Proc};
use crate::{SOON, free_port};

/// How long a start, a migration, a failover or a rejoin may take on a loaded machine.
const PATIENCE: Duration = Duration::from_secs(30);
/// The number of hash slots of a Redis Cluster.
pub const SLOTS: u16 = 16_384;

pub struct RedisCluster {
    /// The temporary directory, with one directory per node (its `nodes.conf`).
    root: PathBuf,
    program: OsString,
    /// Whether the nodes serve TLS too ([`RedisCluster::start_tls`]).
    tls: bool,
    nodes: Vec<Node>,
}

struct Node {
    port: u16,
    bus_port: u16,
    /// The TLS client port, in a cluster with TLS.
    tls_port: Option<u16>,
    dir: PathBuf,
    /// `None` once killed.
    proc: Option<Proc>,
}

impl RedisCluster {
    /// Starts `masters` masters with `replicas_per_master` replicas each and waits until the
    /// cluster has settled; panics if it cannot. `redis-cli --cluster create` needs at least
    /// three masters.
    pub async fn start(masters: usize, replicas_per_master: usize) -> Self {
        Self::start_with(masters, replicas_per_master, false).await
    }

    /// [`start`](Self::start), with nodes that serve TLS too and talk to each other over TLS
    /// (see the module doc): replicas get [`tls_seed_urls`](Self::tls_seed_urls).
    pub async fn start_tls(masters: usize, replicas_per_master: usize) -> Self {
        Self::start_with(masters, replicas_per_master, true).await
    }

    async fn start_with(masters: usize, replicas_per_master: usize, tls: bool) -> Self {
        assert!(
            masters >= 3,
            "a Redis Cluster needs at least 3 masters (redis-cli --cluster create refuses fewer)"
        );
        let root = std::env::temp_dir().join(format!(
            "fanout-redis-cluster-{}-{:08x}",
            std::process::id(),
            crate::random_u64() as u32
        ));
        std::fs::create_dir(&root).expect("creating the Redis Cluster temp dir");
        let mut cluster = Self {
            root,
            program: std::env::var_os("REDIS_SERVER").unwrap_or_else(|| "redis-server".into()),
            tls,
            nodes: Vec::new(),
        };
        for i in 0..masters * (1 + replicas_per_master) {
            let dir = cluster.root.join(format!("node{i}"));
            std::fs::create_dir(&dir).expect("creating a Redis Cluster node's dir");
            let mut failures = Vec::new();
            for _ in 0..5 {
                let (port, bus_port, tls_port) = (free_port(), free_port(), tls.then(free_port));
                // A node that failed to bind may have written its nodes.conf: start afresh.
                let _ = std::fs::remove_file(dir.join("nodes.conf"));
                match spawn_node(&cluster.program, &dir, port, bus_port, tls_port).await {
                    Ok(proc) => {
                        cluster.nodes.push(Node {
                            port,
                            bus_port,
                            tls_port,
                            dir,
                            proc: Some(proc),
                        });
                        break;
                    }
                    Err(e) => failures.push(format!("{e:#}")),
                }
            }
            assert!(
                failures.len() < 5,
                "redis-server did not start in cluster mode (is it installed and on PATH, or \
                 named by REDIS_SERVER?):\n{}",
                failures.join("\n")
            );
        }
        cluster.create(replicas_per_master);
        until("the new Redis Cluster to settle", PATIENCE, || async {
            let shards = cluster.settled().await?;
            let complete = shards.len() == masters
                && shards.iter().all(|(_, r)| r.len() == replicas_per_master);
            if complete {
                Ok(())
            } else {
                Err(format!(
                    "the nodes see shards {shards:?}, not {masters} masters with \
                     {replicas_per_master} replicas each"
                ))
            }
        })
        .await;
        cluster
    }

    /// `redis://127.0.0.1:<port>` of every node (killed ones included), masters and replicas.
    pub fn urls(&self) -> Vec<String> {
        self.nodes
            .iter()
            .map(|n| format!("redis://127.0.0.1:{}", n.port))
            .collect()
    }

    /// The [`urls`](Self::urls) separated by commas: a `REDIS_CLUSTER_URLS`.
    pub fn seed_urls(&self) -> String {
        self.urls().join(",")
    }

    /// `rediss://127.0.0.1:<TLS port>` of every node (killed ones included), in the order of
    /// [`ports`](Self::ports), separated by commas: the `REDIS_CLUSTER_URLS` of replicas on
    /// TLS. Panics unless the cluster was started with [`start_tls`](Self::start_tls).
    pub fn tls_seed_urls(&self) -> String {
        assert!(
            self.tls,
            "tls_seed_urls: the cluster was not started with RedisCluster::start_tls"
        );
        self.nodes
            .iter()
            .filter_map(|n| n.tls_port.map(crate::tls::url))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// The client port of every node, killed ones included.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// The running nodes that the cluster sees as masters (not failed), sorted: the running
    /// nodes agree on them (waits up to [`SOON`] for that).
    pub async fn masters(&self) -> Vec<u16> {
        until(
            "the Redis Cluster nodes to agree on the masters",
            SOON,
            || async {
                let views = self.views().await?;
                let running = self.running();
                let masters = |v: &View| -> Vec<u16> {
                    let mut ports: Vec<u16> = v
                        .shards()
                        .into_iter()
                        .map(|(m, _)| m)
                        .filter(|p| running.contains(p))
                        .collect();
                    ports.sort_unstable();
                    ports
                };
                agree(&views, masters)
            },
        )
        .await
    }

    /// The Redis Cluster hash slot of `key`: CRC16 (XMODEM) of the key, or of its hash tag
    /// (what is between the first `{` and the next `}`, if not empty), modulo 16,384. Shard
    /// channels map to slots the same way.
    pub fn slot(key: &str) -> u16 {
        let key = key.as_bytes();
        let hashed = key
            .iter()
            .position(|&b| b == b'{')
            .and_then(|open| {
                let rest = &key[open + 1..];
                let close = rest.iter().position(|&b| b == b'}')?;
                (close > 0).then(|| &rest[..close])
            })
            .unwrap_or(key);
        crc16_xmodem(hashed) % SLOTS
    }

    /// The port of the master that owns `slot`, as the running nodes agree (waits up to
    /// [`SOON`] for that). Right after a kill, that may be the dead master until its replica
    /// takes over: [`wait_failover`](Self::wait_failover) waits for that.
    pub async fn owner(&self, slot: u16) -> u16 {
        until(
            &format!("the Redis Cluster nodes to agree on the owner of slot {slot}"),
            SOON,
            || self.try_owner(slot),
        )
        .await
    }

    /// Moves `slot` (and its keys, if any) from its owner to the master on `to_port`, the way
    /// `redis-cli --cluster reshard` does, and waits until every running node sees the new
    /// owner. Nothing happens if `to_port` owns it already.
    pub async fn migrate_slot(&self, slot: u16, to_port: u16) {
        if let Some(from_port) = self.begin_migration(slot, to_port).await {
            self.finish_migration(slot, from_port, to_port).await;
        }
    }

    /// The first half of [`migrate_slot`](Self::migrate_slot): marks `slot` `IMPORTING` on
    /// the master on `to_port` and `MIGRATING` on its owner, and moves its keys. The owner
    /// keeps serving the slot's shard channels meanwhile. Returns the owner's port, or `None`
    /// if `to_port` owns the slot already.
    pub async fn begin_migration(&self, slot: u16, to_port: u16) -> Option<u16> {
        assert!(slot < SLOTS, "no slot {slot} in a Redis Cluster");
        assert!(
            self.masters().await.contains(&to_port),
            "migrate_slot: {to_port} is not a running master of the Redis Cluster"
        );
        let from_port = self.owner(slot).await;
        if from_port == to_port {
            return None;
        }
        let from_id = self.node_id(from_port).await;
        let to_id = self.node_id(to_port).await;
        self.admin::<()>(to_port, &setslot(slot, "IMPORTING", &from_id))
            .await;
        self.admin::<()>(from_port, &setslot(slot, "MIGRATING", &to_id))
            .await;
        loop {
            let mut getkeys = redis::cmd("CLUSTER");
            getkeys.arg("GETKEYSINSLOT").arg(slot).arg(100);
            let keys: Vec<Vec<u8>> = self.admin(from_port, &getkeys).await;
            if keys.is_empty() {
                break;
            }
            let mut migrate = redis::cmd("MIGRATE");
            migrate
                .arg("127.0.0.1")
                .arg(to_port)
                .arg("")
                .arg(0)
                .arg(5_000)
                .arg("REPLACE")
                .arg("KEYS")
                .arg(&keys);
            self.admin::<()>(from_port, &migrate).await;
        }
        Some(from_port)
    }

    /// The second half of [`migrate_slot`](Self::migrate_slot): gives `slot` to the master
    /// on `to_port` everywhere and waits until every running node sees it there.
    pub async fn finish_migration(&self, slot: u16, from_port: u16, to_port: u16) {
        let to_id = self.node_id(to_port).await;
        // The target first (it takes the slot and bumps its epoch), then the source (it
        // stops serving it), then the other masters; gossip tells the replicas.
        self.admin::<()>(to_port, &setslot(slot, "NODE", &to_id))
            .await;
        self.admin::<()>(from_port, &setslot(slot, "NODE", &to_id))
            .await;
        for port in self.masters().await {
            if port != from_port && port != to_port {
                self.admin::<()>(port, &setslot(slot, "NODE", &to_id)).await;
            }
        }
        until(
            &format!("every node to see slot {slot} on {to_port}"),
            PATIENCE,
            || async {
                let views = self.views().await?;
                for v in &views {
                    if !v.state_ok {
                        return Err(format!("node {}: cluster_state is not ok", v.port));
                    }
                    if v.owner(slot) != Some(to_port) {
                        return Err(format!(
                            "node {} sees slot {slot} on {:?}",
                            v.port,
                            v.owner(slot)
                        ));
                    }
                }
                Ok(())
            },
        )
        .await;
    }

    /// Has the node on `port` announce `announced` as its client port instead (`CONFIG SET
    /// cluster-announce-port`), so that clients that follow the cluster's map reach it there,
    /// through a [`Proxy`](crate::Proxy) say. Waits until every running node's map says so.
    /// The node's own methods here take its announced port from then on.
    pub async fn announce(&self, port: u16, announced: u16) {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("SET").arg("cluster-announce-port").arg(announced);
        self.admin::<()>(port, &cmd).await;
        self.until_every_table(
            &format!("every node to announce {port} as {announced}"),
            |t| {
                t.lines()
                    .any(|l| l.contains(&format!("127.0.0.1:{announced}@")))
            },
        )
        .await;
    }

    /// Removes the master on `port`, which must own no slot any more (migrate them away
    /// first), the way `redis-cli --cluster del-node` does: every other node forgets it,
    /// then it is shut down. Waits until no running node knows it.
    pub async fn remove_master(&mut self, port: u16) {
        let views = self
            .views()
            .await
            .unwrap_or_else(|e| panic!("remove_master: {e}"));
        let owned = views.iter().find(|v| v.port == port).map_or(0, |v| {
            (0..SLOTS).filter(|s| v.owner(*s) == Some(port)).count()
        });
        assert_eq!(owned, 0, "remove_master: {port} still owns {owned} slots");
        let id = self.node_id(port).await;
        for other in self.running() {
            if other != port {
                let mut forget = redis::cmd("CLUSTER");
                forget.arg("FORGET").arg(&id);
                self.admin::<()>(other, &forget).await;
            }
        }
        let node = self
            .nodes
            .iter_mut()
            .find(|n| n.port == port)
            .expect("remove_master: no such node");
        node.proc = None;
        self.until_every_table(&format!("every Redis Cluster node to forget {port}"), |t| {
            !t.lines().any(|l| l.contains(&format!("127.0.0.1:{port}@")))
        })
        .await;
    }

    /// Kills the master on `port` (SIGKILL, like a crash) and reaps it. Its replica takes
    /// over once the other masters agree that it failed: see
    /// [`wait_failover`](Self::wait_failover).
    pub async fn kill_master(&mut self, port: u16) {
        assert!(
            self.masters().await.contains(&port),
            "kill_master: {port} is not a running master of the Redis Cluster"
        );
        // Dropping the process kills it with SIGKILL and waits for it.
        self.node_mut(port).proc = None;
    }

    /// Waits until a running node other than `old_port` owns `slot`, all running nodes agree
    /// on it and say `cluster_state:ok`; returns the new owner's port.
    pub async fn wait_failover(&self, slot: u16, old_port: u16) -> u16 {
        until(
            &format!("a failover of slot {slot} away from {old_port}"),
            PATIENCE,
            || async {
                let views = self.views().await?;
                if let Some(v) = views.iter().find(|v| !v.state_ok) {
                    return Err(format!("node {}: cluster_state is not ok", v.port));
                }
                let owner = agree(&views, |v| v.owner(slot))?;
                match owner {
                    Some(p) if p != old_port && self.running().contains(&p) => Ok(p),
                    other => Err(format!("slot {slot} is still on {other:?}")),
                }
            },
        )
        .await
    }

    /// Starts the node on `port` again (killed by [`kill_master`](Self::kill_master)), on its
    /// ports with its `nodes.conf` and no data, and waits until the cluster has settled. A
    /// master whose slots were taken over rejoins as a replica of the node that took them.
    pub async fn restart(&mut self, port: u16) {
        let program = self.program.clone();
        let node = self.node_mut(port);
        assert!(
            node.proc.is_none(),
            "restart: the node on {port} still runs"
        );
        let deadline = Instant::now() + Duration::from_secs(10);
        let proc = loop {
            match spawn_node(&program, &node.dir, node.port, node.bus_port, node.tls_port).await {
                Ok(proc) => break proc,
                Err(e) => assert!(
                    Instant::now() < deadline,
                    "redis-server did not restart on port {port}: {e:#}"
                ),
            }
        };
        node.proc = Some(proc);
        until(
            &format!("the Redis Cluster to settle after {port} restarted"),
            PATIENCE,
            || self.settled(),
        )
        .await;
    }

    /// Starts one more node, has the cluster meet it, and waits until every running node
    /// knows it: a master without slots (give it some with [`migrate_slot`](Self::migrate_slot)).
    /// Returns its port.
    pub async fn add_master(&mut self) -> u16 {
        let dir = self.root.join(format!("node{}", self.nodes.len()));
        std::fs::create_dir(&dir).expect("creating a Redis Cluster node's dir");
        let mut failures = Vec::new();
        let (port, bus_port, tls_port, proc) = loop {
            let (port, bus_port, tls_port) = (free_port(), free_port(), self.tls.then(free_port));
            let _ = std::fs::remove_file(dir.join("nodes.conf"));
            match spawn_node(&self.program, &dir, port, bus_port, tls_port).await {
                Ok(proc) => break (port, bus_port, tls_port, proc),
                Err(e) => failures.push(format!("{e:#}")),
            }
            assert!(
                failures.len() < 5,
                "redis-server did not start:\n{}",
                failures.join("\n")
            );
        };
        let known = self.running();
        self.nodes.push(Node {
            port,
            bus_port,
            tls_port,
            dir,
            proc: Some(proc),
        });
        let mut meet = redis::cmd("CLUSTER");
        meet.arg("MEET").arg("127.0.0.1").arg(port).arg(bus_port);
        let _: String = self.admin(known[0], &meet).await;
        self.until_every_table(
            &format!("every Redis Cluster node to know the new node {port}"),
            |t| {
                t.lines().any(|l| {
                    l.contains(&format!("127.0.0.1:{port}@"))
                        && l.contains("master")
                        && !l.contains("handshake")
                        && !l.contains("fail")
                })
            },
        )
        .await;
        port
    }

    /// A new connection to the node on `port` (cluster commands on it are not redirected).
    pub async fn node_conn(&self, port: u16) -> MultiplexedConnection {
        redis::Client::open(format!("redis://127.0.0.1:{port}"))
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap_or_else(|e| panic!("connecting to the Redis Cluster node on {port}: {e}"))
    }

    /// `SPUBLISH channel payload` at the master that owns the channel's slot; returns how
    /// many subscribers (of that master) received it. Retries for up to [`SOON`] while the
    /// cluster cannot take it (the owner is dead or moving, the answer is `MOVED`).
    pub async fn spublish(&self, channel: &str, payload: impl AsRef<[u8]>) -> i64 {
        let payload = payload.as_ref();
        self.at_owner(&format!("SPUBLISH {channel}"), channel, || {
            let mut cmd = redis::cmd("SPUBLISH");
            cmd.arg(channel).arg(payload);
            cmd
        })
        .await
    }

    /// `PUBSUB SHARDNUMSUB channel` at the master that owns the channel's slot: how many of
    /// its connections subscribe to it (subscribers on replicas are not counted).
    pub async fn shard_numsub(&self, channel: &str) -> i64 {
        let pairs: Vec<(String, i64)> = self
            .at_owner(&format!("PUBSUB SHARDNUMSUB {channel}"), channel, || {
                let mut cmd = redis::cmd("PUBSUB");
                cmd.arg("SHARDNUMSUB").arg(channel);
                cmd
            })
            .await;
        pairs.first().map_or(0, |(_, n)| *n)
    }

    /// Joins the started nodes with `redis-cli --cluster create` (over TLS, at the TLS ports,
    /// in a cluster with TLS). It blocks the thread for the second or so the tool takes, like
    /// `initdb` in [`crate::pg_server`]: the nodes are processes of their own and need nothing
    /// from this runtime meanwhile.
    fn create(&self, replicas_per_master: usize) {
        let cli = cli_program(&self.program);
        let mut command = Command::new(&cli);
        if self.tls {
            command
                .arg("--tls")
                .arg("--cacert")
                .arg(&crate::tls::test_ca().ca_file);
        }
        let out = command
            .arg("--cluster")
            .arg("create")
            .args(
                self.nodes
                    .iter()
                    .map(|n| format!("127.0.0.1:{}", n.tls_port.unwrap_or(n.port))),
            )
            .args(["--cluster-replicas", &replicas_per_master.to_string()])
            .arg("--cluster-yes")
            .output()
            .unwrap_or_else(|e| {
                panic!(
                    "cannot run {} (install redis-tools, or name it with REDIS_CLI): {e}",
                    cli.to_string_lossy()
                )
            });
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Whether the cluster has settled (see the module doc); its shards if so, what is
    /// missing if not.
    async fn settled(&self) -> Result<Vec<(u16, Vec<u16>)>, String> {
        let views = self.views().await?;
        let running = self.running();
        for v in &views {
            if !v.state_ok {
                return Err(format!("node {}: cluster_state is not ok", v.port));
            }
            let covered = v.covered();
            if covered != usize::from(SLOTS) {
                return Err(format!("node {} sees {covered} slots covered", v.port));
            }
            if let Some(e) = v
                .entries
                .iter()
                .find(|e| e.failing && running.contains(&e.port))
            {
                return Err(format!("node {} suspects node {}", v.port, e.port));
            }
            if v.myself().is_some_and(|me| !me.master) && !v.link_up {
                return Err(format!("replica {}: its master link is down", v.port));
            }
        }
        agree(&views, View::slot_map)?;
        agree(&views, View::shards)
    }

    /// Waits until `check` holds for the `CLUSTER NODES` table of every running node.
    async fn until_every_table(&self, what: &str, check: impl Fn(&str) -> bool) {
        until(what, PATIENCE, || async {
            for node in self.running() {
                let mut cmd = redis::cmd("CLUSTER");
                cmd.arg("NODES");
                let table: String = query(node, &cmd).await.map_err(|e| format!("{e:#}"))?;
                if !check(&table) {
                    return Err(format!("node {node} does not say so yet"));
                }
            }
            Ok(())
        })
        .await;
    }

    /// The view of every running node; an error if one does not answer.
    async fn views(&self) -> Result<Vec<View>, String> {
        let mut views = Vec::new();
        for port in self.running() {
            views.push(
                view(port)
                    .await
                    .map_err(|e| format!("node {port}: {e:#}"))?,
            );
        }
        Ok(views)
    }

    async fn try_owner(&self, slot: u16) -> Result<u16, String> {
        let views = self.views().await?;
        agree(&views, |v| v.owner(slot))?.ok_or_else(|| format!("no node owns slot {slot}"))
    }

    /// The answer to `cmd()` at the owner of `key`'s slot, retried for up to [`SOON`].
    async fn at_owner<T: FromRedisValue>(
        &self,
        what: &str,
        key: &str,
        cmd: impl Fn() -> redis::Cmd,
    ) -> T {
        let slot = Self::slot(key);
        until(what, SOON, || async {
            let port = self.try_owner(slot).await?;
            query(port, &cmd())
                .await
                .map_err(|e| format!("node {port}: {e:#}"))
        })
        .await
    }

    /// `CLUSTER MYID` of the node on `port`.
    async fn node_id(&self, port: u16) -> String {
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("MYID");
        self.admin(port, &cmd).await
    }

    /// The answer of the node on `port` to `cmd`; panics on an error.
    async fn admin<T: FromRedisValue>(&self, port: u16, cmd: &redis::Cmd) -> T {
        query(port, cmd).await.unwrap_or_else(|e| {
            panic!(
                "Redis Cluster node {port}: {} failed: {e:#}",
                String::from_utf8_lossy(&cmd.get_packed_command()).replace("\r\n", " ")
            )
        })
    }

    fn running(&self) -> Vec<u16> {
        self.nodes
            .iter()
            .filter(|n| n.proc.is_some())
            .map(|n| n.port)
            .collect()
    }

    fn node_mut(&mut self, port: u16) -> &mut Node {
        self.nodes
            .iter_mut()
            .find(|n| n.port == port)
            .unwrap_or_else(|| panic!("no node of the Redis Cluster on port {port}"))
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        // Dropping the processes kills them (and prints their output if a test panics).
        self.nodes.clear();
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

/// Spawns a cluster-enabled server in `dir` (serving TLS on `tls_port` too, if given) and
/// waits until it answers as itself; fails if it exited first (a port was taken), never
/// answered, or cannot be run at all.
async fn spawn_node(
    program: &OsString,
    dir: &Path,
    port: u16,
    bus_port: u16,
    tls_port: Option<u16>,
) -> anyhow::Result<Proc> {
    let mut command = Command::new(program);
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args([
            "--cluster-enabled",
            "yes",
            "--cluster-config-file",
            "nodes.conf",
        ])
        .args(["--cluster-port", &bus_port.to_string()])
        .args(["--cluster-node-timeout", "1000"])
        .args(["--cluster-allow-replica-migration", "no"])
        .args(["--cluster-replica-validity-factor", "0"])
        .args(["--repl-diskless-sync-delay", "0"])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no"])
        .arg("--dir")
        .arg(dir)
        .args(["--loglevel", "notice"]);
    if let Some(tls_port) = tls_port {
        command
            .args(["--tls-cluster", "yes"])
            .args(crate::tls::server_args(tls_port));
    }
    let mut proc = Proc::spawn(&format!("redis-{port}"), command, Logs::Memory).map_err(|e| {
        e.context("install redis-server (apt-get install redis-server), or name it")
    })?;
    let url = format!("redis://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Some(status) = proc.exited() {
            anyhow::bail!(
                "redis-server on port {port} (bus {bus_port}) exited ({status})\n{}",
                proc.log_tail(20)
            );
        }
        if crate::redis_server::served_by(&url, proc.pid()).await {
            return Ok(proc);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    anyhow::bail!(
        "redis-server on port {port} did not answer within 5 s\n{}",
        proc.log_tail(20)
    )
}

/// `REDIS_CLI`, else the `redis-cli` next to the server program, else `redis-cli` from PATH.
/// Shared with [`crate::tls`]'s tests.
pub(crate) fn cli_program(server: &OsString) -> OsString {
    if let Some(cli) = std::env::var_os("REDIS_CLI") {
        return cli;
    }
    Path::new(server)
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .map(|dir| dir.join("redis-cli"))
        .filter(|cli| cli.is_file())
        .map_or_else(|| "redis-cli".into(), PathBuf::into_os_string)
}

/// `cmd` on a fresh connection to the node on `port`, with generous timeouts (a `MIGRATE`
/// of many keys may take a while). Shared with [`crate::redis_sentinel`].
pub(crate) async fn query<T: FromRedisValue>(port: u16, cmd: &redis::Cmd) -> anyhow::Result<T> {
    let config = AsyncConnectionConfig::new()
        .set_connection_timeout(Some(Duration::from_secs(1)))
        .set_response_timeout(Some(Duration::from_secs(10)));
    let mut conn = redis::Client::open(format!("redis://127.0.0.1:{port}"))?
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    Ok(cmd.query_async(&mut conn).await?)
}

/// What one node sees: `CLUSTER INFO`, `CLUSTER NODES` and its replication link.
async fn view(port: u16) -> anyhow::Result<View> {
    let mut info = redis::cmd("CLUSTER");
    info.arg("INFO");
    let info: String = query(port, &info).await?;
    let mut nodes = redis::cmd("CLUSTER");
    nodes.arg("NODES");
    let nodes: String = query(port, &nodes).await?;
    let mut replication = redis::cmd("INFO");
    replication.arg("replication");
    let replication: String = query(port, &replication).await?;
    Ok(View {
        port,
        state_ok: info.lines().any(|l| l.trim() == "cluster_state:ok"),
        link_up: replication
            .lines()
            .any(|l| l.trim() == "master_link_status:up"),
        entries: nodes.lines().filter_map(Entry::parse).collect(),
    })
}

/// The value `f` gives for every view, if they all give the same; what differs if not.
fn agree<T: PartialEq + std::fmt::Debug>(
    views: &[View],
    f: impl Fn(&View) -> T,
) -> Result<T, String> {
    let mut views = views.iter();
    let first = views.next().ok_or("no node runs")?;
    let value = f(first);
    for v in views {
        let other = f(v);
        if other != value {
            return Err(format!(
                "nodes {} and {} disagree: {value:?} / {other:?}",
                first.port, v.port
            ));
        }
    }
    Ok(value)
}

struct View {
    port: u16,
    state_ok: bool,
    /// `master_link_status:up` (replicas only).
    link_up: bool,
    entries: Vec<Entry>,
}

impl View {
    fn myself(&self) -> Option<&Entry> {
        self.entries.iter().find(|e| e.myself)
    }

    fn owner(&self, slot: u16) -> Option<u16> {
        self.entries
            .iter()
            .find(|e| e.master && e.slots.iter().any(|&(a, b)| (a..=b).contains(&slot)))
            .map(|e| e.port)
    }

    /// `(first slot, last slot, owner)`, sorted.
    fn slot_map(&self) -> Vec<(u16, u16, u16)> {
        let mut map: Vec<(u16, u16, u16)> = self
            .entries
            .iter()
            .filter(|e| e.master)
            .flat_map(|e| e.slots.iter().map(|&(a, b)| (a, b, e.port)))
            .collect();
        map.sort_unstable();
        map
    }

    fn covered(&self) -> usize {
        self.slot_map()
            .iter()
            .map(|&(a, b, _)| usize::from(b - a) + 1)
            .sum()
    }

    /// The masters not seen failing, each with its replicas not seen failing, sorted.
    fn shards(&self) -> Vec<(u16, Vec<u16>)> {
        let mut shards: Vec<(u16, Vec<u16>)> = self
            .entries
            .iter()
            .filter(|m| m.master && !m.failing)
            .map(|m| {
                let mut replicas: Vec<u16> = self
                    .entries
                    .iter()
                    .filter(|r| !r.failing && r.master_id.as_deref() == Some(&m.id))
                    .map(|r| r.port)
                    .collect();
                replicas.sort_unstable();
                (m.port, replicas)
            })
            .collect();
        shards.sort_unstable();
        shards
    }
}

/// A line of `CLUSTER NODES`: `<id> <ip:port@cport[,hostname]> <flags> <master> <ping-sent>
/// <pong-recv> <config-epoch> <link-state> <slot>...`.
struct Entry {
    id: String,
    port: u16,
    myself: bool,
    master: bool,
    /// Flagged `fail` or `fail?` (suspected).
    failing: bool,
    master_id: Option<String>,
    /// Ranges of owned slots (not the `[slot->-id]` of a migration in progress).
    slots: Vec<(u16, u16)>,
}

impl Entry {
    /// `None` for a node still in handshake or without an address.
    fn parse(line: &str) -> Option<Self> {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 8 {
            return None;
        }
        let flags: Vec<&str> = fields[2].split(',').collect();
        if flags.contains(&"handshake") || flags.contains(&"noaddr") {
            return None;
        }
        let addr = fields[1].split(['@', ',']).next()?;
        let port = addr.rsplit(':').next()?.parse().ok()?;
        let slots = fields[8..]
            .iter()
            .filter(|s| !s.starts_with('['))
            .filter_map(|s| match s.split_once('-') {
                Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                None => s.parse().ok().map(|a| (a, a)),
            })
            .collect();
        Some(Self {
            id: fields[0].to_string(),
            port,
            myself: flags.contains(&"myself"),
            master: flags.contains(&"master"),
            failing: flags.contains(&"fail") || flags.contains(&"fail?"),
            master_id: (fields[3] != "-").then(|| fields[3].to_string()),
            slots,
        })
    }
}

/// CRC16/XMODEM (polynomial 0x1021, initial value 0), the checksum of Redis Cluster's key
/// hashing.
fn crc16_xmodem(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &b in bytes {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// Polls `probe` until it succeeds, or panics after `timeout` naming `what` and the last
/// reason it gave: [`crate::eventually`] with the reason kept for the message. Shared with
/// [`crate::redis_sentinel`].
pub(crate) async fn until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        match probe().await {
            Ok(v) => return v,
            Err(why) if Instant::now() >= deadline => {
                panic!("timed out after {timeout:?} waiting for {what}: {why}")
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(25)).await,
        }
    }
}

/// `CLUSTER SETSLOT <slot> <state> <node id>`.
fn setslot(slot: u16, state: &str, id: &str) -> redis::Cmd {
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg("SETSLOT").arg(slot).arg(state).arg(id);
    cmd
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_of_known_keys() {
        assert_eq!(crc16_xmodem(b"123456789"), 0x31C3);
        assert_eq!(RedisCluster::slot("foo"), 12182);
        assert_eq!(RedisCluster::slot("bar"), 5061);
        assert_eq!(RedisCluster::slot("123456789"), 12739);
        assert_eq!(RedisCluster::slot(""), 0);
        assert_eq!(
            RedisCluster::slot("{user1000}.following"),
            RedisCluster::slot("{user1000}.followers")
        );
        assert_eq!(
            RedisCluster::slot("{user1000}.following"),
            RedisCluster::slot("user1000")
        );
        // Only the first `{...}` counts, and an empty one means the whole key.
        assert_eq!(
            RedisCluster::slot("foo{bar}{zap}"),
            RedisCluster::slot("bar")
        );
        assert_eq!(
            RedisCluster::slot("foo{{bar}}zap"),
            RedisCluster::slot("{bar")
        );
        assert_ne!(RedisCluster::slot("foo{}{bar}"), RedisCluster::slot("bar"));
        assert_eq!(RedisCluster::slot("{bar"), crc16_xmodem(b"{bar") % SLOTS);
    }

    #[test]
    fn parses_cluster_nodes_lines() {
        let e = Entry::parse(
            "b0f8 127.0.0.1:21001@21101 myself,master - 0 1796573909000 1 connected \
             0-5460 7000 [13271->-fabf]",
        )
        .unwrap();
        assert_eq!(e.port, 21001);
        assert!(e.myself && e.master && !e.failing);
        assert_eq!(e.master_id, None);
        assert_eq!(e.slots, vec![(0, 5460), (7000, 7000)]);
        let e = Entry::parse(
            "fabf 127.0.0.1:21002@21102,host slave,fail? b0f8 0 1796573910167 2 connected",
        )
        .unwrap();
        assert_eq!(e.port, 21002);
        assert!(!e.master && e.failing);
        assert_eq!(e.master_id.as_deref(), Some("b0f8"));
        assert!(Entry::parse("abcd :0@0 master,noaddr - 0 0 0 disconnected").is_none());
    }
}
