//! Where `notify` webhooks may go. A rule's URL is written by whoever submits the job, and the
//! coordinator sends it from inside the operator's network: without a guard any admin token
//! could probe the coordinator's loopback, the private ranges or a cloud's metadata service
//! (169.254.169.254) and read the answer's status in the audit log.
//!
//! A webhook's host is resolved here, and every address it resolves to must be public: not
//! loopback, link-local, private (RFC 1918, fc00::/7), shared (100.64.0.0/10), unspecified,
//! multicast, broadcast, documentation, or one of this host's own addresses, unless the
//! operator's allow-list (`--notify-allow`) names the host or a range holding the address.
//! The request then goes to the address that was checked (no second lookup a rebinding DNS
//! server could answer differently), and redirects are not followed.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Why a webhook may not go where it asks.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VetError {
    /// Not a public address, and not allowed: final.
    #[error("refused: `{host}` is {ip} ({why}); the operator may allow it with `--notify-allow`")]
    Refused {
        host: String,
        ip: IpAddr,
        why: &'static str,
    },
    /// The URL or its name gave no address (may work on a later try).
    #[error("{0}")]
    Unresolved(String),
}

/// A `--notify-allow` entry that does not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("`{text}`: {why}")]
pub struct AllowError {
    text: String,
    why: &'static str,
}

/// One `--notify-allow` entry: a host name (exact, case-insensitive), an address, or a range.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Allowed {
    Host(String),
    Range(IpAddr, u8),
}

impl Allowed {
    pub fn parse(text: &str) -> Result<Allowed, AllowError> {
        let text = text.trim();
        let error = |why| AllowError {
            text: text.to_string(),
            why,
        };
        if let Some((addr, bits)) = text.split_once('/') {
            let addr: IpAddr = addr.parse().map_err(|_| error("not an address range"))?;
            let max = if addr.is_ipv4() { 32 } else { 128 };
            let bits: u8 = bits
                .parse()
                .ok()
                .filter(|b| *b <= max)
                .ok_or_else(|| error("the prefix length is past the address's bits"))?;
            return Ok(Allowed::Range(addr, bits));
        }
        if let Ok(addr) = text.parse::<IpAddr>() {
            return Ok(Allowed::Range(addr, if addr.is_ipv4() { 32 } else { 128 }));
        }
        if text.is_empty()
            || !text
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-.".contains(c))
        {
            return Err(error("a host name, an address or a range (10.0.0.0/8)"));
        }
        Ok(Allowed::Host(text.to_ascii_lowercase()))
    }

    fn holds(&self, host: &str, ip: IpAddr) -> bool {
        match self {
            Allowed::Host(h) => h.eq_ignore_ascii_case(host.trim_end_matches('.')),
            Allowed::Range(net, bits) => in_range(ip, *net, *bits),
        }
    }
}

fn in_range(ip: IpAddr, net: IpAddr, bits: u8) -> bool {
    match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(n)) => {
            let mask = u32::MAX.checked_shl(32 - u32::from(bits)).unwrap_or(0);
            u32::from(a) & mask == u32::from(n) & mask
        }
        (IpAddr::V6(a), IpAddr::V6(n)) => {
            let mask = u128::MAX.checked_shl(128 - u32::from(bits)).unwrap_or(0);
            u128::from(a) & mask == u128::from(n) & mask
        }
        // An IPv4-mapped IPv6 address is its IPv4 one.
        (IpAddr::V6(a), IpAddr::V4(_)) => a
            .to_ipv4_mapped()
            .is_some_and(|v4| in_range(IpAddr::V4(v4), net, bits)),
        _ => false,
    }
}

/// Why `ip` is not a public address, or `None`.
pub fn not_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => not_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => not_public_v4(v4),
            None => not_public_v6(v6),
        },
    }
    .or_else(|| is_own(ip).then_some("one of this host's own addresses"))
}

fn not_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_link_local() {
        Some("a link-local address (cloud metadata services live there)")
    } else if ip.is_private() {
        Some("a private address")
    } else if a == 100 && (64..128).contains(&b) {
        Some("a shared (carrier-grade NAT) address")
    } else if ip.is_unspecified() || a == 0 {
        Some("an unspecified address")
    } else if ip.is_multicast() || ip.is_broadcast() || a >= 240 {
        Some("a multicast, broadcast or reserved address")
    } else if ip.is_documentation() {
        Some("a documentation address")
    } else {
        None
    }
}

fn not_public_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    if ip.is_loopback() {
        Some("a loopback address")
    } else if ip.is_unspecified() {
        Some("an unspecified address")
    } else if first & 0xffc0 == 0xfe80 {
        Some("a link-local address")
    } else if first & 0xfe00 == 0xfc00 {
        Some("a private (unique local) address")
    } else if ip.is_multicast() {
        Some("a multicast address")
    } else if first == 0x2001 && ip.segments()[1] == 0x0db8 {
        Some("a documentation address")
    } else {
        None
    }
}

/// Whether `ip` is assigned to this host (binding to it succeeds only then).
fn is_own(ip: IpAddr) -> bool {
    std::net::UdpSocket::bind(SocketAddr::new(ip, 0)).is_ok()
}

/// The address a webhook to `url` may be sent to, or why none may.
pub async fn vet(url: &reqwest::Url, allowed: &[Allowed]) -> Result<SocketAddr, VetError> {
    let unresolved = VetError::Unresolved;
    let host = url
        .host_str()
        .ok_or_else(|| unresolved("the URL has no host".into()))?;
    let port = url
        .port_or_known_default()
        .ok_or_else(|| unresolved("the URL has no port and no default one".into()))?;
    let bare = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match bare.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((bare, port))
            .await
            .map_err(|e| unresolved(format!("`{host}` does not resolve: {e}")))?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(unresolved(format!("`{host}` resolves to no address")));
    }
    // Every address must pass: a name that also resolves to a private address could be
    // answered with it on the connection's own lookup.
    for a in &addrs {
        if allowed.iter().any(|rule| rule.holds(bare, a.ip())) {
            continue;
        }
        if let Some(why) = not_public(a.ip()) {
            return Err(VetError::Refused {
                host: host.to_string(),
                ip: a.ip(),
                why,
            });
        }
    }
    Ok(addrs[0])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn internal_addresses_are_not_public_and_allow_lists_parse() {
        for internal in [
            "127.0.0.1",
            "127.8.9.10",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
        ] {
            let ip: IpAddr = internal.parse().unwrap();
            assert!(not_public(ip).is_some(), "{internal}");
        }
        for public in ["93.184.216.34", "1.1.1.1", "2606:4700::1111"] {
            let ip: IpAddr = public.parse().unwrap();
            assert_eq!(not_public(ip), None, "{public}");
        }
        let range = Allowed::parse("10.0.0.0/8").unwrap();
        assert!(range.holds("x", "10.9.8.7".parse().unwrap()));
        assert!(!range.holds("x", "11.0.0.1".parse().unwrap()));
        assert!(
            Allowed::parse("127.0.0.1")
                .unwrap()
                .holds("h", "127.0.0.1".parse().unwrap())
        );
        assert!(
            Allowed::parse("Hooks.Internal")
                .unwrap()
                .holds("hooks.internal.", "10.0.0.1".parse().unwrap())
        );
        assert!(Allowed::parse("::1/129").is_err());
        assert!(Allowed::parse("a b").is_err());
    }
}
