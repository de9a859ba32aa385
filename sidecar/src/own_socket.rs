//! Whether a connection to one of our listeners comes from a socket of this very process: a
//! connection the proxy itself opened (a forwarded one, in explicit mode also to a loopback
//! address) must not count as a local caller. The kernel's socket tables (`/proc/net/tcp`,
//! `/proc/net/tcp6`) name the inode of the socket at the other end; `/proc/self/fd` says
//! whether that inode is one of ours.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// The inode of the TCP socket whose local address is `from` and remote address is `to`, as
/// the kernel's tables list it.
fn socket_inode(from: SocketAddr, to: SocketAddr) -> Option<u64> {
    let canon = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    let (from, to) = (canon(from), canon(to));
    ["/proc/self/net/tcp", "/proc/self/net/tcp6"]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .find_map(|text| {
            text.lines().skip(1).find_map(|line| {
                let f: Vec<&str> = line.split_whitespace().collect();
                let (local, remote, inode) = (f.get(1)?, f.get(2)?, f.get(9)?);
                (parse_addr(local)? == from && parse_addr(remote)? == to)
                    .then(|| inode.parse().ok())
                    .flatten()
            })
        })
}

/// `0100007F:1F90` (IPv4) or 32 hex digits and a port (IPv6): each 32-bit word as the kernel
/// holds it (network order, printed as a native integer).
pub fn parse_addr(s: &str) -> Option<SocketAddr> {
    let (ip, port) = s.split_once(':')?;
    let port = u16::from_str_radix(port, 16).ok()?;
    let word = |h: &str| u32::from_str_radix(h, 16).ok().map(u32::to_ne_bytes);
    let ip = match ip.len() {
        8 => IpAddr::V4(Ipv4Addr::from(word(ip)?)),
        32 => {
            let mut b = [0u8; 16];
            for i in 0..4 {
                b[i * 4..i * 4 + 4].copy_from_slice(&word(ip.get(i * 8..i * 8 + 8)?)?);
            }
            IpAddr::V6(Ipv6Addr::from(b))
        }
        _ => return None,
    };
    Some(SocketAddr::new(ip.to_canonical(), port))
}

/// The socket inodes of this process's file descriptors.
fn own_socket_inodes() -> HashSet<u64> {
    std::fs::read_dir("/proc/self/fd")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .filter_map(|l| {
            l.to_str()?
                .strip_prefix("socket:[")?
                .strip_suffix(']')?
                .parse()
                .ok()
        })
        .collect()
}

/// Whether the peer `peer` of a connection accepted at `local` is a socket of this process.
/// Unknown (no such line, /proc unreadable) is `false`: the caller decides what else to check.
pub fn is_own(peer: SocketAddr, local: SocketAddr) -> bool {
    socket_inode(peer, local).is_some_and(|inode| own_socket_inodes().contains(&inode))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_kernels_addresses() {
        if cfg!(target_endian = "little") {
            assert_eq!(
                parse_addr("0100007F:1F90"),
                Some("127.0.0.1:8080".parse().expect("addr"))
            );
            assert_eq!(
                parse_addr("00000000000000000000000001000000:0050"),
                Some("[::1]:80".parse().expect("addr"))
            );
            // IPv4-mapped IPv6 is read as IPv4.
            assert_eq!(
                parse_addr("0000000000000000FFFF00000100007F:0050"),
                Some("127.0.0.1:80".parse().expect("addr"))
            );
        }
        assert_eq!(parse_addr("zz:1"), None);
        assert_eq!(parse_addr("0100007F"), None);
    }

    /// Our own connection is ours; another process's is not.
    #[test]
    fn tells_our_own_sockets_from_another_process() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let at = listener.local_addr().expect("addr");
        let _ours = std::net::TcpStream::connect(at).expect("connect");
        let (_s, peer) = listener.accept().expect("accept");
        assert!(is_own(peer, at));

        let mut child = std::process::Command::new("bash")
            .arg("-c")
            .arg(format!(
                "exec 3<>/dev/tcp/127.0.0.1/{} && sleep 30",
                at.port()
            ))
            .spawn()
            .expect("bash");
        let (_s, peer) = listener.accept().expect("accept");
        let theirs = is_own(peer, at);
        let _ = child.kill();
        let _ = child.wait();
        assert!(!theirs, "a child's socket counted as ours");
    }
}
