//! What /proc says about the systems under test and about the machine.
//!
//! Efficiency is judged by the servers' own CPU time and memory, read from
//! `/proc/<pid>/stat` (utime + stime, all threads, dead ones included) and
//! `/proc/<pid>/status` (VmRSS), because the generator shares the machine's cores with them:
//! throughput alone would mostly measure the generator. Every system, the baseline included,
//! runs as its own process so that it is measured the same way.
//!
//! The processes themselves are `fanout_testkit`'s (`process::Proc`, `Replica`,
//! `RedisServer`): killed if the generator dies, their output in log files in [`log_dir`]
//! (shown when one fails, removed after a run without failures), SIGTERM and then SIGKILL
//! when stopped.

use std::path::PathBuf;
use std::time::Duration;

use tokio::time::Instant;

/// The directory for the children's logs of this run.
pub fn log_dir() -> PathBuf {
    std::env::temp_dir().join(format!("fanout-loadtest-{}", std::process::id()))
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

/// Checks that the fanout binary to start is there, saying how to build it if not.
pub fn require_fanout(bin: &std::path::Path) -> anyhow::Result<()> {
    anyhow::ensure!(
        bin.is_file(),
        "no fanout binary at {}; build it with `cargo build --release -p fanout` or pass --fanout-bin",
        bin.display()
    );
    Ok(())
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
