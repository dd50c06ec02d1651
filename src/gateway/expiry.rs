//! Ends sessions whose token expires.
//!
//! One task and one ordered set for the whole replica rather than a timer task per socket:
//! an idle connection then costs an entry in a map (tens of bytes), and refreshing a token
//! is a map update. The task holds socket ids, not sockets, so a disconnected socket is
//! never kept alive by its timer.

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use socketioxide::SocketIo;
use socketioxide::socket::Sid;
use tokio::sync::mpsc;

use crate::ops::metrics;
use crate::ops::shutdown::Shutdown;
use crate::protocol::now_ms;
use crate::tasks::{Policy, Tasks};
use crate::transport::Transports;

/// The longest the task sleeps: a far-away deadline is looked at again after this.
const IDLE_WAKE: Duration = Duration::from_secs(3600);

enum Command {
    /// The session of `Sid` ends at this time (ms since the epoch).
    Set(Sid, u64),
    Remove(Sid),
}

#[derive(Clone)]
pub struct Expiry {
    tx: mpsc::UnboundedSender<Command>,
}

impl Expiry {
    /// Starts the timer task. Fatal if it fails: the schedule it holds is the only record
    /// of when each session ends.
    pub fn start(io: SocketIo, transports: Transports, tasks: &Tasks) -> Self {
        let (tx, rx) = mpsc::unbounded_channel();
        let mut rx = Some(rx);
        let refusals = tasks.clone();
        tasks.spawn("session-expiry", Policy::Fatal, move |shutdown| {
            let rx = rx.take().expect("a fatal task starts once");
            run(
                io.clone(),
                transports.clone(),
                refusals.clone(),
                rx,
                shutdown,
            )
        });
        Self { tx }
    }

    /// Schedules (or moves) the end of `sid`'s session to `deadline_ms`.
    pub fn set(&self, sid: Sid, deadline_ms: u64) {
        let _ = self.tx.send(Command::Set(sid, deadline_ms));
    }

    pub fn remove(&self, sid: Sid) {
        let _ = self.tx.send(Command::Remove(sid));
    }
}

async fn run(
    io: SocketIo,
    transports: Transports,
    tasks: Tasks,
    mut rx: mpsc::UnboundedReceiver<Command>,
    shutdown: Shutdown,
) {
    let mut queue: BTreeSet<(u64, Sid)> = BTreeSet::new();
    let mut deadline_of: HashMap<Sid, u64> = HashMap::new();
    loop {
        let wait = match queue.first() {
            Some(&(at, _)) => Duration::from_millis(at.saturating_sub(now_ms())).min(IDLE_WAKE),
            // Nothing scheduled: wake now and then anyway, harmlessly.
            None => IDLE_WAKE,
        };
        tokio::select! {
            _ = shutdown.wait() => return,
            _ = crate::tasks::fault("session-expiry") => panic!("fault injected"),
            cmd = rx.recv() => match cmd {
                None => return,
                Some(Command::Set(sid, at)) => {
                    if let Some(old) = deadline_of.insert(sid, at) {
                        queue.remove(&(old, sid));
                    }
                    queue.insert((at, sid));
                }
                Some(Command::Remove(sid)) => {
                    if let Some(old) = deadline_of.remove(&sid) {
                        queue.remove(&(old, sid));
                    }
                }
            },
            _ = tokio::time::sleep(wait) => {
                let now = now_ms();
                while let Some(&(at, sid)) = queue.first() {
                    if at > now {
                        break;
                    }
                    queue.pop_first();
                    deadline_of.remove(&sid);
                    if let Some(socket) = io.get_socket(sid) {
                        ::metrics::counter!(metrics::AUTH_FAILURES, "reason" => "session_expired").increment(1);
                        tracing::info!(%sid, "token expired without refresh; disconnecting");
                        super::refuse(&socket, &transports, &tasks, "Token expired");
                    }
                }
            }
        }
    }
}
