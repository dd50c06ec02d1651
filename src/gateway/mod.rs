//! The Socket.IO gateway: authenticates sockets and puts them in their rooms.
//!
//! Invariants enforced here (and tested in `tests/`):
//! - a socket is in no room until its token is verified; a rejected socket is told why
//!   (`auth-error`) and disconnected, and receives nothing else;
//! - the organization comes from the token only, never from anything the client sends;
//! - a socket is counted in presence before its organization's subscription is requested,
//!   and joins its rooms only once that subscription is in place, so `auth-success` means
//!   "you will now receive your organization's messages";
//! - a session ends when its token expires, unless `auth-refresh` extended it.

pub mod conn;
mod expiry;

use std::sync::Arc;

use serde_json::{Value, json};
use socketioxide::SocketIo;
use socketioxide::extract::{AckSender, SocketRef, TryData};

use crate::auth::{AuthError, Identity, Verifier};
use crate::bus::Bus;
use crate::ops::metrics;
use crate::ops::shutdown::Shutdown;
use crate::presence::Presence;
use crate::protocol::user_room;
use conn::Transports;
pub use expiry::Expiry;

pub struct Gateway {
    verifier: Verifier,
    leeway_ms: u64,
    bus: Arc<Bus>,
    presence: Arc<Presence>,
    expiry: Expiry,
    transports: Transports,
    shutdown: Shutdown,
}

impl Gateway {
    pub fn new(
        verifier: Verifier,
        leeway_seconds: u64,
        bus: Arc<Bus>,
        presence: Arc<Presence>,
        expiry: Expiry,
        transports: Transports,
        shutdown: Shutdown,
    ) -> Arc<Self> {
        Arc::new(Self {
            verifier,
            leeway_ms: leeway_seconds * 1000,
            bus,
            presence,
            expiry,
            transports,
            shutdown,
        })
    }

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
        if self.shutdown.is_triggered() {
            // Closing the transport (not a Socket.IO disconnect) makes the client retry,
            // through the load balancer, on a replica that is not going away.
            self.transports.close(&socket);
            return;
        }
        let token = auth.as_ref().and_then(|a| a.get("token"));
        let identity = match self.verifier.verify(token) {
            Ok(id) => id,
            Err(e) => return reject(&socket, &e),
        };
        let (org, user) = (identity.org.clone(), identity.user.clone());

        // Presence first, disconnect handler next: from here on, a disconnect at any point
        // undoes exactly what was done.
        self.presence.add(&org, &user);
        ::metrics::gauge!(metrics::CONNECTIONS).increment(1.0);
        {
            let gw = self.clone();
            let (org, user) = (org.clone(), user.clone());
            socket.on_disconnect(move |socket: SocketRef| async move {
                gw.expiry.remove(socket.id);
                gw.transports.forget(socket.id);
                ::metrics::gauge!(metrics::CONNECTIONS).decrement(1.0);
                if gw.presence.remove(&org, &user) {
                    gw.bus.left(&org);
                }
            });
        }
        self.bus.joined(&org).await;
        if !socket.connected() {
            return;
        }
        socket.join([org.room(), user_room(&org, &user)]);
        if !socket.connected() {
            // Disconnected while joining: the adapter already forgot it, so must we.
            socket.leave_all();
            return;
        }
        self.expiry
            .set(socket.id, identity.exp * 1000 + self.leeway_ms);
        self.listen_for_refresh(&socket, &identity);
        ::metrics::counter!(metrics::CONNECTIONS_TOTAL, "result" => "accepted").increment(1);
        tracing::debug!(sid = %socket.id, %org, %user, "authenticated");
        let _ = socket.emit(
            "auth-success",
            &json!({
                "message": "Connected to organization channel",
                "organizationId": identity.raw_org,
                "userId": identity.raw_user,
                "role": identity.role,
            }),
        );
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
                let reply = match gw.verifier.verify(token) {
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
                        gw.expiry.set(socket.id, fresh.exp * 1000 + gw.leeway_ms);
                        json!({"ok": true, "exp": fresh.exp})
                    }
                };
                let _ = ack.send(&reply);
            },
        );
    }
}

/// Tells the client why and disconnects it. The `auth-error` is queued before the
/// disconnect packet on the same ordered queue, so it always arrives first.
fn reject(socket: &SocketRef, err: &AuthError) {
    ::metrics::counter!(metrics::AUTH_FAILURES, "reason" => err.reason()).increment(1);
    ::metrics::counter!(metrics::CONNECTIONS_TOTAL, "result" => "rejected").increment(1);
    tracing::debug!(sid = %socket.id, reason = err.reason(), "rejected: {err}");
    let _ = socket.emit("auth-error", &json!({"error": err.client_message()}));
    let _ = socket.clone().disconnect();
}
