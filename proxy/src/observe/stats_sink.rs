//! `stats_sinks`: Envoy's statsd sink (`envoy.stat_sinks.statsd`, UDP). Every stats flush sends
//! each used counter's change since the last flush (`<prefix>.<name>:<delta>|c`, zero changes
//! included, as Envoy sends them) and each used gauge (`<prefix>.<name>:<value>|g`); histogram
//! samples go out as they are recorded (`<prefix>.<name>:<value>|ms`). One metric per datagram,
//! names in full (no tags), as Envoy's sink does by default.

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};

use xds_client::pb::envoy::config::metrics::v3::{
    statsd_sink::StatsdSpecifier, StatsSink, StatsdSink,
};

use crate::config::{invalid, reject_unhandled, ConfigError};
use crate::observe::stats::StatsSnapshot;

const STATSD_URL: &str = "type.googleapis.com/envoy.config.metrics.v3.StatsdSink";

#[derive(Debug)]
pub struct Statsd {
    socket: UdpSocket,
    to: SocketAddr,
    prefix: String,
    /// Each counter's value at the last flush.
    last: Mutex<HashMap<String, u64>>,
}

pub fn compile(sinks: &[StatsSink], path: &str) -> Result<Vec<Arc<Statsd>>, ConfigError> {
    sinks
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let sp = format!("{path}[{i}]");
            let any = match &s.config_type {
                Some(
                    xds_client::pb::envoy::config::metrics::v3::stats_sink::ConfigType::TypedConfig(
                        a,
                    ),
                ) => a,
                None => return Err(invalid(&sp, "typed_config is required")),
            };
            let url = xds_client::TypeRegistry::effective_type_url(any);
            if url != STATSD_URL {
                return Err(ConfigError::UnsupportedExtension {
                    path: format!("{sp} ('{}')", s.name),
                    why: petrel_filters::extensions::refusal(&url),
                    type_url: url,
                });
            }
            let mut cfg: StatsdSink = xds_client::TypeRegistry::global().unpack(any)?;
            let tp = format!("{sp}.typed_config");
            let to = match cfg.statsd_specifier.take() {
                Some(StatsdSpecifier::Address(a)) => {
                    crate::listener::socket_addr(&Some(a), &format!("{tp}.address"))?
                }
                Some(StatsdSpecifier::TcpClusterName(_)) => {
                    return Err(ConfigError::Unsupported {
                        path: tp,
                        fields: "'tcp_cluster_name' (statsd over TCP)".into(),
                    })
                }
                None => return Err(invalid(&tp, "address or tcp_cluster_name is required")),
            };
            let prefix = match std::mem::take(&mut cfg.prefix) {
                p if p.is_empty() => "envoy".to_string(),
                p => p,
            };
            reject_unhandled(&cfg, &tp)?;
            let bind: SocketAddr = if to.is_ipv4() {
                ([0, 0, 0, 0], 0).into()
            } else {
                (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
            };
            let socket = UdpSocket::bind(bind)
                .and_then(|s| s.set_nonblocking(true).map(|_| s))
                .map_err(|e| invalid(&tp, format!("cannot open a UDP socket: {e}")))?;
            Ok(Arc::new(Statsd {
                socket,
                to,
                prefix,
                last: Mutex::new(HashMap::new()),
            }))
        })
        .collect()
}

impl Statsd {
    fn send(&self, line: &str) {
        // A full socket buffer drops the metric, as a UDP sink does.
        let _ = self.socket.send_to(line.as_bytes(), self.to);
    }

    /// The stats flush.
    pub fn flush(&self, snap: &StatsSnapshot) {
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        for (name, value, used) in &snap.counters {
            if !used {
                continue;
            }
            let before = last.insert(name.clone(), *value).unwrap_or(0);
            self.send(&format!(
                "{}.{name}:{}|c",
                self.prefix,
                value.saturating_sub(before)
            ));
        }
        for (name, value, used) in &snap.gauges {
            if *used {
                self.send(&format!("{}.{name}:{value}|g", self.prefix));
            }
        }
    }
}

/// Every sink's share of the samples.
#[derive(Debug)]
pub struct AllSinks(pub Vec<Arc<Statsd>>);

impl petrel_filters::histogram::SampleSink for AllSinks {
    fn sample(&self, name: &str, value: u64) {
        for s in &self.0 {
            s.sample(name, value);
        }
    }
}

impl petrel_filters::histogram::SampleSink for Statsd {
    fn sample(&self, name: &str, value: u64) {
        self.send(&format!("{}.{name}:{value}|ms", self.prefix));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::observe::stats::Store;

    #[test]
    fn flushes_deltas_gauges_and_samples() {
        let rx = UdpSocket::bind("127.0.0.1:0").unwrap();
        rx.set_read_timeout(Some(std::time::Duration::from_secs(2)))
            .unwrap();
        let sink: StatsSink = xds_client::TypeRegistry::global()
            .from_json(
                &serde_json::json!({"name": "envoy.stat_sinks.statsd", "typed_config": {
                    "@type": STATSD_URL,
                    "address": {"socket_address": {"address": "127.0.0.1", "port_value": rx.local_addr().unwrap().port()}}}}),
                false,
            )
            .unwrap();
        let statsd = compile(&[sink], "stats_sinks").unwrap().remove(0);
        let store = Store::default();
        store.set_sample_sink(statsd.clone());
        store.counter("a.c").add(3);
        store.counter("a.unused");
        store.gauge("a.g").set(7);
        store.histogram("a.h").record(12);
        statsd.flush(&store.snapshot());
        store.counter("a.c").add(2);
        statsd.flush(&store.snapshot());
        let mut got = Vec::new();
        let mut buf = [0u8; 512];
        for _ in 0..5 {
            let n = rx.recv(&mut buf).unwrap();
            got.push(String::from_utf8_lossy(&buf[..n]).into_owned());
        }
        assert_eq!(
            got,
            [
                "envoy.a.h:12|ms",
                "envoy.a.c:3|c",
                "envoy.a.g:7|g",
                "envoy.a.c:2|c",
                "envoy.a.g:7|g"
            ]
        );
    }

    #[test]
    fn tcp_statsd_and_other_sinks_are_refused() {
        let sink = |v: serde_json::Value| -> StatsSink {
            xds_client::TypeRegistry::global()
                .from_json(&v, false)
                .unwrap()
        };
        let tcp = sink(
            serde_json::json!({"typed_config": {"@type": STATSD_URL, "tcp_cluster_name": "c"}}),
        );
        assert!(compile(&[tcp], "s").is_err());
    }
}
