//! Outbound connections under one address policy. Everything jobhost sends
//! to an address a job submitter chose (webhooks now, guest HTTP later)
//! goes through a client from [`AddressPolicy::client`]: names are resolved
//! once, every address is checked by [`AddressPolicy::check`], and the
//! connection goes to the checked address. Without this, a job's webhook
//! could reach the host's own API, a database on the private network or a
//! cloud's metadata service.
//!
//! Loopback, private, carrier-grade NAT, link-local, unique-local,
//! multicast, unspecified and reserved addresses are refused, also in their
//! IPv4-mapped, IPv4-compatible, NAT64 and 6to4 forms, unless the operator
//! allows a network that holds them (`--allow-net`).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::str::FromStr;
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// The networks the operator allows although they are internal.
#[derive(Debug, Clone, Default)]
pub struct AddressPolicy {
    allowed: Vec<IpNet>,
}

/// A connection the policy refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{address} is a {kind} address: refused by policy (an operator can allow it with --allow-net)"
)]
pub struct Refused {
    pub address: IpAddr,
    pub kind: &'static str,
}

impl AddressPolicy {
    /// Refuses every internal address but those in `allowed`.
    pub fn new(allowed: Vec<IpNet>) -> Self {
        AddressPolicy { allowed }
    }

    /// Parses `--allow-net` entries: CIDRs (`10.0.0.0/8`) or single addresses.
    pub fn parse_allowed(entries: &[String]) -> Result<Vec<IpNet>, String> {
        entries
            .iter()
            .map(|entry| {
                let entry = entry.trim();
                IpNet::from_str(entry)
                    .or_else(|_| IpAddr::from_str(entry).map(IpNet::from))
                    .map_err(|_| {
                        format!("`{entry}` is not a network like 10.0.0.0/8 or an address")
                    })
            })
            .collect()
    }

    /// The one check: whether jobhost may connect to `address`.
    pub fn check(&self, address: IpAddr) -> Result<(), Refused> {
        let address = address.to_canonical();
        let Some(kind) = internal_kind(address) else {
            return Ok(());
        };
        let embedded = embedded_v4(address).map(IpAddr::V4);
        let allowed = self
            .allowed
            .iter()
            .any(|net| net.contains(&address) || embedded.is_some_and(|v4| net.contains(&v4)));
        if allowed {
            Ok(())
        } else {
            Err(Refused { address, kind })
        }
    }

    /// Checks a URL whose host is an IP literal: the HTTP client connects to
    /// those without asking the resolver.
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), Refused> {
        let host = url.host_str().unwrap_or_default();
        match host.trim_start_matches('[').trim_end_matches(']').parse() {
            Ok(address) => self.check(address),
            Err(_) => Ok(()),
        }
    }

    /// An HTTP client that resolves names under this policy, uses no proxy
    /// from the environment (it would connect on our behalf, unchecked) and
    /// follows no redirect (a redirect could point anywhere). Callers still
    /// call [`AddressPolicy::check_url`] for IP-literal hosts.
    pub fn client(self: &Arc<Self>) -> reqwest::ClientBuilder {
        reqwest::Client::builder()
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none())
            .dns_resolver(CheckedResolver(self.clone()))
    }
}

/// Resolves once and hands the client only addresses that passed the check.
struct CheckedResolver(Arc<AddressPolicy>);

impl Resolve for CheckedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let policy = self.0.clone();
        Box::pin(async move {
            let addresses: Vec<SocketAddr> =
                tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            if addresses.is_empty() {
                return Err(format!("`{}` has no address", name.as_str()).into());
            }
            // One refused address refuses the name: a name that resolves
            // both outside and inside is a rebinding attempt, not a choice.
            for address in &addresses {
                policy.check(address.ip())?;
            }
            Ok(Box::new(addresses.into_iter()) as Addrs)
        })
    }
}

/// What kind of internal address `address` is; `None` for a public one.
fn internal_kind(address: IpAddr) -> Option<&'static str> {
    match address {
        IpAddr::V4(v4) => v4_kind(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = embedded_v4(IpAddr::V6(v6)) {
                return v4_kind(v4);
            }
            v6_kind(v6)
        }
    }
}

fn v4_kind(v4: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = v4.octets();
    let kind = match (a, b, c) {
        (0, _, _) => "unspecified",
        (127, _, _) => "loopback",
        (10, _, _) | (172, 16..=31, _) | (192, 168, _) => "private",
        (100, 64..=127, _) => "carrier-grade NAT",
        (169, 254, _) => "link-local",
        (224..=239, _, _) => "multicast",
        (240..=255, _, _) => "reserved",
        (192, 0, 0) | (192, 0, 2) | (198, 51, 100) | (203, 0, 113) | (198, 18..=19, _) => {
            "reserved"
        }
        _ => return None,
    };
    Some(kind)
}

