//! The bootstrap's `stats_config` and `deferred_stat_options`: how stat names become
//! Prometheus names and tags, which stats exist at all (`stats_matcher`: a rejected stat is
//! neither in `/stats` nor in `/stats/prometheus`, as Envoy creates it as a null stat), and
//! whether a cluster's traffic stats appear only once the cluster is used, and the bucket
//! bounds each histogram is exposed with (`histogram_bucket_settings`).

use petrel_filters::histogram::DEFAULT_BUCKETS;
use petrel_filters::matcher::StringMatcher;
use xds_client::pb::envoy::config::bootstrap::v3::bootstrap::DeferredStatOptions;
use xds_client::pb::envoy::config::metrics::v3::{
    stats_matcher::StatsMatcher as Kind, HistogramBucketSettings, StatsConfig as Pb,
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
    /// `histogram_bucket_settings`: the first whose matcher takes a histogram's full name
    /// gives its bounds (sorted); none, Envoy's defaults.
    buckets: Vec<(StringMatcher, Vec<f64>)>,
}

impl Default for StatsConfig {
    fn default() -> Self {
        StatsConfig {
            tags: TagProducer::default(),
            matcher: Matcher::All,
            deferred: false,
            buckets: Vec::new(),
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

/// One `HistogramBucketSettings`, validated as Envoy's proto rules do (a matcher; bounds
/// positive and unique) and sorted, as Envoy sorts them.
fn bucket_setting(
    b: &HistogramBucketSettings,
    path: &str,
) -> Result<(StringMatcher, Vec<f64>), ConfigError> {
    let m = b
        .r#match
        .as_ref()
        .ok_or_else(|| invalid(format!("{path}.match"), "is required"))?;
    let matcher = StringMatcher::from_proto(m, &format!("{path}.match"))
        .map_err(|e| invalid(path, e.to_string()))?;
    let mut bounds = b.buckets.clone();
    if let Some(v) = bounds.iter().find(|v| v.is_nan() || **v <= 0.0) {
        return Err(invalid(
            format!("{path}.buckets"),
            format!("bucket {v} is not greater than 0"),
        ));
    }
    bounds.sort_by(f64::total_cmp);
    if let Some(w) = bounds.windows(2).find(|w| w[0] == w[1]) {
        return Err(invalid(
            format!("{path}.buckets"),
            format!("bucket {} appears twice", w[0]),
        ));
    }
    // `bins` sizes circllhist's initial bin array in Envoy, an allocation hint with nothing
    // to size here (bins are per-decade arrays made on first use); its bounds are still Envoy's.
    if let Some(n) = b.bins.as_ref().map(|v| v.value) {
        if n == 0 || n > 46082 {
            return Err(invalid(
                format!("{path}.bins"),
                format!("{n} is not in 1..=46082"),
            ));
        }
    }
    Ok((matcher, bounds))
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
        let buckets = std::mem::take(&mut rest.histogram_bucket_settings)
            .iter()
            .enumerate()
            .map(|(i, b)| bucket_setting(b, &format!("{path}.histogram_bucket_settings[{i}]")))
            .collect::<Result<_, _>>()?;
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
            buckets,
        })
    }

    /// The bucket bounds `/stats/prometheus` shows a histogram with, by its full stat name
    /// (before tag extraction, as Envoy matches it).
    pub fn buckets(&self, stat: &str) -> &[f64] {
        self.buckets
            .iter()
            .find(|(m, _)| m.matches(stat))
            .map_or(&DEFAULT_BUCKETS[..], |(_, b)| b)
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
    fn histogram_buckets_first_match_sorted_else_default() {
        let c = cfg(serde_json::json!({"histogram_bucket_settings": [
            {"match": {"prefix": "cluster.a."}, "buckets": [300, 1, 7.5]},
            {"match": {"prefix": "cluster."}, "buckets": [2], "bins": 10},
            {"match": {"suffix": "_ms"}, "buckets": []}]}));
        assert_eq!(c.buckets("cluster.a.upstream_rq_time"), [1.0, 7.5, 300.0]);
        assert_eq!(c.buckets("cluster.b.upstream_cx_length_ms"), [2.0]);
        assert!(c.buckets("http.x.downstream_cx_length_ms").is_empty());
        assert_eq!(c.buckets("http.x.downstream_rq_time"), DEFAULT_BUCKETS);
    }

    #[test]
    fn histogram_buckets_refused_as_envoy_validates() {
        for (bad, field) in [
            (serde_json::json!({"buckets": [1]}), ".match"),
            (
                serde_json::json!({"match": {"prefix": "a"}, "buckets": [1, 0]}),
                ".buckets",
            ),
            (
                serde_json::json!({"match": {"prefix": "a"}, "buckets": [-1]}),
                ".buckets",
            ),
            (
                serde_json::json!({"match": {"prefix": "a"}, "buckets": [5, 1, 5]}),
                ".buckets",
            ),
            (
                serde_json::json!({"match": {"prefix": "a"}, "buckets": [1], "bins": 0}),
                ".bins",
            ),
        ] {
            let pb: Pb = xds_client::TypeRegistry::global()
                .from_json(
                    &serde_json::json!({"histogram_bucket_settings": [bad]}),
                    false,
                )
                .unwrap();
            let e = StatsConfig::compile(Some(&pb), None)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(&format!("stats_config.histogram_bucket_settings[0]{field}")),
                "{e}"
            );
        }
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
