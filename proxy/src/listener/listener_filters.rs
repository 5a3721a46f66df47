//! A listener's `listener_filters`: `original_dst` restores the destination iptables redirected
//! from; `tls_inspector` and `http_inspector` read the first bytes (kept for the connection) to
//! learn the transport protocol, SNI and ALPN / HTTP version that filter-chain matching uses.
//! `filter_disabled`, `listener_filters_timeout` and `continue_on_listener_filters_timeout`
//! behave as in Envoy.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::AsyncReadExt;
use tokio::net::TcpStream;
use xds_client::pb::envoy::config::listener::v3::{
    listener_filter::ConfigType, listener_filter_chain_match_predicate::Rule, ListenerFilter,
    ListenerFilterChainMatchPredicate,
};
use xds_client::pb::envoy::extensions::filters::listener::{
    http_inspector::v3::HttpInspector, original_dst::v3::OriginalDst,
    tls_inspector::v3::TlsInspector,
};
use xds_client::TypeRegistry;

use super::{http_inspector, tls_inspector};
use crate::config::{invalid, reject_unhandled, ConfigError};
use crate::observe::stats::Store;
use crate::stat_struct;

stat_struct!(TlsInspectorStats {
    counter tls_found,
    counter tls_not_found,
    counter sni_found,
    counter sni_not_found,
    counter alpn_found,
    counter alpn_not_found,
    counter client_hello_too_large,
});

stat_struct!(HttpInspectorStats {
    counter http10_found,
    counter http11_found,
    counter http2_found,
    counter http_not_found,
    counter read_error,
});

#[derive(Debug, Clone, Copy, PartialEq)]
enum Kind {
    OriginalDst,
    TlsInspector,
    HttpInspector,
}

/// `ListenerFilterChainMatchPredicate`: when it matches, the filter is skipped.
#[derive(Debug, Clone, PartialEq)]
enum Predicate {
    Any,
    Or(Vec<Predicate>),
    And(Vec<Predicate>),
    Not(Box<Predicate>),
    /// `destination_port_range`: `[start, end)`.
    DestinationPorts(i32, i32),
}

impl Predicate {
    fn compile(p: &ListenerFilterChainMatchPredicate, path: &str) -> Result<Self, ConfigError> {
        let set = |rules: &[ListenerFilterChainMatchPredicate], name: &str| {
            if rules.len() < 2 {
                return Err(invalid(
                    format!("{path}.{name}.rules"),
                    "value must contain at least 2 item(s)",
                ));
            }
            rules
                .iter()
                .enumerate()
                .map(|(i, r)| Predicate::compile(r, &format!("{path}.{name}.rules[{i}]")))
                .collect::<Result<Vec<_>, _>>()
        };
        Ok(match &p.rule {
            Some(Rule::AnyMatch(true)) => Predicate::Any,
            Some(Rule::OrMatch(m)) => Predicate::Or(set(&m.rules, "or_match")?),
            Some(Rule::AndMatch(m)) => Predicate::And(set(&m.rules, "and_match")?),
            Some(Rule::NotMatch(n)) => Predicate::Not(Box::new(Predicate::compile(
                n,
                &format!("{path}.not_match"),
            )?)),
            Some(Rule::DestinationPortRange(r)) => Predicate::DestinationPorts(r.start, r.end),
            Some(Rule::AnyMatch(false)) | None => {
                return Err(invalid(path, "value is required (a rule)"));
            }
        })
    }

    fn matches(&self, destination: SocketAddr) -> bool {
        match self {
            Predicate::Any => true,
            Predicate::Or(rs) => rs.iter().any(|r| r.matches(destination)),
            Predicate::And(rs) => rs.iter().all(|r| r.matches(destination)),
            Predicate::Not(r) => !r.matches(destination),
            Predicate::DestinationPorts(start, end) => {
                let p = destination.port() as i32;
                *start <= p && p < *end
            }
        }
    }
}

#[derive(Debug)]
struct Filter {
    kind: Kind,
    disabled: Option<Predicate>,
}

#[derive(Debug)]
pub struct ListenerFilters {
    filters: Vec<Filter>,
    /// `listener_filters_timeout` (default 15 s; 0 disables it).
    timeout: Option<Duration>,
    continue_on_timeout: bool,
    tls_stats: TlsInspectorStats,
    http_stats: HttpInspectorStats,
}

