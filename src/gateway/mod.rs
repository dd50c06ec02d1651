//! The Socket.IO gateway: authenticates sockets and puts them in their rooms.
//!
//! Invariants enforced here (and tested in `tests/`):
//! - a socket is in no room until its token is verified; a rejected socket is told why
//!   (`auth-error`) and disconnected, and receives nothing else;
//! - the organization comes from the token only, never from anything the client sends;
//! - a socket that would take its user or its organization over the replica's caps
//!   (`FANOUT_MAX_CONNECTIONS_PER_USER`, `_PER_ORG`) is refused like a bad token, with
//!   `Too many connections`, and counted nowhere;
//! - a socket is counted in presence before its organization's subscription is requested,
//!   and joins its rooms only once that subscription is in place, so `auth-success` means
//!   "you will now receive your organization's messages";
//! - a session ends when its token expires, unless `auth-refresh` extended it;
//! - a client that sends `auth.lastSeq` is sent the durable events it missed, in order,
//!   before any live durable event (see `delivery::history`).

mod expiry;
mod handshake;
mod hosts;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use serde_json::{Value, json};
use socketioxide::extract::{AckSender, SocketRef, TryData};
use socketioxide::socket::Sid;
use socketioxide::{SendError, SocketError, SocketIo};

use crate::auth::{Identity, Verifier};
use crate::bus::Bus;
use crate::delivery::Delivery;
use crate::ops::metrics;
use crate::presence::{Caps, Presence};
use crate::protocol::{OrgId, UserId};
use crate::tasks::Tasks;
use crate::transport::Transports;
pub use expiry::Expiry;
pub use handshake::{Handshakes, middleware};
pub use hosts::TrustedProxies;

/// The gateway and the parts of the replica it works with.
pub struct Gateway {
    pub verifier: Arc<Verifier>,
    /// Clock skew tolerated on a token's `exp`, in milliseconds.
    pub leeway_ms: u64,
    pub bus: Arc<Bus>,
    pub delivery: Arc<Delivery>,
    pub presence: Arc<Presence>,
    /// Caps on one user's and one organization's sockets on this replica.
    pub caps: Caps,
    pub expiry: Expiry,
    pub transports: Transports,
    pub tasks: Tasks,
}

impl Gateway {
    /// Registers the handlers of the default namespace.
    pub fn attach(self: &Arc<Self>, io: &SocketIo) {
        let gw = self.clone();
        io.ns(
            "/",
            move |socket: SocketRef, TryData(auth): TryData<Value>| {
                let gw = gw.clone();
                async move { gw.on_connect(socket, auth.ok()).await }
            },
        );
    }

    async fn on_connect(self: Arc<Self>, socket: SocketRef, auth: Option<Value>) {
        if self.tasks.shutdown().is_triggered() {
            // Closing the transport (not a Socket.IO disconnect) makes the client retry,
            // through the load balancer, on a replica that is not going away.
            self.transports.close(&socket);
            return;
        }
        let token = auth.as_ref().and_then(|a| a.get("token"));
        let identity = match self.verifier.verify_fresh(token).await {
            Ok(id) => id,
            Err(e) => {
                ::metrics::counter!(metrics::AUTH_FAILURES, "reason" => e.reason()).increment(1);
                ::metrics::counter!(metrics::CONNECTIONS_TOTAL, "result" => "rejected")
                    .increment(1);
                tracing::debug!(sid = %socket.id, reason = e.reason(), "rejected: {e}");
                return refuse(&socket, &self.transports, &self.tasks, e.client_message());
            }
        };
        handshake::authenticated(&socket);
        let (org, user) = (identity.org.clone(), identity.user.clone());
        let last_seq = last_seq(auth.as_ref());

        // Presence first, then the handler that undoes it: from here on, a disconnect at any
        // point undoes exactly what was done, once.
        if let Err(over) = self.presence.try_add(&org, &user, self.caps) {
            ::metrics::counter!(metrics::CONNECTIONS_REFUSED, "reason" => over.reason())
                .increment(1);
            ::metrics::counter!(metrics::CONNECTIONS_TOTAL, "result" => "rejected").increment(1);
            tracing::debug!(sid = %socket.id, %org, %user, reason = over.reason(), "refused");
            return refuse(&socket, &self.transports, &self.tasks, TOO_MANY_CONNECTIONS);
        }
        ::metrics::gauge!(metrics::CONNECTIONS).increment(1.0);
        let admission = Arc::new(Admission {
            gw: self.clone(),
            org: org.clone(),
            user: user.clone(),
            ended: AtomicBool::new(false),
        });
        {
            let admission = admission.clone();
            socket.on_disconnect(move |socket: SocketRef| async move { admission.end(socket.id) });
        }
        // Closed before the handler existed: socketioxide will never call it.
        if !socket.connected() {
            return admission.end(socket.id);
        }
        self.bus.joined(&org).await;
        if !socket.connected() {
            return admission.end(socket.id);
        }
        let seam = self
            .delivery
            .join(&socket, &org, &user, last_seq.unwrap_or(None))
            .await;
        if !socket.connected() {
            // Disconnected while joining: the adapter already forgot it, so must we.
            socket.leave_all();
            return admission.end(socket.id);
        }
        self.expiry
            .set(socket.id, identity.expires_at_ms(self.leeway_ms));
        self.listen_for_refresh(&socket, &identity);
        let sent = socket.emit(
            "auth-success",
            &json!({
                "message": "Connected to organization channel",
                "organizationId": identity.raw_org,
                "userId": identity.raw_user,
                "role": identity.role,
            }),
        );
        // A transport that closed before socketioxide put the socket in its namespace
        // leaves a socket that looks connected but will never be closed; only a send tells.
        // Disconnecting it removes it from the namespace and runs the handler above.
        if let Err(SendError::Socket(SocketError::Closed)) = sent {
            let _ = socket.clone().disconnect();
            return admission.end(socket.id);
        }
        ::metrics::counter!(metrics::CONNECTIONS_TOTAL, "result" => "accepted").increment(1);
        tracing::debug!(sid = %socket.id, %org, %user, "authenticated");
        match (last_seq, seam) {
            (Err(()), _) => self.delivery.invalid_last_seq(&socket),
            (Ok(_), Some(seam)) => self.delivery.replay(&socket, &user, seam).await,
            (Ok(_), None) => {}
        }
    }

