//! Envoy's RBAC engine (`envoy.config.rbac.v3.RBAC`), shared by the HTTP filter
//! (`envoy.filters.http.rbac`) and the network filter (`envoy.filters.network.rbac`): policies of
//! permissions (what is asked) and principals (who asks), with `ALLOW`, `DENY` and `LOG`
//! actions. Istio compiles every AuthorizationPolicy into these.

pub mod http;
pub mod network;

use std::collections::BTreeMap;
use std::net::SocketAddr;

use ::http::HeaderMap;
use petrel_filters::matcher::{joined_header, Cidr, HeaderMatch, StringMatcher};
use xds_client::pb::envoy::config::rbac::v3::{
    permission, principal, rbac::Action as PbAction, Permission, Policy, Principal, Rbac,
};
use xds_client::pb::envoy::r#type::matcher::v3::{MetadataMatcher, PathMatcher};

use crate::config::{invalid, reject_unhandled, ConfigError};
use crate::router::uri_template::UriTemplate;

/// The peer's certificate names, for `authenticated` principals.
#[derive(Debug, Clone, Copy, Default)]
pub struct Peer<'a> {
    pub uri_sans: &'a [String],
    pub dns_sans: &'a [String],
    pub subject: &'a str,
}

/// What the engine looks at.
#[derive(Debug, Clone, Copy)]
pub struct Input<'a> {
    /// HTTP only: the request headers and the request line.
    pub headers: Option<&'a HeaderMap>,
    pub method: &'a str,
    /// With the query.
    pub path: &'a str,
    pub authority: &'a str,
    pub scheme: &'a str,
    pub direct_remote: SocketAddr,
    /// After `x-forwarded-for` processing.
    pub remote: SocketAddr,
    pub local: SocketAddr,
    pub requested_server_name: &'a str,
    /// The client certificate of an mTLS connection.
    pub peer: Option<Peer<'a>>,
    /// The connection's filter state.
    pub filter_state: &'a petrel_filters::filter_state::FilterState,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Action {
    Allow,
    Deny,
    Log,
}

#[derive(Debug)]
enum Perm {
    Any,
    And(Vec<Perm>),
    Or(Vec<Perm>),
    Not(Box<Perm>),
    Header(HeaderMatch),
    UrlPath(StringMatcher),
    UriTemplate(UriTemplate),
    DestinationIp(Cidr),
    DestinationPort(u32),
    DestinationPortRange(u32, u32),
    RequestedServerName(StringMatcher),
    /// Dynamic metadata: no filter Petrel runs writes any, so it is absent (a match only when
    /// inverted).
    Metadata {
        invert: bool,
    },
}

#[derive(Debug)]
enum Id {
    Any,
    And(Vec<Id>),
    Or(Vec<Id>),
    Not(Box<Id>),
    Authenticated(Option<StringMatcher>),
    DirectRemoteIp(Cidr),
    RemoteIp(Cidr),
    Header(HeaderMatch),
    UrlPath(StringMatcher),
    Metadata {
        invert: bool,
    },
    /// An object's string form (Istio's `io.istio.peer_principal`, set by `istio_authn`); an
    /// absent object does not match.
    FilterState {
        key: String,
        matcher: StringMatcher,
    },
}

#[derive(Debug)]
struct CompiledPolicy {
    name: &'static str,
    /// `rbac_access_denied_matched_policy[<name>]`, interned.
    details: &'static str,
    permissions: Vec<Perm>,
    principals: Vec<Id>,
}

/// A compiled `RBAC` (`rules` or `shadow_rules`).
#[derive(Debug)]
pub struct Engine {
    pub action: Action,
    /// In name order, as Envoy's map iterates them.
    policies: Vec<CompiledPolicy>,
}

/// What the engine decided, and the policy that decided it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    /// The policy that matched, if one did.
    pub policy: Option<&'static str>,
    /// `%RESPONSE_CODE_DETAILS%` of a denial: the matched policy, or `[none]`.
    pub details: &'static str,
}

