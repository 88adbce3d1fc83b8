//! Tailscale's address ranges (tailscale `net/tsaddr`): which addresses are tailnet addresses,
//! so mDNS never advertises one on a LAN.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// Whether `ip` is in Tailscale's ranges: 100.64.0.0/10 without the ChromeOS VM range
/// 100.115.92.0/23, or fd7a:115c:a1e0::/48. Being in range proves nothing about identity
/// (other CGNAT users exist); it only says "do not put this on a LAN".
pub fn is_tailnet(ip: &IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_tailnet_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_tailnet_v4(&v4),
            None => is_tailnet_v6(v6),
        },
    }
}

fn is_tailnet_v4(v4: &Ipv4Addr) -> bool {
    let o = v4.octets();
    let cgnat = o[0] == 100 && (o[1] & 0xc0) == 64;
    let chromeos = o[0] == 100 && o[1] == 115 && (o[2] & 0xfe) == 92;
    cgnat && !chromeos
}

fn is_tailnet_v6(v6: &Ipv6Addr) -> bool {
    let s = v6.segments();
    s[0] == 0xfd7a && s[1] == 0x115c && s[2] == 0xa1e0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges() {
        let t = |s: &str| is_tailnet(&s.parse().unwrap());
        assert!(t("100.64.0.1"));
        assert!(t("100.127.255.255"));
        assert!(!t("100.128.0.1"));
        assert!(!t("100.63.255.255"));
        assert!(!t("100.115.92.7"), "ChromeOS VMs");
        assert!(!t("100.115.93.7"), "ChromeOS VMs");
        assert!(t("100.115.94.7"));
        assert!(t("fd7a:115c:a1e0::e201:5514"));
        assert!(t("::ffff:100.64.0.20"));
        assert!(!t("fd7a:115c:a1e1::1"));
        assert!(!t("10.0.0.1"));
        assert!(!t("127.0.0.1"));
    }
}