    /// `auth-refresh` `{ token }`: extends the session to the new token's `exp`, if the new
    /// token is valid and names the same organization and user.
    fn listen_for_refresh(self: &Arc<Self>, socket: &SocketRef, identity: &Identity) {
        let gw = self.clone();
        let (org, user) = (identity.org.clone(), identity.user.clone());
        socket.on(
            "auth-refresh",
            move |socket: SocketRef, TryData(payload): TryData<Value>, ack: AckSender| async move {
                let payload = payload.ok();
                let token = payload.as_ref().and_then(|p| p.get("token"));
                let reply = match gw.verifier.verify_fresh(token).await {
                    Err(e) => {
                        ::metrics::counter!(metrics::AUTH_FAILURES, "reason" => "refresh_rejected")
                            .increment(1);
                        json!({"ok": false, "error": e.client_message()})
                    }
                    Ok(fresh) if fresh.org != org || fresh.user != user => {
                        ::metrics::counter!(metrics::AUTH_FAILURES, "reason" => "refresh_mismatch")
                            .increment(1);
                        json!({"ok": false, "error": "Token is for another organization or user"})
                    }
                    Ok(fresh) => {
                        gw.expiry.set(socket.id, fresh.expires_at_ms(gw.leeway_ms));
                        json!({"ok": true, "exp": fresh.exp})
                    }
                };
                let _ = ack.send(&reply);
            },
        );
    }
}

/// `auth.lastSeq`: absent or null (no replay), a non-negative integer, or its decimal
/// string (some clients keep it in storage as text). Anything else is an error.
fn last_seq(auth: Option<&Value>) -> Result<Option<u64>, ()> {
    match auth.and_then(|a| a.get("lastSeq")) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Number(n)) => n.as_u64().map(Some).ok_or(()),
        Some(Value::String(s)) => s.trim().parse().map(Some).map_err(|_| ()),
        Some(_) => Err(()),
    }
}

/// What an authenticated socket added to the replica's shared state. Ended exactly once,
/// by whichever comes first: the disconnect handler, or the connect path noticing that
/// socketioxide will never call that handler.
struct Admission {
    gw: Arc<Gateway>,
    org: OrgId,
    user: UserId,
    ended: AtomicBool,
}

impl Admission {
    fn end(&self, sid: Sid) {
        if self.ended.swap(true, Ordering::AcqRel) {
            return;
        }
        let gw = &self.gw;
        gw.expiry.remove(sid);
        gw.transports.forget(sid);
        ::metrics::gauge!(metrics::CONNECTIONS).decrement(1.0);
        if gw.presence.remove(&self.org, &self.user) {
            gw.bus.left(&self.org);
            gw.delivery.left(&self.org);
        }
    }
}

/// What a client over its user's or organization's connection cap is told.
const TOO_MANY_CONNECTIONS: &str = "Too many connections";

/// How long a refused client has to read its `auth-error` before its transport is closed.
const REFUSAL_GRACE: std::time::Duration = std::time::Duration::from_millis(250);

/// Tells the client why (`auth-error`), disconnects it, and a moment later ends its
/// session: the `auth-error` is queued before the disconnect packet on the same ordered
/// queue, so it always arrives first, and a stock client closes its transport on that
/// disconnect; one that keeps polling or answering pings has it closed for it.
fn refuse(socket: &SocketRef, transports: &Transports, tasks: &Tasks, message: &str) {
    let _ = socket.emit("auth-error", &json!({ "error": message }));
    let _ = socket.clone().disconnect();
    let (socket, transports) = (socket.clone(), transports.clone());
    tasks.spawn_short("refusal", async move {
        tokio::time::sleep(REFUSAL_GRACE).await;
        transports.end_session(&socket);
    });
}

#[cfg(test)]
mod tests {
    use super::last_seq;
    use serde_json::json;

    #[test]
    fn last_seq_is_a_non_negative_integer_or_its_text() {
        assert_eq!(last_seq(None), Ok(None));
        assert_eq!(last_seq(Some(&json!({"token": "t"}))), Ok(None));
        assert_eq!(last_seq(Some(&json!({"lastSeq": null}))), Ok(None));
        assert_eq!(last_seq(Some(&json!({"lastSeq": 0}))), Ok(Some(0)));
        assert_eq!(last_seq(Some(&json!({"lastSeq": 42}))), Ok(Some(42)));
        assert_eq!(last_seq(Some(&json!({"lastSeq": " 42 "}))), Ok(Some(42)));
        for bad in [
            json!(-1),
            json!(1.5),
            json!("x"),
            json!([1]),
            json!({}),
            json!(true),
        ] {
            assert_eq!(last_seq(Some(&json!({ "lastSeq": bad }))), Err(()), "{bad}");
        }
    }
}
