//! `/stats/prometheus`: Envoy's default tag extraction and text exposition (counters, then
//! gauges; families sorted by name, `{}` for untagged series).

use std::collections::BTreeMap;

use crate::observe::stats::StatsSnapshot;
use crate::observe::stats_config::StatsConfig;
use crate::observe::tag_producer::TagProducer;

/// The Prometheus metric name and labels for an Envoy stat name: `envoy_` and the
/// tag-extracted name, the tags as labels (names and metric sanitized as Envoy does). A stat
/// made with explicit tags keeps them; one in a custom namespace loses the namespace and the
/// `envoy_` prefix (Istio's `istio_requests_total`).
pub fn tagged_name(
    tags: &TagProducer,
    snap: &StatsSnapshot,
    stat: &str,
) -> (String, Vec<(String, String)>) {
    let (name, tags) = match snap.tagged.get(stat) {
        Some((extracted, tags)) => (extracted.clone(), tags.clone()),
        None => tags.produce(stat),
    };
    let labels = tags.into_iter().map(|(k, v)| (sanitize(&k), v)).collect();
    let custom = snap.custom_namespaces.iter().find_map(|ns| {
        name.strip_prefix(ns.as_str())
            .and_then(|rest| rest.strip_prefix('.'))
    });
    match custom {
        Some(rest) => (sanitize(rest), labels),
        None => (format!("envoy_{}", sanitize(&name)), labels),
    }
}

