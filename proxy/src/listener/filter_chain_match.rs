//! Envoy's filter-chain selection: criteria are tried in a fixed order (destination port,
//! destination IP, server name, transport protocol, application protocols, direct source IP,
//! source type, source IP, source port); at each step the most specific matching chains stay and
//! chains that leave the criterion unset are the fallback. There is no backtracking: a step
//! that keeps no chain means no match.

use std::net::{IpAddr, SocketAddr};

use petrel_filters::matcher::Cidr;
use xds_client::pb::envoy::config::listener::v3::{
    filter_chain_match::ConnectionSourceType, FilterChainMatch,
};

use crate::config::{invalid, reject_unhandled, ConfigError};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum SourceType {
    Any,
    SameIpOrLoopback,
    External,
}

/// One chain's compiled `filter_chain_match`.
#[derive(Debug, Clone, PartialEq)]
pub struct ChainMatch {
    destination_port: Option<u16>,
    prefix_ranges: Vec<(Cidr, u8)>,
    server_names: Vec<String>,
    transport_protocol: Option<String>,
    application_protocols: Vec<String>,
    direct_source_prefix_ranges: Vec<(Cidr, u8)>,
    source_type: SourceType,
    source_prefix_ranges: Vec<(Cidr, u8)>,
    source_ports: Vec<u16>,
}

/// What is known about a connection when its chain is chosen.
pub struct ConnectionFacts<'a> {
    pub destination: SocketAddr,
    pub source: SocketAddr,
    pub direct_source: SocketAddr,
    /// SNI, once a TLS inspector found it.
    pub server_name: Option<&'a str>,
    /// `raw_buffer` unless a listener filter detected otherwise.
    pub transport_protocol: &'a str,
    pub application_protocols: &'a [String],
}

fn cidrs(
    list: &[xds_client::pb::envoy::config::core::v3::CidrRange],
    path: &str,
) -> Result<Vec<(Cidr, u8)>, ConfigError> {
    list.iter()
        .enumerate()
        .map(|(i, c)| {
            let p = format!("{path}[{i}]");
            let cidr = Cidr::from_proto(c, &p)?;
            let len = c.prefix_len.as_ref().map(|v| v.value as u8).unwrap_or(
                if c.address_prefix.contains(':') {
                    128
                } else {
                    32
                },
            );
            Ok((cidr, len))
        })
        .collect()
}

