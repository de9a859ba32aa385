//! The original destination of a connection that iptables redirected to the proxy
//! (`SO_ORIGINAL_DST` for IPv4, `IP6T_SO_ORIGINAL_DST` for IPv6), through `nix`: no unsafe code.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use nix::sys::socket::{getsockopt, sockopt};
use tokio::net::TcpStream;

/// Where a captured connection was going before it was redirected.
///
/// [`SoOriginalDst`] asks the kernel; tests on loopback inject their own (any
/// `Fn(&TcpStream) -> io::Result<SocketAddr>` is a source).
pub trait OriginalDst: Send + Sync + 'static {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr>;
}

impl<F> OriginalDst for F
where
    F: Fn(&TcpStream) -> io::Result<SocketAddr> + Send + Sync + 'static,
{
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        self(stream)
    }
}

/// The kernel's answer (netfilter conntrack). A connection that was not redirected is an
/// error of kind `NotFound`: Linux then either fails (`ENOENT`, no conntrack entry) or
/// returns the socket's own local address, and both are reported the same way, so a proxy
/// never connects to itself.
#[derive(Clone, Copy, Debug, Default)]
pub struct SoOriginalDst;

impl OriginalDst for SoOriginalDst {
    fn original_dst(&self, stream: &TcpStream) -> io::Result<SocketAddr> {
        let local = stream.local_addr()?;
        // A dual-stack socket ([::] without IPV6_V6ONLY) shows IPv4 connections as
        // IPv4-mapped: their conntrack entry, and so their original destination, is IPv4.
        let local = SocketAddr::new(local.ip().to_canonical(), local.port());
        let original = original_dst(stream, local.is_ipv6())?;
        if SocketAddr::new(original.ip().to_canonical(), original.port()) == local {
            return Err(not_redirected());
        }
        Ok(original)
    }
}

fn not_redirected() -> io::Error {
    io::Error::new(io::ErrorKind::NotFound, "connection was not redirected")
}

/// The raw `SO_ORIGINAL_DST` (or its IPv6 twin) of `stream`.
pub fn original_dst(stream: &TcpStream, ipv6: bool) -> io::Result<SocketAddr> {
    let result = if ipv6 {
        getsockopt(stream, sockopt::Ip6tOriginalDst).map(|sa| {
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sa.sin6_addr.s6_addr),
                u16::from_be(sa.sin6_port),
                u32::from_be(sa.sin6_flowinfo),
                sa.sin6_scope_id,
            ))
        })
    } else {
        getsockopt(stream, sockopt::OriginalDst).map(|sa| {
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
                u16::from_be(sa.sin_port),
            ))
        })
    };
    match result {
        Ok(addr) => Ok(addr),
        Err(nix::errno::Errno::ENOENT) => Err(not_redirected()),
        Err(e) => Err(io::Error::from(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// On loopback without a REDIRECT rule the real source must never return a usable
    /// destination (ENOENT, or the own address filtered out).
    #[tokio::test]
    async fn unredirected_connection_has_no_original_dst() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (accepted, _) = listener.accept().await.expect("accept");
        let err = SoOriginalDst
            .original_dst(&accepted)
            .expect_err("not redirected");
        // ENOPROTOOPT when the netfilter module is not loaded at all.
        assert!(
            matches!(
                err.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::Other | io::ErrorKind::Unsupported
            ) || err.raw_os_error().is_some(),
            "{err:?}"
        );
    }
}