fn sanitize(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(
    snap: &StatsSnapshot,
    config: &StatsConfig,
    keep: impl Fn(&str, bool) -> bool,
) -> String {
    let producer = &config.tags;
    let mut out = String::new();
    let counters = snap
        .counters
        .iter()
        .map(|(n, v, u)| (n.as_str(), v.to_string(), *u));
    let gauges = snap
        .gauges
        .iter()
        .map(|(n, v, u)| (n.as_str(), v.to_string(), *u));
    for (kind, series) in [
        ("counter", counters.collect::<Vec<_>>()),
        ("gauge", gauges.collect()),
    ] {
        let mut families: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
        for (stat, value, used) in series {
            if !keep(stat, used) {
                continue;
            }
            let (name, tags) = tagged_name(producer, snap, stat);
            let labels = tags
                .iter()
                .map(|(k, v)| format!("{k}=\"{}\"", escape(v)))
                .collect::<Vec<_>>()
                .join(",");
            families
                .entry(name)
                .or_default()
                .push((stat.to_string(), format!("{{{labels}}} {value}")));
        }
        for (name, mut lines) in families {
            lines.sort();
            out.push_str(&format!("# TYPE {name} {kind}\n"));
            for (_, l) in lines {
                out.push_str(&name);
                out.push_str(&l);
                out.push('\n');
            }
        }
    }
    render_histograms(&mut out, snap, config, &keep);
    out
}

/// Histograms as Envoy writes them: cumulative buckets at the bounds `stats_config` gives the
/// stat (Envoy's defaults unless `histogram_bucket_settings` says otherwise), `+Inf`, the
/// (bin-midpoint) sum and the count, as of the last stats flush.
fn render_histograms(
    out: &mut String,
    snap: &StatsSnapshot,
    config: &StatsConfig,
    keep: &impl Fn(&str, bool) -> bool,
) {
    use petrel_filters::histogram::{approx_sum, count, count_below};
    let mut families: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for (stat, merged, used) in &snap.histograms {
        if !keep(stat, *used) {
            continue;
        }
        let (name, tags) = tagged_name(&config.tags, snap, stat);
        let labels: String = tags
            .iter()
            .map(|(k, v)| format!("{k}=\"{}\",", escape(v)))
            .collect();
        let d = &merged.cumulative;
        let mut series = String::new();
        for &b in config.buckets(stat) {
            series.push_str(&format!(
                "{name}_bucket{{{labels}le=\"{}\"}} {}\n",
                fmt_g32(b),
                count_below(d, b)
            ));
        }
        let n = count(d);
        series.push_str(&format!("{name}_bucket{{{labels}le=\"+Inf\"}} {n}\n"));
        let plain = labels.trim_end_matches(',');
        series.push_str(&format!(
            "{name}_sum{{{plain}}} {}\n",
            fmt_g32(approx_sum(d))
        ));
        series.push_str(&format!("{name}_count{{{plain}}} {n}\n"));
        families
            .entry(name)
            .or_default()
            .push((stat.clone(), series));
    }
    for (name, mut series) in families {
        series.sort();
        out.push_str(&format!("# TYPE {name} histogram\n"));
        for (_, s) in series {
            out.push_str(&s);
        }
    }
}

/// C's `%.32g`, as Envoy formats bucket bounds and sums.
fn fmt_g32(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let sci = format!("{v:.31e}");
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let trim = |s: &str| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_string()
        } else {
            s.to_string()
        }
    };
    if !(-4..32).contains(&exp) {
        let sign = if exp < 0 { '-' } else { '+' };
        return format!("{}e{sign}{:02}", trim(mantissa), exp.abs());
    }
    trim(&format!("{v:.*}", (31 - exp).max(0) as usize))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tagged(stat: &str) -> (String, Vec<(&'static str, String)>) {
        let snap = crate::observe::stats::Store::default().snapshot();
        let (name, tags) = tagged_name(&TagProducer::default(), &snap, stat);
        let tags = tags
            .into_iter()
            .map(|(k, v)| (&*Box::leak(k.into_boxed_str()), v))
            .collect();
        (name, tags)
    }

    #[test]
    fn g32_is_cs() {
        assert_eq!(fmt_g32(0.5), "0.5");
        assert_eq!(fmt_g32(3600000.0), "3600000");
        assert_eq!(
            fmt_g32(741.545_729_101_582_5),
            "741.54572910158253762347158044577"
        );
        assert_eq!(fmt_g32(3.05), "3.049999999999999822364316059975");
        assert_eq!(fmt_g32(1e40), "1.0000000000000000303786028427004e+40");
    }

    #[test]
    fn envoy_default_tags() {
        assert_eq!(
            tagged("cluster.up.upstream_rq_2xx"),
            (
                "envoy_cluster_upstream_rq_xx".into(),
                vec![
                    ("envoy_response_code_class", "2".into()),
                    ("envoy_cluster_name", "up".into())
                ]
            )
        );
        assert_eq!(
            tagged("cluster.up.upstream_rq_503"),
            (
                "envoy_cluster_upstream_rq".into(),
                vec![
                    ("envoy_response_code", "503".into()),
                    ("envoy_cluster_name", "up".into())
                ]
            )
        );
        assert_eq!(
            tagged("listener.127.0.0.1_19000.http.ingress.downstream_rq_1xx"),
            (
                "envoy_listener_http_downstream_rq_xx".into(),
                vec![
                    ("envoy_response_code_class", "1".into()),
                    ("envoy_http_conn_manager_prefix", "ingress".into()),
                    ("envoy_listener_address", "127.0.0.1_19000".into())
                ]
            )
        );
        assert_eq!(
            tagged("listener.admin.downstream_cx_total"),
            ("envoy_listener_admin_downstream_cx_total".into(), vec![])
        );
        assert_eq!(tagged("server.live"), ("envoy_server_live".into(), vec![]));
    }

    #[test]
    fn explicit_tags_and_custom_namespaces() {
        let store = crate::observe::stats::Store::default();
        store.register_custom_namespace("istiocustom");
        store
            .counter_tagged(
                "istiocustom.istio_requests_total",
                &[("reporter", "source"), ("response_code", "200")],
            )
            .add(3);
        // An explicit tag set is not run through extraction, even where a default regex matches.
        store
            .counter_tagged("cluster.up.upstream_rq_200", &[("k", "v")])
            .inc();
        let snap = store.snapshot();
        let names: Vec<&str> = snap.counters.iter().map(|c| c.0.as_str()).collect();
        assert_eq!(
            names,
            [
                "cluster.up.upstream_rq_200.k.v",
                "istiocustom.istio_requests_total.reporter.source.response_code.200"
            ]
        );
        let text = render(&snap, &StatsConfig::default(), |_, _| true);
        assert!(text.contains(
            "# TYPE istio_requests_total counter\nistio_requests_total{reporter=\"source\",response_code=\"200\"} 3\n"
        ), "{text}");
        assert!(
            text.contains("envoy_cluster_up_upstream_rq_200{k=\"v\"} 1\n"),
            "{text}"
        );
    }
}
