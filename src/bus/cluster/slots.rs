//! Which master owns a channel: hash slots and the cluster's slot map.
//!
//! A shard channel lives in the hash slot of its name, like a key (CRC16 of the name, or of
//! its `{hash tag}`, modulo 16384), and only the master that owns that slot delivers it.
//! The map comes from `CLUSTER SLOTS` and is only ever a belief: a slot may have moved
//! since, which the cluster says with `MOVED` or a `sunsubscribe`, and then the map is
//! read again.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};

use super::super::gate::Health;
use crate::protocol::OrgId;

/// Hash slots in a cluster.
pub const SLOTS: u16 = 16384;

/// The hash slot of `key`: CRC16/XMODEM of its hash tag (the part between the first `{`
/// and the next `}`, when not empty) or of the whole key, modulo 16384.
pub fn slot(key: &[u8]) -> u16 {
    let hashed = key
        .iter()
        .position(|&b| b == b'{')
        .and_then(|open| {
            let rest = &key[open + 1..];
            let close = rest.iter().position(|&b| b == b'}')?;
            (close > 0).then(|| &rest[..close])
        })
        .unwrap_or(key);
    crc16(hashed) % SLOTS
}

fn crc16(data: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in data {
        crc ^= u16::from(byte) << 8;
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

/// A master's address, as the cluster announces it (`host:port`).
pub type Node = String;

/// Slot ranges and their masters.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SlotMap {
    /// First slot of each range → (last slot, master).
    ranges: BTreeMap<u16, (u16, Node)>,
}

impl SlotMap {
    /// Reads the reply of `CLUSTER SLOTS`: `[[start, end, [host, port, id, ...], replicas...], ...]`.
    pub fn from_cluster_slots(reply: &redis::Value) -> Result<Self, String> {
        use redis::Value;
        let Value::Array(ranges) = reply else {
            return Err(format!("CLUSTER SLOTS answered {reply:?}"));
        };
        let mut map = Self::default();
        for range in ranges {
            let Value::Array(fields) = range else {
                return Err(format!("a CLUSTER SLOTS range is {range:?}"));
            };
            let (Some(Value::Int(start)), Some(Value::Int(end)), Some(Value::Array(master))) =
                (fields.first(), fields.get(1), fields.get(2))
            else {
                return Err(format!("a CLUSTER SLOTS range is {fields:?}"));
            };
            let host = match master.first() {
                Some(Value::BulkString(host)) => String::from_utf8_lossy(host).into_owned(),
                Some(Value::SimpleString(host)) => host.clone(),
                other => return Err(format!("a CLUSTER SLOTS master's host is {other:?}")),
            };
            let Some(Value::Int(port)) = master.get(1) else {
                return Err(format!("a CLUSTER SLOTS master is {master:?}"));
            };
            let in_range = |v: i64| u16::try_from(v).ok().filter(|s| *s < SLOTS);
            let (Some(start), Some(end)) = (in_range(*start), in_range(*end)) else {
                return Err(format!("a CLUSTER SLOTS range is {start}-{end}"));
            };
            map.ranges.insert(start, (end, format!("{host}:{port}")));
        }
        Ok(map)
    }

    /// The master of `slot`, if some range covers it.
    pub fn owner(&self, slot: u16) -> Option<&Node> {
        let (_, (end, node)) = self.ranges.range(..=slot).next_back()?;
        (slot <= *end).then_some(node)
    }

    /// Each range of slots, first to last, with its master.
    pub fn ranges(&self) -> impl Iterator<Item = (u16, u16, &Node)> {
        self.ranges
            .iter()
            .map(|(start, (end, node))| (*start, *end, node))
    }

    /// Every master, once each.
    pub fn masters(&self) -> Vec<Node> {
        let mut nodes: Vec<Node> = self.ranges.values().map(|(_, n)| n.clone()).collect();
        nodes.sort();
        nodes.dedup();
        nodes
    }

    /// Whether every slot has a master.
    pub fn is_complete(&self) -> bool {
        let mut next = 0u32;
        for (start, (end, _)) in &self.ranges {
            if u32::from(*start) != next {
                return false;
            }
            next = u32::from(*end) + 1;
        }
        next == u32::from(SLOTS)
    }

    /// A hash tag whose slot `node` owns, so that a channel `…{tag}` is served by `node`.
    pub fn tag_for(&self, node: &str) -> Option<String> {
        (0..200_000u32)
            .map(|i| i.to_string())
            .find(|tag| self.owner(slot(tag.as_bytes())).is_some_and(|n| n == node))
    }
}

/// Per hash slot, whether the subscriptions of its channels are in place, for the gate: a
/// word per slot, odd while not, bumped at each change, so that a publish can tell that its
/// slot was lost (even briefly) while it went out. Written by the manager only.
pub struct SlotHealth {
    words: Box<[AtomicU64]>,
    org_prefix: String,
}

impl SlotHealth {
    /// Every slot down, until the manager has its subscriptions in place.
    pub fn new(prefix: &str) -> Self {
        Self {
            words: (0..SLOTS).map(|_| AtomicU64::new(1)).collect(),
            org_prefix: format!("{prefix}org:"),
        }
    }

    pub fn set(&self, slot: u16, up: bool) {
        let word = &self.words[usize::from(slot)];
        if (word.load(Ordering::Acquire) & 1 == 0) != up {
            word.fetch_add(1, Ordering::AcqRel);
        }
    }
}

impl Health for SlotHealth {
    fn token(&self, org: &OrgId) -> Option<u64> {
        let name = format!("{}{org}", self.org_prefix);
        let word = self.words[usize::from(slot(name.as_bytes()))].load(Ordering::Acquire);
        (word & 1 == 0).then_some(word)
    }
}

#[cfg(test)]
mod tests {
    use redis::Value;

    use super::*;

    #[test]
    fn slots_of_known_keys() {
        // Values from the Redis Cluster specification and `CLUSTER KEYSLOT`.
        assert_eq!(slot(b"foo"), 12182);
        assert_eq!(slot(b"bar"), 5061);
        assert_eq!(slot(b"123456789"), 0x31C3 % SLOTS);
        assert_eq!(slot(b"{user1000}.following"), slot(b"{user1000}.followers"));
        assert_eq!(slot(b"{user1000}.following"), slot(b"user1000"));
        // An empty tag, or no closing brace: the whole key is hashed.
        assert_eq!(slot(b"foo{}{bar}"), crc16(b"foo{}{bar}") % SLOTS);
        assert_eq!(slot(b"foo{bar"), crc16(b"foo{bar") % SLOTS);
    }

    fn range(start: i64, end: i64, port: i64) -> Value {
        Value::Array(vec![
            Value::Int(start),
            Value::Int(end),
            Value::Array(vec![
                Value::BulkString(b"127.0.0.1".to_vec()),
                Value::Int(port),
                Value::BulkString(b"id".to_vec()),
            ]),
        ])
    }

    #[test]
    fn the_map_of_cluster_slots() {
        let reply = Value::Array(vec![
            range(5461, 10922, 7001),
            range(0, 5460, 7000),
            range(10923, 16383, 7002),
        ]);
        let map = SlotMap::from_cluster_slots(&reply).unwrap();
        assert!(map.is_complete());
        assert_eq!(map.owner(0).unwrap(), "127.0.0.1:7000");
        assert_eq!(map.owner(5461).unwrap(), "127.0.0.1:7001");
        assert_eq!(map.owner(16383).unwrap(), "127.0.0.1:7002");
        assert_eq!(
            map.masters(),
            ["127.0.0.1:7000", "127.0.0.1:7001", "127.0.0.1:7002"]
        );
        for node in map.masters() {
            let tag = map.tag_for(&node).unwrap();
            assert_eq!(map.owner(slot(tag.as_bytes())).unwrap(), &node);
        }

        let partial = SlotMap::from_cluster_slots(&Value::Array(vec![range(0, 100, 7000)]));
        let partial = partial.unwrap();
        assert!(!partial.is_complete());
        assert_eq!(partial.owner(101), None);
        assert!(SlotMap::from_cluster_slots(&Value::Int(1)).is_err());
    }

    #[test]
    fn a_slot_lost_and_back_has_a_new_token() {
        let health = SlotHealth::new("fanout:");
        let acme = OrgId::parse("acme").unwrap();
        let mine = slot(b"fanout:org:acme");
        assert_eq!(health.token(&acme), None, "down until the manager says");
        health.set(mine, true);
        let token = health.token(&acme).unwrap();
        health.set(mine, true);
        assert_eq!(
            health.token(&acme),
            Some(token),
            "unchanged while it stays up"
        );
        health.set(mine.wrapping_add(1) % SLOTS, false);
        assert_eq!(health.token(&acme), Some(token), "another slot's loss");
        health.set(mine, false);
        assert_eq!(health.token(&acme), None);
        health.set(mine, true);
        assert!(health.token(&acme).is_some_and(|t| t != token));
    }
}
