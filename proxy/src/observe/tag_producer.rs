//! Envoy's tag extraction (`TagProducerImpl`): the tag-extracted name and the tags of a stat
//! name, from Envoy's default extractors (regexes and token patterns, in Envoy's order) and the
//! bootstrap's `stats_config.stats_tags` (ECMAScript regexes — Istio's use lookahead — or fixed
//! values). Every extractor looks at the whole name; the characters each removes are removed
//! together at the end, as Envoy does.

use std::collections::HashSet;

use crate::config::{invalid, ConfigError};

const TAG_VALUE: &str = r"[^\.]+";

/// Envoy's `expandRegex` substitutions.
fn expand(re: &str) -> String {
    re.replace(
        "<ADDRESS>",
        r"(?:(?:\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}|\[[a-fA-F_\d]+\])_\d+)",
    )
    .replace("<CIPHER>", r"[\w-]+")
    .replace("<TLS_VERSION>", r"TLSv\d\.\d")
    .replace("<TAG_VALUE>", TAG_VALUE)
    .replace("<ROUTE_CONFIG_NAME>", r"[\w\-\.]+")
    .replace(
        "<LISTENER_OR_CLUSTER_WITH_NAME>",
        r"(?:listener|cluster)\..*?",
    )
}

/// Envoy's default regex extractors: (tag name, regex, substring it needs, value it skips).
const DEFAULT_REGEXES: &[(&str, &str, &str, &str)] = &[
    ("envoy.response_code", r"_rq(_(\d{3}))$", "_rq_", ""),
    ("envoy.response_code_class", r"_rq_((\d))xx$", "_rq_", ""),
    (
        "envoy.dynamo_partition_id",
        r"^http\.<TAG_VALUE>\.dynamodb\.table\.<TAG_VALUE>\.capacity\.<TAG_VALUE>(\.__partition_id=(\w{7}))$",
        ".dynamodb.table.",
        "",
    ),
    (
        "envoy.dyanmo_operation",
        r"^http\.<TAG_VALUE>\.dynamodb.(?:operation|table\.<TAG_VALUE>\.capacity)(\.(<TAG_VALUE>))(?:\.|$)",
        ".dynamodb.",
        "",
    ),
    (
        "envoy.dynamo_table",
        r"^http\.<TAG_VALUE>\.dynamodb.(?:table|error)\.((<TAG_VALUE>)\.)",
        ".dynamodb.",
        "",
    ),
    (
        "envoy.ssl_cipher",
        r"^listener\..*?\.ssl\.ciphers(\.(<CIPHER>))$",
        ".ssl.ciphers.",
        "",
    ),
    (
        "envoy.ssl_curve",
        r"^<LISTENER_OR_CLUSTER_WITH_NAME>\.ssl\.curves(\.(<CIPHER>))$",
        ".ssl.curves.",
        "",
    ),
    (
        "envoy.ssl_sigalg",
        r"^<LISTENER_OR_CLUSTER_WITH_NAME>\.ssl\.sigalgs(\.(<CIPHER>))$",
        ".ssl.sigalgs.",
        "",
    ),
    (
        "envoy.ssl_version",
        r"^<LISTENER_OR_CLUSTER_WITH_NAME>\.ssl\.versions(\.(<TLS_VERSION>))$",
        ".ssl.versions.",
        "",
    ),
    (
        "cipher_suite",
        r"^cluster\.<TAG_VALUE>\.ssl\.ciphers(\.(<CIPHER>))$",
        ".ssl.ciphers.",
        "",
    ),
    (
        "envoy.http_conn_manager_prefix",
        r"^listener\..*?\.http\.((<TAG_VALUE>)\.)",
        ".http.",
        "",
    ),
    (
        "envoy.worker_id",
        r"^(?:listener\.(?:<ADDRESS>|<TAG_VALUE>)\.|server\.|listener_manager\.)worker_((\d+)\.)",
        "",
        "",
    ),
    (
        "envoy.listener_address",
        r"^listener\.((<ADDRESS>|<TAG_VALUE>)\.)",
        "",
        "admin",
    ),
    (
        "envoy.rds_route_config",
        r"^http\.<TAG_VALUE>\.rds\.((<ROUTE_CONFIG_NAME>)\.)\w+?$",
        ".rds.",
        "",
    ),
];

