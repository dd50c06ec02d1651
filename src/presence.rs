//! Which organizations and users this replica holds authenticated sockets of.
//!
//! This is the single source of truth for "should this replica be subscribed to org X":
//! the Redis bus reads it whenever it reconciles a channel, so a subscription decision is
//! always made on the current count, never on a stale event. One mutex over one map: joins
//! and leaves are rare next to deliveries, and deliveries only take it for a lookup.
//!
//! It is also where the per-user and per-organization connection caps are enforced
//! (`try_add`): the check and the count happen under the same lock, so a burst of sockets
//! of one user cannot all pass a check made before any of them was counted.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::protocol::{OrgId, UserId};

#[derive(Default)]
pub struct Presence {
    orgs: Mutex<HashMap<OrgId, OrgPresence>>,
}

/// Caps on the authenticated sockets of one user (of one organization) and of one
/// organization, on this replica. `None`: no cap.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Caps {
    pub per_user: Option<usize>,
    pub per_org: Option<usize>,
}

/// The cap a socket would have gone over.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Over {
    User,
    Org,
}

impl Over {
    /// The metric label (`fanout_connections_refused_total{reason}`).
    pub fn reason(self) -> &'static str {
        match self {
            Self::User => "user_limit",
            Self::Org => "org_limit",
        }
    }
}

#[derive(Default)]
struct OrgPresence {
    sockets: usize,
    users: HashMap<UserId, usize>,
}

impl Presence {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts a socket in, whatever the caps. Returns true when it is the organization's
    /// first on this replica.
    pub fn add(&self, org: &OrgId, user: &UserId) -> bool {
        self.try_add(org, user, Caps::default()) == Ok(true)
    }

    /// Counts a socket in unless that takes its user or its organization over `caps`.
    /// Returns true when it is the organization's first on this replica.
    pub fn try_add(&self, org: &OrgId, user: &UserId, caps: Caps) -> Result<bool, Over> {
        let mut orgs = self.orgs.lock().unwrap();
        let (in_org, of_user) = orgs.get(org).map_or((0, 0), |e| {
            (e.sockets, e.users.get(user).copied().unwrap_or(0))
        });
        if caps.per_org.is_some_and(|cap| in_org >= cap) {
            return Err(Over::Org);
        }
        if caps.per_user.is_some_and(|cap| of_user >= cap) {
            return Err(Over::User);
        }
        let entry = orgs.entry(org.clone()).or_default();
        entry.sockets += 1;
        *entry.users.entry(user.clone()).or_default() += 1;
        Ok(entry.sockets == 1)
    }

    /// Counts a socket out. Returns true when it was the organization's last on this replica.
    pub fn remove(&self, org: &OrgId, user: &UserId) -> bool {
        let mut orgs = self.orgs.lock().unwrap();
        let Some(entry) = orgs.get_mut(org) else {
            debug_assert!(false, "remove without add for {org}");
            return false;
        };
        entry.sockets -= 1;
        if let Some(n) = entry.users.get_mut(user) {
            *n -= 1;
            if *n == 0 {
                entry.users.remove(user);
            }
        }
        if entry.sockets == 0 {
            orgs.remove(org);
            true
        } else {
            false
        }
    }

    pub fn org_sockets(&self, org: &OrgId) -> usize {
        self.orgs.lock().unwrap().get(org).map_or(0, |e| e.sockets)
    }

    pub fn user_sockets(&self, org: &OrgId, user: &UserId) -> usize {
        self.orgs
            .lock()
            .unwrap()
            .get(org)
            .and_then(|e| e.users.get(user).copied())
            .unwrap_or(0)
    }

    /// Every organization with at least one socket here.
    pub fn orgs(&self) -> Vec<OrgId> {
        self.orgs.lock().unwrap().keys().cloned().collect()
    }

    pub fn total_sockets(&self) -> usize {
        self.orgs.lock().unwrap().values().map(|e| e.sockets).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_first_and_last() {
        let p = Presence::new();
        let (a, b) = (OrgId::parse("a").unwrap(), OrgId::parse("b").unwrap());
        let (u1, u2) = (UserId::parse("1").unwrap(), UserId::parse("2").unwrap());
        assert!(p.add(&a, &u1));
        assert!(!p.add(&a, &u1));
        assert!(!p.add(&a, &u2));
        assert!(p.add(&b, &u1));
        assert_eq!(p.org_sockets(&a), 3);
        assert_eq!(p.user_sockets(&a, &u1), 2);
        assert_eq!(p.user_sockets(&b, &u2), 0);
        assert_eq!(p.total_sockets(), 4);
        assert!(!p.remove(&a, &u1));
        assert!(!p.remove(&a, &u2));
        assert_eq!(p.user_sockets(&a, &u2), 0);
        assert!(p.remove(&a, &u1));
        assert_eq!(p.org_sockets(&a), 0);
        let mut orgs = p.orgs();
        orgs.sort();
        assert_eq!(orgs, vec![b]);
    }

    #[test]
    fn caps_refuse_the_socket_over_them_and_count_nothing() {
        let p = Presence::new();
        let (a, b) = (OrgId::parse("a").unwrap(), OrgId::parse("b").unwrap());
        let (u1, u2, u3) = (
            UserId::parse("1").unwrap(),
            UserId::parse("2").unwrap(),
            UserId::parse("3").unwrap(),
        );
        let caps = Caps {
            per_user: Some(2),
            per_org: Some(3),
        };
        assert_eq!(p.try_add(&a, &u1, caps), Ok(true));
        assert_eq!(p.try_add(&a, &u1, caps), Ok(false));
        assert_eq!(p.try_add(&a, &u1, caps), Err(Over::User));
        assert_eq!(p.user_sockets(&a, &u1), 2);
        // Another user of the same organization, up to the organization's cap.
        assert_eq!(p.try_add(&a, &u2, caps), Ok(false));
        assert_eq!(p.try_add(&a, &u3, caps), Err(Over::Org));
        assert_eq!(p.org_sockets(&a), 3);
        // The same user id in another organization is another user.
        assert_eq!(p.try_add(&b, &u1, caps), Ok(true));
        // A socket out makes room again.
        assert!(!p.remove(&a, &u1));
        assert_eq!(p.try_add(&a, &u3, caps), Ok(false));
        // No caps: no limit.
        for _ in 0..10 {
            p.try_add(&b, &u1, Caps::default()).unwrap();
        }
        assert_eq!(p.user_sockets(&b, &u1), 11);
    }
}
