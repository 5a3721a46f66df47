//! The bootstrap's `stats_config` and `deferred_stat_options`: how stat names become
//! Prometheus names and tags, which stats exist at all (`stats_matcher`: a rejected stat is
//! neither in `/stats` nor in `/stats/prometheus`, as Envoy creates it as a null stat), and
//! whether a cluster's traffic stats appear only once the cluster is used.

use petrel_filters::matcher::StringMatcher;
use xds_client::pb::envoy::config::bootstrap::v3::bootstrap::DeferredStatOptions;
use xds_client::pb::envoy::config::metrics::v3::{
    stats_matcher::StatsMatcher as Kind, StatsConfig as Pb,
};

use super::tag_producer::TagProducer;
use crate::config::{invalid, reject_unhandled, ConfigError};

#[derive(Debug)]
enum Matcher {
    All,
    RejectAll,
    Inclusion(Vec<StringMatcher>),
    Exclusion(Vec<StringMatcher>),
}

/// Envoy's `ClusterTrafficStats`: what deferred creation holds back until a cluster is used.
const CLUSTER_TRAFFIC_STATS: &[&str] = &[
    "bind_errors",
    "original_dst_host_invalid",
    "retry_or_shadow_abandoned",
    "upstream_cx_close_notify",
    "upstream_cx_connect_attempts_exceeded",
    "upstream_cx_connect_fail",
    "upstream_cx_connect_timeout",
    "upstream_cx_connect_with_0_rtt",
    "upstream_cx_destroy",
    "upstream_cx_destroy_local",
    "upstream_cx_destroy_local_with_active_rq",
    "upstream_cx_destroy_remote",
    "upstream_cx_destroy_remote_with_active_rq",
    "upstream_cx_destroy_with_active_rq",
    "upstream_cx_http1_total",
    "upstream_cx_http2_total",
    "upstream_cx_http3_total",
    "upstream_cx_idle_timeout",
    "upstream_cx_max_duration_reached",
    "upstream_cx_max_requests",
    "upstream_cx_none_healthy",
    "upstream_cx_overflow",
    "upstream_cx_pool_overflow",
    "upstream_cx_protocol_error",
    "upstream_cx_rx_bytes_total",
    "upstream_cx_total",
    "upstream_cx_tx_bytes_total",
    "upstream_flow_control_backed_up_total",
    "upstream_flow_control_drained_total",
    "upstream_flow_control_paused_reading_total",
    "upstream_flow_control_resumed_reading_total",
    "upstream_internal_redirect_failed_total",
    "upstream_internal_redirect_succeeded_total",
    "upstream_rq_cancelled",
    "upstream_rq_completed",
    "upstream_rq_maintenance_mode",
    "upstream_rq_max_duration_reached",
    "upstream_rq_pending_failure_eject",
    "upstream_rq_pending_overflow",
    "upstream_rq_pending_total",
    "upstream_rq_0rtt",
    "upstream_rq_per_try_timeout",
    "upstream_rq_per_try_idle_timeout",
    "upstream_rq_retry",
    "upstream_rq_retry_backoff_exponential",
    "upstream_rq_retry_backoff_ratelimited",
    "upstream_rq_retry_limit_exceeded",
    "upstream_rq_retry_overflow",
    "upstream_rq_retry_success",
    "upstream_rq_rx_reset",
    "upstream_rq_timeout",
    "upstream_rq_total",
    "upstream_rq_tx_reset",
    "upstream_http3_broken",
    "upstream_cx_active",
    "upstream_cx_rx_bytes_buffered",
    "upstream_cx_tx_bytes_buffered",
    "upstream_rq_active",
    "upstream_rq_pending_active",
];

#[derive(Debug)]
pub struct StatsConfig {
    pub tags: TagProducer,
    matcher: Matcher,
    /// `deferred_stat_options.enable_deferred_creation_stats`.
    deferred: bool,
}

impl Default for StatsConfig {
    fn default() -> Self {
        StatsConfig {
            tags: TagProducer::default(),
            matcher: Matcher::All,
            deferred: false,
        }
    }
}

fn patterns(
    list: &xds_client::pb::envoy::r#type::matcher::v3::ListStringMatcher,
    path: &str,
) -> Result<Vec<StringMatcher>, ConfigError> {
    list.patterns
        .iter()
        .enumerate()
        .map(|(i, p)| {
            StringMatcher::from_proto(p, &format!("{path}.patterns[{i}]"))
                .map_err(|e| invalid(path, e.to_string()))
        })
        .collect()
}

