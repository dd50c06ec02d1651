//! The systems under test as child processes, and what /proc says about them.
//!
//! Efficiency is judged by the servers' own CPU time and memory, read from
//! `/proc/<pid>/stat` (utime + stime, all threads, dead ones included) and
//! `/proc/<pid>/status` (VmRSS), because the generator shares the machine's cores with them:
//! throughput alone would mostly measure the generator. Every system, the baseline included,
//! runs as its own process so that it is measured the same way.
//!
//! Children write their output to log files in a temporary directory (shown when one fails,
//! removed after a run without failures), get SIGTERM and then SIGKILL when stopped, and are
//! killed if the generator dies.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::Context;
use tokio::process::{Child, Command};
use tokio::time::Instant;

use crate::http::HttpClient;

/// A running child process.
pub struct Proc {
    pub name: String,
    pub pid: u32,
    child: Child,
    log: PathBuf,
}

/// What to run.
pub struct Spec<'a> {
    pub name: String,
    pub program: &'a Path,
    pub args: Vec<String>,
    pub env: Vec<(&'static str, String)>,
    pub cwd: Option<&'a Path>,
}

/// The directory for the children's logs of this run.
pub fn log_dir() -> PathBuf {
    std::env::temp_dir().join(format!("fanout-loadtest-{}", std::process::id()))
}

pub fn spawn(spec: Spec<'_>) -> anyhow::Result<Proc> {
    let dir = log_dir();
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let log = dir.join(format!("{}.log", spec.name));
    let out = std::fs::File::create(&log).with_context(|| format!("creating {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::new(spec.program);
    cmd.args(&spec.args)
        .envs(spec.env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true);
    if let Some(cwd) = spec.cwd {
        cmd.current_dir(cwd);
    }
    // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let child = cmd.spawn().with_context(|| {
        format!(
            "cannot start {} ({}): is it installed and executable?",
            spec.name,
            spec.program.display()
        )
    })?;
    let pid = child.id().context("child exited at once")?;
    Ok(Proc {
        name: spec.name,
        pid,
        child,
        log,
    })
}

impl Proc {
    /// The last lines of the child's output, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        format!("{} (log: {}):\n{tail}", self.name, self.log.display())
    }

    /// Whether the child has exited, with how.
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    }

    /// Polls `GET http://addr/readyz` until 200; fails early if the child exits.
    pub async fn wait_http_ready(
        &mut self,
        addr: std::net::SocketAddr,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                anyhow::bail!(
                    "{} exited ({status}) before it was ready\n{}",
                    self.name,
                    self.log_tail(20)
                );
            }
            let mut client = HttpClient::new(addr);
            let last = match client.get("/readyz").await {
                Ok(s) if s.is_success() => return Ok(()),
                Ok(s) => format!("GET /readyz answered {s}"),
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() > deadline {
                anyhow::bail!(
                    "{} not ready within {timeout:?} ({last})\n{}",
                    self.name,
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        if self.exited().is_some() {
            return;
        }
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.pid as libc::pid_t, libc::SIGTERM) };
        if tokio::time::timeout(grace, self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.kill().await;
        }
    }
}

/// Polls a Redis server with PING until it answers.
pub async fn wait_redis_ready(
    proc: &mut Proc,
    addr: std::net::SocketAddr,
    timeout: Duration,
) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(status) = proc.exited() {
            anyhow::bail!("redis-server exited ({status})\n{}", proc.log_tail(20));
        }
        if let Ok(mut s) = tokio::net::TcpStream::connect(addr).await {
            let mut buf = [0u8; 7];
            if s.write_all(b"PING\r\n").await.is_ok()
                && s.read_exact(&mut buf).await.is_ok()
                && &buf == b"+PONG\r\n"
            {
                return Ok(());
            }
        }
        if Instant::now() > deadline {
            anyhow::bail!(
                "redis-server not answering PING on {addr} within {timeout:?}\n{}",
                proc.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn clock_ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// CPU seconds (user + system, all threads) a process has used; `None` if it is gone.
pub fn cpu_seconds(pid: Option<u32>) -> Option<f64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/stat"),
        None => "/proc/self/stat".to_string(),
    };
    let stat = std::fs::read_to_string(path).ok()?;
    // The command name (field 2) may contain spaces: count fields after its closing paren.
    let after = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = after.split_whitespace().collect();
    // Fields 14 and 15 of the whole line are utime and stime: 11 and 12 after the name.
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / clock_ticks_per_second())
}

/// Sum of [`cpu_seconds`] over `pids` (processes that are gone count as 0).
pub fn cpu_seconds_sum(pids: &[u32]) -> f64 {
    pids.iter().filter_map(|p| cpu_seconds(Some(*p))).sum()
}

/// CPU seconds the whole machine has been busy (all cores: user, nice, system, irq,
/// softirq, steal from `/proc/stat`), to see what else ran during a measurement.
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .map(|f| f.parse().unwrap_or(0.0))
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is included in user).
    let busy = [0, 1, 2, 5, 6, 7]
        .iter()
        .filter_map(|&i| v.get(i))
        .sum::<f64>();
    Some(busy / clock_ticks_per_second())
}

/// Resident memory in KiB; `None` if the process is gone.
pub fn rss_kib(pid: Option<u32>) -> Option<u64> {
    let path = match pid {
        Some(pid) => format!("/proc/{pid}/status"),
        None => "/proc/self/status".to_string(),
    };
    let status = std::fs::read_to_string(path).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

pub fn rss_kib_sum(pids: &[u32]) -> u64 {
    pids.iter().filter_map(|p| rss_kib(Some(*p))).sum()
}

/// The kernel's count of connections dropped because a listen queue was full
/// (`TcpExt ListenOverflows`, machine-wide): each one costs its client a SYN retransmit (1 s).
pub fn listen_overflows() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/netstat").ok()?;
    let mut lines = text.lines().filter(|l| l.starts_with("TcpExt:"));
    let (names, values) = (lines.next()?, lines.next()?);
    let i = names
        .split_whitespace()
        .position(|n| n == "ListenOverflows")?;
    values.split_whitespace().nth(i)?.parse().ok()
}

/// Waits until `pids` together use less than 5% of a core over 300 ms (they finished
/// whatever the previous scenario left them, e.g. closing 20,000 connections), at most `max`.
pub async fn wait_idle(pids: &[u32], max: Duration) {
    let deadline = Instant::now() + max;
    let window = Duration::from_millis(300);
    while Instant::now() < deadline {
        let before = cpu_seconds_sum(pids);
        tokio::time::sleep(window).await;
        if cpu_seconds_sum(pids) - before < 0.05 * window.as_secs_f64() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_is_readable() {
        assert!(cpu_seconds(None).is_some());
        assert!(rss_kib(None).unwrap() > 0);
        assert!(rss_kib(Some(std::process::id())).is_some());
        assert_eq!(cpu_seconds(Some(u32::MAX)), None);
        assert!(listen_overflows().is_some());
        assert!(machine_busy_seconds().is_some_and(|s| s > 0.0));
    }
}