/// What the listener filters learnt of a connection.
#[derive(Debug, Clone)]
pub struct Detected {
    /// The local address, restored to the original destination by `original_dst`.
    pub local: SocketAddr,
    pub restored: bool,
    pub server_name: Option<String>,
    pub transport_protocol: &'static str,
    pub application_protocols: Vec<String>,
}

/// Why a connection is closed by its listener filters.
#[derive(Debug, PartialEq)]
pub enum Closed {
    Timeout,
    PeerClosed,
    TooLarge,
}

impl ListenerFilters {
    /// Compiles `listener_filters` (taking the fields they use out of `rest`); `use_original_dst`
    /// implies `original_dst` first, as in Envoy.
    pub fn compile(
        rest: &mut xds_client::pb::envoy::config::listener::v3::Listener,
        use_original_dst: bool,
        store: &Store,
        path: &str,
    ) -> Result<Self, ConfigError> {
        let mut filters = Vec::new();
        if use_original_dst {
            filters.push(Filter {
                kind: Kind::OriginalDst,
                disabled: None,
            });
        }
        for (i, f) in std::mem::take(&mut rest.listener_filters)
            .iter()
            .enumerate()
        {
            let fp = format!("{path}.listener_filters[{i}]");
            let kind = compile_filter(f, &fp)?;
            let disabled = match &f.filter_disabled {
                Some(p) => Some(Predicate::compile(p, &format!("{fp}.filter_disabled"))?),
                None => None,
            };
            filters.push(Filter { kind, disabled });
        }
        let timeout = match rest.listener_filters_timeout.take() {
            Some(d) => {
                let d = crate::config::duration::to_std(
                    &d,
                    &format!("{path}.listener_filters_timeout"),
                )?;
                (!d.is_zero()).then_some(d)
            }
            None => Some(Duration::from_secs(15)),
        };
        let continue_on_timeout = std::mem::take(&mut rest.continue_on_listener_filters_timeout);
        // An inspector's stats exist once a listener has it, as Envoy creates them with it.
        let unlisted = Store::default();
        let has = |k: Kind| filters.iter().any(|f| f.kind == k);
        let tls_store = if has(Kind::TlsInspector) {
            store
        } else {
            &unlisted
        };
        let http_store = if has(Kind::HttpInspector) {
            store
        } else {
            &unlisted
        };
        Ok(ListenerFilters {
            tls_stats: TlsInspectorStats::new(tls_store, "tls_inspector."),
            http_stats: HttpInspectorStats::new(http_store, "http_inspector."),
            filters,
            timeout,
            continue_on_timeout,
        })
    }

    pub fn is_empty(&self) -> bool {
        self.filters.is_empty()
    }

    /// Runs the filters on a new connection; bytes read stay in `buf` for the filter chain.
    pub async fn run(
        &self,
        stream: &mut TcpStream,
        buf: &mut BytesMut,
        mut detected: Detected,
    ) -> Result<Detected, Closed> {
        let deadline = self.timeout.map(|t| tokio::time::Instant::now() + t);
        for f in &self.filters {
            if f.disabled
                .as_ref()
                .is_some_and(|p| p.matches(detected.local))
            {
                continue;
            }
            let step = match f.kind {
                Kind::OriginalDst => {
                    if let Some(dst) = super::connection::original_destination(stream) {
                        detected.restored = true;
                        detected.local = dst;
                    }
                    Ok(())
                }
                Kind::TlsInspector => self.tls(stream, buf, deadline, &mut detected).await,
                Kind::HttpInspector => self.http(stream, buf, deadline, &mut detected).await,
            };
            match step {
                Ok(()) => {}
                // Envoy goes on to chain matching with what it has, when told to.
                Err(Closed::Timeout) if self.continue_on_timeout => return Ok(detected),
                Err(e) => return Err(e),
            }
        }
        Ok(detected)
    }