/// Envoy's default token extractors, in order.
const DEFAULT_TOKENS: &[(&str, &str)] = &[
    (
        "envoy.mongo_callsite",
        "mongo.*.collection.*.callsite.$.query.**",
    ),
    ("envoy.mongo_collection", "mongo.*.collection.$.**.query.*"),
    ("envoy.mongo_cmd", "mongo.*.cmd.$.**"),
    ("envoy.grpc_bridge_method", "cluster.*.grpc.*.$.**"),
    ("envoy.http_user_agent", "http.*.user_agent.$.**"),
    ("envoy.virtual_cluster", "vhost.*.vcluster.$.**"),
    ("envoy.fault_downstream_cluster", "http.*.fault.$.**"),
    ("envoy.grpc_bridge_service", "cluster.*.grpc.$.**"),
    ("envoy.tcp_prefix", "tcp.$.**"),
    ("envoy.udp_prefix", "udp.$.**"),
    ("envoy.clientssl_prefix", "auth.clientssl.$.**"),
    ("envoy.ratelimit_prefix", "ratelimit.$.**"),
    ("envoy.cluster_name", "cluster.$.**"),
    ("envoy.ext_authz_prefix", "cluster.*.ext_authz.$.**"),
    ("envoy.ext_authz_prefix", "http.*.ext_authz.$.**"),
    ("envoy.http_conn_manager_prefix", "http.$.**"),
    ("envoy.virtual_host", "vhost.$.**"),
    ("envoy.mongo_prefix", "mongo.$.**"),
    ("envoy.route", "vhost.*.route.$.**"),
    ("envoy.thrift_prefix", "thrift.$.**"),
    ("envoy.redis_prefix", "redis.$.**"),
    (
        "envoy.local_http_ratelimit_prefix",
        "$.http_local_rate_limit.**",
    ),
    (
        "envoy.local_network_ratelimit_prefix",
        "local_rate_limit.$.**",
    ),
    (
        "envoy.local_listener_ratelimit_prefix",
        "listener_local_ratelimit.$.**",
    ),
    ("envoy.dns_filter_prefix", "dns_filter.$.**"),
];

#[derive(Debug)]
enum Kind {
    /// Envoy's default regexes (RE2 there; none uses what RE2 lacks).
    Re2 {
        re: regex::Regex,
        substr: String,
        negative: String,
    },
    /// `stats_tags` regexes (`std::regex` ECMAScript there: Istio's use lookahead).
    Std(fancy_regex::Regex),
    Tokens {
        tokens: Vec<String>,
        capture: usize,
    },
    Fixed(String),
}

#[derive(Debug)]
struct Extractor {
    name: String,
    kind: Kind,
    /// The first token a name must have for this extractor to run (Envoy's prefix map).
    prefix: Option<String>,
    /// Another extractor has the same tag name: the first that matches wins.
    shared_name: bool,
}

/// The first name token a regex requires, as Envoy's `extractRegexPrefix` finds it.
fn regex_prefix(re: &str) -> Option<String> {
    let rest = re.strip_prefix('^')?;
    let end = rest
        .char_indices()
        .find(|(_, c)| !(c.is_ascii_alphanumeric() || *c == '_'))
        .map(|(i, _)| i)?;
    if end == 0 {
        return None;
    }
    let after = &rest[end..];
    let last = after.len() == 1;
    ((!last && (after.starts_with("\\.") || after.starts_with("(?=\\.)")))
        || (last && after == "$"))
        .then(|| rest[..end].to_string())
}

