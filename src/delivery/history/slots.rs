//! Replay's share of the store: a bounded number of replay reads at once, and a share of
//! them per organization.
//!
//! A replay reads its events from PostgreSQL in chunks, through the pool durable ingest
//! commits through too. Without a bound, one organization's reconnect storm (500 dashboards
//! coming back with `lastSeq: 0` after a deploy) queued hundreds of reads ahead of every
//! commit: another organization's durable ingest went from 2 ms to 157 ms at p50. So a read
//! takes a slot first: at most `FANOUT_REPLAY_CONCURRENCY` reads run at once, which leaves
//! the rest of the pool to commits and gap fills, and one organization holds at most half of
//! the slots (rounded up), so another organization's replays do not wait behind a storm.
//! A replay waits for its organization's share before it waits for a slot, so the slots'
//! queue (first come, first served) holds at most a share of any one organization.
//!
//! Only the read holds a slot, never the sending: a slow client's queue must not hold up
//! other replays.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::ops::metrics;
use crate::protocol::OrgId;

pub struct Slots {
    all: Arc<Semaphore>,
    share: usize,
    /// Each organization's share, while one of its replays holds or waits for a slot.
    orgs: Mutex<HashMap<OrgId, Arc<Semaphore>>>,
}

/// A replay read's slot: released when dropped.
pub struct Slot<'a> {
    slots: &'a Slots,
    org: OrgId,
    permits: Option<(OwnedSemaphorePermit, OwnedSemaphorePermit)>,
}

/// Counts a replay in `fanout_replays_waiting` while it waits (also when its wait is
/// abandoned: the client left).
struct Waiting;

impl Waiting {
    fn start() -> Self {
        ::metrics::gauge!(metrics::REPLAYS_WAITING).increment(1.0);
        Self
    }
}

impl Drop for Waiting {
    fn drop(&mut self) {
        ::metrics::gauge!(metrics::REPLAYS_WAITING).decrement(1.0);
    }
}

impl Slots {
    /// `total` reads at once (at least 1), at most half of them (rounded up) per organization.
    pub fn new(total: usize) -> Self {
        let total = total.max(1);
        Self {
            all: Arc::new(Semaphore::new(total)),
            share: total.div_ceil(2),
            orgs: Mutex::default(),
        }
    }

    /// Waits for a slot for one of `org`'s replay reads.
    pub async fn acquire(&self, org: &OrgId) -> Slot<'_> {
        let share = self
            .orgs
            .lock()
            .unwrap()
            .entry(org.clone())
            .or_insert_with(|| Arc::new(Semaphore::new(self.share)))
            .clone();
        let mut slot = Slot {
            slots: self,
            org: org.clone(),
            permits: None,
        };
        let waiting = Waiting::start();
        let own = share.acquire_owned().await.expect("never closed");
        let any = self
            .all
            .clone()
            .acquire_owned()
            .await
            .expect("never closed");
        drop(waiting);
        slot.permits = Some((own, any));
        slot
    }

    /// How many organizations have a share now (for tests).
    #[cfg(test)]
    fn orgs(&self) -> usize {
        self.orgs.lock().unwrap().len()
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.permits = None;
        // Forget the organization's share once no replay holds or waits for it: the map
        // holds one reference, and each acquiring replay one more while it lives.
        let mut orgs = self.slots.orgs.lock().unwrap();
        if let Some(share) = orgs.get(&self.org)
            && Arc::strong_count(share) == 1
        {
            orgs.remove(&self.org);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn org(s: &str) -> OrgId {
        OrgId::parse(s).unwrap()
    }

    async fn pending<F: std::future::Future>(f: F) -> bool {
        tokio::time::timeout(Duration::from_millis(50), f)
            .await
            .is_err()
    }

    #[tokio::test]
    async fn one_organization_holds_at_most_its_share() {
        let slots = Slots::new(4);
        let storm = org("storm");
        let _a = slots.acquire(&storm).await;
        let _b = slots.acquire(&storm).await;
        assert!(
            pending(slots.acquire(&storm)).await,
            "a third read of storm waits"
        );
        // Another organization still finds slots.
        let quiet = org("quiet");
        let _c = slots.acquire(&quiet).await;
        let _d = slots.acquire(&quiet).await;
        assert!(
            pending(slots.acquire(&org("third"))).await,
            "all four slots taken"
        );
    }

    #[tokio::test]
    async fn a_released_slot_goes_to_the_next_and_idle_shares_are_forgotten() {
        let slots = Slots::new(1);
        let storm = org("storm");
        let first = slots.acquire(&storm).await;
        assert!(pending(slots.acquire(&org("quiet"))).await);
        drop(first);
        let next = slots.acquire(&org("quiet")).await;
        drop(next);
        assert_eq!(slots.orgs(), 0, "no share is kept for an idle organization");
    }

    #[tokio::test]
    async fn an_abandoned_wait_gives_nothing_away() {
        let slots = Slots::new(2);
        let storm = org("storm");
        let held = slots.acquire(&storm).await;
        // Share of 1: a second read of storm waits; the client leaves meanwhile.
        assert!(pending(slots.acquire(&storm)).await);
        drop(held);
        let _again = slots.acquire(&storm).await;
        let _other = slots.acquire(&org("quiet")).await;
    }
}
