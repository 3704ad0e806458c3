//! What network a run may reach: none (the default), the host's, or named hosts through the
//! agent's egress proxy (`network = { allow = ["pkgs.example.org", "*.files.example.org:443"] }`).
//!
//! Rules name hosts, never addresses: a name is resolved by the proxy, which refuses private,
//! loopback, link-local and metadata addresses whatever the name resolves to.

use std::fmt;
use std::net::IpAddr;

use serde::{Deserialize, Serialize};

/// At most this many rules in one `allow` list.
pub const MAX_RULES: usize = 64;

/// The network a run may reach.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(try_from = "NetworkSpec", into = "NetworkSpec")]
pub enum Network {
    /// Loopback only (its own network namespace).
    #[default]
    Off,
    /// The host's network (`network = true`).
    Host,
    /// Only the named hosts, through the agent's proxy.
    Allow(Vec<EgressRule>),
}

/// How [`Network`] is written in a spec: `false`, `true` or `{ allow = [...] }`.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum NetworkSpec {
    Flag(bool),
    Allow(AllowList),
}

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct AllowList {
    /// Host names (`pkgs.example.org`), wildcards for subdomains (`*.example.org`), each with an
    /// optional port (`api.example.com:443`; without one, any port).
    pub allow: Vec<String>,
}

impl TryFrom<NetworkSpec> for Network {
    type Error = String;

    fn try_from(spec: NetworkSpec) -> Result<Self, String> {
        match spec {
            NetworkSpec::Flag(false) => Ok(Network::Off),
            NetworkSpec::Flag(true) => Ok(Network::Host),
            NetworkSpec::Allow(AllowList { allow }) => {
                if allow.is_empty() {
                    return Err("`network.allow` is empty: say `network = false` for none".into());
                }
                if allow.len() > MAX_RULES {
                    return Err(format!(
                        "`network.allow` has {} rules; at most {MAX_RULES}",
                        allow.len()
                    ));
                }
                allow
                    .iter()
                    .map(|r| EgressRule::parse(r))
                    .collect::<Result<Vec<_>, _>>()
                    .map(Network::Allow)
            }
        }
    }
}

impl From<Network> for NetworkSpec {
    fn from(n: Network) -> Self {
        match n {
            Network::Off => NetworkSpec::Flag(false),
            Network::Host => NetworkSpec::Flag(true),
            Network::Allow(rules) => NetworkSpec::Allow(AllowList {
                allow: rules.iter().map(ToString::to_string).collect(),
            }),
        }
    }
}

impl Network {
    pub fn is_off(&self) -> bool {
        *self == Network::Off
    }

    pub fn is_host(&self) -> bool {
        *self == Network::Host
    }

    /// The rules of an allow list (none for `Off` and `Host`).
    pub fn rules(&self) -> &[EgressRule] {
        match self {
            Network::Allow(r) => r,
            _ => &[],
        }
    }
}

/// One rule: a host name or `*.suffix`, and a port or any.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct EgressRule {
    /// Lower case, without a trailing dot; `*.` kept for a wildcard.
    host: String,
    port: Option<u16>,
}

impl EgressRule {
    /// Parse `host`, `*.suffix`, `host:port`. Addresses, ports out of range, bare `*` and
    /// malformed names are refused with the reason.
    pub fn parse(text: &str) -> Result<EgressRule, String> {
        let t = text.trim();
        let (host, port) = match t.rsplit_once(':') {
            Some((h, p)) => {
                let port = p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                    format!("egress rule `{text}`: `{p}` is not a port (1-65535)")
                })?;
                (h, Some(port))
            }
            None => (t, None),
        };
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if host.parse::<IpAddr>().is_ok() || host.starts_with('[') {
            return Err(format!(
                "egress rule `{text}`: rules name hosts, not addresses"
            ));
        }
        let name = host.strip_prefix("*.").unwrap_or(&host);
        if !valid_name(name) {
            return Err(format!(
                "egress rule `{text}`: `{host}` is not a host name (letters, digits, `-`, dots; `*.` only as the first label)"
            ));
        }
        if host.starts_with("*.") && !name.contains('.') {
            return Err(format!(
                "egress rule `{text}`: a wildcard needs a domain of at least two labels"
            ));
        }
        Ok(EgressRule { host, port })
    }

    /// Does this rule let a connection to `host:port` through? `host` is a name as asked.
    pub fn matches(&self, host: &str, port: u16) -> bool {
        if self.port.is_some_and(|p| p != port) {
            return false;
        }
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        match self.host.strip_prefix("*.") {
            Some(suffix) => host
                .strip_suffix(suffix)
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            None => host == self.host,
        }
    }

    /// Does this rule allow everything `other` allows? (An operator's rule covering a job's.)
    pub fn covers(&self, other: &EgressRule) -> bool {
        if self.port.is_some() && self.port != other.port {
            return false;
        }
        match (self.host.strip_prefix("*."), other.host.strip_prefix("*.")) {
            (None, None) => self.host == other.host,
            (None, Some(_)) => false,
            (Some(_), None) => self.matches(&other.host, other.port.or(self.port).unwrap_or(1)),
            (Some(mine), Some(theirs)) => {
                theirs == mine
                    || theirs
                        .strip_suffix(mine)
                        .is_some_and(|head| head.ends_with('.'))
            }
        }
    }
}

impl fmt::Display for EgressRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(p) => write!(f, "{}:{p}", self.host),
            None => f.write_str(&self.host),
        }
    }
}

fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Is every rule of `asked` covered by one of `allowed`? `Err` names the first that is not.
pub fn within(asked: &[EgressRule], allowed: &[EgressRule]) -> Result<(), String> {
    match asked.iter().find(|a| !allowed.iter().any(|o| o.covers(a))) {
        Some(a) => Err(a.to_string()),
        None => Ok(()),
    }
}