impl StatsConfig {
    pub fn compile(
        pb: Option<&Pb>,
        deferred: Option<&DeferredStatOptions>,
    ) -> Result<StatsConfig, ConfigError> {
        let deferred = match deferred {
            Some(d) => {
                let mut rest = *d;
                let on = std::mem::take(&mut rest.enable_deferred_creation_stats);
                reject_unhandled(&rest, "deferred_stat_options")?;
                on
            }
            None => false,
        };
        let Some(pb) = pb else {
            return Ok(StatsConfig {
                deferred,
                ..Default::default()
            });
        };
        let path = "stats_config";
        let mut rest = pb.clone();
        if !rest.histogram_bucket_settings.is_empty() {
            return Err(ConfigError::Unsupported {
                path: path.into(),
                fields:
                    "'histogram_bucket_settings' (histograms come with observability, issue #7)"
                        .into(),
            });
        }
        let tags = TagProducer::compile(pb, path)?;
        rest.stats_tags.clear();
        rest.use_all_default_tags = None;
        let matcher = match rest.stats_matcher.take().and_then(|m| m.stats_matcher) {
            None => Matcher::All,
            Some(Kind::RejectAll(true)) => Matcher::RejectAll,
            Some(Kind::RejectAll(false)) => Matcher::All,
            Some(Kind::InclusionList(l)) => Matcher::Inclusion(patterns(
                &l,
                &format!("{path}.stats_matcher.inclusion_list"),
            )?),
            Some(Kind::ExclusionList(l)) => Matcher::Exclusion(patterns(
                &l,
                &format!("{path}.stats_matcher.exclusion_list"),
            )?),
        };
        reject_unhandled(&rest, path)?;
        Ok(StatsConfig {
            tags,
            matcher,
            deferred,
        })
    }

    /// Whether a stat exists (is not rejected by `stats_matcher`).
    pub fn accepts(&self, stat: &str) -> bool {
        match &self.matcher {
            Matcher::All => true,
            Matcher::RejectAll => false,
            Matcher::Inclusion(p) => p.iter().any(|m| m.matches(stat)),
            Matcher::Exclusion(p) => !p.iter().any(|m| m.matches(stat)),
        }
    }

    /// Under deferred creation, the cluster whose traffic stat this is (its group appears once
    /// any of it was used).
    pub fn deferred_cluster<'a>(&self, stat: &'a str) -> Option<&'a str> {
        if !self.deferred {
            return None;
        }
        let rest = stat.strip_prefix("cluster.")?;
        let (cluster, leaf) = rest.rsplit_once('.')?;
        CLUSTER_TRAFFIC_STATS.contains(&leaf).then_some(cluster)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(v: serde_json::Value) -> StatsConfig {
        let pb: Pb = xds_client::TypeRegistry::global()
            .from_json(&v, false)
            .unwrap();
        StatsConfig::compile(Some(&pb), None).unwrap()
    }

    #[test]
    fn matchers_include_and_exclude() {
        let c = cfg(
            serde_json::json!({"stats_matcher": {"inclusion_list": {"patterns": [{"prefix": "server"}, {"suffix": "rbac.allowed"}]}}}),
        );
        assert!(c.accepts("server.live"));
        assert!(c.accepts("http.x.rbac.allowed"));
        assert!(!c.accepts("cluster.a.upstream_rq_total"));
        let c = cfg(
            serde_json::json!({"stats_matcher": {"exclusion_list": {"patterns": [{"prefix": "cluster."}]}}}),
        );
        assert!(!c.accepts("cluster.a.upstream_rq_total"));
        assert!(c.accepts("server.live"));
        let c = cfg(serde_json::json!({"stats_matcher": {"reject_all": true}}));
        assert!(!c.accepts("server.live"));
    }

    #[test]
    fn istio_tag_regexes_compile_and_extract() {
        let c = cfg(
            serde_json::json!({"use_all_default_tags": false, "stats_tags": [
            {"tag_name": "http_conn_manager_listener_prefix", "regex": "^listener(?=\\.).*?\\.http\\.(((?:[_.[:digit:]]*|[_\\[\\]aAbBcCdDeEfF[:digit:]]*))\\.)"},
            {"tag_name": "response_code", "regex": "_rq(_(\\d{3}))$"}]}),
        );
        let (name, tags) = c
            .tags
            .produce("listener.0.0.0.0_15006.http.10.0.0.1_8080.downstream_rq_200");
        assert_eq!(name, "listener.0.0.0.0_15006.http.downstream_rq");
        assert_eq!(
            tags,
            vec![
                ("response_code".to_string(), "200".to_string()),
                (
                    "http_conn_manager_listener_prefix".to_string(),
                    "10.0.0.1_8080".to_string()
                )
            ]
        );
    }

    #[test]
    fn deferred_cluster_traffic_stats() {
        let c = StatsConfig::compile(
            None,
            Some(&DeferredStatOptions {
                enable_deferred_creation_stats: true,
            }),
        )
        .unwrap();
        assert_eq!(
            c.deferred_cluster("cluster.a.b.upstream_rq_total"),
            Some("a.b")
        );
        assert_eq!(c.deferred_cluster("cluster.a.membership_total"), None);
    }
}