/// Extracts tags; shared by every stat name rendering.
#[derive(Debug)]
pub struct TagProducer {
    extractors: Vec<Extractor>,
}

impl Default for TagProducer {
    fn default() -> Self {
        let mut p = TagProducer {
            extractors: Vec::new(),
        };
        p.add_defaults();
        p
    }
}

impl TagProducer {
    /// From `stats_config`: the defaults unless `use_all_default_tags` is false, then the
    /// `stats_tags`.
    pub fn compile(
        cfg: &xds_client::pb::envoy::config::metrics::v3::StatsConfig,
        path: &str,
    ) -> Result<TagProducer, ConfigError> {
        use xds_client::pb::envoy::config::metrics::v3::tag_specifier::TagValue;
        let mut p = TagProducer {
            extractors: Vec::new(),
        };
        if cfg.use_all_default_tags.as_ref().is_none_or(|b| b.value) {
            p.add_defaults();
        }
        for (i, t) in cfg.stats_tags.iter().enumerate() {
            let tp = format!("{path}.stats_tags[{i}]");
            if t.tag_name.is_empty() {
                return Err(invalid(&tp, "tag_name cannot be empty"));
            }
            match &t.tag_value {
                Some(TagValue::Regex(re)) if !re.is_empty() => {
                    let compiled = fancy_regex::Regex::new(re)
                        .map_err(|e| invalid(&tp, format!("Invalid regex '{re}': {e}")))?;
                    p.push(t.tag_name.clone(), Kind::Std(compiled), regex_prefix(re));
                }
                Some(TagValue::FixedValue(v)) => {
                    p.push(t.tag_name.clone(), Kind::Fixed(v.clone()), None);
                }
                _ => {
                    // No regex: the default extractors of that name.
                    let before = p.extractors.len();
                    p.add_defaults_named(Some(&t.tag_name));
                    if p.extractors.len() == before {
                        return Err(invalid(
                            &tp,
                            format!("No regex specified for tag specifier and no default regex for name: '{}'", t.tag_name),
                        ));
                    }
                }
            }
        }
        Ok(p)
    }

    fn add_defaults(&mut self) {
        self.add_defaults_named(None);
    }

    fn add_defaults_named(&mut self, only: Option<&str>) {
        for (name, re, substr, negative) in DEFAULT_REGEXES {
            if only.is_some_and(|o| o != *name) {
                continue;
            }
            let expanded = expand(re);
            let Ok(compiled) = regex::Regex::new(&expanded) else {
                continue;
            };
            let prefix = regex_prefix(&expanded);
            self.push(
                name.to_string(),
                Kind::Re2 {
                    re: compiled,
                    substr: substr.to_string(),
                    negative: negative.to_string(),
                },
                prefix,
            );
        }
        for (name, pattern) in DEFAULT_TOKENS {
            if only.is_some_and(|o| o != *name) {
                continue;
            }
            let tokens: Vec<String> = pattern.split('.').map(str::to_string).collect();
            let capture = tokens.iter().position(|t| t == "$").unwrap_or(0);
            let prefix = tokens
                .first()
                .filter(|f| !matches!(f.as_str(), "$" | "*" | "**"))
                .cloned();
            self.push(name.to_string(), Kind::Tokens { tokens, capture }, prefix);
        }
    }

    fn push(&mut self, name: String, kind: Kind, prefix: Option<String>) {
        let shared = self
            .extractors
            .iter_mut()
            .filter(|e| e.name == name)
            .fold(false, |_, e| {
                e.shared_name = true;
                true
            });
        self.extractors.push(Extractor {
            name,
            kind,
            prefix,
            shared_name: shared,
        });
    }