/// An address the proxy never connects to, whatever name led to it: loopback, private,
/// shared (CGNAT), link-local (cloud metadata lives there), unspecified, multicast, broadcast,
/// and the IPv6 forms of all of them (mapped and NAT64-embedded IPv4 included).
pub fn forbidden_address(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            if v4.is_loopback() {
                Some("loopback")
            } else if v4.is_private() {
                Some("private")
            } else if v4.is_link_local() {
                Some("link-local (cloud metadata)")
            } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
                Some("shared address space (carrier NAT)")
            } else if o[0] == 0 || v4.is_unspecified() {
                Some("unspecified")
            } else if v4.is_multicast() || v4.is_broadcast() || o[0] >= 240 {
                Some("multicast or reserved")
            } else if o[0] == 192 && o[1] == 0 && o[2] == 0 {
                Some("IETF protocol assignments")
            } else {
                None
            }
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return forbidden_address(IpAddr::V4(v4));
            }
            let s = v6.segments();
            if s[0] == 0x64 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
                let o = v6.octets();
                return forbidden_address(IpAddr::V4([o[12], o[13], o[14], o[15]].into()));
            }
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if (s[0] & 0xfe00) == 0xfc00 {
                Some("private (unique local)")
            } else if (s[0] & 0xffc0) == 0xfe80 {
                Some("link-local")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if s[0..6] == [0, 0, 0, 0, 0, 0] {
                Some("IPv4-compatible")
            } else {
                None
            }
        }
    }
}

/// One connection the proxy saw, allowed or refused; listed in the run's report.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct EgressConnection {
    /// Milliseconds from the run's start.
    pub at_ms: u64,
    /// `CONNECT` (tunnels, HTTPS) or the plain HTTP method.
    pub method: String,
    pub host: String,
    pub port: u16,
    pub allowed: bool,
    /// Why it was refused, or which address it went to.
    pub detail: String,
    /// Bytes from the program to the host, and back.
    pub bytes_up: u64,
    pub bytes_down: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(s: &str) -> EgressRule {
        EgressRule::parse(s).unwrap()
    }

    #[test]
    fn rules_parse_and_refuse_addresses_and_junk() {
        assert_eq!(rule("PKGS.example.org.").to_string(), "pkgs.example.org");
        assert_eq!(
            rule("api.example.com:443").to_string(),
            "api.example.com:443"
        );
        for bad in [
            "10.0.0.1",
            "[::1]:443",
            "::1",
            "*",
            "*.com",
            "a..b",
            "-a.b",
            "a.b:0",
            "a.b:70000",
            "a b.c",
            "*.*.example.org",
            "",
        ] {
            assert!(EgressRule::parse(bad).is_err(), "{bad} was accepted");
        }
    }

    #[test]
    fn wildcards_match_subdomains_only_and_ports_hold() {
        let w = rule("*.files.example.org");
        assert!(w.matches("a.files.example.org", 443));
        assert!(w.matches("a.b.files.example.org", 80));
        assert!(!w.matches("files.example.org", 443));
        assert!(!w.matches("evilfiles.example.org", 443));
        assert!(!w.matches("files.example.org.evil.com", 443));
        let p = rule("api.example.com:443");
        assert!(p.matches("API.example.com", 443));
        assert!(!p.matches("api.example.com", 80));
    }

    #[test]
    fn an_operators_rules_cover_a_jobs_only_when_wider() {
        let ops = [rule("*.example.org"), rule("pypi.org:443")];
        assert!(within(&[rule("pkgs.example.org")], &ops).is_ok());
        assert!(within(&[rule("*.files.example.org:443")], &ops).is_ok());
        assert!(within(&[rule("*.example.org")], &ops).is_ok());
        assert!(within(&[rule("pypi.org:443")], &ops).is_ok());
        assert_eq!(within(&[rule("pypi.org")], &ops), Err("pypi.org".into()));
        assert_eq!(
            within(&[rule("example.org")], &ops),
            Err("example.org".into())
        );
        assert_eq!(
            within(&[rule("*.example.com")], &ops).unwrap_err(),
            "*.example.com"
        );
    }

    #[test]
    fn private_loopback_and_metadata_addresses_are_forbidden_in_every_spelling() {
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.100.100.200",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "::1",
            "::",
            "fd00:ec2::254",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "64:ff9b::a9fe:a9fe",
            "::127.0.0.1",
        ] {
            let ip: IpAddr = bad.parse().unwrap();
            assert!(forbidden_address(ip).is_some(), "{bad} is allowed");
        }
        for good in ["198.51.100.2", "93.184.216.34", "2606:2800:220:1::1"] {
            let ip: IpAddr = good.parse().unwrap();
            assert_eq!(forbidden_address(ip), None, "{good}");
        }
    }

    #[test]
    fn the_spec_forms_round_trip() {
        let n: Network = serde_json::from_str("false").unwrap();
        assert!(n.is_off());
        let n: Network = serde_json::from_str("true").unwrap();
        assert!(n.is_host());
        let n: Network = serde_json::from_str(r#"{"allow":["a.example.org:443"]}"#).unwrap();
        assert_eq!(
            serde_json::to_string(&n).unwrap(),
            r#"{"allow":["a.example.org:443"]}"#
        );
        assert!(serde_json::from_str::<Network>(r#"{"allow":[]}"#).is_err());
        assert!(serde_json::from_str::<Network>(r#"{"allow":["1.2.3.4"]}"#).is_err());
        assert!(serde_json::from_str::<Network>(r#"{"deny":["a.b"]}"#).is_err());
    }
}