/// Policy names live as long as the process: each distinct one is kept once (a bounded set,
/// so that local replies can carry `&'static str` details).
fn intern(s: String) -> &'static str {
    use std::collections::HashSet;
    use std::sync::{LazyLock, Mutex};
    static SEEN: LazyLock<Mutex<HashSet<&'static str>>> = LazyLock::new(Default::default);
    let mut seen = SEEN.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(k) = seen.get(s.as_str()) {
        return k;
    }
    let k: &'static str = Box::leak(s.into_boxed_str());
    seen.insert(k);
    k
}

fn err(e: petrel_filters::FilterConfigError) -> ConfigError {
    e.into()
}

fn path_matcher(p: &PathMatcher, path: &str) -> Result<StringMatcher, ConfigError> {
    use xds_client::pb::envoy::r#type::matcher::v3::path_matcher::Rule;
    match &p.rule {
        Some(Rule::Path(m)) => StringMatcher::from_proto(m, &format!("{path}.path")).map_err(err),
        None => Err(invalid(path, "rule is required")),
    }
}

fn metadata(m: &MetadataMatcher) -> bool {
    m.invert
}

fn cidr(
    c: &xds_client::pb::envoy::config::core::v3::CidrRange,
    path: &str,
) -> Result<Cidr, ConfigError> {
    Cidr::from_proto(c, path).map_err(err)
}

fn compile_perm(p: &Permission, path: &str) -> Result<Perm, ConfigError> {
    use permission::Rule as R;
    let list = |rules: &[Permission], kind: &str| -> Result<Vec<Perm>, ConfigError> {
        rules
            .iter()
            .enumerate()
            .map(|(i, r)| compile_perm(r, &format!("{path}.{kind}.rules[{i}]")))
            .collect()
    };
    Ok(match &p.rule {
        Some(R::Any(true)) => Perm::Any,
        Some(R::Any(false)) => return Err(invalid(format!("{path}.any"), "value must equal true")),
        Some(R::AndRules(s)) => Perm::And(list(&s.rules, "and_rules")?),
        Some(R::OrRules(s)) => Perm::Or(list(&s.rules, "or_rules")?),
        Some(R::NotRule(r)) => Perm::Not(Box::new(compile_perm(r, &format!("{path}.not_rule"))?)),
        Some(R::Header(h)) => {
            Perm::Header(HeaderMatch::from_proto(h, &format!("{path}.header")).map_err(err)?)
        }
        Some(R::UrlPath(u)) => Perm::UrlPath(path_matcher(u, &format!("{path}.url_path"))?),
        Some(R::DestinationIp(c)) => {
            Perm::DestinationIp(cidr(c, &format!("{path}.destination_ip"))?)
        }
        Some(R::DestinationPort(p)) => Perm::DestinationPort(*p),
        Some(R::DestinationPortRange(r)) => {
            Perm::DestinationPortRange(r.start.max(0) as u32, r.end.max(0) as u32)
        }
        Some(R::RequestedServerName(m)) => Perm::RequestedServerName(
            StringMatcher::from_proto(m, &format!("{path}.requested_server_name")).map_err(err)?,
        ),
        Some(R::Metadata(m)) => Perm::Metadata {
            invert: metadata(m),
        },
        Some(R::UriTemplate(t)) => {
            let tp = format!("{path}.uri_template");
            let any = t
                .typed_config
                .as_ref()
                .ok_or_else(|| invalid(&tp, "typed_config is required"))?;
            let cfg: xds_client::pb::envoy::extensions::path::r#match::uri_template::v3::UriTemplateMatchConfig =
                xds_client::TypeRegistry::global()
                    .unpack(any)
                    .map_err(|e| invalid(&tp, e.to_string()))?;
            Perm::UriTemplate(UriTemplate::compile(&cfg.path_template, &tp)?)
        }
        Some(other) => {
            let name = format!("{other:?}");
            return Err(ConfigError::Unsupported {
                path: path.into(),
                fields: format!("'{}' permission", name.split('(').next().unwrap_or("rule")),
            });
        }
        None => return Err(invalid(path, "rule is required")),
    })
}

