//! `envoy.filters.http.rbac`: the RBAC engine on each request, and a 403 `RBAC: access denied`
//! when it refuses. (`RBACPerRoute` overrides are refused by the extension table.)

use std::sync::Arc;

use bytes::Bytes;
use http::StatusCode;
use petrel_filters::http_filter::{
    FilterStatus, HttpFilter, HttpFilterFactory, LocalReply, RequestHead,
};
use xds_client::pb::envoy::extensions::filters::http::rbac::v3::Rbac;
use xds_client::pb::google::protobuf::Any;

use super::{Engine, Input, Peer, RbacStats, Rules};
use crate::config::{invalid, reject_unhandled, ConfigError};
use crate::observe::stats::Store;

pub const TYPE_URL: &str = "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC";
pub const PER_ROUTE_TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBACPerRoute";

/// A route's `RBACPerRoute`: its engines replace the filter's (counted in the filter's stats);
/// without `rbac`, the route is not checked.
#[derive(Debug)]
pub struct PerRoute {
    enforced: Option<Engine>,
    shadow: Option<Engine>,
}

pub fn per_route(
    any: &Any,
    path: &str,
) -> Result<petrel_filters::http_filter::RouteFilterConfig, ConfigError> {
    let cfg: xds_client::pb::envoy::extensions::filters::http::rbac::v3::RbacPerRoute =
        xds_client::TypeRegistry::global()
            .unpack(any)
            .map_err(|e| invalid(path, e.to_string()))?;
    let mut rest = cfg.clone();
    let (enforced, shadow) = match rest.rbac.take() {
        Some(mut r) => {
            let rp = format!("{path}.rbac");
            let (enforced, shadow) =
                super::engines(r.rules.take().as_ref(), r.shadow_rules.take().as_ref(), &rp)?;
            // The filter's stats count a route's decisions; a route's own stat prefixes are
            // refused (by `reject_unhandled`) rather than guessed at.
            reject_unhandled(&r, &rp)?;
            (enforced, shadow)
        }
        None => (None, None),
    };
    reject_unhandled(&rest, path)?;
    Ok(Arc::new(PerRoute { enforced, shadow }))
}

#[derive(Debug)]
pub struct Factory {
    name: String,
    rules: Arc<Rules>,
}

/// Compiles an `RBAC` filter config into its rules and stats.
pub(super) fn rules(
    cfg: &Rbac,
    store: &Store,
    stat_prefix: &str,
    path: &str,
) -> Result<Rules, ConfigError> {
    let mut rest = cfg.clone();
    let (enforced, shadow) = super::engines(
        rest.rules.take().as_ref(),
        rest.shadow_rules.take().as_ref(),
        path,
    )?;
    let shadow_prefix = std::mem::take(&mut rest.shadow_rules_stat_prefix);
    let rules_prefix = std::mem::take(&mut rest.rules_stat_prefix);
    reject_unhandled(&rest, path)?;
    Ok(Rules {
        enforced,
        shadow,
        stats: RbacStats::new(store, stat_prefix, &rules_prefix, &shadow_prefix),
        shadow_keys: super::shadow_keys(&shadow_prefix),
        enforced_keys: Some(super::enforced_keys(&rules_prefix)),
        namespace: "envoy.filters.http.rbac",
    })
}

impl Factory {
    pub fn compile(
        name: &str,
        any: &Any,
        store: &Store,
        stat_prefix: &str,
        path: &str,
    ) -> Result<Factory, ConfigError> {
        let cfg: Rbac = xds_client::TypeRegistry::global()
            .unpack(any)
            .map_err(|e| invalid(path, e.to_string()))?;
        Ok(Factory {
            name: name.to_string(),
            rules: Arc::new(rules(&cfg, store, stat_prefix, path)?),
        })
    }
}

impl HttpFilterFactory for Factory {
    fn name(&self) -> &str {
        &self.name
    }
    fn create(&self) -> Box<dyn HttpFilter> {
        Box::new(Filter {
            name: self.name.clone(),
            rules: self.rules.clone(),
        })
    }
}

struct Filter {
    name: String,
    rules: Arc<Rules>,
}

impl HttpFilter for Filter {
    fn decode_headers(&mut self, req: &mut RequestHead<'_>, _end_stream: bool) -> FilterStatus {
        let per_route = req
            .route
            .and_then(|r| r.config(&self.name))
            .and_then(|c| c.downcast_ref::<PerRoute>());
        let rules = self.rules.as_ref();
        let info = req.info;
        let input = Input {
            headers: Some(req.headers),
            method: req.method.as_str(),
            path: req.path,
            authority: info.authority,
            scheme: info.scheme,
            direct_remote: info.downstream_direct_remote,
            remote: info.downstream_remote,
            local: info.downstream_local,
            requested_server_name: info.requested_server_name,
            peer: info.peer.map(|p| Peer {
                uri_sans: p.uri_sans,
                dns_sans: p.dns_sans,
                subject: p.subject,
            }),
            filter_state: info.filter_state,
        };
        let (enforced, shadow) = match per_route {
            Some(p) => (p.enforced.as_ref(), p.shadow.as_ref()),
            None => (rules.enforced.as_ref(), rules.shadow.as_ref()),
        };
        let (allowed, details) =
            rules.check_with(enforced, shadow, &input, Some(req.dynamic_metadata));
        if allowed {
            return FilterStatus::Continue;
        }
        FilterStatus::LocalReply(Box::new(LocalReply {
            status: StatusCode::FORBIDDEN,
            body: Bytes::from_static(b"RBAC: access denied"),
            response_flag: "",
            details,
            headers: http::HeaderMap::new(),
            grpc_status: None,
        }))
    }
}
