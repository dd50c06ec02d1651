//! Which host a handshake comes from, and each host's budget of new sessions
//! (`FANOUT_HANDSHAKE_RATE_PER_HOST`, off by default).
//!
//! Pending sessions are bounded for the whole replica (`FANOUT_MAX_PENDING_SESSIONS`), so one
//! host opening sessions in a loop would take those places from everyone else's reconnects.
//! With a rate per host, that host gets 429 with `Retry-After` (counted in
//! `fanout_connections_refused_total{reason="host_rate"}`), and everyone else is not slowed.
//!
//! The host is the TCP peer, unless the peer is a proxy named in `FANOUT_TRUSTED_PROXIES`:
//! then it is the rightmost `X-Forwarded-For` address that is not itself a trusted proxy
//! (what a proxy appends is true; what the client wrote to the left of it is not). From an
//! untrusted peer the header is ignored, so no client can pick its own budget. IPv6 hosts are
//! counted per /64, what one subscriber usually gets.
//!
//! It is off by default because behind a proxy that fanout does not trust, every client has
//! the proxy's address: a per-host budget would then be one budget for everyone.

use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use axum::http::HeaderMap;
use ipnet::{IpNet, Ipv6Net};

use crate::rates::Budgets;

/// The proxies whose `X-Forwarded-For` is believed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TrustedProxies(pub Vec<IpNet>);

impl TrustedProxies {
    fn contains(&self, ip: IpAddr) -> bool {
        self.0.iter().any(|net| net.contains(&ip))
    }

    /// The client host of a request from `peer` with `headers`.
    pub fn client_host(&self, peer: IpAddr, headers: &HeaderMap) -> IpAddr {
        if !self.contains(peer) {
            return peer;
        }
        // Every X-Forwarded-For header, in order, is one list; walk it from the right.
        let forwarded: Vec<&str> = headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .collect();
        let mut host = peer;
        for hop in forwarded.iter().rev() {
            match hop.trim().parse::<IpAddr>() {
                Ok(ip) if self.contains(ip) => host = ip,
                Ok(ip) => return ip,
                // Garbage (or a port, or "unknown") where a trusted proxy wrote: stop at the
                // last address known to be true.
                Err(_) => return host,
            }
        }
        host
    }
}

/// Each host's budget of new sessions.
pub struct HostRates(Budgets<IpAddr>);

impl HostRates {
    /// `per_second` new sessions per host, in bursts of up to one second's worth.
    pub fn new(per_second: NonZeroU32) -> Self {
        Self(Budgets::new(per_second))
    }

    pub fn per_second(&self) -> u32 {
        self.0.per_second()
    }

    /// Takes one session from `host`'s budget, or says how long until there is one.
    pub fn check(&self, host: IpAddr) -> Result<(), Duration> {
        self.0.check(&per_subscriber(host))
    }
}

/// An IPv4 host as is; an IPv6 host as its /64.
fn per_subscriber(host: IpAddr) -> IpAddr {
    match host {
        IpAddr::V4(_) => host,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(Ipv6Net::new_assert(v6, 64).network()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(text: &str) -> IpAddr {
        text.parse().unwrap()
    }

    fn headers(values: &[&str]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        headers
    }

    #[test]
    fn forwarded_for_is_believed_from_trusted_proxies_only() {
        let trusted = TrustedProxies(vec!["10.0.0.0/8".parse().unwrap()]);
        let xff = headers(&["198.51.100.9, 203.0.113.7"]);
        // From a trusted proxy: the rightmost address it did not itself add.
        assert_eq!(trusted.client_host(ip("10.1.2.3"), &xff), ip("203.0.113.7"));
        // Through two trusted proxies.
        let chained = headers(&["203.0.113.7", "10.9.9.9"]);
        assert_eq!(
            trusted.client_host(ip("10.1.2.3"), &chained),
            ip("203.0.113.7")
        );
        // From anyone else the header is the client's own word: ignored.
        assert_eq!(trusted.client_host(ip("192.0.2.1"), &xff), ip("192.0.2.1"));
        assert_eq!(
            TrustedProxies::default().client_host(ip("10.1.2.3"), &xff),
            ip("10.1.2.3")
        );
        // No header, or garbage where the proxy wrote: the last address known true.
        assert_eq!(
            trusted.client_host(ip("10.1.2.3"), &HeaderMap::new()),
            ip("10.1.2.3")
        );
        let garbage = headers(&["203.0.113.7, unknown"]);
        assert_eq!(
            trusted.client_host(ip("10.1.2.3"), &garbage),
            ip("10.1.2.3")
        );
    }

    #[test]
    fn each_host_has_its_own_budget_and_ipv6_counts_per_64() {
        let rates = HostRates::new(NonZeroU32::new(2).unwrap());
        assert!(rates.check(ip("192.0.2.1")).is_ok());
        assert!(rates.check(ip("192.0.2.1")).is_ok());
        let wait = rates.check(ip("192.0.2.1")).unwrap_err();
        assert!(
            wait > Duration::ZERO && wait <= Duration::from_millis(500),
            "{wait:?}"
        );
        assert!(rates.check(ip("192.0.2.2")).is_ok());
        // Two addresses of one /64 share a budget; another /64 has its own.
        assert!(rates.check(ip("2001:db8:0:1::1")).is_ok());
        assert!(rates.check(ip("2001:db8:0:1::2")).is_ok());
        assert!(rates.check(ip("2001:db8:0:1:ffff::3")).is_err());
        assert!(rates.check(ip("2001:db8:0:2::1")).is_ok());
        // An IPv4 host seen as IPv4-mapped IPv6 is the same host.
        assert!(rates.check(ip("::ffff:192.0.2.1")).is_err());
    }
}
