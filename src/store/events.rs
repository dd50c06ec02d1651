//! Reading the event log back: what replicas need to deliver durable events in order
//! (the last sequence number of an organization, a range of its events) and to replay them
//! to reconnecting clients.

use std::collections::HashMap;

use serde_json::value::RawValue;

use super::{Store, StoreError};
use crate::protocol::{EventName, Message, OrgId, UserId};

/// Most events read by one query; longer ranges are read in several.
pub const CHUNK: i64 = 1000;

impl Store {
    /// The last sequence number given out to each of `orgs` (0 when none yet).
    pub async fn last_seqs(&self, orgs: &[&str]) -> Result<HashMap<String, u64>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT organization_id, last_seq FROM org_sequences
                 WHERE organization_id = ANY($1::text[])",
                &[&orgs],
            )
            .await
            .map_err(|e| self.failed(&e))?;
        let mut last: HashMap<String, u64> = orgs.iter().map(|o| (o.to_string(), 0)).collect();
        for row in rows {
            last.insert(row.get(0), row.get::<_, i64>(1) as u64);
        }
        Ok(last)
    }

    /// The last sequence number of `org` (0 when it has none).
    pub async fn last_seq(&self, org: &OrgId) -> Result<u64, StoreError> {
        let last = self.last_seqs(&[org.as_str()]).await?;
        Ok(last.get(org.as_str()).copied().unwrap_or(0))
    }

    /// The events of `org` with `after < seq <= upto`, in order, at most [`CHUNK`]; with
    /// `user`, only those for everyone or for that user. Also returns the first sequence
    /// number still retained, so callers can tell "none for you" from "deleted".
    pub async fn range(
        &self,
        org: &OrgId,
        after: u64,
        upto: u64,
        user: Option<&UserId>,
    ) -> Result<Range, StoreError> {
        let client = self.client().await?;
        let (after, upto) = (after as i64, upto as i64);
        let user = user.map(UserId::as_str);
        let rows = client
            .query(
                "SELECT seq, event, data::text, user_id FROM events
                 WHERE organization_id = $1 AND seq > $2 AND seq <= $3
                   AND ($4::text IS NULL OR user_id IS NULL OR user_id = $4)
                 ORDER BY seq LIMIT $5",
                &[&org.as_str(), &after, &upto, &user, &CHUNK],
            )
            .await
            .map_err(|e| self.failed(&e))?;
        let first: Option<i64> = client
            .query_one(
                "SELECT min(seq) FROM events WHERE organization_id = $1",
                &[&org.as_str()],
            )
            .await
            .map_err(|e| self.failed(&e))?
            .get(0);
        let mut events = Vec::with_capacity(rows.len());
        for row in rows {
            let seq: i64 = row.get(0);
            let (event, data, user): (&str, String, Option<&str>) =
                (row.get(1), row.get(2), row.get(3));
            // Everything in the log passed these checks when it was accepted.
            let (Ok(event), Ok(data)) = (EventName::parse(event), RawValue::from_string(data))
            else {
                tracing::error!(%org, seq, "unreadable event in the history; skipped");
                continue;
            };
            events.push(Message {
                org: org.clone(),
                event,
                data,
                ts_ms: None,
                user: user.and_then(|u| UserId::parse(u).ok()),
                via_ingest: true,
                seq: Some(seq as u64),
                sig: None,
                stamp: None,
            });
        }
        Ok(Range {
            events,
            first_retained: first.map(|f| f as u64),
        })
    }
}

/// A slice of the event log.
pub struct Range {
    pub events: Vec<Message>,
    /// The oldest sequence number the log still holds for the organization, if any.
    pub first_retained: Option<u64>,
}