fn compile_id(p: &Principal, path: &str) -> Result<Id, ConfigError> {
    use principal::Identifier as I;
    let list = |ids: &[Principal], kind: &str| -> Result<Vec<Id>, ConfigError> {
        ids.iter()
            .enumerate()
            .map(|(i, r)| compile_id(r, &format!("{path}.{kind}.ids[{i}]")))
            .collect()
    };
    Ok(match &p.identifier {
        Some(I::Any(true)) => Id::Any,
        Some(I::Any(false)) => return Err(invalid(format!("{path}.any"), "value must equal true")),
        Some(I::AndIds(s)) => Id::And(list(&s.ids, "and_ids")?),
        Some(I::OrIds(s)) => Id::Or(list(&s.ids, "or_ids")?),
        Some(I::NotId(r)) => Id::Not(Box::new(compile_id(r, &format!("{path}.not_id"))?)),
        Some(I::Authenticated(a)) => Id::Authenticated(
            a.principal_name
                .as_ref()
                .map(|m| {
                    StringMatcher::from_proto(m, &format!("{path}.authenticated.principal_name"))
                })
                .transpose()
                .map_err(err)?,
        ),
        #[allow(deprecated)]
        Some(I::SourceIp(c)) => Id::DirectRemoteIp(cidr(c, &format!("{path}.source_ip"))?),
        Some(I::DirectRemoteIp(c)) => {
            Id::DirectRemoteIp(cidr(c, &format!("{path}.direct_remote_ip"))?)
        }
        Some(I::RemoteIp(c)) => Id::RemoteIp(cidr(c, &format!("{path}.remote_ip"))?),
        Some(I::Header(h)) => {
            Id::Header(HeaderMatch::from_proto(h, &format!("{path}.header")).map_err(err)?)
        }
        Some(I::UrlPath(u)) => Id::UrlPath(path_matcher(u, &format!("{path}.url_path"))?),
        Some(I::Metadata(m)) => Id::Metadata {
            invert: metadata(m),
        },
        Some(I::FilterState(f)) => {
            use xds_client::pb::envoy::r#type::matcher::v3::filter_state_matcher::Matcher;
            let fp = format!("{path}.filter_state");
            if f.key.is_empty() {
                return Err(invalid(
                    format!("{fp}.key"),
                    "value length must be at least 1 characters",
                ));
            }
            let matcher = match &f.matcher {
                Some(Matcher::StringMatch(m)) => {
                    StringMatcher::from_proto(m, &format!("{fp}.string_match")).map_err(err)?
                }
                _ => {
                    return Err(ConfigError::Unsupported {
                        path: fp,
                        fields: "a filter_state matcher other than string_match".into(),
                    })
                }
            };
            Id::FilterState {
                key: f.key.clone(),
                matcher,
            }
        }
        Some(other) => {
            let name = format!("{other:?}");
            return Err(ConfigError::Unsupported {
                path: path.into(),
                fields: format!(
                    "'{}' principal",
                    name.split('(').next().unwrap_or("identifier")
                ),
            });
        }
        None => return Err(invalid(path, "identifier is required")),
    })
}

/// A header's value as RBAC sees it: pseudo-headers from the request line.
fn header_value<'a>(i: &Input<'a>, name: &str) -> Option<std::borrow::Cow<'a, str>> {
    let line = |s: &'a str| (!s.is_empty()).then_some(std::borrow::Cow::Borrowed(s));
    match name {
        ":method" => line(i.method),
        ":path" => line(i.path),
        ":authority" | "host" if i.headers.is_some() => line(i.authority),
        ":scheme" => line(i.scheme),
        _ => i
            .headers
            .and_then(|h| joined_header(h, name))
            .map(std::borrow::Cow::Owned),
    }
}

fn path_only<'a>(i: &Input<'a>) -> Option<&'a str> {
    i.headers?;
    Some(i.path.split('?').next().unwrap_or(""))
}

