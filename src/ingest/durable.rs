//! Durable ingest: group commit, then publish in sequence order.
//!
//! Every event accepted by the HTTP ingest gets the next sequence number of its
//! organization and is committed, with the projections it changes, before it is published
//! and before the worker is answered. One task (the *committer*) takes whatever requests are
//! waiting and commits them in one transaction ([`crate::store::write::commit`]): a busy
//! replica makes few, large commits, an idle one answers a lone request at once (there is
//! no batching delay).
//!
//! Why a separate publisher task: the committer can start the next transaction while the
//! previous batch is on its way to the bus, yet batches are still published in the order
//! they were committed. A replica therefore publishes each organization's events in
//! sequence order; across replicas the order is restored by the receiving replicas
//! (`delivery::history`), which also read back from the history whatever the bus lost.
//! Each published event is signed ([`crate::protocol::BusKey`]), so that receiving replicas
//! believe its sequence number.
//!
//! When the commit succeeds but the publish fails, the event is durable and keeps its
//! number: the worker is told it was stored (`published: false`), it must not retry, and
//! the replicas deliver it from the history (see `fanout_durable_unpublished_total`).

use std::sync::Arc;
use std::time::Instant;

use tokio::sync::{mpsc, oneshot};

use crate::bus::Bus;
use crate::ops::metrics;
use crate::protocol::Message;
use crate::store::write::{self, CommitError, NewEvent, Projection};
use crate::store::{Store, StoreError};
use crate::tasks::{Policy, Tasks};

/// Most events in one transaction.
const MAX_BATCH: usize = 512;
/// Requests waiting for the committer; beyond this, `append` waits (back-pressure).
const QUEUE: usize = 8192;
/// Attempts of a batch that lost a deadlock or serialization conflict.
const CONFLICT_ATTEMPTS: usize = 3;

/// The answer to an accepted event.
#[derive(Debug, Clone, Copy)]
pub struct Stored {
    pub seq: u64,
    /// Whether the bus acknowledged it (see the module doc for `false`).
    pub published: bool,
}

/// Hands events to the committer.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
}

struct Job {
    event: NewEvent,
    reply: Reply,
}

type Reply = oneshot::Sender<Result<Stored, StoreError>>;

/// A committed batch on its way to the bus: messages carry their sequence numbers.
struct Committed {
    messages: Vec<Message>,
    replies: Vec<Reply>,
}

impl Writer {
    /// Starts the committer and the publisher. Fatal if either fails: the requests and
    /// committed batches in their queues exist nowhere else, and a restarted publisher
    /// could not keep the commit order. They end when every `Writer` is dropped, which is
    /// when the internal listener has stopped, at the end of the shutdown: ingest keeps
    /// working while the replica drains.
    pub fn start(store: Store, bus: Arc<Bus>, tasks: &Tasks) -> Self {
        let (jobs, rx) = mpsc::channel(QUEUE);
        let (committed_tx, committed_rx) = mpsc::unbounded_channel();
        let mut committer = Some((rx, committed_tx));
        tasks.spawn("durable-committer", Policy::Fatal, move |_| {
            let (rx, committed) = committer.take().expect("a fatal task starts once");
            commit_loop(store.clone(), rx, committed)
        });
        let mut publisher = Some(committed_rx);
        tasks.spawn("durable-publisher", Policy::Fatal, move |_| {
            let committed = publisher.take().expect("a fatal task starts once");
            publish_loop(bus.clone(), committed)
        });
        Self { jobs }
    }

    /// Commits `msg` (its `seq` is assigned here), publishes it, and says how it went.
    pub async fn append(&self, msg: Message, projection: Projection) -> Result<Stored, StoreError> {
        let (reply, answer) = oneshot::channel();
        let job = Job {
            event: NewEvent { msg, projection },
            reply,
        };
        let gone = || StoreError::Unavailable("the replica is shutting down".into());
        self.jobs.send(job).await.map_err(|_| gone())?;
        answer.await.map_err(|_| gone())?
    }
}