    async fn tls(
        &self,
        stream: &mut TcpStream,
        buf: &mut BytesMut,
        deadline: Option<tokio::time::Instant>,
        d: &mut Detected,
    ) -> Result<(), Closed> {
        let s = &self.tls_stats;
        loop {
            match tls_inspector::inspect(buf) {
                tls_inspector::Inspection::NeedMore => {
                    if buf.len() >= tls_inspector::MAX_CLIENT_HELLO {
                        s.client_hello_too_large.inc();
                        return Err(Closed::TooLarge);
                    }
                    read_more(stream, buf, deadline).await?;
                }
                tls_inspector::Inspection::NotTls => {
                    s.tls_not_found.inc();
                    return Ok(());
                }
                tls_inspector::Inspection::Tls { server_name, alpn } => {
                    s.tls_found.inc();
                    if server_name.is_some() {
                        &s.sni_found
                    } else {
                        &s.sni_not_found
                    }
                    .inc();
                    if alpn.is_empty() {
                        &s.alpn_not_found
                    } else {
                        &s.alpn_found
                    }
                    .inc();
                    d.transport_protocol = "tls";
                    d.server_name = server_name;
                    d.application_protocols = alpn;
                    return Ok(());
                }
            }
        }
    }

    async fn http(
        &self,
        stream: &mut TcpStream,
        buf: &mut BytesMut,
        deadline: Option<tokio::time::Instant>,
        d: &mut Detected,
    ) -> Result<(), Closed> {
        // Only plaintext is inspected.
        if d.transport_protocol != "raw_buffer" {
            return Ok(());
        }
        let s = &self.http_stats;
        loop {
            match http_inspector::inspect(buf) {
                http_inspector::Inspection::NeedMore => {
                    if let Err(e) = read_more(stream, buf, deadline).await {
                        if e == Closed::PeerClosed {
                            s.read_error.inc();
                        }
                        return Err(e);
                    }
                }
                http_inspector::Inspection::NotHttp => {
                    s.http_not_found.inc();
                    return Ok(());
                }
                http_inspector::Inspection::Http(p) => {
                    match p {
                        "h2c" => &s.http2_found,
                        "http/1.0" => &s.http10_found,
                        _ => &s.http11_found,
                    }
                    .inc();
                    d.application_protocols = vec![p.to_string()];
                    return Ok(());
                }
            }
        }
    }
}

/// Reads more of the connection's first bytes, until the deadline.
async fn read_more(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    deadline: Option<tokio::time::Instant>,
) -> Result<(), Closed> {
    buf.reserve(4096);
    let read = stream.read_buf(buf);
    let n = match deadline {
        Some(at) => tokio::time::timeout_at(at, read)
            .await
            .map_err(|_| Closed::Timeout)?,
        None => read.await,
    };
    match n {
        Ok(0) | Err(_) => Err(Closed::PeerClosed),
        Ok(_) => Ok(()),
    }
}

fn compile_filter(f: &ListenerFilter, path: &str) -> Result<Kind, ConfigError> {
    let Some(ConfigType::TypedConfig(any)) = &f.config_type else {
        return Err(ConfigError::Unsupported {
            path: path.into(),
            fields: "'config_discovery' (listener filters need a typed_config)".into(),
        });
    };
    let url = TypeRegistry::effective_type_url(any);
    let cp = format!("{path}.typed_config");
    let reg = TypeRegistry::global();
    match url.as_str() {
        "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst" => {
            let c: OriginalDst = reg.unpack(any)?;
            reject_unhandled(&c, &cp)?;
            Ok(Kind::OriginalDst)
        }
        "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector" => {
            let c: TlsInspector = reg.unpack(any)?;
            reject_unhandled(&c, &cp)?;
            Ok(Kind::TlsInspector)
        }
        "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector" => {
            let c: HttpInspector = reg.unpack(any)?;
            reject_unhandled(&c, &cp)?;
            Ok(Kind::HttpInspector)
        }
        _ => Err(ConfigError::UnsupportedExtension {
            path: path.into(),
            why: petrel_filters::extensions::refusal(&url),
            type_url: url,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn istio_inbound_predicates() {
        // virtualInbound's http_inspector: disabled on ports 80 and 15006.
        let p: ListenerFilterChainMatchPredicate = TypeRegistry::global()
            .from_json(
                &serde_json::json!({"or_match": {"rules": [
                    {"destination_port_range": {"start": 80, "end": 81}},
                    {"destination_port_range": {"start": 15006, "end": 15007}}]}}),
                false,
            )
            .expect("predicate");
        let p = Predicate::compile(&p, "p").expect("compile");
        let at = |port| SocketAddr::from(([10, 0, 0, 1], port));
        assert!(p.matches(at(80)) && p.matches(at(15006)));
        assert!(!p.matches(at(81)) && !p.matches(at(9080)));
        let not = Predicate::Not(Box::new(p));
        assert!(not.matches(at(9080)));
    }
}
