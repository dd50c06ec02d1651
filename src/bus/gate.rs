//! What the two Redis buses share between their publishers and the one task that owns
//! their subscriptions: whether every subscription is in place, a generation bumped each
//! time some were lost (or made again), and the requests that tell the task to look at an
//! organization again.
//!
//! Publishers number their ephemeral messages here, and subscribers count the numbers
//! that never arrived here too (`gaps.rs`).
//!
//! An ephemeral message is taken only if it went out while the subscriptions it needs were
//! all in place and stayed so (with one Redis: all of them; in a cluster: those of its
//! channel's hash slot, so that a dead master stops only its own organizations), and if Redis says it reached a subscriber whenever this replica
//! holds sockets of the organization: otherwise its publisher is told to retry, since this
//! replica's own members may have missed it.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};

use super::BusError;
use super::gaps::{Gaps, Stamps};
use crate::ops::metrics;
use crate::presence::Presence;
use crate::protocol::{Message, OrgId};

/// How long a joining socket waits for its organization's subscription before it is told
/// `auth-success` anyway (Redis slow but up; the subscription still happens).
const JOIN_WAIT: Duration = Duration::from_secs(5);

/// "Look at this org again", optionally with a reply once it is subscribed (or need not be).
pub struct Request {
    pub org: OrgId,
    pub applied: Option<oneshot::Sender<()>>,
}

/// Whether the subscriptions an organization's messages need are in place, per slot of a
/// cluster; without it, the gate's one flag and generation say it for all.
pub trait Health: Send + Sync {
    /// A token while they are in place (the same token as long as they stay so), `None`
    /// while they are not.
    fn token(&self, org: &OrgId) -> Option<u64>;
}

pub struct Gate {
    /// Set by the subscription task: every subscription is in place.
    pub up: Arc<AtomicBool>,
    /// Bumped by the subscription task when subscriptions were lost or made again.
    pub generation: Arc<AtomicU64>,
    /// What this replica's subscriptions missed of what was published.
    pub gaps: Arc<Gaps>,
    stamps: Stamps,
    /// Finer than `up` and `generation`, when set.
    health: Option<Arc<dyn Health>>,
    presence: Arc<Presence>,
    requests: mpsc::UnboundedSender<Request>,
}

impl Gate {
    /// The gate, and the requests for the subscription task. With `health`, a publish needs
    /// only its own organization's subscriptions in place; without, all of them.
    pub fn new(
        presence: Arc<Presence>,
        health: Option<Arc<dyn Health>>,
    ) -> (Self, mpsc::UnboundedReceiver<Request>) {
        let (tx, rx) = mpsc::unbounded_channel();
        // Present from the start, so that the first misses show as an increase.
        ::metrics::counter!(metrics::BUS_MISSED).increment(0);
        ::metrics::counter!(metrics::BUS_DUPLICATES).increment(0);
        let gate = Self {
            up: Arc::new(AtomicBool::new(false)),
            generation: Arc::new(AtomicU64::new(0)),
            gaps: Arc::default(),
            stamps: Stamps::new(),
            health,
            presence,
            requests: tx,
        };
        (gate, rx)
    }

    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Acquire)
    }

    /// Stamps the ephemeral `msg`, runs `send` (a publish answering how many subscribers
    /// Redis says received it) with it, and says whether the message is taken.
    pub async fn publish<F: Future<Output = Result<i64, BusError>>>(
        &self,
        mut msg: Message,
        send: impl FnOnce(Message) -> F,
    ) -> Result<(), BusError> {
        let org = msg.org.clone();
        let Some(token) = self.token(&org) else {
            return Err(BusError::Resubscribing);
        };
        let stamp = self.stamps.next(&org);
        msg.stamp = Some(stamp);
        let taken = async {
            let receivers = send(msg).await?;
            if receivers == 0 && self.presence.org_sockets(&org) > 0 {
                return Err(BusError::Resubscribing);
            }
            if self.token(&org) != Some(token) {
                return Err(BusError::Resubscribing);
            }
            Ok(())
        }
        .await;
        if taken.is_err() {
            self.stamps.failed(&org, stamp);
        }
        taken
    }

    /// The subscriptions `org`'s messages need are in place: a token that changes when
    /// they are lost.
    fn token(&self, org: &OrgId) -> Option<u64> {
        match &self.health {
            Some(health) => health.token(org),
            None => {
                let generation = self.generation.load(Ordering::Acquire);
                self.is_up().then_some(generation)
            }
        }
    }

    /// Called after a socket of `org` was counted in presence: resolves once this replica
    /// receives `org`'s messages, or at once while the subscriptions are down (they are all
    /// made again when it is back).
    pub async fn joined(&self, org: &OrgId) {
        let (tx, rx) = oneshot::channel();
        let waiting = self.is_up();
        let _ = self.requests.send(Request {
            org: org.clone(),
            applied: waiting.then_some(tx),
        });
        if waiting && tokio::time::timeout(JOIN_WAIT, rx).await.is_err() {
            tracing::warn!(%org, "subscription not confirmed within {JOIN_WAIT:?}; continuing");
        }
    }

    /// Called after the last socket of `org` left presence.
    pub fn left(&self, org: &OrgId) {
        self.gaps.forget(org);
        let _ = self.requests.send(Request {
            org: org.clone(),
            applied: None,
        });
    }
}

