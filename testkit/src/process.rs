//! Child processes (replicas, Redis, PostgreSQL, the benchmark's other systems): spawned so
//! that they die with their parent, with their output where the caller reads it, and
//! stopped by signal.
//!
//! Every child gets `PR_SET_PDEATHSIG` = SIGKILL, so a test binary killed by a timeout or an
//! interrupted load generator leaves nothing running on its ports. The kernel sends it when
//! the *thread* that spawned the child ends: spawn from a thread that lives as long as the
//! child should (a test's thread, a runtime's worker), not from a short-lived helper.
//!
//! Output goes where its reader wants it. [`Logs::Memory`] keeps stdout and stderr apart in
//! memory: tests search them, and a child dropped while its test panics prints them, which
//! is usually all that is needed to see why. [`Logs::File`] appends both to `<dir>/<name>.log`:
//! a benchmark's children run for minutes, and their logs outlive a failed run.
//!
//! Dropping a [`Proc`] kills it (SIGKILL) and reaps it.

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Where a child's output goes.
#[derive(Debug, Clone)]
pub enum Logs {
    /// In memory, stdout and stderr apart.
    Memory,
    /// Both streams appended to `<dir>/<name>.log` (the directory is created).
    File(PathBuf),
}

enum Output {
    Memory {
        stdout: Arc<Mutex<String>>,
        stderr: Arc<Mutex<String>>,
    },
    File(PathBuf),
}

/// A running child process.
pub struct Proc {
    pub name: String,
    child: Child,
    output: Output,
}

impl Proc {
    /// Spawns `command` (program, arguments, environment and the like set by the caller)
    /// with stdin closed and its output in `logs`.
    pub fn spawn(name: &str, mut command: Command, logs: Logs) -> anyhow::Result<Self> {
        let output = match logs {
            Logs::Memory => {
                command.stdout(Stdio::piped()).stderr(Stdio::piped());
                None
            }
            Logs::File(dir) => {
                std::fs::create_dir_all(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
                let path = dir.join(format!("{name}.log"));
                let file = std::fs::File::options()
                    .create(true)
                    .append(true)
                    .open(&path)
                    .with_context(|| format!("creating {}", path.display()))?;
                command.stdout(file.try_clone()?).stderr(file);
                Some(path)
            }
        };
        {
            use std::os::unix::process::CommandExt;
            // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
            unsafe {
                command.pre_exec(|| {
                    libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                    Ok(())
                });
            }
        }
        let mut child = command.stdin(Stdio::null()).spawn().with_context(|| {
            format!(
                "cannot start {name} ({}): is it installed and executable?",
                command.get_program().to_string_lossy()
            )
        })?;
        let output = match output {
            Some(path) => Output::File(path),
            None => Output::Memory {
                stdout: collect(child.stdout.take().expect("piped")),
                stderr: collect(child.stderr.take().expect("piped")),
            },
        };
        Ok(Self {
            name: name.to_string(),
            child,
            output,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// How the child exited, or `None` while it runs.
    pub fn exited(&mut self) -> Option<ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Sends `signal`, unless the child has exited (its pid may be another process's by now).
    pub fn signal(&mut self, signal: libc::c_int) {
        if self.exited().is_none() {
            // SAFETY: kill has no memory-safety preconditions; the pid is our unreaped child.
            unsafe { libc::kill(self.child.id() as libc::pid_t, signal) };
        }
    }

    /// Waits for the child to exit; `None` if it still runs after `timeout`.
    pub async fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.exited() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// SIGTERM, then SIGKILL if the child still runs after `grace`.
    pub async fn stop(mut self, grace: Duration) {
        self.signal(libc::SIGTERM);
        self.wait_exit(grace).await;
        // Drop kills what is left.
    }

    /// Polls `GET url` until it answers `status`; fails early if the child exits.
    pub async fn wait_http(
        &mut self,
        url: &str,
        status: u16,
        timeout: Duration,
    ) -> anyhow::Result<()> {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(crate::SOON)
            .build()?;
        let deadline = Instant::now() + timeout;
        loop {
            let last = match http.get(url).send().await {
                Ok(r) if r.status().as_u16() == status => return Ok(()),
                Ok(r) => format!("it answered {}", r.status()),
                Err(e) => format!("no answer: {e}"),
            };
            if let Some(exit) = self.exited() {
                anyhow::bail!(
                    "{} exited ({exit}) while waiting for GET {url} to answer {status}\n{}",
                    self.name,
                    self.log_tail(20)
                );
            }
            if Instant::now() >= deadline {
                anyhow::bail!(
                    "{}: GET {url} did not answer {status} within {timeout:?} ({last})\n{}",
                    self.name,
                    self.log_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(25)).await;
        }
    }

    /// The child's stdout so far (with [`Logs::File`], its whole log).
    pub fn stdout(&self) -> String {
        match &self.output {
            Output::Memory { stdout, .. } => stdout.lock().unwrap().clone(),
            Output::File(path) => std::fs::read_to_string(path).unwrap_or_default(),
        }
    }

    /// The child's stderr so far (with [`Logs::File`], its whole log).
    pub fn stderr(&self) -> String {
        match &self.output {
            Output::Memory { stderr, .. } => stderr.lock().unwrap().clone(),
            Output::File(path) => std::fs::read_to_string(path).unwrap_or_default(),
        }
    }

    /// The last `lines` lines of the output (stdout, then stderr, in memory), named, for
    /// error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        let (text, source) = match &self.output {
            Output::File(path) => (self.stderr(), format!("log: {}", path.display())),
            Output::Memory { .. } => (self.stdout() + &self.stderr(), "output".into()),
        };
        let all: Vec<&str> = text.lines().collect();
        let tail = all[all.len().saturating_sub(lines)..].join("\n");
        format!("{} ({source}):\n{tail}", self.name)
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        if self.exited().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if std::thread::panicking() && matches!(self.output, Output::Memory { .. }) {
            eprintln!(
                "----- {} (pid {}) stderr -----\n{}----- {} stdout -----\n{}",
                self.name,
                self.child.id(),
                self.stderr(),
                self.name,
                self.stdout()
            );
        }
    }
}

/// Collects a child's output on a thread, line by line.
fn collect(stream: impl Read + Send + 'static) -> Arc<Mutex<String>> {
    let buf = Arc::new(Mutex::new(String::new()));
    let sink = buf.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines() {
            let Ok(line) = line else { break };
            let mut b = sink.lock().unwrap();
            b.push_str(&line);
            b.push('\n');
        }
    });
    buf
}
