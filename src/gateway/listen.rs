//! Where a gateway listens: the bind address (loopback, LAN, tailnet), one port for QUIC (UDP)
//! and the classic bridge (TCP), and the address it advertises to peers.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};

use anyhow::{anyhow, Context, Result};

use super::settings::Bind;

/// Pending TCP connections the kernel queues for the bridge: a fleet of nodes reconnecting
/// after a gateway restart arrives in bursts of thousands; the default 128 drops SYNs and
/// costs each dropped client a 1 s retransmit.
const TCP_BACKLOG: u32 = 4096;

/// A TCP listener for the classic bridge: `TCP_NODELAY` (inherited by accepted sockets, so a
/// small reply never waits behind a delayed ACK) and a deep accept backlog.
fn tcp_listener(addr: SocketAddr) -> std::io::Result<tokio::net::TcpListener> {
    let sock = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()?
    } else {
        tokio::net::TcpSocket::new_v6()?
    };
    sock.set_reuseaddr(true)?;
    sock.set_nodelay(true)?;
    sock.bind(addr)?;
    sock.listen(TCP_BACKLOG)
}

/// The receive buffer asked for the gateway's one UDP socket, which every node's and peer's
/// QUIC packets share. The kernel default (208 KiB, about 150 small datagrams) overflowed at
/// 50 000 native nodes (pings, pongs, vitals and acks: tens of thousands of datagrams a
/// second): a few ms of scheduling delay on a busy host dropped pongs by the hundred
/// thousand, the gateway closed the nodes as unresponsive, they reconnected: a spiral.
/// 8 MiB holds a few thousand datagrams, a few hundred ms of that traffic. The kernel caps it
/// at `net.core.rmem_max` (the administrator's limit, not overridden); memory is used only
/// while packets wait.
const UDP_RECV_BUFFER: usize = 8 << 20;

/// Asks for [`UDP_RECV_BUFFER`] on the QUIC socket; says so when the kernel grants less.
fn grow_recv_buffer(udp: &std::net::UdpSocket) {
    use nix::sys::socket::{getsockopt, setsockopt, sockopt::RcvBuf};
    if let Err(e) = setsockopt(udp, RcvBuf, &UDP_RECV_BUFFER) {
        tracing::warn!("cannot set the QUIC socket's receive buffer: {e}");
        return;
    }
    // Linux reports twice what it grants (bookkeeping included).
    let granted = getsockopt(udp, RcvBuf).map(|b| b / 2).unwrap_or(0);
    if granted < UDP_RECV_BUFFER {
        tracing::info!(
            granted,
            wanted = UDP_RECV_BUFFER,
            "the QUIC socket's receive buffer is capped by net.core.rmem_max; with tens of thousands of nodes, raise it (sysctl -w net.core.rmem_max={UDP_RECV_BUFFER})"
        );
    }
}

/// Binds UDP (QUIC) and TCP (classic bridge) on the same port; with port 0, finds one that is
/// free for both.
pub(super) fn bind_both(
    ip: IpAddr,
    port: u16,
) -> Result<(std::net::UdpSocket, tokio::net::TcpListener)> {
    let attempts = if port == 0 { 20 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        let udp = std::net::UdpSocket::bind(SocketAddr::new(ip, port))
            .with_context(|| format!("cannot bind UDP {ip}:{port} (QUIC)"))?;
        let p = udp.local_addr()?.port();
        match tcp_listener(SocketAddr::new(ip, p)) {
            Ok(tcp) => {
                grow_recv_buffer(&udp);
                return Ok((udp, tcp));
            }
            Err(e) => last = Some(e),
        }
    }
    Err(anyhow!(
        "cannot bind TCP {ip}:{port} for the classic WebSocket bridge: {}",
        last.map(|e| e.to_string()).unwrap_or_default()
    ))
}

fn interface_addrs() -> Vec<IpAddr> {
    let Ok(addrs) = nix::ifaddrs::getifaddrs() else {
        return Vec::new();
    };
    addrs
        .filter_map(|a| a.address)
        .filter_map(|s| s.as_sockaddr_in().map(|v4| IpAddr::V4(v4.ip())))
        .collect()
}

pub(super) fn bind_ip(bind: &Bind) -> Result<IpAddr> {
    Ok(match bind {
        Bind::Loopback => IpAddr::V4(Ipv4Addr::LOCALHOST),
        Bind::Lan => IpAddr::V4(Ipv4Addr::UNSPECIFIED),
        Bind::Ip(ip) => *ip,
        Bind::Tailnet => interface_addrs()
            .into_iter()
            .find(clawmesh_discovery::tsaddr::is_tailnet)
            .ok_or_else(|| anyhow!("--bind tailnet: this machine has no Tailscale address (100.64.0.0/10); is tailscale up?"))?,
    })
}

pub(super) fn default_advertise(bound: SocketAddr) -> String {
    if !bound.ip().is_unspecified() {
        return bound.to_string();
    }
    let ip = interface_addrs()
        .into_iter()
        .find(|ip| !ip.is_loopback())
        .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST));
    SocketAddr::new(ip, bound.port()).to_string()
}