#[cfg(test)]
mod tests {
    use serde_json::value::RawValue;

    use super::*;
    use crate::protocol::{EventName, UserId};

    fn message(org: &OrgId) -> Message {
        Message {
            org: org.clone(),
            event: EventName::parse("tick").unwrap(),
            data: RawValue::from_string("1".into()).unwrap(),
            ts_ms: None,
            user: None,
            via_ingest: true,
            seq: None,
            sig: None,
            stamp: None,
        }
    }

    fn gate() -> (Gate, Arc<Presence>, OrgId) {
        let presence = Arc::new(Presence::new());
        let (gate, _requests) = Gate::new(presence.clone(), None);
        gate.up.store(true, Ordering::Release);
        (gate, presence, OrgId::parse("acme").unwrap())
    }

    #[tokio::test]
    async fn taken_only_while_in_place_and_received_where_members_are() {
        let (gate, presence, acme) = gate();
        let sent = |receivers: i64| move |_: Message| async move { Ok(receivers) };
        // Nobody here holds acme: Redis taking it is enough.
        assert!(gate.publish(message(&acme), sent(0)).await.is_ok());
        // A member here, and Redis says no subscriber got it: this replica's own
        // subscription missed it.
        presence.add(&acme, &UserId::parse("alice").unwrap());
        assert!(matches!(
            gate.publish(message(&acme), sent(0)).await,
            Err(BusError::Resubscribing)
        ));
        assert!(gate.publish(message(&acme), sent(1)).await.is_ok());
        // Down: refused without being sent.
        gate.up.store(false, Ordering::Release);
        let unsent = |_: Message| async { panic!("sent while the subscriptions were down") };
        assert!(matches!(
            gate.publish(message(&acme), unsent).await,
            Err(BusError::Resubscribing)
        ));
    }

    #[tokio::test]
    async fn a_loss_while_it_went_out_refuses_it_and_starts_an_epoch() {
        let (gate, _presence, acme) = gate();
        let stamps = std::sync::Mutex::new(Vec::new());
        let lost_meanwhile = |msg: Message| {
            stamps.lock().unwrap().push(msg.stamp.unwrap());
            gate.generation.fetch_add(1, Ordering::AcqRel);
            async { Ok(1) }
        };
        assert!(matches!(
            gate.publish(message(&acme), lost_meanwhile).await,
            Err(BusError::Resubscribing)
        ));
        let recorded = |msg: Message| {
            stamps.lock().unwrap().push(msg.stamp.unwrap());
            async { Ok(1) }
        };
        assert!(gate.publish(message(&acme), recorded).await.is_ok());
        let stamps = stamps.into_inner().unwrap();
        assert_eq!((stamps[0].epoch, stamps[0].n), (0, 1));
        assert_eq!(
            (stamps[1].epoch, stamps[1].n),
            (1, 1),
            "a new epoch after the refusal"
        );
    }
}
