//! `RouteConfiguration` compiled into a route table: virtual hosts indexed by Envoy's domain
//! precedence, routes with compiled matchers, and actions ready to run.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use super::retry_policy::RetryPolicy;
use http::{HeaderMap, StatusCode};
use petrel_filters::http_filter::PerFilterConfigs;
use petrel_filters::matcher::{FullRegex, HeaderMatch, StringMatcher};
use xds_client::pb::envoy::config::route::v3 as pb;
use xds_client::pb::envoy::r#type::v3::fractional_percent::DenominatorType;

use super::uri_template::UriTemplate;
use crate::config::{duration, invalid, reject_unhandled, ConfigError};
use petrel_filters::header_formatter::HeaderMutations;

/// Compiles and takes out a message's `request_headers_to_add/_remove` and
/// `response_headers_to_add/_remove` (every route level has the four fields).
macro_rules! take_header_mutations {
    ($msg:ident, $path:expr) => {
        (
            HeaderMutations::compile(
                &std::mem::take(&mut $msg.request_headers_to_add),
                &std::mem::take(&mut $msg.request_headers_to_remove),
                &format!("{}.request_headers", $path),
            )?,
            HeaderMutations::compile(
                &std::mem::take(&mut $msg.response_headers_to_add),
                &std::mem::take(&mut $msg.response_headers_to_remove),
                &format!("{}.response_headers", $path),
            )?,
        )
    };
}

#[derive(Debug)]
pub struct RouteTable {
    pub name: String,
    vhosts: Vec<VirtualHost>,
    exact: HashMap<String, usize>,
    /// Wildcard suffixes (`*.foo.com`, `*-bar.com`) by length of the literal part, longest first.
    suffix: BTreeMap<std::cmp::Reverse<usize>, HashMap<String, usize>>,
    /// Wildcard prefixes (`foo.*`) by length, longest first.
    prefix: BTreeMap<std::cmp::Reverse<usize>, HashMap<String, usize>>,
    default: Option<usize>,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
    pub internal_only_headers: Vec<http::HeaderName>,
    pub most_specific_header_mutations_wins: bool,
    ignore_port_in_host_matching: bool,
    /// Whether some virtual host has `require_tls` (so requests look it up before routing).
    pub any_require_tls: bool,
}