async fn commit_loop(
    store: Store,
    mut jobs: mpsc::Receiver<Job>,
    committed: mpsc::UnboundedSender<Committed>,
) {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while jobs.recv_many(&mut batch, MAX_BATCH).await > 0 {
        let (events, replies): (Vec<NewEvent>, Vec<Reply>) =
            batch.drain(..).map(|job| (job.event, job.reply)).unzip();
        match commit_with_retry(&store, &events).await {
            Ok(seqs) => {
                let messages = events
                    .into_iter()
                    .zip(seqs)
                    .map(|(event, seq)| numbered(&store, event.msg, seq))
                    .collect();
                let _ = committed.send(Committed { messages, replies });
            }
            Err(BatchError::Rejected(_)) if events.len() > 1 => {
                // One event the database refuses must not fail the others: commit them
                // one by one so only the culprit gets the error.
                for (event, reply) in events.into_iter().zip(replies) {
                    let one = [event];
                    match commit_with_retry(&store, &one).await {
                        Ok(seqs) => {
                            let [event] = one;
                            let _ = committed.send(Committed {
                                messages: vec![numbered(&store, event.msg, seqs[0])],
                                replies: vec![reply],
                            });
                        }
                        Err(e) => {
                            let _ = reply.send(Err(e.into()));
                        }
                    }
                }
            }
            Err(e) => {
                for reply in replies {
                    let _ = reply.send(Err(e.clone().into()));
                }
            }
        }
    }
}

/// A committed message with its sequence number, signed so that receiving replicas believe
/// the number (see [`crate::protocol::BusKey`]).
fn numbered(store: &Store, mut msg: Message, seq: u64) -> Message {
    msg.seq = Some(seq);
    msg.sig = store.bus_key().and_then(|key| key.sign(&msg));
    msg
}

async fn publish_loop(bus: Arc<Bus>, mut committed: mpsc::UnboundedReceiver<Committed>) {
    while let Some(Committed { messages, replies }) = committed.recv().await {
        let published = match bus.publish_batch(&messages).await {
            Ok(()) => true,
            Err(e) => {
                ::metrics::counter!(metrics::UNPUBLISHED).increment(messages.len() as u64);
                tracing::warn!(
                    events = messages.len(),
                    "committed events could not be published ({e}); replicas will deliver them from the history"
                );
                false
            }
        };
        ::metrics::counter!(metrics::PUBLISHED, "source" => "http")
            .increment(messages.len() as u64);
        for (msg, reply) in messages.iter().zip(replies) {
            let seq = msg.seq.expect("committed messages have a sequence number");
            let _ = reply.send(Ok(Stored { seq, published }));
        }
    }
}

#[derive(Debug, Clone)]
enum BatchError {
    /// PostgreSQL is unreachable, or the transaction's outcome is unknown.
    Unavailable(String),
    /// PostgreSQL refused the data (a data exception): retrying will not help.
    Rejected(String),
}

impl BatchError {
    /// The store's own reason, not its whole message: the answer wraps it once more.
    fn unavailable(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(reason) => Self::Unavailable(reason),
            e => Self::Unavailable(e.to_string()),
        }
    }
}

impl From<BatchError> for StoreError {
    fn from(e: BatchError) -> Self {
        match e {
            BatchError::Unavailable(e) => StoreError::Unavailable(e),
            BatchError::Rejected(e) => StoreError::Rejected(e),
        }
    }
}

async fn commit_with_retry(store: &Store, events: &[NewEvent]) -> Result<Vec<u64>, BatchError> {
    let mut attempt = 1;
    loop {
        let started = Instant::now();
        match write::commit(store, events).await {
            Ok(seqs) => {
                ::metrics::histogram!(metrics::COMMIT_DURATION)
                    .record(started.elapsed().as_secs_f64());
                ::metrics::histogram!(metrics::COMMIT_BATCH).record(events.len() as f64);
                ::metrics::counter!(metrics::DURABLE_EVENTS).increment(events.len() as u64);
                return Ok(seqs);
            }
            Err(CommitError::Conflict(e)) if attempt < CONFLICT_ATTEMPTS => {
                tracing::debug!(attempt, "group commit conflicted ({e}); retrying");
                attempt += 1;
            }
            Err(CommitError::Conflict(e)) | Err(CommitError::Other(e)) => {
                return Err(BatchError::Unavailable(e));
            }
            Err(CommitError::Store(e)) => return Err(BatchError::unavailable(e)),
            Err(CommitError::Data(e)) => return Err(BatchError::Rejected(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unavailable_store_is_said_once() {
        let e = StoreError::from(BatchError::unavailable(StoreError::Unavailable(
            "the schema is not migrated yet".into(),
        )));
        assert_eq!(
            e.to_string(),
            "PostgreSQL is unavailable (the schema is not migrated yet); nothing was stored, retry later"
        );
    }
}
