//! The proxy's own address, as Envoy's `LocalInfo` determines it: the first non-loopback address
//! of the `--local-address-ip-version` family on any interface, else loopback. Envoy appends it to
//! `x-forwarded-for` when a loopback peer talks to a `use_remote_address` listener.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::cli::IpVersion;

/// The machine's host name (`%HOSTNAME%`), read once.
pub fn hostname() -> &'static str {
    static NAME: std::sync::LazyLock<String> = std::sync::LazyLock::new(|| {
        std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|s| s.trim().to_string())
            .unwrap_or_default()
    });
    &NAME
}

/// Addresses of the machine's interfaces, in the order `getifaddrs` lists them.
fn interface_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `head` with a list we only read and then free with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: `cur` is a node of the list getifaddrs returned; it stays valid until freed.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr whose family says which struct it is.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: family AF_INET means a sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                out.push(IpAddr::V4(Ipv4Addr::from(u32::from_be(
                    sin.sin_addr.s_addr,
                ))));
            } else if family == libc::AF_INET6 {
                // SAFETY: family AF_INET6 means a sockaddr_in6.
                let sin6 = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in6) };
                out.push(IpAddr::V6(Ipv6Addr::from(sin6.sin6_addr.s6_addr)));
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: `head` came from a successful getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// Envoy's `Network::Utility::getLocalAddress`.
pub fn local_address(version: IpVersion) -> IpAddr {
    let want_v4 = version == IpVersion::V4;
    interface_addresses()
        .into_iter()
        .find(|a| {
            a.is_ipv4() == want_v4
                && !a.is_loopback()
                && !matches!(a, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80)
        })
        .unwrap_or(if want_v4 {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_address_has_the_asked_family() {
        assert!(local_address(IpVersion::V4).is_ipv4());
        assert!(local_address(IpVersion::V6).is_ipv6());
        assert!(interface_addresses().iter().any(|a| a.is_loopback()));
    }
}