#[derive(Debug)]
pub struct VirtualHost {
    pub name: String,
    pub routes: Vec<Route>,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
    pub require_tls: RequireTls,
    /// `include_request_attempt_count`: `x-envoy-attempt-count` on upstream requests.
    pub attempt_count_in_request: bool,
    /// `include_attempt_count_in_response`: `x-envoy-attempt-count` on upstream responses.
    pub attempt_count_in_response: bool,
    /// The virtual host's `retry_policy`, for routes without their own.
    pub retry_policy: Option<Arc<RetryPolicy>>,
    /// `per_request_buffer_limit_bytes`: how much request body is kept for retries.
    pub buffer_limit: Option<u32>,
    /// `typed_per_filter_config`, for routes without their own entry.
    pub per_filter: PerFilterConfigs,
    /// `request_mirror_policies`, for routes without their own.
    pub mirrors: Vec<MirrorPolicy>,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RequireTls {
    None,
    ExternalOnly,
    All,
}

#[derive(Debug)]
pub struct Route {
    pub name: String,
    matcher: RouteMatcher,
    pub action: RouteAction,
    /// `per_request_buffer_limit_bytes`, over the virtual host's.
    pub buffer_limit: Option<u32>,
    /// `typed_per_filter_config`: filter settings for this route, by filter name.
    pub per_filter: PerFilterConfigs,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
    /// `decorator`: names the stream's span.
    pub decorator: Option<crate::observe::tracing::Decorator>,
    /// `tracing`: sampling and tags over the connection manager's.
    pub tracing: Option<crate::observe::tracing::RouteTracing>,
}

#[derive(Debug)]
enum PathMatch {
    Prefix(String),
    Exact(String),
    Regex(FullRegex),
    SeparatedPrefix(String),
    Template(UriTemplate),
}

#[derive(Debug)]
struct RouteMatcher {
    path: PathMatch,
    case_sensitive: bool,
    headers: Vec<HeaderMatch>,
    query: Vec<(String, Option<StringMatcher>)>,
    grpc: bool,
    /// Percentage out of 1,000,000 (Envoy's runtime_fraction default value).
    runtime_fraction: Option<u64>,
}

#[derive(Debug)]
pub enum RouteAction {
    Forward(Box<ForwardAction>),
    Redirect(Box<RedirectAction>),
    Direct {
        status: StatusCode,
        body: Option<bytes::Bytes>,
    },
}

#[derive(Debug)]
pub enum ClusterChoice {
    Named(Arc<str>),
    Header(http::HeaderName),
    Weighted(WeightedClusters),
}

#[derive(Debug)]
pub struct WeightedClusters {
    pub clusters: Vec<WeightedCluster>,
    /// Cumulative upper bounds, for a binary search on a random draw.
    cumulative: Vec<u64>,
    total: u64,
}

#[derive(Debug)]
pub struct WeightedCluster {
    pub name: Arc<str>,
    pub request_headers: HeaderMutations,
    pub response_headers: HeaderMutations,
    pub host_rewrite_literal: Option<http::HeaderValue>,
}

impl WeightedClusters {
    /// Picks by a draw in `[0, total)`.
    pub fn pick(&self, draw: u64) -> &WeightedCluster {
        let d = draw % self.total.max(1);
        let i = self.cumulative.partition_point(|&c| c <= d);
        &self.clusters[i.min(self.clusters.len() - 1)]
    }
    pub fn total(&self) -> u64 {
        self.total
    }
}

#[derive(Debug)]
pub enum HostRewrite {
    Literal(http::HeaderValue),
    Auto,
    Header(http::HeaderName),
}

#[derive(Debug)]
pub struct ForwardAction {
    pub cluster: ClusterChoice,
    pub cluster_not_found_response_code: StatusCode,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(regex::Regex, String)>,
    pub host_rewrite: Option<HostRewrite>,
    /// `None` means no timeout (`0s`).
    pub timeout: Option<Duration>,
    /// `retry_policy`: replaces the virtual host's entirely, as in Envoy.
    pub retry_policy: Option<Arc<RetryPolicy>>,
    /// `max_grpc_timeout`: when set, a gRPC request's `grpc-timeout` is its timeout, capped by
    /// this (zero: no cap).
    pub max_grpc_timeout: Option<Duration>,
    /// `grpc_timeout_offset`, taken off the `grpc-timeout` value.
    pub grpc_timeout_offset: Option<Duration>,
    /// `request_mirror_policies`: requests copied to other clusters, answers dropped.
    pub mirrors: Vec<MirrorPolicy>,
    /// `hash_policy`: what RING_HASH and MAGLEV clusters balance on.
    pub hash_policy: Option<super::hash_policy::HashPolicy>,
    /// `max_stream_duration`: when set, Envoy's "new timeouts" (see `timeouts`).
    pub stream_duration: Option<super::timeouts::StreamDuration>,
    /// `idle_timeout`: replaces the connection manager's `stream_idle_timeout` for the
    /// route (`Some(None)`: zero, no idle timeout at all).
    pub idle_timeout: Option<Option<Duration>>,
}

/// One `request_mirror_policies` entry.
#[derive(Debug)]
pub struct MirrorPolicy {
    pub cluster: MirrorCluster,
    /// `runtime_fraction.default_value`, per million.
    pub per_million: u64,
    /// Envoy appends `-shadow` to the host unless `disable_shadow_host_suffix_append`.
    pub host_suffix: bool,
    /// `host_rewrite_literal`: the mirror's host, instead of the request's.
    pub host_rewrite: Option<http::HeaderValue>,
}

#[derive(Debug)]
pub enum MirrorCluster {
    Named(Arc<str>),
    Header(http::HeaderName),
}

/// Compiles `request_mirror_policies`; with `known`, each named cluster must exist (Envoy's
/// `route: unknown shadow cluster`).
fn compile_mirrors(
    list: &[pb::route_action::RequestMirrorPolicy],
    path: &str,
    known: Option<&HashSet<String>>,
) -> Result<Vec<MirrorPolicy>, ConfigError> {
    let mut out = Vec::new();
    for (i, m) in list.iter().enumerate() {
        let mp = format!("{path}.request_mirror_policies[{i}]");
        let mut rest = m.clone();
        let cluster = match (
            std::mem::take(&mut rest.cluster),
            std::mem::take(&mut rest.cluster_header),
        ) {
            (c, h) if !c.is_empty() && h.is_empty() => {
                if known.is_some_and(|k| !k.contains(&c)) {
                    return Err(invalid(
                        format!("{mp}.cluster"),
                        format!("route: unknown shadow cluster '{c}'"),
                    ));
                }
                MirrorCluster::Named(c.into())
            }
            (c, h) if c.is_empty() && !h.is_empty() => MirrorCluster::Header(
                http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes())
                    .map_err(|_| invalid(format!("{mp}.cluster_header"), "invalid header name"))?,
            ),
            _ => {
                return Err(invalid(
                    &mp,
                    "Exactly one of cluster or cluster_header in request mirror policy need to be specified",
                ))
            }
        };
        let per_million = match rest.runtime_fraction.take() {
            None => 1_000_000,
            Some(rf) => {
                if !rf.runtime_key.is_empty() {
                    return Err(ConfigError::Unsupported {
                        path: format!("{mp}.runtime_fraction"),
                        fields: "'runtime_key'".into(),
                    });
                }
                let d = rf.default_value.unwrap_or_default();
                fraction_per_million(
                    d.numerator,
                    d.denominator,
                    &format!("{mp}.runtime_fraction"),
                )?
            }
        };
        // Whether a mirror's trace is sampled matters only with tracing (issue #7), which
        // Petrel refuses at the connection manager, so there is no trace to sample.
        rest.trace_sampled = None;
        let host_suffix = !std::mem::take(&mut rest.disable_shadow_host_suffix_append);
        let host_rewrite = match std::mem::take(&mut rest.host_rewrite_literal) {
            h if h.is_empty() => None,
            h => Some(http::HeaderValue::from_str(&h).map_err(|_| {
                invalid(format!("{mp}.host_rewrite_literal"), "invalid header value")
            })?),
        };
        reject_unhandled(&rest, &mp)?;
        out.push(MirrorPolicy {
            cluster,
            per_million,
            host_suffix,
            host_rewrite,
        });
    }
    Ok(out)
}

#[derive(Debug)]
pub struct RedirectAction {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u32>,
    pub path: Option<String>,
    pub prefix_rewrite: Option<String>,
    pub regex_rewrite: Option<(regex::Regex, String)>,
    pub strip_query: bool,
    pub status: StatusCode,
}

/// What a request offers to route matching.
pub struct RouteInput<'a> {
    pub host: &'a str,
    /// `:path` with the query string.
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub method: &'a http::Method,
    pub scheme: &'a str,
    /// A uniform draw in `[0, 1_000_000)` for `runtime_fraction`.
    pub draw: u64,
}

impl RouteTable {
    /// Finds the virtual host for a `Host`/`:authority`, by Envoy's precedence.
    pub fn virtual_host(&self, host: &str) -> Option<&VirtualHost> {
        let mut host = host.to_ascii_lowercase();
        if self.ignore_port_in_host_matching {
            if let Some(i) = host.rfind(':') {
                if !host.ends_with(']') && host[i + 1..].bytes().all(|b| b.is_ascii_digit()) {
                    host.truncate(i);
                }
            }
        }
        if let Some(&i) = self.exact.get(&host) {
            return Some(&self.vhosts[i]);
        }
        for (len, m) in &self.suffix {
            // The wildcard must stand for at least one character.
            if host.len() > len.0 {
                if let Some(&i) = m.get(&host[host.len() - len.0..]) {
                    return Some(&self.vhosts[i]);
                }
            }
        }
        for (len, m) in &self.prefix {
            if host.len() > len.0 {
                if let Some(&i) = m.get(&host[..len.0]) {
                    return Some(&self.vhosts[i]);
                }
            }
        }
        self.default.map(|i| &self.vhosts[i])
    }