fn v6_kind(v6: Ipv6Addr) -> Option<&'static str> {
    let segments = v6.segments();
    let kind = if v6.is_unspecified() {
        "unspecified"
    } else if v6.is_loopback() {
        "loopback"
    } else if segments[0] & 0xffc0 == 0xfe80 || segments[0] & 0xffc0 == 0xfec0 {
        "link-local"
    } else if segments[0] & 0xfe00 == 0xfc00 {
        "unique-local"
    } else if segments[0] & 0xff00 == 0xff00 {
        "multicast"
    } else if segments[..3] == [0x64, 0xff9b, 1] {
        // Local-use NAT64 (RFC 8215): translates to whatever the site chose.
        "NAT64"
    } else if segments[..2] == [0x2001, 0] {
        // Teredo hides its IPv4 server and client; nothing to check.
        "Teredo"
    } else if segments[..2] == [0x2001, 0xdb8] || segments[..4] == [0x100, 0, 0, 0] {
        "reserved"
    } else {
        return None;
    };
    Some(kind)
}

/// The IPv4 address an IPv6 address carries: IPv4-mapped (`::ffff:a.b.c.d`),
/// IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::a.b.c.d`) and 6to4
/// (`2002:AABB:CCDD::`).
fn embedded_v4(address: IpAddr) -> Option<Ipv4Addr> {
    let IpAddr::V6(v6) = address else {
        return None;
    };
    let s = v6.segments();
    let low = |hi: u16, lo: u16| Ipv4Addr::from(((hi as u32) << 16) | lo as u32);
    match s {
        [0, 0, 0, 0, 0, 0xffff, hi, lo] => Some(low(hi, lo)),
        // `::` and `::1` are IPv6's own unspecified and loopback.
        [0, 0, 0, 0, 0, 0, hi, lo] if hi != 0 => Some(low(hi, lo)),
        [0x64, 0xff9b, 0, 0, 0, 0, hi, lo] => Some(low(hi, lo)),
        [0x2002, hi, lo, ..] => Some(low(hi, lo)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(policy: &AddressPolicy, address: &str) -> Option<&'static str> {
        policy
            .check(address.parse().unwrap())
            .err()
            .map(|refused| refused.kind)
    }

    #[test]
    fn refuses_every_internal_form_by_default() {
        let policy = AddressPolicy::default();
        for (address, kind) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("10.1.2.3", "private"),
            ("172.16.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("100.64.0.1", "carrier-grade NAT"),
            ("100.100.100.200", "carrier-grade NAT"),
            ("169.254.169.254", "link-local"),
            ("0.0.0.0", "unspecified"),
            ("224.0.0.1", "multicast"),
            ("255.255.255.255", "reserved"),
            ("192.0.0.170", "reserved"),
            ("::", "unspecified"),
            ("::1", "loopback"),
            ("fe80::1", "link-local"),
            ("fd00:ec2::254", "unique-local"),
            ("ff02::1", "multicast"),
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "link-local"),
            ("::127.0.0.1", "loopback"),
            ("64:ff9b::a9fe:a9fe", "link-local"),
            ("64:ff9b::10.0.0.1", "private"),
            ("64:ff9b:1::1", "NAT64"),
            ("2002:7f00:1::", "loopback"),
            ("2002:a9fe:a9fe::1", "link-local"),
            ("2001:0:4136:e378::1", "Teredo"),
        ] {
            assert_eq!(refused(&policy, address), Some(kind), "{address}");
        }
    }

    #[test]
    fn lets_public_addresses_through() {
        let policy = AddressPolicy::default();
        for address in [
            "93.184.215.14",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:2800:21f:cb07:6820:80da:af6b:8b2c",
            "::ffff:93.184.215.14",
            "64:ff9b::8.8.8.8",
            "2002:0808:0808::1",
        ] {
            assert_eq!(refused(&policy, address), None, "{address}");
        }
    }

    #[test]
    fn the_operator_can_allow_networks_in_every_form() {
        let allowed =
            AddressPolicy::parse_allowed(&["127.0.0.0/8".into(), " 10.1.2.3 ".into()]).unwrap();
        let policy = AddressPolicy::new(allowed);
        assert_eq!(refused(&policy, "127.0.0.1"), None);
        assert_eq!(refused(&policy, "::ffff:127.0.0.1"), None);
        assert_eq!(refused(&policy, "10.1.2.3"), None);
        assert_eq!(refused(&policy, "10.1.2.4"), Some("private"));
        assert_eq!(refused(&policy, "::1"), Some("loopback"));
        assert!(AddressPolicy::parse_allowed(&["localhost".into()]).is_err());
    }

    #[tokio::test]
    async fn names_are_checked_after_resolution() {
        let resolver = CheckedResolver(Arc::new(AddressPolicy::default()));
        let error = match resolver.resolve(Name::from_str("localhost").unwrap()).await {
            Ok(_) => panic!("localhost resolved under the default policy"),
            Err(error) => error.to_string(),
        };
        assert!(
            error.contains("loopback address: refused by policy"),
            "{error}"
        );
        let allowed = AddressPolicy::new(vec![
            "127.0.0.0/8".parse().unwrap(),
            "::1/128".parse().unwrap(),
        ]);
        let resolver = CheckedResolver(Arc::new(allowed));
        let addresses: Vec<_> = resolver
            .resolve(Name::from_str("localhost").unwrap())
            .await
            .unwrap()
            .collect();
        assert!(addresses.iter().all(|a| a.ip().is_loopback()) && !addresses.is_empty());
    }
}
