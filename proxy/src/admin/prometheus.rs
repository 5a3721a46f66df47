//! `/stats/prometheus`: Envoy's default tag extraction and text exposition (counters, then
//! gauges; families sorted by name, `{}` for untagged series).

use std::collections::BTreeMap;
use std::sync::OnceLock;

use regex::Regex;

use crate::observe::stats::StatsSnapshot;

/// A tag extractor: a regex whose group 1 is removed from the name and whose group 2 is the
/// tag's value (Envoy's `TagExtractorImpl` convention).
struct Extractor {
    tag: &'static str,
    re: Regex,
}

/// Envoy's default extractors that apply to the stats Petrel has, in Envoy's order.
fn extractors() -> &'static [Extractor] {
    static E: OnceLock<Vec<Extractor>> = OnceLock::new();
    E.get_or_init(|| {
        let x = |tag, re: &str| Extractor {
            tag,
            re: Regex::new(re).expect("static regex"),
        };
        vec![
            x("envoy_response_code", r"_rq(_(\d{3}))$"),
            x("envoy_response_code_class", r"_rq_((\d))xx$"),
            x(
                "envoy_http_conn_manager_prefix",
                r"^listener\..*?\.http\.((.*?)\.)",
            ),
            x("envoy_cluster_name", r"^cluster\.(([^.]*)\.)"),
            x("envoy_http_conn_manager_prefix", r"^http\.(([^.]*)\.)"),
            x(
                "envoy_listener_address",
                r"^listener\.(((?:[_.0-9]*|[_\[\]aAbBcCdDeEfF0-9]*))\.)",
            ),
        ]
    })
}

/// The Prometheus metric name and tags for an Envoy stat name.
pub fn tagged_name(stat: &str) -> (String, Vec<(&'static str, String)>) {
    let mut name = stat.to_string();
    let mut tags = Vec::new();
    for e in extractors() {
        if let Some(c) = e.re.captures(&name) {
            let (Some(remove), Some(value)) = (c.get(1), c.get(2)) else {
                continue;
            };
            let value = value.as_str().to_string();
            let range = remove.range();
            name.replace_range(range, "");
            tags.push((e.tag, value));
        }
    }
    let sanitized: String = name
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == ':' {
                c
            } else {
                '_'
            }
        })
        .collect();
    (format!("envoy_{sanitized}"), tags)
}

fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub fn render(snap: &StatsSnapshot, keep: impl Fn(&str, bool) -> bool) -> String {
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
            let (name, tags) = tagged_name(stat);
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
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envoy_default_tags() {
        assert_eq!(
            tagged_name("cluster.up.upstream_rq_2xx"),
            (
                "envoy_cluster_upstream_rq_xx".into(),
                vec![
                    ("envoy_response_code_class", "2".into()),
                    ("envoy_cluster_name", "up".into())
                ]
            )
        );
        assert_eq!(
            tagged_name("cluster.up.upstream_rq_503"),
            (
                "envoy_cluster_upstream_rq".into(),
                vec![
                    ("envoy_response_code", "503".into()),
                    ("envoy_cluster_name", "up".into())
                ]
            )
        );
        assert_eq!(
            tagged_name("listener.127.0.0.1_19000.http.ingress.downstream_rq_1xx"),
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
            tagged_name("listener.admin.downstream_cx_total"),
            ("envoy_listener_admin_downstream_cx_total".into(), vec![])
        );
        assert_eq!(
            tagged_name("server.live"),
            ("envoy_server_live".into(), vec![])
        );
    }
}