    /// The tag-extracted name and the tags, in extraction order.
    pub fn produce(&self, stat: &str) -> (String, Vec<(String, String)>) {
        let first = stat.split_once('.').map(|(f, _)| f);
        let mut removed: Vec<(usize, usize)> = Vec::new();
        let mut tags = Vec::new();
        let mut seen: HashSet<&str> = HashSet::new();
        let tokens: Vec<&str> = stat.split('.').collect();
        // Extractors without a prefix, then those for the name's first token, each in order.
        let order = self.extractors.iter().filter(|e| e.prefix.is_none()).chain(
            self.extractors
                .iter()
                .filter(|e| e.prefix.is_some() && e.prefix.as_deref() == first),
        );
        for e in order {
            if e.shared_name && seen.contains(e.name.as_str()) {
                continue;
            }
            if let Some((value, range)) = e.extract(stat, &tokens) {
                tags.push((e.name.clone(), value));
                if let Some(r) = range {
                    removed.push(r);
                }
                if e.shared_name {
                    seen.insert(&e.name);
                }
            }
        }
        let name: String = stat
            .char_indices()
            .filter(|(i, _)| !removed.iter().any(|(s, e)| (*s..*e).contains(i)))
            .map(|(_, c)| c)
            .collect();
        (name, tags)
    }
}

impl Extractor {
    /// The tag value and the byte range to remove, when this extractor matches.
    fn extract(&self, stat: &str, tokens: &[&str]) -> Option<(String, Option<(usize, usize)>)> {
        match &self.kind {
            Kind::Fixed(v) => Some((v.clone(), None)),
            Kind::Re2 {
                re,
                substr,
                negative,
            } => {
                if !substr.is_empty() && !stat.contains(substr.as_str()) {
                    return None;
                }
                let c = re.captures(stat)?;
                let remove = c.get(1).filter(|m| !m.as_str().is_empty())?;
                let value = c
                    .get(2)
                    .filter(|m| !m.as_str().is_empty())
                    .unwrap_or(remove)
                    .as_str();
                if !negative.is_empty() && negative == value {
                    return None;
                }
                Some((value.to_string(), Some((remove.start(), remove.end()))))
            }
            Kind::Std(re) => {
                let c = re.captures(stat).ok()??;
                let remove = c.get(1)?;
                let value = c.get(2).unwrap_or(remove).as_str();
                Some((value.to_string(), Some((remove.start(), remove.end()))))
            }
            Kind::Tokens {
                tokens: pattern,
                capture,
            } => {
                let (index, start) = search(pattern, *capture, tokens, 0, 0, 0)??;
                let value = tokens[index];
                let (mut s, mut e) = (start, start + value.len());
                // The dot after the token, or before it when it is the last.
                if index < tokens.len() - 1 {
                    e += 1;
                } else {
                    s = s.saturating_sub(1);
                }
                Some((value.to_string(), Some((s, e))))
            }
        }
    }
}

/// Envoy's `searchTags`: whether the pattern matches the whole input from these positions,
/// with the input token index and character offset the `$` took (when it was in this part).
fn search(
    pattern: &[String],
    capture: usize,
    input: &[&str],
    mut ii: usize,
    mut pi: usize,
    mut ci: usize,
) -> Option<Option<(usize, usize)>> {
    let mut found = None;
    while ii < input.len() && pi < pattern.len() {
        if pi == capture {
            found = Some((ii, ci));
        } else {
            let expected = pattern[pi].as_str();
            if expected == "**" {
                if pi == pattern.len() - 1 {
                    return Some(found);
                }
                // The rest of the pattern must match some suffix of the input.
                pi += 1;
                while ii < input.len() {
                    if let Some(inner) = search(pattern, capture, input, ii, pi, ci) {
                        return Some(found.or(inner));
                    }
                    ci += input[ii].len() + 1;
                    ii += 1;
                }
                return None;
            }
            if expected != "*" && expected != input[ii] {
                return None;
            }
            ci += input[ii].len() + 1;
        }
        ii += 1;
        pi += 1;
    }
    (pi == pattern.len() && ii == input.len()).then_some(found)
}

#[cfg(test)]
mod tests;
