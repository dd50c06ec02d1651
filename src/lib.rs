//! fanout: realtime Socket.IO fan-out for dashboards, scaled through Redis.
//!
//! See `ARCHITECTURE.md` for the map of these modules and the invariants they keep.

pub mod admin;
pub mod api;
pub mod auth;
pub mod bus;
pub mod config;
pub mod dashboard;
pub mod delivery;
pub mod demo;
pub mod gateway;
pub mod ingest;
pub mod openapi;
pub mod ops;
pub mod presence;
pub mod protocol;
pub mod rates;
pub mod retry;
pub mod server;
pub mod store;
pub mod tasks;
pub mod transport;