impl ChainMatch {
    pub fn compile(m: Option<&FilterChainMatch>, path: &str) -> Result<ChainMatch, ConfigError> {
        let mut rest = m.cloned().unwrap_or_default();
        let destination_port = match rest.destination_port.take() {
            Some(p) if (1..=65535).contains(&p.value) => Some(p.value as u16),
            Some(_) => {
                return Err(invalid(
                    format!("{path}.destination_port"),
                    "value must be inside range [1, 65535]",
                ))
            }
            None => None,
        };
        let source_ports = std::mem::take(&mut rest.source_ports)
            .into_iter()
            .map(|p| {
                u16::try_from(p).ok().filter(|p| *p > 0).ok_or_else(|| {
                    invalid(
                        format!("{path}.source_ports"),
                        "value must be inside range [1, 65535]",
                    )
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        let source_type =
            match ConnectionSourceType::try_from(std::mem::take(&mut rest.source_type)) {
                Ok(ConnectionSourceType::Any) => SourceType::Any,
                Ok(ConnectionSourceType::SameIpOrLoopback) => SourceType::SameIpOrLoopback,
                Ok(ConnectionSourceType::External) => SourceType::External,
                Err(_) => return Err(invalid(format!("{path}.source_type"), "unknown enum value")),
            };
        let out = ChainMatch {
            destination_port,
            prefix_ranges: cidrs(
                &std::mem::take(&mut rest.prefix_ranges),
                &format!("{path}.prefix_ranges"),
            )?,
            server_names: std::mem::take(&mut rest.server_names)
                .into_iter()
                .map(|s| s.to_ascii_lowercase())
                .collect(),
            transport_protocol: Some(std::mem::take(&mut rest.transport_protocol))
                .filter(|t| !t.is_empty()),
            application_protocols: std::mem::take(&mut rest.application_protocols),
            direct_source_prefix_ranges: cidrs(
                &std::mem::take(&mut rest.direct_source_prefix_ranges),
                &format!("{path}.direct_source_prefix_ranges"),
            )?,
            source_type,
            source_prefix_ranges: cidrs(
                &std::mem::take(&mut rest.source_prefix_ranges),
                &format!("{path}.source_prefix_ranges"),
            )?,
            source_ports,
        };
        // address_suffix/suffix_len are unimplemented in Envoy as well; refused by name.
        reject_unhandled(&rest, path)?;
        Ok(out)
    }
}

/// Keeps the candidates that score best (`Some(score)`, higher is more specific); chains that
/// leave the criterion unset (`None` from `unset`) are the fallback when no chain matches.
fn narrow(
    cands: Vec<usize>,
    unset: impl Fn(usize) -> bool,
    score: impl Fn(usize) -> Option<u32>,
) -> Vec<usize> {
    let best = cands
        .iter()
        .filter(|&&i| !unset(i))
        .filter_map(|&i| score(i))
        .max();
    match best {
        Some(b) => cands
            .into_iter()
            .filter(|&i| !unset(i) && score(i) == Some(b))
            .collect(),
        None => cands.into_iter().filter(|&i| unset(i)).collect(),
    }
}

fn longest_prefix(ranges: &[(Cidr, u8)], ip: IpAddr) -> Option<u32> {
    ranges
        .iter()
        .filter(|(c, _)| c.contains(ip))
        .map(|(_, len)| *len as u32 + 1)
        .max()
}

/// Chooses a chain for a connection, or None (Envoy then closes it, counting
/// `no_filter_chain_match`).
pub fn select(chains: &[ChainMatch], f: &ConnectionFacts<'_>) -> Option<usize> {
    let mut c: Vec<usize> = (0..chains.len()).collect();
    c = narrow(
        c,
        |i| chains[i].destination_port.is_none(),
        |i| (chains[i].destination_port == Some(f.destination.port())).then_some(1),
    );
    c = narrow(
        c,
        |i| chains[i].prefix_ranges.is_empty(),
        |i| longest_prefix(&chains[i].prefix_ranges, f.destination.ip()),
    );
    c = narrow(
        c,
        |i| chains[i].server_names.is_empty(),
        |i| {
            let sni = f.server_name?.to_ascii_lowercase();
            chains[i]
                .server_names
                .iter()
                .filter_map(|n| {
                    if *n == sni {
                        Some(u32::MAX)
                    } else {
                        // `*.example.com`: the longer the suffix, the more specific.
                        n.strip_prefix('*')
                            .filter(|suffix| sni.ends_with(suffix) && sni.len() > suffix.len())
                            .map(|s| s.len() as u32)
                    }
                })
                .max()
        },
    );
    c = narrow(
        c,
        |i| chains[i].transport_protocol.is_none(),
        |i| (chains[i].transport_protocol.as_deref() == Some(f.transport_protocol)).then_some(1),
    );
    c = narrow(
        c,
        |i| chains[i].application_protocols.is_empty(),
        |i| {
            chains[i]
                .application_protocols
                .iter()
                .any(|p| f.application_protocols.contains(p))
                .then_some(1)
        },
    );
    c = narrow(
        c,
        |i| chains[i].direct_source_prefix_ranges.is_empty(),
        |i| longest_prefix(&chains[i].direct_source_prefix_ranges, f.direct_source.ip()),
    );
    let local = f.source.ip().is_loopback() || f.source.ip() == f.destination.ip();
    c = narrow(
        c,
        |i| chains[i].source_type == SourceType::Any,
        |i| match chains[i].source_type {
            SourceType::SameIpOrLoopback => local.then_some(1),
            SourceType::External => (!local).then_some(1),
            SourceType::Any => None,
        },
    );
    c = narrow(
        c,
        |i| chains[i].source_prefix_ranges.is_empty(),
        |i| longest_prefix(&chains[i].source_prefix_ranges, f.source.ip()),
    );
    c = narrow(
        c,
        |i| chains[i].source_ports.is_empty(),
        |i| {
            chains[i]
                .source_ports
                .contains(&f.source.port())
                .then_some(1)
        },
    );
    c.first().copied()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn m(v: serde_json::Value) -> ChainMatch {
        let fcm: FilterChainMatch = xds_client::TypeRegistry::global()
            .from_json(&v, false)
            .unwrap();
        ChainMatch::compile(Some(&fcm), "m").unwrap()
    }

    fn facts(dest: &str, src: &str) -> ConnectionFacts<'static> {
        ConnectionFacts {
            destination: dest.parse().unwrap(),
            source: src.parse().unwrap(),
            direct_source: src.parse().unwrap(),
            server_name: None,
            transport_protocol: "raw_buffer",
            application_protocols: &[],
        }
    }

    #[test]
    fn envoy_order_and_specificity() {
        let chains = vec![
            m(json!({})),
            m(json!({"destination_port": 9080})),
            m(json!({"prefix_ranges": [{"address_prefix": "127.0.0.0", "prefix_len": 8}]})),
            m(json!({"prefix_ranges": [{"address_prefix": "127.0.0.2", "prefix_len": 32}]})),
            m(json!({"source_ports": [5000]})),
            m(json!({"destination_port": 9090, "source_type": "EXTERNAL"})),
        ];
        let pick = |d: &str, s: &str| select(&chains, &facts(d, s));
        // Port first: a port match beats every other criterion.
        assert_eq!(pick("10.0.0.1:9080", "10.0.0.9:1"), Some(1));
        // Then the longest destination prefix.
        assert_eq!(pick("127.0.0.2:80", "10.0.0.9:1"), Some(3));
        assert_eq!(pick("127.0.0.3:80", "10.0.0.9:1"), Some(2));
        // Source port only when nothing more specific matched before it.
        assert_eq!(pick("10.0.0.1:80", "10.0.0.9:5000"), Some(4));
        assert_eq!(pick("10.0.0.1:80", "10.0.0.9:5001"), Some(0));
        // No backtracking: port 9090 narrows to a chain that needs an external source.
        assert_eq!(pick("10.0.0.1:9090", "10.0.0.1:1"), None);
        assert_eq!(pick("10.0.0.1:9090", "10.0.0.9:1"), Some(5));
    }

    #[test]
    fn server_names_need_sni() {
        let chains = vec![
            m(json!({"server_names": ["*.example.com"]})),
            m(json!({"server_names": ["www.example.com"]})),
            m(json!({})),
        ];
        let mut f = facts("1.1.1.1:443", "2.2.2.2:1");
        assert_eq!(select(&chains, &f), Some(2));
        f.server_name = Some("www.example.com");
        assert_eq!(select(&chains, &f), Some(1));
        f.server_name = Some("api.example.com");
        assert_eq!(select(&chains, &f), Some(0));
    }

    #[test]
    fn refusals() {
        let fcm: FilterChainMatch = xds_client::TypeRegistry::global()
            .from_json(&json!({"address_suffix": "x"}), false)
            .unwrap();
        assert!(ChainMatch::compile(Some(&fcm), "m").is_err());
    }
}