impl Perm {
    fn matches(&self, i: &Input<'_>) -> bool {
        match self {
            Perm::Any => true,
            Perm::And(v) => v.iter().all(|p| p.matches(i)),
            Perm::Or(v) => v.iter().any(|p| p.matches(i)),
            Perm::Not(p) => !p.matches(i),
            Perm::Header(h) => {
                i.headers.is_some() && h.matches(header_value(i, &h.name).as_deref())
            }
            Perm::UrlPath(m) => path_only(i).is_some_and(|p| m.matches(p)),
            Perm::UriTemplate(t) => path_only(i).is_some_and(|p| t.matches(p)),
            Perm::DestinationIp(c) => c.contains(i.local.ip()),
            Perm::DestinationPort(p) => u32::from(i.local.port()) == *p,
            Perm::DestinationPortRange(s, e) => (*s..*e).contains(&u32::from(i.local.port())),
            Perm::RequestedServerName(m) => m.matches(i.requested_server_name),
            Perm::Metadata { invert } => *invert,
        }
    }
}

impl Id {
    fn matches(&self, i: &Input<'_>) -> bool {
        match self {
            Id::Any => true,
            Id::And(v) => v.iter().all(|p| p.matches(i)),
            Id::Or(v) => v.iter().any(|p| p.matches(i)),
            Id::Not(p) => !p.matches(i),
            Id::Authenticated(name) => {
                let Some(peer) = i.peer else { return false };
                let Some(m) = name else { return true };
                // URI SANs, then DNS SANs, then the subject, as Envoy looks.
                peer.uri_sans.iter().any(|u| m.matches(u))
                    || peer.dns_sans.iter().any(|d| m.matches(d))
                    || m.matches(peer.subject)
            }
            Id::DirectRemoteIp(c) => c.contains(i.direct_remote.ip()),
            Id::RemoteIp(c) => c.contains(i.remote.ip()),
            Id::Header(h) => i.headers.is_some() && h.matches(header_value(i, &h.name).as_deref()),
            Id::UrlPath(m) => path_only(i).is_some_and(|p| m.matches(p)),
            Id::Metadata { invert } => *invert,
            Id::FilterState { key, matcher } => i
                .filter_state
                .get(key)
                .is_some_and(|o| matcher.matches(&o.plain)),
        }
    }
}