    pub fn route(&self, input: &RouteInput<'_>) -> Option<(&VirtualHost, &Route)> {
        let vh = self.virtual_host(input.host)?;
        let (path_only, query) = match input.path.split_once('?') {
            Some((p, q)) => (p, Some(q)),
            None => (input.path, None),
        };
        let path_only = path_only.split('#').next().unwrap_or(path_only);
        vh.routes
            .iter()
            .find(|r| r.matcher.matches(path_only, query, input))
            .map(|r| (vh, r))
    }
}

impl RouteMatcher {
    fn matches(&self, path: &str, query: Option<&str>, input: &RouteInput<'_>) -> bool {
        let path_ok = match &self.path {
            PathMatch::Prefix(p) => {
                if self.case_sensitive {
                    path.starts_with(p.as_str())
                } else {
                    path.len() >= p.len()
                        && path.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
                }
            }
            PathMatch::Exact(p) => {
                if self.case_sensitive {
                    path == p
                } else {
                    path.eq_ignore_ascii_case(p)
                }
            }
            PathMatch::SeparatedPrefix(p) => {
                let head_ok = path.len() >= p.len()
                    && if self.case_sensitive {
                        path.starts_with(p.as_str())
                    } else {
                        path.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
                    };
                head_ok && (path.len() == p.len() || path.as_bytes()[p.len()] == b'/')
            }
            PathMatch::Regex(r) => r.is_match(path),
            PathMatch::Template(t) => t.matches(path),
        };
        if !path_ok {
            return false;
        }
        if let Some(frac) = self.runtime_fraction {
            if input.draw >= frac {
                return false;
            }
        }
        if self.grpc && !crate::http::local_reply::is_grpc(input.headers) {
            return false;
        }
        for h in &self.headers {
            if !h.matches(header_value(h.name.as_str(), input).as_deref()) {
                return false;
            }
        }
        for (name, m) in &self.query {
            let value = query.and_then(|q| {
                q.split('&').find_map(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    (k == name).then_some(v)
                })
            });
            let ok = match (m, value) {
                (None, v) => v.is_some(),
                (Some(_), None) => false,
                (Some(m), Some(v)) => m.matches(v),
            };
            if !ok {
                return false;
            }
        }
        true
    }
}

/// A header's value for matching: pseudo-headers from the request line, others joined with `,`.
fn header_value(name: &str, input: &RouteInput<'_>) -> Option<String> {
    match name {
        ":path" => Some(input.path.to_string()),
        ":method" => Some(input.method.as_str().to_string()),
        ":authority" => Some(input.host.to_string()),
        ":scheme" => Some(input.scheme.to_string()),
        _ => petrel_filters::matcher::joined_header(input.headers, name),
    }
}

/// Compile options that depend on where the route config came from.
pub struct CompileOptions<'a> {
    /// Cluster names known now, when the config asks for validation.
    pub known_clusters: Option<&'a HashSet<String>>,
    /// From RDS: `validate_clusters` defaults to false (true for inline route configs).
    pub from_rds: bool,
}

