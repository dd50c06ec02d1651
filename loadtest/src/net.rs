//! Getting past one machine's limits on connections: open files and source ports.
//!
//! 50,000 connections from one process need 50,000 file descriptors (the default soft limit
//! is often 1,024) and 50,000 distinct source (address, port) pairs, while a source address
//! has about 28,000 ephemeral ports. So the generator raises its own `RLIMIT_NOFILE`
//! (`fanout_testkit::raise_nofile_limit`; children spawned afterwards inherit it; where the
//! hard limit cannot move, `connect` spreads its connections over several generator
//! processes), and spreads connections to loopback targets over the source addresses
//! 127.0.0.1, 127.0.0.2, ... (all of 127/8 is loopback on Linux). Sockets are bound with
//! `IP_BIND_ADDRESS_NO_PORT`, so the kernel picks the source port at `connect()` for the
//! whole 4-tuple instead of reserving it at `bind()`: ports are then shared between
//! destinations, and loopback `TIME_WAIT` entries left by a previous scenario can be reused
//! (`net.ipv4.tcp_tw_reuse`).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::fd::AsRawFd;

use tokio::net::{TcpSocket, TcpStream};

/// Connections per (source address, destination) pair: well below the ~28,000 ephemeral
/// ports, because `connect()` gets slow when it has to search a nearly full port range.
const PER_SOURCE_AND_DESTINATION: usize = 10_000;

/// File descriptors a process needs besides its connections (runtime, listeners, logs,
/// Redis and HTTP clients).
pub const FD_RESERVE: u64 = 500;

/// Raises this process's open-file limit (children spawned afterwards inherit it) to
/// `wanted` descriptors plus [`FD_RESERVE`]; fails, saying for `what`, unless at least
/// `needed` plus the reserve are allowed. Returns the limit.
pub fn open_files(wanted: u64, needed: u64, what: &str) -> anyhow::Result<u64> {
    let limit = fanout_testkit::raise_nofile_limit(wanted + FD_RESERVE);
    anyhow::ensure!(
        limit >= needed + FD_RESERVE,
        "the open-file limit {limit} is too low for {what}: it needs {needed} descriptors and \
         {FD_RESERVE} more (raise the hard limit, ulimit -Hn, or run a smaller load)"
    );
    Ok(limit)
}

/// The source addresses that connections to `destinations` are spread over.
#[derive(Debug, Clone)]
pub struct Sources {
    addrs: Vec<Ipv4Addr>,
}

impl Sources {
    /// Enough loopback source addresses for `connections` spread evenly over `destinations`;
    /// none (the kernel chooses) when a destination is not on loopback.
    pub fn for_connections(connections: usize, destinations: &[SocketAddr]) -> Self {
        if destinations.is_empty() || !destinations.iter().all(|d| d.ip().is_loopback()) {
            return Self { addrs: Vec::new() };
        }
        let per_source = PER_SOURCE_AND_DESTINATION * destinations.len();
        let count = connections.div_ceil(per_source).clamp(1, 250);
        let addrs = (1..=count as u8)
            .map(|i| Ipv4Addr::new(127, 0, 0, i))
            .collect();
        Self { addrs }
    }

    /// The source address of connection `i`, if sources are used.
    pub fn pick(&self, i: usize) -> Option<Ipv4Addr> {
        (!self.addrs.is_empty()).then(|| self.addrs[i % self.addrs.len()])
    }

    pub fn len(&self) -> usize {
        self.addrs.len()
    }
}

/// Opens a TCP connection from `source` (any address if `None`) with `TCP_NODELAY`.
pub async fn connect(source: Option<Ipv4Addr>, dst: SocketAddr) -> io::Result<TcpStream> {
    let socket = match dst.ip() {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    if let (Some(src), IpAddr::V4(_)) = (source, dst.ip()) {
        bind_address_no_port(&socket)?;
        socket.bind(SocketAddr::new(IpAddr::V4(src), 0))?;
    }
    socket.set_nodelay(true)?;
    socket.connect(dst).await
}

fn bind_address_no_port(socket: &TcpSocket) -> io::Result<()> {
    let one: libc::c_int = 1;
    // SAFETY: a valid socket fd and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_IP,
            libc::IP_BIND_ADDRESS_NO_PORT,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Parses `ws://HOST:PORT`, `http://HOST:PORT` or `HOST:PORT` (anything after the port is
/// ignored: paths are the client's business).
pub fn parse_addr(url: &str) -> anyhow::Result<SocketAddr> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("http://"))
        .or_else(|| url.strip_prefix("redis://"))
        .unwrap_or(url);
    let hostport = rest.split('/').next().unwrap_or(rest);
    hostport.parse().map_err(|_| {
        anyhow::anyhow!(
            "invalid address {url:?}: expected ws://IP:PORT, http://IP:PORT or IP:PORT \
             (an IP address, e.g. ws://127.0.0.1:3000; host names are not resolved)"
        )
    })
}

/// Parses a comma-separated list of addresses (see [`parse_addr`]).
pub fn parse_addrs(list: &str) -> anyhow::Result<Vec<SocketAddr>> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(parse_addr)
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sources_scale_with_connections_and_destinations() {
        let one: Vec<SocketAddr> = vec!["127.0.0.1:3000".parse().unwrap()];
        let two: Vec<SocketAddr> = vec![
            "127.0.0.1:3000".parse().unwrap(),
            "127.0.0.1:3001".parse().unwrap(),
        ];
        assert_eq!(Sources::for_connections(300, &one).len(), 1);
        assert_eq!(Sources::for_connections(50_000, &one).len(), 5);
        assert_eq!(Sources::for_connections(50_000, &two).len(), 3);
        let remote: Vec<SocketAddr> = vec!["10.0.0.1:3000".parse().unwrap()];
        assert_eq!(Sources::for_connections(50_000, &remote).pick(3), None);
        let s = Sources::for_connections(50_000, &one);
        assert_eq!(s.pick(0), Some(Ipv4Addr::new(127, 0, 0, 1)));
        assert_eq!(s.pick(6), Some(Ipv4Addr::new(127, 0, 0, 2)));
    }

    #[test]
    fn addresses_parse_with_or_without_scheme() {
        for s in [
            "ws://127.0.0.1:3000",
            "http://127.0.0.1:3000/x",
            "127.0.0.1:3000",
        ] {
            assert_eq!(parse_addr(s).unwrap(), "127.0.0.1:3000".parse().unwrap());
        }
        assert!(parse_addr("localhost:3000").is_err());
        assert_eq!(parse_addrs("127.0.0.1:1, 127.0.0.1:2").unwrap().len(), 2);
    }
}