impl Engine {
    pub fn compile(r: &Rbac, path: &str) -> Result<Engine, ConfigError> {
        let mut rest = r.clone();
        let action = match PbAction::try_from(std::mem::take(&mut rest.action)) {
            Ok(PbAction::Allow) => Action::Allow,
            Ok(PbAction::Deny) => Action::Deny,
            Ok(PbAction::Log) => Action::Log,
            Err(_) => return Err(invalid(format!("{path}.action"), "unknown action")),
        };
        let policies: BTreeMap<String, Policy> =
            std::mem::take(&mut rest.policies).into_iter().collect();
        reject_unhandled(&rest, path)?;
        let mut compiled = Vec::with_capacity(policies.len());
        for (name, p) in policies {
            let pp = format!("{path}.policies[{name}]");
            let mut prest = p.clone();
            let permissions = std::mem::take(&mut prest.permissions)
                .iter()
                .enumerate()
                .map(|(i, x)| compile_perm(x, &format!("{pp}.permissions[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            let principals = std::mem::take(&mut prest.principals)
                .iter()
                .enumerate()
                .map(|(i, x)| compile_id(x, &format!("{pp}.principals[{i}]")))
                .collect::<Result<Vec<_>, _>>()?;
            reject_unhandled(&prest, &pp)?;
            compiled.push(CompiledPolicy {
                details: intern(format!("rbac_access_denied_matched_policy[{name}]")),
                name: intern(name.clone()),
                permissions,
                principals,
            });
        }
        Ok(Engine {
            action,
            policies: compiled,
        })
    }

    /// The first policy (by name) whose permissions and principals both match.
    fn matched(&self, i: &Input<'_>) -> Option<&CompiledPolicy> {
        self.policies.iter().find(|p| {
            p.permissions.iter().any(|x| x.matches(i)) && p.principals.iter().any(|x| x.matches(i))
        })
    }

    pub fn decide(&self, i: &Input<'_>) -> Decision {
        let matched = self.matched(i);
        let allowed = match self.action {
            Action::Allow => matched.is_some(),
            Action::Deny => matched.is_none(),
            Action::Log => true,
        };
        Decision {
            allowed,
            policy: matched.map(|p| p.name),
            details: match (self.action, matched) {
                (Action::Deny, Some(p)) => p.details,
                _ => "rbac_access_denied_matched_policy[none]",
            },
        }
    }
}

/// Compiles a filter's `rules` and `shadow_rules`.
pub fn engines(
    rules: Option<&Rbac>,
    shadow_rules: Option<&Rbac>,
    path: &str,
) -> Result<(Option<Engine>, Option<Engine>), ConfigError> {
    let enforced = rules
        .map(|r| Engine::compile(r, &format!("{path}.rules")))
        .transpose()?;
    let shadow = shadow_rules
        .map(|r| Engine::compile(r, &format!("{path}.shadow_rules")))
        .transpose()?;
    Ok((enforced, shadow))
}

/// The dynamic metadata keys of the shadow engine's decision.
pub fn shadow_keys(prefix: &str) -> (String, String) {
    (
        format!("{prefix}shadow_effective_policy_id"),
        format!("{prefix}shadow_engine_result"),
    )
}

/// The dynamic metadata keys of the enforced engine's decision.
pub fn enforced_keys(prefix: &str) -> (String, String) {
    (
        format!("{prefix}enforced_effective_policy_id"),
        format!("{prefix}enforced_engine_result"),
    )
}

/// The RBAC stats of one filter: `<prefix>rbac.<rules prefix>allowed`, and the shadow ones.
#[derive(Debug, Clone)]
pub struct RbacStats {
    pub allowed: std::sync::Arc<crate::observe::stats::Counter>,
    pub denied: std::sync::Arc<crate::observe::stats::Counter>,
    pub shadow_allowed: std::sync::Arc<crate::observe::stats::Counter>,
    pub shadow_denied: std::sync::Arc<crate::observe::stats::Counter>,
}

impl RbacStats {
    pub fn new(
        store: &crate::observe::stats::Store,
        prefix: &str,
        rules_prefix: &str,
        shadow_prefix: &str,
    ) -> Self {
        // A non-empty rules or shadow prefix is its own scope (`rbac.<p>.allowed`).
        let c = |p: &str, n: &str| {
            let sep = if p.is_empty() || p.ends_with('.') {
                ""
            } else {
                "."
            };
            store.counter(&format!("{prefix}rbac.{p}{sep}{n}"))
        };
        RbacStats {
            allowed: c(rules_prefix, "allowed"),
            denied: c(rules_prefix, "denied"),
            shadow_allowed: c(shadow_prefix, "shadow_allowed"),
            shadow_denied: c(shadow_prefix, "shadow_denied"),
        }
    }
}

/// `rules` and `shadow_rules` of a filter, with its stats.
#[derive(Debug)]
pub struct Rules {
    pub enforced: Option<Engine>,
    pub shadow: Option<Engine>,
    pub stats: RbacStats,
    /// `<shadow_rules_stat_prefix>shadow_effective_policy_id` / `…shadow_engine_result`.
    pub shadow_keys: (String, String),
    /// `<rules_stat_prefix>enforced_effective_policy_id` / `…enforced_engine_result` (the
    /// HTTP filter writes them; the network one does not).
    pub enforced_keys: Option<(String, String)>,
    /// The filter's dynamic metadata namespace (`envoy.filters.http.rbac`, `….network.rbac`).
    pub namespace: &'static str,
}

impl Rules {
    /// Evaluates both engines: whether the request or connection may go on, and the details of
    /// a denial.
    pub fn check(
        &self,
        i: &Input<'_>,
        metadata: Option<&mut petrel_filters::http_filter::DynamicMetadata>,
    ) -> (bool, &'static str) {
        self.check_with(self.enforced.as_ref(), self.shadow.as_ref(), i, metadata)
    }

    /// `check` with other engines (a route's `RBACPerRoute`), counted in these stats.
    pub fn check_with(
        &self,
        enforced: Option<&Engine>,
        shadow: Option<&Engine>,
        i: &Input<'_>,
        mut metadata: Option<&mut petrel_filters::http_filter::DynamicMetadata>,
    ) -> (bool, &'static str) {
        // Each decision goes to the stream's dynamic metadata, as Envoy writes it.
        let mut record = |keys: Option<&(String, String)>, d: &Decision, log_hint: Option<bool>| {
            let Some(all) = metadata.as_deref_mut() else {
                return;
            };
            if let Some(keys) = keys {
                let m = all.entry(self.namespace.to_string()).or_default();
                if let Some(p) = d.policy {
                    m.insert(keys.0.clone(), p.into());
                }
                let result = if d.allowed { "allowed" } else { "denied" };
                m.insert(keys.1.clone(), result.into());
            }
            // An enforced LOG engine tells access logs whether a policy matched.
            if let Some(hint) = log_hint {
                all.entry("envoy.common".to_string())
                    .or_default()
                    .insert("access_log_hint".into(), hint.into());
            }
        };
        if let Some(s) = shadow {
            let d = s.decide(i);
            if d.allowed {
                self.stats.shadow_allowed.inc();
            } else {
                self.stats.shadow_denied.inc();
            }
            record(Some(&self.shadow_keys), &d, None);
        }
        let Some(e) = enforced else {
            return (true, "");
        };
        let d = e.decide(i);
        if d.allowed {
            self.stats.allowed.inc();
        } else {
            self.stats.denied.inc();
        }
        let hint = (e.action == Action::Log).then_some(d.policy.is_some());
        record(self.enforced_keys.as_ref(), &d, hint);
        (d.allowed, d.details)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn engine(v: serde_json::Value) -> Engine {
        let r: Rbac = xds_client::TypeRegistry::global()
            .from_json(&v, false)
            .unwrap();
        Engine::compile(&r, "rules").unwrap()
    }

    static EMPTY_STATE: std::sync::LazyLock<petrel_filters::filter_state::FilterState> =
        std::sync::LazyLock::new(Default::default);

    fn input<'a>(peer: Option<Peer<'a>>) -> Input<'a> {
        let a: SocketAddr = "10.0.0.1:1000".parse().unwrap();
        Input {
            headers: None,
            method: "",
            path: "",
            authority: "",
            scheme: "",
            direct_remote: a,
            remote: a,
            local: "10.0.0.2:8080".parse().unwrap(),
            requested_server_name: "",
            peer,
            filter_state: &EMPTY_STATE,
        }
    }

    #[test]
    fn istio_principals_from_spiffe_sans() {
        // What istiod emits for `principals: ["cluster.local/ns/foo/sa/bar"]` and for
        // `namespaces: ["foo"]`.
        let e = engine(json!({"policies": {
            "p": {"permissions": [{"destinationPort": 8080}], "principals": [{"orIds": {"ids": [
                {"authenticated": {"principalName": {"exact": "spiffe://cluster.local/ns/foo/sa/bar"}}},
                {"authenticated": {"principalName": {"safeRegex": {"regex": ".*/ns/baz/.*"}}}}]}}]}}}));
        let uri = |s: &str| vec![s.to_string()];
        let bar = uri("spiffe://cluster.local/ns/foo/sa/bar");
        let baz = uri("spiffe://cluster.local/ns/baz/sa/x");
        let other = uri("spiffe://cluster.local/ns/foo/sa/other");
        let peer = |u: &'static [String]| Peer {
            uri_sans: u,
            dns_sans: &[],
            subject: "CN=x",
        };
        let leak = |v: Vec<String>| -> &'static [String] { Box::leak(v.into_boxed_slice()) };
        assert!(e.decide(&input(Some(peer(leak(bar))))).allowed);
        assert!(e.decide(&input(Some(peer(leak(baz))))).allowed);
        assert!(!e.decide(&input(Some(peer(leak(other))))).allowed);
        // Plaintext: no principal at all.
        let d = e.decide(&input(None));
        assert!(!d.allowed);
        assert_eq!(d.details, "rbac_access_denied_matched_policy[none]");
        // An empty authenticated matches any client certificate; the subject is the fallback.
        let any_cert = engine(json!({"policies": {"p": {"permissions": [{"any": true}],
            "principals": [{"authenticated": {"principalName": {"exact": "CN=x"}}}]}}}));
        assert!(any_cert.decide(&input(Some(peer(&[])))).allowed);
    }
}