pub fn compile(
    rc: &pb::RouteConfiguration,
    opts: &CompileOptions<'_>,
) -> Result<RouteTable, ConfigError> {
    let mut rest = rc.clone();
    let name = std::mem::take(&mut rest.name);
    let vhosts_pb = std::mem::take(&mut rest.virtual_hosts);
    let (request_headers, response_headers) = take_header_mutations!(rest, "route_config");
    let internal_only_headers = std::mem::take(&mut rest.internal_only_headers)
        .iter()
        .map(|h| {
            http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                invalid(
                    "route_config.internal_only_headers",
                    format!("invalid header name '{h}'"),
                )
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let most_specific = std::mem::take(&mut rest.most_specific_header_mutations_wins);
    // Envoy's default limit on a direct response body is 4 KiB.
    let max_body = rest
        .max_direct_response_body_size_bytes
        .take()
        .map_or(4096, |v| v.value as usize);
    let validate = rest.validate_clusters.take().map(|b| b.value);
    let ignore_port = std::mem::take(&mut rest.ignore_port_in_host_matching);
    reject_unhandled(&rest, "route_config")?;

    // Static route configs validate clusters by default; RDS ones do not (Envoy's rule).
    let known = match validate {
        Some(false) => None,
        None if opts.from_rds => None,
        _ => opts.known_clusters,
    };

    let mut table = RouteTable {
        name,
        vhosts: Vec::new(),
        exact: HashMap::new(),
        suffix: BTreeMap::new(),
        prefix: BTreeMap::new(),
        default: None,
        request_headers,
        response_headers,
        internal_only_headers,
        most_specific_header_mutations_wins: most_specific,
        ignore_port_in_host_matching: ignore_port,
        any_require_tls: false,
    };
    let mut seen_domains = HashSet::new();
    for (vi, vh) in vhosts_pb.iter().enumerate() {
        let path = format!("route_config.virtual_hosts[{vi}]");
        let idx = table.vhosts.len();
        let compiled = compile_vhost(vh, &path, known)?;
        table.any_require_tls |= compiled.require_tls != RequireTls::None;
        table.vhosts.push(compiled);
        if vh.domains.is_empty() {
            return Err(invalid(
                format!("{path}.domains"),
                "value must contain at least 1 item(s)",
            ));
        }
        for d in &vh.domains {
            let d = d.to_ascii_lowercase();
            if !seen_domains.insert(d.clone()) {
                return Err(invalid(
                    format!("{path}.domains"),
                    format!("Only unique values for domains are permitted. Duplicate entry of domain {d} in route {}", table.name),
                ));
            }
            if d == "*" {
                table.default = Some(idx);
            } else if let Some(s) = d.strip_prefix('*') {
                table
                    .suffix
                    .entry(std::cmp::Reverse(s.len()))
                    .or_default()
                    .insert(s.to_string(), idx);
            } else if let Some(p) = d.strip_suffix('*') {
                table
                    .prefix
                    .entry(std::cmp::Reverse(p.len()))
                    .or_default()
                    .insert(p.to_string(), idx);
            } else {
                table.exact.insert(d, idx);
            }
        }
    }
    for (i, vh) in table.vhosts.iter().enumerate() {
        for (j, r) in vh.routes.iter().enumerate() {
            if let RouteAction::Direct { body: Some(b), .. } = &r.action {
                if b.len() > max_body {
                    return Err(invalid(
                        format!("route_config.virtual_hosts[{i}].routes[{j}].direct_response.body"),
                        format!(
                            "response body size is {} bytes; maximum is {max_body}",
                            b.len()
                        ),
                    ));
                }
            }
        }
    }
    Ok(table)
}

fn compile_vhost(
    vh: &pb::VirtualHost,
    path: &str,
    known: Option<&HashSet<String>>,
) -> Result<VirtualHost, ConfigError> {
    let mut rest = vh.clone();
    let name = std::mem::take(&mut rest.name);
    rest.domains.clear();
    let routes_pb = std::mem::take(&mut rest.routes);
    let require_tls = match std::mem::take(&mut rest.require_tls) {
        0 => RequireTls::None,
        1 => RequireTls::ExternalOnly,
        2 => RequireTls::All,
        _ => return Err(invalid(format!("{path}.require_tls"), "unknown enum value")),
    };
    let (request_headers, response_headers) = take_header_mutations!(rest, path);
    let attempt_count_in_request = std::mem::take(&mut rest.include_request_attempt_count);
    let attempt_count_in_response = std::mem::take(&mut rest.include_attempt_count_in_response);
    let retry_policy = RetryPolicy::compile_optional(rest.retry_policy.take(), path)?;
    let buffer_limit = rest.per_request_buffer_limit_bytes.take().map(|v| v.value);
    let per_filter = per_filter_configs(&std::mem::take(&mut rest.typed_per_filter_config), path)?;
    let mirrors = compile_mirrors(
        &std::mem::take(&mut rest.request_mirror_policies),
        path,
        known,
    )?;
    reject_unhandled(&rest, path)?;
    let routes = routes_pb
        .iter()
        .enumerate()
        .map(|(i, r)| compile_route(r, &format!("{path}.routes[{i}]"), known))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(VirtualHost {
        name,
        routes,
        request_headers,
        response_headers,
        require_tls,
        attempt_count_in_request,
        attempt_count_in_response,
        retry_policy,
        buffer_limit,
        per_filter,
        mirrors,
    })
}

fn compile_route(
    r: &pb::Route,
    path: &str,
    known: Option<&HashSet<String>>,
) -> Result<Route, ConfigError> {
    let mut rest = r.clone();
    let name = std::mem::take(&mut rest.name);
    let m = rest
        .r#match
        .take()
        .ok_or_else(|| invalid(format!("{path}.match"), "value is required"))?;
    let action_pb = rest
        .action
        .take()
        .ok_or_else(|| invalid(path, "action is required"))?;
    // Route metadata is data for filters and loggers, never behaviour by itself.
    rest.metadata = None;
    let decorator = rest
        .decorator
        .take()
        .map(|d| crate::observe::tracing::compile_decorator(&d, &format!("{path}.decorator")))
        .transpose()?;
    let tracing = rest
        .tracing
        .take()
        .map(|t| crate::observe::tracing::compile_route(&t, &format!("{path}.tracing")))
        .transpose()?;
    let (request_headers, response_headers) = take_header_mutations!(rest, path);
    let buffer_limit = rest.per_request_buffer_limit_bytes.take().map(|v| v.value);
    let per_filter = per_filter_configs(&std::mem::take(&mut rest.typed_per_filter_config), path)?;
    reject_unhandled(&rest, path)?;
    let matcher = compile_match(&m, &format!("{path}.match"))?;
    let action = match action_pb {
        pb::route::Action::Route(ra) => RouteAction::Forward(Box::new(compile_forward(
            &ra,
            &format!("{path}.route"),
            known,
        )?)),
        pb::route::Action::DirectResponse(d) => {
            compile_direct(&d, &format!("{path}.direct_response"))?
        }
        pb::route::Action::Redirect(rd) => RouteAction::Redirect(Box::new(compile_redirect(
            &rd,
            &format!("{path}.redirect"),
        )?)),
        pb::route::Action::FilterAction(_) => {
            return Err(ConfigError::Unsupported {
                path: path.into(),
                fields: "'filter_action'".into(),
            })
        }
        pb::route::Action::NonForwardingAction(_) => {
            return Err(ConfigError::Unsupported {
                path: path.into(),
                fields: "'non_forwarding_action'".into(),
            })
        }
    };
    Ok(Route {
        name,
        matcher,
        action,
        buffer_limit,
        per_filter,
        request_headers,
        response_headers,
        decorator,
        tracing,
    })
}

/// `typed_per_filter_config`: each entry compiled by the filter that takes its type, or
/// refused with the extension table's reason.
fn per_filter_configs(
    configs: &HashMap<String, xds_client::pb::google::protobuf::Any>,
    path: &str,
) -> Result<PerFilterConfigs, ConfigError> {
    let mut out = Vec::new();
    for (name, any) in configs {
        let p = format!("{path}.typed_per_filter_config['{name}']");
        // RBAC lives with the proxy (its engine needs the connection's TLS facts).
        if xds_client::TypeRegistry::effective_type_url(any)
            == crate::rbac::http::PER_ROUTE_TYPE_URL
        {
            out.push((name.clone(), crate::rbac::http::per_route(any, &p)?));
            continue;
        }
        match petrel_filters::http::per_route(any, &p) {
            Some(c) => out.push((name.clone(), c?)),
            None => {
                let url = xds_client::TypeRegistry::effective_type_url(any);
                return Err(ConfigError::UnsupportedExtension {
                    path: p,
                    why: petrel_filters::extensions::refusal(&url),
                    type_url: url,
                });
            }
        }
    }
    Ok(PerFilterConfigs::new(out))
}

fn fraction_per_million(n: u32, denom: i32, path: &str) -> Result<u64, ConfigError> {
    let scale = match DenominatorType::try_from(denom) {
        Ok(DenominatorType::Hundred) => 10_000,
        Ok(DenominatorType::TenThousand) => 100,
        Ok(DenominatorType::Million) => 1,
        Err(_) => return Err(invalid(path, "unknown denominator")),
    };
    Ok((n as u64 * scale).min(1_000_000))
}

fn compile_match(m: &pb::RouteMatch, path: &str) -> Result<RouteMatcher, ConfigError> {
    let mut rest = m.clone();
    let case_sensitive = rest.case_sensitive.take().map(|b| b.value).unwrap_or(true);
    let spec = rest
        .path_specifier
        .take()
        .ok_or_else(|| invalid(path, "path_specifier is required"))?;
    let path_match = match spec {
        pb::route_match::PathSpecifier::Prefix(p) => PathMatch::Prefix(p),
        pb::route_match::PathSpecifier::Path(p) => PathMatch::Exact(p),
        pb::route_match::PathSpecifier::SafeRegex(r) => {
            PathMatch::Regex(FullRegex::from_proto(&r, &format!("{path}.safe_regex"))?)
        }
        pb::route_match::PathSpecifier::PathSeparatedPrefix(p) => {
            if p.contains(['?', '#']) || (p.len() > 1 && p.ends_with('/')) {
                return Err(invalid(
                    format!("{path}.path_separated_prefix"),
                    "value does not match regex pattern \"^[^?#]+[^?#/]$\"",
                ));
            }
            PathMatch::SeparatedPrefix(p)
        }
        pb::route_match::PathSpecifier::PathMatchPolicy(ext) => {
            let p = format!("{path}.path_match_policy");
            let any = ext
                .typed_config
                .ok_or_else(|| invalid(&p, "typed_config is required"))?;
            let cfg: xds_client::pb::envoy::extensions::path::r#match::uri_template::v3::UriTemplateMatchConfig =
                xds_client::TypeRegistry::global().unpack(&any).map_err(|e| invalid(&p, e.to_string()))?;
            PathMatch::Template(UriTemplate::compile(&cfg.path_template, &p)?)
        }
        pb::route_match::PathSpecifier::ConnectMatcher(_) => {
            return Err(ConfigError::Unsupported {
                path: path.into(),
                fields: "'connect_matcher'".into(),
            })
        }
    };
    let headers = std::mem::take(&mut rest.headers)
        .iter()
        .enumerate()
        .map(|(i, h)| {
            HeaderMatch::from_proto(h, &format!("{path}.headers[{i}]")).map_err(ConfigError::from)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let mut query = Vec::new();
    for (i, q) in std::mem::take(&mut rest.query_parameters)
        .iter()
        .enumerate()
    {
        let qp = format!("{path}.query_parameters[{i}]");
        use pb::query_parameter_matcher::QueryParameterMatchSpecifier as Q;
        let m = match &q.query_parameter_match_specifier {
            Some(Q::StringMatch(s)) => {
                Some(StringMatcher::from_proto(s, &format!("{qp}.string_match"))?)
            }
            Some(Q::PresentMatch(true)) | None => None,
            Some(Q::PresentMatch(false)) => {
                return Err(invalid(
                    format!("{qp}.present_match"),
                    "present_match: false is not supported by Petrel",
                ))
            }
        };
        query.push((q.name.clone(), m));
    }
    let grpc = match rest.grpc.take() {
        Some(g) => {
            reject_unhandled(&g, &format!("{path}.grpc"))?;
            true
        }
        None => false,
    };
    let runtime_fraction = match rest.runtime_fraction.take() {
        Some(rf) => {
            // Petrel has no runtime layer yet, so the default value is the value; a runtime key
            // that could override it is accepted as Envoy does when the key is absent.
            let d = rf.default_value.ok_or_else(|| {
                invalid(
                    format!("{path}.runtime_fraction.default_value"),
                    "value is required",
                )
            })?;
            Some(fraction_per_million(
                d.numerator,
                d.denominator,
                &format!("{path}.runtime_fraction"),
            )?)
        }
        None => None,
    };
    reject_unhandled(&rest, path)?;
    Ok(RouteMatcher {
        path: path_match,
        case_sensitive,
        headers,
        query,
        grpc,
        runtime_fraction,
    })
}

pub(super) fn compile_regex_rewrite(
    r: &xds_client::pb::envoy::r#type::matcher::v3::RegexMatchAndSubstitute,
    path: &str,
) -> Result<(regex::Regex, String), ConfigError> {
    let pat = r
        .pattern
        .as_ref()
        .ok_or_else(|| invalid(format!("{path}.pattern"), "value is required"))?;
    let re = regex::Regex::new(&pat.regex).map_err(|e| {
        invalid(
            format!("{path}.pattern.regex"),
            format!("invalid regex '{}': {e}", pat.regex),
        )
    })?;
    // RE2 writes group references as \1; the regex crate as ${1}.
    let sub = Regex2Sub::convert(&r.substitution);
    Ok((re, sub))
}

struct Regex2Sub;
impl Regex2Sub {
    fn convert(s: &str) -> String {
        let mut out = String::with_capacity(s.len());
        let mut chars = s.chars().peekable();
        while let Some(c) = chars.next() {
            match c {
                '\\' => match chars.peek() {
                    Some(d) if d.is_ascii_digit() => {
                        out.push_str(&format!("${{{d}}}"));
                        chars.next();
                    }
                    Some('\\') => {
                        out.push('\\');
                        chars.next();
                    }
                    _ => out.push('\\'),
                },
                '$' => out.push_str("$$"),
                c => out.push(c),
            }
        }
        out
    }
}

fn compile_forward(
    ra: &pb::RouteAction,
    path: &str,
    known: Option<&HashSet<String>>,
) -> Result<ForwardAction, ConfigError> {
    let mut rest = ra.clone();
    let check = |name: &str, p: &str| -> Result<(), ConfigError> {
        if let Some(k) = known {
            if !k.contains(name) {
                return Err(invalid(p, format!("route: unknown cluster '{name}'")));
            }
        }
        Ok(())
    };
    let cluster = match rest.cluster_specifier.take() {
        Some(pb::route_action::ClusterSpecifier::Cluster(c)) => {
            if c.is_empty() {
                return Err(invalid(
                    format!("{path}.cluster"),
                    "value length must be at least 1 characters",
                ));
            }
            check(&c, &format!("{path}.cluster"))?;
            ClusterChoice::Named(c.into())
        }
        Some(pb::route_action::ClusterSpecifier::ClusterHeader(h)) => ClusterChoice::Header(
            http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                invalid(
                    format!("{path}.cluster_header"),
                    format!("invalid header name '{h}'"),
                )
            })?,
        ),
        Some(pb::route_action::ClusterSpecifier::WeightedClusters(w)) => {
            let wp = format!("{path}.weighted_clusters");
            let mut wrest = w.clone();
            let cl = std::mem::take(&mut wrest.clusters);
            // total_weight is deprecated; Envoy 1.40 sums the weights.
            wrest.total_weight = None;
            reject_unhandled(&wrest, &wp)?;
            if cl.is_empty() {
                return Err(invalid(
                    format!("{wp}.clusters"),
                    "value must contain at least 1 item(s)",
                ));
            }
            let mut clusters = Vec::new();
            let mut cumulative = Vec::new();
            let mut total = 0u64;
            for (i, c) in cl.iter().enumerate() {
                let cp = format!("{wp}.clusters[{i}]");
                let mut crest = c.clone();
                let name = std::mem::take(&mut crest.name);
                if name.is_empty() {
                    return Err(ConfigError::Unsupported {
                        path: cp,
                        fields: "'cluster_header' (or empty name)".into(),
                    });
                }
                check(&name, &format!("{cp}.name"))?;
                let weight = crest.weight.take().map(|w| w.value).unwrap_or(0);
                let (request_headers, response_headers) = take_header_mutations!(crest, cp);
                let host_rewrite_literal = match crest.host_rewrite_specifier.take() {
                    Some(pb::weighted_cluster::cluster_weight::HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(
                        http::HeaderValue::from_str(&h).map_err(|_| invalid(format!("{cp}.host_rewrite_literal"), "invalid header value"))?,
                    ),
                    None => None,
                };
                reject_unhandled(&crest, &cp)?;
                total += weight as u64;
                cumulative.push(total);
                clusters.push(WeightedCluster {
                    name: name.into(),
                    request_headers,
                    response_headers,
                    host_rewrite_literal,
                });
            }
            if total == 0 {
                return Err(invalid(
                    &wp,
                    "Sum of weights in the weighted_cluster must be greater than 0.",
                ));
            }
            ClusterChoice::Weighted(WeightedClusters {
                clusters,
                cumulative,
                total,
            })
        }
        Some(_) => {
            return Err(ConfigError::Unsupported {
                path: path.into(),
                fields: "'cluster_specifier_plugin'".into(),
            })
        }
        None => return Err(invalid(path, "cluster_specifier is required")),
    };
    let cnf = match std::mem::take(&mut rest.cluster_not_found_response_code) {
        0 => StatusCode::SERVICE_UNAVAILABLE,
        1 => StatusCode::NOT_FOUND,
        2 => StatusCode::INTERNAL_SERVER_ERROR,
        _ => {
            return Err(invalid(
                format!("{path}.cluster_not_found_response_code"),
                "unknown enum value",
            ))
        }
    };
    let prefix_rewrite = Some(std::mem::take(&mut rest.prefix_rewrite)).filter(|s| !s.is_empty());
    let regex_rewrite = match rest.regex_rewrite.take() {
        Some(r) => Some(compile_regex_rewrite(&r, &format!("{path}.regex_rewrite"))?),
        None => None,
    };
    if prefix_rewrite.is_some() && regex_rewrite.is_some() {
        return Err(invalid(
            path,
            "Cannot specify both prefix_rewrite and regex_rewrite",
        ));
    }
    let host_rewrite = match rest.host_rewrite_specifier.take() {
        Some(pb::route_action::HostRewriteSpecifier::HostRewriteLiteral(h)) => Some(
            HostRewrite::Literal(http::HeaderValue::from_str(&h).map_err(|_| {
                invalid(
                    format!("{path}.host_rewrite_literal"),
                    "invalid header value",
                )
            })?),
        ),
        Some(pb::route_action::HostRewriteSpecifier::AutoHostRewrite(b)) => {
            b.value.then_some(HostRewrite::Auto)
        }
        Some(pb::route_action::HostRewriteSpecifier::HostRewriteHeader(h)) => {
            Some(HostRewrite::Header(
                http::HeaderName::from_bytes(h.to_ascii_lowercase().as_bytes()).map_err(|_| {
                    invalid(format!("{path}.host_rewrite_header"), "invalid header name")
                })?,
            ))
        }
        Some(_) => {
            return Err(ConfigError::Unsupported {
                path: path.into(),
                fields: "'host_rewrite_path_regex'".into(),
            })
        }
        None => None,
    };
    let timeout = match rest.timeout.take() {
        Some(d) => duration::optional_timeout(&Some(d), &format!("{path}.timeout"))?,
        None => Some(Duration::from_secs(15)),
    };
    let retry_policy = RetryPolicy::compile_optional(rest.retry_policy.take(), path)?;
    let max_grpc_timeout = duration::optional(
        &rest.max_grpc_timeout.take(),
        &format!("{path}.max_grpc_timeout"),
    )?;
    let grpc_timeout_offset = duration::optional(
        &rest.grpc_timeout_offset.take(),
        &format!("{path}.grpc_timeout_offset"),
    )?;
    let mirrors = compile_mirrors(
        &std::mem::take(&mut rest.request_mirror_policies),
        path,
        known,
    )?;
    let hash_policy =
        super::hash_policy::HashPolicy::compile(&std::mem::take(&mut rest.hash_policy), path)?;
    let idle_timeout =
        duration::optional(&rest.idle_timeout.take(), &format!("{path}.idle_timeout"))?
            .map(|d| (!d.is_zero()).then_some(d));
    let stream_duration = match rest.max_stream_duration.take() {
        Some(m) => {
            let mp = format!("{path}.max_stream_duration");
            let d = |v: &Option<_>, field: &str| duration::optional(v, &format!("{mp}.{field}"));
            Some(super::timeouts::StreamDuration {
                max: d(&m.max_stream_duration, "max_stream_duration")?,
                grpc_timeout_header_max: d(&m.grpc_timeout_header_max, "grpc_timeout_header_max")?,
                grpc_timeout_header_offset: d(
                    &m.grpc_timeout_header_offset,
                    "grpc_timeout_header_offset",
                )?,
            })
        }
        None => None,
    };
    reject_unhandled(&rest, path)?;
    Ok(ForwardAction {
        cluster,
        cluster_not_found_response_code: cnf,
        prefix_rewrite,
        regex_rewrite,
        host_rewrite,
        timeout,
        retry_policy,
        max_grpc_timeout,
        grpc_timeout_offset,
        mirrors,
        hash_policy,
        stream_duration,
        idle_timeout,
    })
}

fn compile_direct(d: &pb::DirectResponseAction, path: &str) -> Result<RouteAction, ConfigError> {
    let mut rest = d.clone();
    let status = StatusCode::from_u16(std::mem::take(&mut rest.status) as u16)
        .ok()
        .filter(|s| (200..600).contains(&s.as_u16()))
        .ok_or_else(|| {
            invalid(
                format!("{path}.status"),
                "value must be inside range [200, 600)",
            )
        })?;
    let body = match rest.body.take() {
        Some(ds) => Some(crate::config::bootstrap::data_source(
            &ds,
            &format!("{path}.body"),
        )?),
        None => None,
    };
    reject_unhandled(&rest, path)?;
    Ok(RouteAction::Direct { status, body })
}

fn compile_redirect(r: &pb::RedirectAction, path: &str) -> Result<RedirectAction, ConfigError> {
    let mut rest = r.clone();
    let scheme = match rest.scheme_rewrite_specifier.take() {
        Some(pb::redirect_action::SchemeRewriteSpecifier::HttpsRedirect(true)) => {
            Some("https".to_string())
        }
        Some(pb::redirect_action::SchemeRewriteSpecifier::HttpsRedirect(false)) => None,
        Some(pb::redirect_action::SchemeRewriteSpecifier::SchemeRedirect(s)) => {
            Some(s.to_ascii_lowercase())
        }
        None => None,
    };
    let (mut p, mut pre, mut rr) = (None, None, None);
    match rest.path_rewrite_specifier.take() {
        Some(pb::redirect_action::PathRewriteSpecifier::PathRedirect(x)) => p = Some(x),
        Some(pb::redirect_action::PathRewriteSpecifier::PrefixRewrite(x)) => pre = Some(x),
        Some(pb::redirect_action::PathRewriteSpecifier::RegexRewrite(x)) => {
            rr = Some(compile_regex_rewrite(&x, &format!("{path}.regex_rewrite"))?)
        }
        Some(_) => {
            return Err(ConfigError::Unsupported {
                path: path.into(),
                fields: "'path_rewrite'".into(),
            })
        }
        None => {}
    }
    let status = match std::mem::take(&mut rest.response_code) {
        0 => StatusCode::MOVED_PERMANENTLY,
        1 => StatusCode::FOUND,
        2 => StatusCode::SEE_OTHER,
        3 => StatusCode::TEMPORARY_REDIRECT,
        4 => StatusCode::PERMANENT_REDIRECT,
        _ => {
            return Err(invalid(
                format!("{path}.response_code"),
                "unknown enum value",
            ))
        }
    };
    let host = Some(std::mem::take(&mut rest.host_redirect)).filter(|s| !s.is_empty());
    let port = Some(std::mem::take(&mut rest.port_redirect)).filter(|p| *p != 0);
    let strip_query = std::mem::take(&mut rest.strip_query);
    reject_unhandled(&rest, path)?;
    Ok(RedirectAction {
        scheme,
        host,
        port,
        path: p,
        prefix_rewrite: pre,
        regex_rewrite: rr,
        strip_query,
        status,
    })
}

/// Applies a prefix or regex rewrite to a `:path` (query kept), as Envoy's router does.
impl Route {
    /// The cluster a forwarding route names (none for weighted or header-chosen clusters).
    /// The cluster a request goes to: the named one, or the weighted one `draw` picks.
    pub fn cluster_name(&self, draw: u64) -> Option<&str> {
        match &self.action {
            RouteAction::Forward(f) => match &f.cluster {
                ClusterChoice::Named(n) => Some(n),
                ClusterChoice::Weighted(w) => Some(&w.pick(draw).name),
                ClusterChoice::Header(_) => None,
            },
            _ => None,
        }
    }

    /// For a `cluster_header` route, the cluster the request's header names (read when the
    /// route is chosen, before the filters, as Envoy does; empty when absent).
    pub fn header_cluster(&self, headers: &http::HeaderMap) -> Option<String> {
        let RouteAction::Forward(f) = &self.action else {
            return None;
        };
        let ClusterChoice::Header(h) = &f.cluster else {
            return None;
        };
        Some(
            headers
                .get(h)
                .and_then(|v| v.to_str().ok())
                .unwrap_or("")
                .to_string(),
        )
    }
}

pub fn rewrite_path(
    path: &str,
    matched_prefix: Option<&str>,
    prefix_rewrite: Option<&str>,
    regex: Option<&(regex::Regex, String)>,
) -> Option<String> {
    let (p, q) = match path.find('?') {
        Some(i) => (&path[..i], &path[i..]),
        None => (path, ""),
    };
    if let (Some(pre), Some(rw)) = (matched_prefix, prefix_rewrite) {
        let tail = p.get(pre.len()..).unwrap_or("");
        return Some(format!("{rw}{tail}{q}"));
    }
    if let Some((re, sub)) = regex {
        return Some(format!("{}{q}", re.replace_all(p, sub.as_str())));
    }
    None
}

impl Route {
    /// The literal prefix a `prefix`/`path_separated_prefix` match consumed, for `prefix_rewrite`.
    pub fn matched_prefix(&self) -> Option<&str> {
        match &self.matcher.path {
            PathMatch::Prefix(p) | PathMatch::SeparatedPrefix(p) | PathMatch::Exact(p) => Some(p),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn table(v: serde_json::Value) -> Result<RouteTable, ConfigError> {
        let rc: pb::RouteConfiguration = xds_client::TypeRegistry::global().from_json(&v, false)?;
        compile(
            &rc,
            &CompileOptions {
                known_clusters: None,
                from_rds: false,
            },
        )
    }

    fn vh(name: &str, domains: &[&str]) -> serde_json::Value {
        json!({"name": name, "domains": domains, "routes": [{"match": {"prefix": "/"}, "direct_response": {"status": 200}}]})
    }

    #[test]
    fn domain_precedence() {
        let t = table(json!({"virtual_hosts": [
            vh("star", &["*"]),
            vh("prefix", &["foo.*"]),
            vh("longprefix", &["foo.bar.*"]),
            vh("suffix", &["*.com"]),
            vh("longsuffix", &["*.example.com"]),
            vh("exact", &["www.example.com"]),
        ]}))
        .unwrap();
        let n = |h: &str| t.virtual_host(h).map(|v| v.name.as_str()).unwrap_or("-");
        assert_eq!(n("www.example.com"), "exact");
        assert_eq!(n("WWW.Example.COM"), "exact");
        assert_eq!(n("a.example.com"), "longsuffix");
        assert_eq!(n("a.com"), "suffix");
        // Suffix beats prefix.
        assert_eq!(n("foo.bar.com"), "suffix");
        assert_eq!(n("foo.bar.net"), "longprefix");
        assert_eq!(n("foo.net"), "prefix");
        assert_eq!(n("other"), "star");
        // The wildcard must stand for at least one character.
        assert_eq!(n(".example.com"), "suffix");
    }

    #[test]
    fn duplicate_domains_rejected() {
        let e = table(json!({"name": "rc", "virtual_hosts": [vh("a", &["x"]), vh("b", &["X"])]}))
            .unwrap_err();
        assert!(
            e.to_string()
                .contains("Duplicate entry of domain x in route rc"),
            "{e}"
        );
    }

    fn input<'a>(path: &'a str, headers: &'a HeaderMap) -> RouteInput<'a> {
        RouteInput {
            host: "h",
            path,
            headers,
            method: &http::Method::GET,
            scheme: "http",
            draw: 0,
        }
    }

    fn first_route(t: &RouteTable, path: &str, headers: &HeaderMap) -> Option<String> {
        t.route(&input(path, headers)).map(|(_, r)| r.name.clone())
    }

    #[test]
    fn path_matches() {
        let t = table(json!({"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
            {"name": "exact", "match": {"path": "/exact"}, "direct_response": {"status": 200}},
            {"name": "ci", "match": {"prefix": "/CI", "case_sensitive": false}, "direct_response": {"status": 200}},
            {"name": "sep", "match": {"path_separated_prefix": "/sep"}, "direct_response": {"status": 200}},
            {"name": "re", "match": {"safe_regex": {"regex": "/re/[0-9]+"}}, "direct_response": {"status": 200}},
            {"name": "q", "match": {"prefix": "/q", "query_parameters": [{"name": "a", "string_match": {"exact": "1"}}, {"name": "b", "present_match": true}]}, "direct_response": {"status": 200}},
            {"name": "grpc", "match": {"prefix": "/g", "grpc": {}}, "direct_response": {"status": 200}},
            {"name": "hdr", "match": {"prefix": "/", "headers": [{"name": "x-v", "string_match": {"prefix": "v"}}]}, "direct_response": {"status": 200}},
        ]}]}))
        .unwrap();
        let none = HeaderMap::new();
        assert_eq!(
            first_route(&t, "/exact?x=1", &none).as_deref(),
            Some("exact")
        );
        assert_eq!(first_route(&t, "/exact/", &none), None);
        assert_eq!(first_route(&t, "/ci/x", &none).as_deref(), Some("ci"));
        assert_eq!(first_route(&t, "/sep", &none).as_deref(), Some("sep"));
        assert_eq!(first_route(&t, "/sep/a", &none).as_deref(), Some("sep"));
        assert_eq!(first_route(&t, "/sepa", &none), None);
        assert_eq!(first_route(&t, "/re/12", &none).as_deref(), Some("re"));
        assert_eq!(first_route(&t, "/re/12x", &none), None);
        assert_eq!(first_route(&t, "/q?b&a=1", &none).as_deref(), Some("q"));
        assert_eq!(first_route(&t, "/q?a=1", &none), None);
        let mut g = HeaderMap::new();
        g.insert("content-type", "application/grpc+proto".parse().unwrap());
        assert_eq!(first_route(&t, "/g", &g).as_deref(), Some("grpc"));
        assert_eq!(first_route(&t, "/g", &none), None);
        let mut h = HeaderMap::new();
        h.insert("x-v", "v2".parse().unwrap());
        assert_eq!(first_route(&t, "/anything", &h).as_deref(), Some("hdr"));
    }

    #[test]
    fn weighted_pick_is_cumulative() {
        let t = table(json!({"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"weighted_clusters": {"clusters": [
                {"name": "a", "weight": 1}, {"name": "b", "weight": 0}, {"name": "c", "weight": 3}]}}}]}]}))
        .unwrap();
        let RouteAction::Forward(f) = &t.vhosts[0].routes[0].action else {
            panic!()
        };
        let ClusterChoice::Weighted(w) = &f.cluster else {
            panic!()
        };
        assert_eq!(w.total(), 4);
        let names: Vec<_> = (0..4).map(|d| w.pick(d).name.to_string()).collect();
        assert_eq!(names, ["a", "c", "c", "c"]);
    }

    #[test]
    fn unsupported_fields_are_named() {
        let e = table(
            json!({"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": "a", "upgrade_configs": [{"upgrade_type": "CONNECT"}]}}]}]}),
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "route_config.virtual_hosts[0].routes[0].route: field(s) 'upgrade_configs' not supported by Petrel");
    }

    #[test]
    fn rewrites() {
        assert_eq!(
            rewrite_path("/api/v1?x", Some("/api"), Some("/new"), None).as_deref(),
            Some("/new/v1?x")
        );
        let re = compile_regex_rewrite(
            &xds_client::pb::envoy::r#type::matcher::v3::RegexMatchAndSubstitute {
                pattern: Some(xds_client::pb::envoy::r#type::matcher::v3::RegexMatcher {
                    regex: "^/svc/([^/]+)/(.*)$".into(),
                    ..Default::default()
                }),
                substitution: "/\\2/instance/\\1".into(),
            },
            "p",
        )
        .unwrap();
        assert_eq!(
            rewrite_path("/svc/a/b/c?q", None, None, Some(&re)).as_deref(),
            Some("/b/c/instance/a?q")
        );
    }

    #[test]
    fn known_clusters_validated() {
        let rc: pb::RouteConfiguration = xds_client::TypeRegistry::global()
            .from_json(&json!({"virtual_hosts": [{"name": "v", "domains": ["*"], "routes": [{"match": {"prefix": "/"}, "route": {"cluster": "nope"}}]}]}), false)
            .unwrap();
        let known = HashSet::from(["yes".to_string()]);
        let e = compile(
            &rc,
            &CompileOptions {
                known_clusters: Some(&known),
                from_rds: false,
            },
        )
        .unwrap_err();
        assert!(
            e.to_string().contains("route: unknown cluster 'nope'"),
            "{e}"
        );
    }
}
