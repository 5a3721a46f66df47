//! `respect_dns_ttl`: a DNS cluster resolves again when its records' TTL runs out instead of every
//! `dns_refresh_rate`. getaddrinfo gives no TTLs, so these clusters resolve with hickory, which
//! reads `/etc/resolv.conf` and the hosts file as Envoy's c-ares does. A hosts-file entry has no
//! TTL of its own (c-ares reports 0), so it keeps `dns_refresh_rate`, as in Envoy.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use hickory_resolver::TokioResolver;

/// hickory gives hosts-file answers its longest TTL (a day): such an answer has none.
const HOSTS_FILE_TTL: Duration = Duration::from_secs(86_400 - 60);

fn resolver() -> Option<&'static TokioResolver> {
    static R: OnceLock<Option<TokioResolver>> = OnceLock::new();
    R.get_or_init(|| TokioResolver::builder_tokio().ok()?.build().ok())
        .as_ref()
}

/// What resolving a cluster's names gave.
pub struct Resolved {
    /// Every name's addresses; `None` when any name failed (Envoy keeps the hosts it has).
    pub answers: Option<HashMap<String, Vec<IpAddr>>>,
    /// The shortest TTL among the answers, when they carry one.
    pub ttl: Option<Duration>,
}

pub async fn resolve(names: &[String]) -> Resolved {
    let Some(r) = resolver() else {
        return Resolved {
            answers: None,
            ttl: None,
        };
    };
    let mut answers = HashMap::new();
    let mut ttl: Option<Duration> = None;
    let mut failed = false;
    for name in names {
        match r.lookup_ip(name.as_str()).await {
            Ok(found) => {
                let left = found
                    .valid_until()
                    .saturating_duration_since(Instant::now());
                if left > Duration::ZERO && left < HOSTS_FILE_TTL {
                    ttl = Some(ttl.map_or(left, |t| t.min(left)));
                }
                answers.insert(name.clone(), found.iter().collect());
            }
            Err(_) => failed = true,
        }
    }
    Resolved {
        answers: (!failed).then_some(answers),
        ttl,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn hosts_file_names_resolve_without_a_ttl() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let r = rt.block_on(super::resolve(&["localhost".to_string()]));
        let answers = r.answers.expect("localhost resolves");
        assert!(answers["localhost"].iter().all(|a| a.is_loopback()));
        assert_eq!(r.ttl, None);
        let r = rt.block_on(super::resolve(&["no-such-host.invalid".to_string()]));
        assert!(r.answers.is_none());
    }
}
