//! A control-plane stand-in: turns the Kubernetes and Istio resources the Bookinfo tasks use into
//! the xDS istiod sends a sidecar or the ingress gateway, in the shapes of
//! `../shared/istio/configdump/` (names like `outbound|9080|v1|reviews.default.svc.cluster.local`,
//! `virtualOutbound`/`virtualInbound`, `0.0.0.0_9080`, `PassthroughCluster`/`BlackHoleCluster`,
//! auto mTLS through `tlsMode: istio` endpoint metadata, SDS secrets `default` and `ROOTCA`).
//!
//! It covers exactly: `Service` (ports, selector, cluster IP given by the harness), `Deployment`
//! (labels, service account; one pod each), `Gateway` (HTTP servers), `VirtualService` (HTTP
//! routes: `uri`/`headers` matches, destinations with `subset`/`port`/`weight`, `rewrite.uri`,
//! `timeout`, `retries`, `fault` delay/abort, `mirror`/`mirrorPercentage`), `DestinationRule`
//! (`subsets`, `trafficPolicy.connectionPool` and `outlierDetection`, `tls.mode`),
//! `PeerAuthentication` (mesh-wide `mtls.mode`) and mesh config `outboundTrafficPolicy`.
//! Anything else in a resource is refused by a panic naming it: a test must not believe a
//! field was applied when it was not.

use std::collections::BTreeMap;

use serde_json::{json, Value};

pub const NAMESPACE: &str = "default";
pub const DOMAIN: &str = "svc.cluster.local";
pub const TRUST_DOMAIN: &str = "cluster.local";

/// Which proxy build the configuration is for: Istio's proxy has Istio's own filters
/// (telemetry, metadata exchange, ALPN override); Envoy from PyPI has none of them.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Flavor {
    IstioProxy,
    PlainEnvoy,
}

#[derive(Clone, Debug)]
pub struct ServicePort {
    pub name: String,
    pub port: u16,
    pub target_port: u16,
}

#[derive(Clone, Debug)]
pub struct Service {
    pub name: String,
    pub cluster_ip: String,
    pub ports: Vec<ServicePort>,
    pub selector: BTreeMap<String, String>,
    /// A ServiceEntry's endpoints (its `name` is then the host itself).
    pub entry_endpoints: Option<Vec<Workload>>,
}

impl Service {
    pub fn fqdn(&self) -> String {
        match self.entry_endpoints {
            Some(_) => self.name.clone(),
            None => format!("{}.{NAMESPACE}.{DOMAIN}", self.name),
        }
    }

    /// The host names a request may carry for this service (without ports).
    fn hosts(&self) -> Vec<String> {
        if self.entry_endpoints.is_some() {
            return vec![self.name.clone()];
        }
        let short = &self.name;
        vec![
            self.fqdn(),
            short.clone(),
            format!("{short}.{NAMESPACE}.svc"),
            format!("{short}.{NAMESPACE}"),
            self.cluster_ip.clone(),
        ]
    }

    /// Whether a VirtualService/DestinationRule `host` names this service.
    fn named_by(&self, host: &str) -> bool {
        self.hosts().iter().any(|h| h == host)
    }
}

#[derive(Clone, Debug)]
pub struct Workload {
    /// The Deployment's name; the pod is `<deployment>-0`.
    pub deployment: String,
    pub namespace: String,
    pub labels: BTreeMap<String, String>,
    pub service_account: String,
    pub ip: String,
    /// Whether the pod has a sidecar (the gateway and sidecar-less clients do not get one).
    pub sidecar: bool,
}

impl Workload {
    pub fn pod(&self) -> String {
        format!("{}-0", self.deployment)
    }
    pub fn app(&self) -> &str {
        self.labels.get("app").map(String::as_str).unwrap_or("")
    }
    pub fn version(&self) -> &str {
        self.labels.get("version").map(String::as_str).unwrap_or("")
    }
    pub fn spiffe(&self) -> String {
        format!(
            "spiffe://{TRUST_DOMAIN}/ns/{}/sa/{}",
            self.namespace, self.service_account
        )
    }
    /// The node id pilot-agent gives the proxy.
    pub fn node_id(&self, gateway: bool) -> String {
        let kind = if gateway { "router" } else { "sidecar" };
        format!(
            "{kind}~{}~{}.{}~{}.{DOMAIN}",
            self.ip,
            self.pod(),
            self.namespace,
            self.namespace
        )
    }
}

/// Istio's resources as the tasks apply them (kind → list of objects).
#[derive(Clone, Debug, Default)]
pub struct IstioConfig {
    pub virtual_services: Vec<Value>,
    pub destination_rules: Vec<Value>,
    pub gateways: Vec<Value>,
    pub service_entries: Vec<Value>,
    pub authorization_policies: Vec<Value>,
    /// Kubernetes TLS secrets by name, as the gateway's `credentialName` finds them (Secret
    /// resources in proto3 JSON without their name).
    pub credentials: BTreeMap<String, Value>,
    /// Mesh-wide PeerAuthentication mode: `PERMISSIVE` (default) or `STRICT`.
    pub mtls_strict: bool,
    /// Mesh config `outboundTrafficPolicy.mode: REGISTRY_ONLY`.
    pub registry_only: bool,
}

impl IstioConfig {
    /// Applies Istio YAML (one or more documents): a resource replaces one of the same kind
    /// and name.
    pub fn apply(&mut self, yaml: &str) {
        for doc in yaml_docs(yaml).into_iter().flat_map(ingress_as_istio) {
            let kind = doc["kind"].as_str().unwrap_or_default().to_string();
            let name = doc["metadata"]["name"].clone();
            let list = match kind.as_str() {
                "VirtualService" => &mut self.virtual_services,
                "DestinationRule" => &mut self.destination_rules,
                "Gateway" => &mut self.gateways,
                "ServiceEntry" => &mut self.service_entries,
                "AuthorizationPolicy" => &mut self.authorization_policies,
                "PeerAuthentication" => {
                    let mode = doc["spec"]["mtls"]["mode"].as_str().unwrap_or("PERMISSIVE");
                    self.mtls_strict = mode == "STRICT";
                    continue;
                }
                other => panic!("the control-plane stand-in does not translate kind {other:?}"),
            };
            list.retain(|r| r["metadata"]["name"] != name);
            list.push(doc);
        }
    }

    /// Removes the resources named in `yaml` (as `kubectl delete -f`).
    pub fn delete(&mut self, yaml: &str) {
        for doc in yaml_docs(yaml).into_iter().flat_map(ingress_as_istio) {
            let name = doc["metadata"]["name"].clone();
            if doc["kind"] == "PeerAuthentication" {
                self.mtls_strict = false;
            }
            for list in [
                &mut self.virtual_services,
                &mut self.destination_rules,
                &mut self.gateways,
                &mut self.service_entries,
                &mut self.authorization_policies,
            ] {
                list.retain(|r| r["metadata"]["name"] != name || r["kind"] != doc["kind"]);
            }
        }
    }
}

/// A Kubernetes Ingress (class `istio`) as istiod sees it: a Gateway on the ingress gateway's
/// port 80 for any host and a VirtualService with a route per path (`Exact` → exact; `Prefix`
/// → the path itself and everything under it). Other documents pass through.
fn ingress_as_istio(doc: Value) -> Vec<Value> {
    if doc["kind"] != "Ingress" {
        return vec![doc];
    }
    let name = doc["metadata"]["name"].as_str().unwrap_or_default();
    let gateway = format!("{name}-istio-autogenerated-k8s-ingress");
    check_keys(&doc["spec"], &["rules"], "Ingress.spec");
    let mut http = Vec::new();
    for rule in doc["spec"]["rules"].as_array().into_iter().flatten() {
        check_keys(rule, &["http"], "Ingress.spec.rules[]");
        for p in rule["http"]["paths"].as_array().into_iter().flatten() {
            let path = p["path"].as_str().unwrap_or("/");
            let matches = match p["pathType"].as_str() {
                Some("Exact") => json!([{"uri": {"exact": path}}]),
                Some("Prefix") => {
                    let base = path.trim_end_matches('/');
                    json!([{"uri": {"exact": base}}, {"uri": {"prefix": format!("{base}/")}}])
                }
                other => panic!("the control-plane stand-in does not translate pathType {other:?}"),
            };
            let backend = &p["backend"]["service"];
            http.push(json!({"match": matches, "route": [{"destination": {
                "host": backend["name"], "port": {"number": backend["port"]["number"]}}}]}));
        }
    }
    vec![
        json!({"kind": "Gateway", "metadata": {"name": gateway}, "spec": {"selector": {"istio": "ingressgateway"},
            "servers": [{"port": {"number": 80, "name": "http-80-ingress", "protocol": "HTTP"}, "hosts": ["*"]}]}}),
        json!({"kind": "VirtualService", "metadata": {"name": format!("{name}-istio-autogenerated-k8s-ingress")},
            "spec": {"hosts": ["*"], "gateways": [gateway], "http": http}}),
    ]
}

/// The documents of a multi-document YAML file as JSON values (empty ones skipped).
pub fn yaml_docs(yaml: &str) -> Vec<Value> {
    use serde::Deserialize;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("bad YAML: {e}")))
        .filter(|v| !v.is_null())
        .collect()
}

/// The mesh: services, their pods and the Istio configuration.
#[derive(Clone, Debug)]
pub struct Mesh {
    pub services: Vec<Service>,
    pub workloads: Vec<Workload>,
    pub config: IstioConfig,
}

/// One proxy's resources: type URL → name → proto3 JSON.
pub type Resources = BTreeMap<&'static str, BTreeMap<String, Value>>;

pub const CLUSTER: &str = "type.googleapis.com/envoy.config.cluster.v3.Cluster";
pub const ENDPOINTS: &str = "type.googleapis.com/envoy.config.endpoint.v3.ClusterLoadAssignment";
pub const LISTENER: &str = "type.googleapis.com/envoy.config.listener.v3.Listener";
pub const ROUTES: &str = "type.googleapis.com/envoy.config.route.v3.RouteConfiguration";
pub const SECRETS: &str = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret";

impl Mesh {
    /// Services and Deployments from Kubernetes YAML (`bookinfo.yaml`): cluster IPs from
    /// `service_ips`, pod IPs from `pod_ips` (by Service and Deployment name).
    pub fn from_kube(
        yaml: &str,
        service_ips: &dyn Fn(&str) -> String,
        pod_ips: &dyn Fn(&str) -> String,
    ) -> Mesh {
        let mut services = Vec::new();
        let mut workloads = Vec::new();
        for doc in yaml_docs(yaml) {
            let name = doc["metadata"]["name"].as_str().unwrap_or_default();
            match doc["kind"].as_str() {
                Some("Service") => services.push(Service {
                    name: name.to_string(),
                    cluster_ip: service_ips(name),
                    ports: doc["spec"]["ports"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .map(|p| {
                            let port = p["port"].as_u64().unwrap_or(0) as u16;
                            ServicePort {
                                name: p["name"].as_str().unwrap_or("http").to_string(),
                                port,
                                target_port: p["targetPort"].as_u64().map_or(port, |t| t as u16),
                            }
                        })
                        .collect(),
                    selector: string_map(&doc["spec"]["selector"]),
                    entry_endpoints: None,
                }),
                Some("Deployment") => {
                    let spec = &doc["spec"]["template"]["spec"];
                    workloads.push(Workload {
                        deployment: name.to_string(),
                        namespace: doc["metadata"]["namespace"]
                            .as_str()
                            .unwrap_or(NAMESPACE)
                            .to_string(),
                        labels: string_map(&doc["spec"]["template"]["metadata"]["labels"]),
                        service_account: spec["serviceAccountName"]
                            .as_str()
                            .unwrap_or("default")
                            .to_string(),
                        ip: pod_ips(name),
                        sidecar: true,
                    })
                }
                _ => {}
            }
        }
        Mesh {
            services,
            workloads,
            config: IstioConfig::default(),
        }
    }

    /// The Kubernetes services and the ServiceEntries' hosts.
    fn all_services(&self) -> Vec<Service> {
        let mut all = self.services.clone();
        for se in &self.config.service_entries {
            let spec = &se["spec"];
            check_keys(
                spec,
                &["hosts", "ports", "resolution", "location", "endpoints"],
                "ServiceEntry.spec",
            );
            assert_eq!(
                spec["resolution"], "STATIC",
                "the control-plane stand-in translates STATIC ServiceEntries only"
            );
            let ports: Vec<ServicePort> = spec["ports"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|p| {
                    let port = p["number"].as_u64().unwrap_or(0) as u16;
                    ServicePort {
                        name: p["name"].as_str().unwrap_or("http").into(),
                        port,
                        target_port: port,
                    }
                })
                .collect();
            for host in spec["hosts"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
            {
                let endpoints = spec["endpoints"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|e| Workload {
                        deployment: host.to_string(),
                        namespace: NAMESPACE.into(),
                        labels: BTreeMap::new(),
                        service_account: String::new(),
                        ip: e["address"].as_str().unwrap_or_default().to_string(),
                        sidecar: false,
                    })
                    .collect();
                all.push(Service {
                    name: host.to_string(),
                    cluster_ip: String::new(),
                    ports: ports.clone(),
                    selector: BTreeMap::new(),
                    entry_endpoints: Some(endpoints),
                });
            }
        }
        all
    }

    fn service(&self, host: &str) -> Service {
        self.all_services()
            .into_iter()
            .find(|s| s.named_by(host))
            .unwrap_or_else(|| panic!("no Service for host {host:?}"))
    }

    fn destination_rule(&self, service: &Service) -> Option<&Value> {
        self.config
            .destination_rules
            .iter()
            .find(|d| service.named_by(d["spec"]["host"].as_str().unwrap_or("")))
    }

    /// The pods behind a service (and subset labels).
    fn endpoints(&self, service: &Service, subset: &BTreeMap<String, String>) -> Vec<Workload> {
        if let Some(e) = &service.entry_endpoints {
            return e.clone();
        }
        self.workloads
            .iter()
            .filter(|w| {
                service
                    .selector
                    .iter()
                    .chain(subset.iter())
                    .all(|(k, v)| w.labels.get(k) == Some(v))
            })
            .cloned()
            .collect()
    }

    /// What istiod sends the proxy of `w`: a sidecar's, or the ingress gateway's when
    /// `gateway`.
    pub fn resources(&self, w: &Workload, gateway: bool, flavor: Flavor) -> Resources {
        let mut r = Resources::new();
        let (clusters, endpoints) = self.outbound_clusters(flavor);
        r.insert(CLUSTER, clusters);
        r.insert(ENDPOINTS, endpoints);
        let mut listeners = BTreeMap::new();
        let mut routes = BTreeMap::new();
        if gateway {
            for (name, l, rc) in self.gateway_listeners(flavor) {
                listeners.insert(name.clone(), l);
                routes.insert(rc["name"].as_str().unwrap_or_default().to_string(), rc);
            }
            // istiod serves the gateway's credentials over ADS as `kubernetes://<name>`.
            let secrets = self
                .config
                .credentials
                .iter()
                .map(|(name, secret)| {
                    let name = format!("kubernetes://{name}");
                    let mut secret = secret.clone();
                    secret["name"] = json!(name);
                    (name, secret)
                })
                .collect();
            r.insert(SECRETS, secrets);
        } else {
            for (name, value) in self.sidecar_clusters(w) {
                r.get_mut(CLUSTER).expect("inserted").insert(name, value);
            }
            for port in self.service_ports() {
                let name = format!("0.0.0.0_{port}");
                listeners.insert(name.clone(), outbound_listener(&name, port, flavor));
                routes.insert(port.to_string(), self.outbound_routes(port));
            }
            listeners.insert("virtualOutbound".into(), self.virtual_outbound(flavor));
            listeners.insert("virtualInbound".into(), self.virtual_inbound(w, flavor));
        }
        r.insert(LISTENER, listeners);
        r.insert(ROUTES, routes);
        r
    }

    fn service_ports(&self) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .all_services()
            .iter()
            .flat_map(|s| s.ports.iter().map(|p| p.port))
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    /// `outbound|<port>|<subset>|<fqdn>` for every service port and DestinationRule subset,
    /// with their assignments.
    fn outbound_clusters(
        &self,
        flavor: Flavor,
    ) -> (BTreeMap<String, Value>, BTreeMap<String, Value>) {
        let mut clusters = BTreeMap::new();
        let mut assignments = BTreeMap::new();
        for s in &self.all_services() {
            let dr = self.destination_rule(s);
            let mut subsets = vec![(String::new(), BTreeMap::new(), None)];
            for sub in dr
                .and_then(|d| d["spec"]["subsets"].as_array())
                .into_iter()
                .flatten()
            {
                subsets.push((
                    sub["name"].as_str().unwrap_or_default().to_string(),
                    string_map(&sub["labels"]),
                    sub.get("trafficPolicy"),
                ));
            }
            let policy = dr.and_then(|d| d["spec"].get("trafficPolicy"));
            for p in &s.ports {
                for (subset, labels, sub_policy) in &subsets {
                    let name = format!("outbound|{}|{subset}|{}", p.port, s.fqdn());
                    let pods = self.endpoints(s, labels);
                    let identities: Vec<String> = {
                        let mut ids: Vec<String> = pods.iter().map(|w| w.spiffe()).collect();
                        ids.sort();
                        ids.dedup();
                        ids
                    };
                    let cluster = outbound_cluster(
                        &name,
                        s,
                        p.port,
                        sub_policy.or(policy),
                        &identities,
                        flavor,
                    );
                    clusters.insert(name.clone(), cluster);
                    assignments.insert(name.clone(), assignment(&name, &pods, p.target_port));
                }
            }
        }
        (clusters, assignments)
    }

    /// The clusters only a sidecar has: its inbound ports and the passthrough/black hole ones.
    fn sidecar_clusters(&self, w: &Workload) -> Vec<(String, Value)> {
        let mut out = vec![
            (
                "BlackHoleCluster".to_string(),
                json!({"name": "BlackHoleCluster", "type": "STATIC", "connect_timeout": "10s"}),
            ),
            (
                "PassthroughCluster".to_string(),
                json!({"name": "PassthroughCluster", "type": "ORIGINAL_DST", "connect_timeout": "10s",
                    "lb_policy": "CLUSTER_PROVIDED", "circuit_breakers": default_circuit_breakers(),
                    "filters": []}),
            ),
            (
                "InboundPassthroughClusterIpv4".to_string(),
                inbound_original_dst("InboundPassthroughClusterIpv4"),
            ),
        ];
        for port in self.inbound_ports(w) {
            let name = format!("inbound|{port}||");
            out.push((name.clone(), inbound_original_dst(&name)));
        }
        out
    }

    /// The target ports of the services selecting `w`.
    fn inbound_ports(&self, w: &Workload) -> Vec<u16> {
        let mut ports: Vec<u16> = self
            .services
            .iter()
            .filter(|s| s.selector.iter().all(|(k, v)| w.labels.get(k) == Some(v)))
            .flat_map(|s| s.ports.iter().map(|p| p.target_port))
            .collect();
        ports.sort_unstable();
        ports.dedup();
        ports
    }

    fn virtual_outbound(&self, flavor: Flavor) -> Value {
        let catchall = if self.config.registry_only {
            "BlackHoleCluster"
        } else {
            "PassthroughCluster"
        };
        json!({"name": "virtualOutbound", "address": socket("0.0.0.0", 15001), "use_original_dst": true,
            "traffic_direction": "OUTBOUND",
            "filter_chains": [
                {"name": "virtualOutbound-blackhole", "filter_chain_match": {"destination_port": 15001},
                 "filters": tcp_filters("BlackHoleCluster", flavor, false)},
                {"name": "virtualOutbound-catchall-tcp", "filters": tcp_filters(catchall, flavor, false)}]})
    }

    /// The routes of outbound port `port`: a virtual host per service on that port, shaped by
    /// the VirtualServices for the mesh, and the catch-all one.
    fn outbound_routes(&self, port: u16) -> Value {
        let mut hosts = Vec::new();
        for s in self
            .all_services()
            .iter()
            .filter(|s| s.ports.iter().any(|p| p.port == port))
        {
            let fqdn = s.fqdn();
            let mut domains = Vec::new();
            for d in s.hosts() {
                domains.push(json!(d));
                domains.push(json!(format!("{d}:{port}")));
            }
            let vs = self.config.virtual_services.iter().find(|v| {
                let gateways = v["spec"]["gateways"].as_array();
                let for_mesh =
                    gateways.is_none_or(|g| g.is_empty() || g.iter().any(|g| g == "mesh"));
                for_mesh
                    && v["spec"]["hosts"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .any(|h| s.named_by(h.as_str().unwrap_or("")))
            });
            let routes = match vs {
                Some(vs) => self.http_routes(vs, port),
                None => vec![default_route(
                    &format!("outbound|{port}||{fqdn}"),
                    &format!("{fqdn}:{port}"),
                )],
            };
            hosts.push(
                json!({"name": format!("{fqdn}:{port}"), "domains": domains, "routes": routes,
                "include_request_attempt_count": true}),
            );
        }
        if self.config.registry_only {
            hosts.push(json!({"name": "block_all", "domains": ["*"], "include_request_attempt_count": true,
                "routes": [{"name": "block_all", "match": {"prefix": "/"}, "direct_response": {"status": 502}}]}));
        } else {
            hosts.push(json!({"name": "allow_any", "domains": ["*"], "include_request_attempt_count": true,
                "routes": [{"name": "allow_any", "match": {"prefix": "/"},
                    "route": {"cluster": "PassthroughCluster", "timeout": "0s", "max_grpc_timeout": "0s"}}]}));
        }
        json!({"name": port.to_string(), "virtual_hosts": hosts, "validate_clusters": false,
            "ignore_port_in_host_matching": true})
    }

    /// Envoy routes for a VirtualService's `http` rules: one route per match condition.
    fn http_routes(&self, vs: &Value, port: u16) -> Vec<Value> {
        let spec = &vs["spec"];
        check_keys(spec, &["hosts", "gateways", "http"], "VirtualService.spec");
        let mut routes = Vec::new();
        for rule in spec["http"].as_array().into_iter().flatten() {
            check_keys(
                rule,
                &[
                    "name",
                    "match",
                    "route",
                    "rewrite",
                    "timeout",
                    "retries",
                    "fault",
                    "mirror",
                    "mirrorPercentage",
                ],
                "VirtualService.spec.http[]",
            );
            let action = self.route_action(rule, port);
            let matches: Vec<Value> = match rule["match"].as_array() {
                Some(m) if !m.is_empty() => m.iter().map(http_match).collect(),
                _ => vec![json!({"prefix": "/"})],
            };
            for m in matches {
                let mut r = json!({"match": m, "route": action.clone(),
                    "decorator": {"operation": format!("{}:{port}/*", vs["spec"]["hosts"][0].as_str().unwrap_or(""))}});
                if let Some(name) = rule["name"].as_str() {
                    r["name"] = json!(name);
                }
                if let Some(fault) = rule.get("fault") {
                    r["typed_per_filter_config"] =
                        json!({"envoy.filters.http.fault": fault_config(fault)});
                }
                if let (Some(rw), Some(p)) =
                    (rule["rewrite"]["uri"].as_str(), r["route"].as_object_mut())
                {
                    p.insert("prefix_rewrite".into(), json!(rw));
                }
                routes.push(r);
            }
        }
        routes
    }

    fn route_action(&self, rule: &Value, port: u16) -> Value {
        let dests = rule["route"].as_array().cloned().unwrap_or_default();
        let cluster_of = |d: &Value| {
            let dest = &d["destination"];
            check_keys(dest, &["host", "subset", "port"], "destination");
            let s = self.service(dest["host"].as_str().unwrap_or(""));
            let p = dest["port"]["number"].as_u64().map_or(port, |p| p as u16);
            format!(
                "outbound|{p}|{}|{}",
                dest["subset"].as_str().unwrap_or(""),
                s.fqdn()
            )
        };
        let mut action = if dests.len() == 1 {
            json!({"cluster": cluster_of(&dests[0])})
        } else {
            let clusters: Vec<Value> = dests
                .iter()
                .map(
                    |d| json!({"name": cluster_of(d), "weight": d["weight"].as_u64().unwrap_or(0)}),
                )
                .collect();
            json!({"weighted_clusters": {"clusters": clusters}})
        };
        let timeout = rule.get("timeout").map_or(json!("0s"), duration);
        action["timeout"] = timeout.clone();
        action["max_grpc_timeout"] = timeout;
        action["retry_policy"] = match rule.get("retries") {
            Some(r) => {
                check_keys(r, &["attempts", "perTryTimeout", "retryOn"], "retries");
                let mut p = istio_retry_policy();
                p["num_retries"] = json!(r["attempts"].as_u64().unwrap_or(2));
                if let Some(t) = r.get("perTryTimeout") {
                    p["per_try_timeout"] = duration(t);
                }
                if let Some(on) = r["retryOn"].as_str() {
                    p["retry_on"] = json!(on);
                }
                p
            }
            None => istio_retry_policy(),
        };
        if let Some(m) = rule.get("mirror") {
            let percent = rule["mirrorPercentage"]["value"].as_f64().unwrap_or(100.0);
            action["request_mirror_policies"] = json!([{"cluster": cluster_of(&json!({"destination": m})),
                "runtime_fraction": {"default_value": {"numerator": (percent * 10000.0) as u64, "denominator": "MILLION"}},
                "trace_sampled": false}]);
        }
        action
    }

    /// The inbound listener: a filter chain per inbound port (mTLS, and plaintext unless
    /// STRICT), and the passthrough chains for other ports.
    /// The RBAC filters for the AuthorizationPolicies selecting `w`: DENY ones first, then
    /// ALLOW ones, as istiod orders them (Istio's policy names, `RBAC: access denied` from
    /// Envoy's filter).
    fn rbac_filters(&self, w: &Workload) -> Vec<Value> {
        let mut by_action: BTreeMap<&str, serde_json::Map<String, Value>> = BTreeMap::new();
        for p in &self.config.authorization_policies {
            let spec = &p["spec"];
            check_keys(
                spec,
                &["selector", "action", "rules"],
                "AuthorizationPolicy.spec",
            );
            let selected = string_map(&spec["selector"]["matchLabels"])
                .iter()
                .all(|(k, v)| w.labels.get(k) == Some(v));
            if !selected {
                continue;
            }
            let action = spec["action"].as_str().unwrap_or("ALLOW");
            assert!(
                action == "ALLOW" || action == "DENY",
                "the control-plane stand-in does not translate action {action}"
            );
            let policies = by_action.entry(action).or_default();
            let name = p["metadata"]["name"].as_str().unwrap_or_default();
            for (i, rule) in spec["rules"].as_array().into_iter().flatten().enumerate() {
                policies.insert(
                    format!("ns[{NAMESPACE}]-policy[{name}]-rule[{i}]"),
                    rbac_policy(rule),
                );
            }
        }
        let mut out = Vec::new();
        for action in ["DENY", "ALLOW"] {
            let Some(policies) = by_action.remove(action) else {
                continue;
            };
            let mut rules = json!({"policies": policies});
            if action == "DENY" {
                rules["action"] = json!("DENY");
            }
            out.push(json!({"name": "envoy.filters.http.rbac", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                "rules": rules, "shadow_rules_stat_prefix": "istio_dry_run_allow_"}}));
        }
        out
    }

    fn virtual_inbound(&self, w: &Workload, flavor: Flavor) -> Value {
        let mut chains = vec![json!({"name": "virtualInbound-blackhole",
            "filter_chain_match": {"destination_port": 15006},
            "filters": tcp_filters("BlackHoleCluster", flavor, true)})];
        for port in self.inbound_ports(w) {
            let cluster = format!("inbound|{port}||");
            let hcm = || {
                json!({"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": format!("inbound_0.0.0.0_{port}"),
                "route_config": {"name": cluster, "validate_clusters": false, "virtual_hosts": [{
                    "name": format!("inbound|http|{port}"), "domains": ["*"],
                    "routes": [{"name": "default", "match": {"prefix": "/"},
                        "route": {"cluster": cluster, "timeout": "0s", "max_grpc_timeout": "0s"},
                        "decorator": {"operation": format!("{}.{NAMESPACE}.{DOMAIN}:{port}/*", w.app())}}]}]},
                "http_filters": with_rbac(http_filters(flavor, true), self.rbac_filters(w)),
                "server_name": "istio-envoy", "use_remote_address": false,
                "forward_client_cert_details": "APPEND_FORWARD",
                "set_current_client_cert_details": {"subject": true, "dns": true, "uri": true},
                "upgrade_configs": [{"upgrade_type": "websocket"}], "stream_idle_timeout": "0s",
                "normalize_path": true, "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
                "request_id_extension": {"typed_config": {"@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig", "use_request_id_for_trace_sampling": true}},
                "access_log": [istio_access_log()], "tracing": hcm_tracing()}})
            };
            let mut network = inbound_network_filters(flavor);
            network.push(hcm());
            chains.push(json!({"name": format!("0.0.0.0_{port}"),
                "filter_chain_match": {"destination_port": port, "transport_protocol": "tls",
                    "application_protocols": ["istio", "istio-peer-exchange", "istio-http/1.0", "istio-http/1.1", "istio-h2"]},
                "filters": network,
                "transport_socket": downstream_tls()}));
            if !self.config.mtls_strict {
                let mut network = inbound_network_filters(flavor);
                network.push(hcm());
                chains.push(json!({"name": format!("0.0.0.0_{port}"),
                    "filter_chain_match": {"destination_port": port, "transport_protocol": "raw_buffer"},
                    "filters": network}));
            }
        }
        if !self.config.mtls_strict {
            chains.push(json!({"name": "virtualInbound",
                "filter_chain_match": {"prefix_ranges": [{"address_prefix": "0.0.0.0", "prefix_len": 0}], "transport_protocol": "raw_buffer"},
                "filters": tcp_filters("InboundPassthroughClusterIpv4", flavor, true)}));
        }
        json!({"name": "virtualInbound", "address": socket("0.0.0.0", 15006), "traffic_direction": "INBOUND",
            "listener_filters_timeout": "0s", "continue_on_listener_filters_timeout": true,
            "listener_filters": [
                {"name": "envoy.filters.listener.original_dst", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.original_dst.v3.OriginalDst"}},
                {"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"},
                 "filter_disabled": {"destination_port_range": {"start": 15006, "end": 15007}}},
                {"name": "envoy.filters.listener.http_inspector", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"},
                 "filter_disabled": {"destination_port_range": {"start": 15006, "end": 15007}}}],
            "filter_chains": chains})
    }

    /// The ingress gateway's listeners (one per Gateway server port) and their routes from the
    /// VirtualServices bound to the gateway.
    fn gateway_listeners(&self, flavor: Flavor) -> Vec<(String, Value, Value)> {
        let mut out = Vec::new();
        for gw in &self.config.gateways {
            let gw_name = gw["metadata"]["name"].as_str().unwrap_or_default();
            check_keys(&gw["spec"], &["selector", "servers"], "Gateway.spec");
            for server in gw["spec"]["servers"].as_array().into_iter().flatten() {
                check_keys(server, &["port", "hosts", "tls"], "Gateway.spec.servers[]");
                // The istio-ingressgateway Service's ports: 80 and 443 reach 8080 and 8443.
                let port = match server["port"]["number"].as_u64().unwrap_or(0) as u16 {
                    80 => 8080,
                    443 => 8443,
                    p => p,
                };
                let hosts: Vec<Value> = server["hosts"].as_array().cloned().unwrap_or_default();
                let mut chain = json!({});
                let rc_name = match server.get("tls") {
                    None => format!("http.{port}"),
                    Some(tls) => {
                        check_keys(
                            tls,
                            &["mode", "credentialName"],
                            "Gateway.spec.servers[].tls",
                        );
                        assert_eq!(
                            tls["mode"], "SIMPLE",
                            "the control-plane stand-in translates SIMPLE gateway TLS only"
                        );
                        let credential = tls["credentialName"].as_str().unwrap_or_default();
                        chain["filter_chain_match"] = json!({"server_names": hosts});
                        chain["transport_socket"] = json!({"name": "envoy.transport_sockets.tls", "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
                            "common_tls_context": {"alpn_protocols": ["h2", "http/1.1"],
                                "tls_certificate_sds_secret_configs": [{"name": format!("kubernetes://{credential}"),
                                    "sds_config": {"ads": {}, "resource_api_version": "V3"}}]},
                            "require_client_certificate": false}});
                        format!(
                            "https.{port}.{}.{gw_name}.{NAMESPACE}",
                            server["port"]["name"].as_str().unwrap_or("https")
                        )
                    }
                };
                let mut routes = Vec::new();
                for vs in self.config.virtual_services.iter().filter(|v| {
                    v["spec"]["gateways"]
                        .as_array()
                        .is_some_and(|g| g.iter().any(|g| g == gw_name))
                }) {
                    routes.extend(self.http_routes(vs, 9080));
                }
                let domains: Vec<Value> = hosts
                    .iter()
                    .flat_map(|h| match h.as_str() {
                        Some("*") | None => vec![json!("*")],
                        Some(h) => vec![json!(h), json!(format!("{h}:*"))],
                    })
                    .collect();
                let rc = json!({"name": rc_name, "validate_clusters": false, "ignore_port_in_host_matching": true,
                    "virtual_hosts": [{"name": format!("{}:{port}", hosts.first().and_then(Value::as_str).unwrap_or("*")),
                        "domains": domains, "routes": routes, "include_request_attempt_count": true}]});
                let name = format!("0.0.0.0_{port}");
                chain["filters"] = json!([{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                        "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                        "stat_prefix": format!("outbound_0.0.0.0_{port}"),
                        "rds": {"config_source": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}, "route_config_name": rc_name},
                        "http_filters": http_filters(flavor, false),
                        "use_remote_address": true, "forward_client_cert_details": "SANITIZE_SET",
                        "set_current_client_cert_details": {"subject": true, "dns": true, "uri": true},
                        "upgrade_configs": [{"upgrade_type": "websocket"}], "stream_idle_timeout": "0s",
                        "normalize_path": true, "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
                        "request_id_extension": {"typed_config": {"@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig", "use_request_id_for_trace_sampling": true}},
                        "access_log": [istio_access_log()], "tracing": hcm_tracing()}}]);
                let mut listener = json!({"name": name, "address": socket("0.0.0.0", port),
                    "filter_chains": [chain], "traffic_direction": "OUTBOUND"});
                if server.get("tls").is_some() {
                    listener["listener_filters"] = json!([{"name": "envoy.filters.listener.tls_inspector",
                        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}}]);
                }
                out.push((name, listener, rc));
            }
        }
        out
    }
}

fn string_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .into_iter()
        .flatten()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
        .collect()
}

/// Panics when `v` has a key outside `known`: the stand-in never half-applies a resource.
fn check_keys(v: &Value, known: &[&str], what: &str) {
    for k in v.as_object().into_iter().flatten().map(|(k, _)| k) {
        assert!(
            known.contains(&k.as_str()),
            "the control-plane stand-in does not translate {what}.{k}"
        );
    }
}

/// A Go duration as Istio writes them (`3m`, `1.5s`, `500ms`, `1h`) in proto3 JSON (`180s`).
fn duration(v: &Value) -> Value {
    let text = v.as_str().unwrap_or_else(|| panic!("not a duration: {v}"));
    let (number, unit) = text
        .find(|c: char| c.is_ascii_alphabetic())
        .map(|i| text.split_at(i))
        .unwrap_or_else(|| panic!("duration without a unit: {text}"));
    let n: f64 = number
        .parse()
        .unwrap_or_else(|_| panic!("bad duration {text}"));
    let seconds = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => panic!("the control-plane stand-in does not translate duration {text}"),
    };
    json!(format!("{seconds}s"))
}

fn socket(address: &str, port: u16) -> Value {
    json!({"socket_address": {"address": address, "port_value": port}})
}

fn sds(name: &str) -> Value {
    json!({"name": name, "sds_config": {"api_config_source": {"api_type": "GRPC", "transport_api_version": "V3",
        "set_node_on_first_message_only": true,
        "grpc_services": [{"envoy_grpc": {"cluster_name": "sds-grpc"}}]},
        "initial_fetch_timeout": "0s", "resource_api_version": "V3"}})
}

fn default_circuit_breakers() -> Value {
    json!({"thresholds": [{"max_connections": 4294967295u64, "max_pending_requests": 4294967295u64,
        "max_requests": 4294967295u64, "max_retries": 4294967295u64, "track_remaining": true}]})
}

fn istio_retry_policy() -> Value {
    json!({"retry_on": "connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes",
        "num_retries": 2, "retry_host_predicate": [{"name": "envoy.retry_host_predicates.previous_hosts",
            "typed_config": {"@type": "type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"}}],
        "host_selection_retry_max_attempts": "5", "retriable_status_codes": [503]})
}

fn default_route(cluster: &str, operation: &str) -> Value {
    json!({"name": "default", "match": {"prefix": "/"},
        "route": {"cluster": cluster, "timeout": "0s", "retry_policy": istio_retry_policy(), "max_grpc_timeout": "0s"},
        "decorator": {"operation": format!("{operation}/*")}})
}

/// Istio's match → Envoy's route match.
fn http_match(m: &Value) -> Value {
    check_keys(m, &["uri", "headers", "name"], "HTTPMatchRequest");
    let mut out = json!({});
    match m.get("uri") {
        Some(u) if u.get("exact").is_some() => out["path"] = u["exact"].clone(),
        Some(u) if u.get("prefix").is_some() => out["prefix"] = u["prefix"].clone(),
        Some(u) if u.get("regex").is_some() => out["safe_regex"] = json!({"regex": u["regex"]}),
        Some(u) => panic!("the control-plane stand-in does not translate uri match {u}"),
        None => out["prefix"] = json!("/"),
    }
    let headers: Vec<Value> = m["headers"]
        .as_object()
        .into_iter()
        .flatten()
        .map(|(name, sm)| {
            let string_match = if let Some(e) = sm.get("exact") {
                json!({"exact": e})
            } else if let Some(p) = sm.get("prefix") {
                json!({"prefix": p})
            } else if let Some(r) = sm.get("regex") {
                json!({"safe_regex": {"regex": r}})
            } else {
                panic!("the control-plane stand-in does not translate header match {sm}")
            };
            json!({"name": name, "string_match": string_match})
        })
        .collect();
    if !headers.is_empty() {
        out["headers"] = json!(headers);
    }
    out
}

fn percent(v: &Value) -> Value {
    let p = v["percentage"]["value"].as_f64().unwrap_or(100.0);
    json!({"numerator": (p * 10000.0) as u64, "denominator": "MILLION"})
}

/// Istio's `fault` → the fault filter's per-route config.
fn fault_config(f: &Value) -> Value {
    check_keys(f, &["delay", "abort"], "fault");
    let mut out =
        json!({"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"});
    if let Some(d) = f.get("delay") {
        out["delay"] = json!({"fixed_delay": duration(&d["fixedDelay"]), "percentage": percent(d)});
    }
    if let Some(a) = f.get("abort") {
        out["abort"] = json!({"http_status": a["httpStatus"], "percentage": percent(a)});
    }
    out
}

/// The outbound cluster for a service port (and subset): EDS, Istio's default circuit breakers
/// unless a DestinationRule says otherwise, auto mTLS to endpoints labelled `tlsMode: istio`.
fn outbound_cluster(
    name: &str,
    s: &Service,
    port: u16,
    policy: Option<&Value>,
    identities: &[String],
    flavor: Flavor,
) -> Value {
    let mut breakers = default_circuit_breakers();
    let mut c = json!({"name": name, "type": "EDS",
        "eds_cluster_config": {"eds_config": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}, "service_name": name},
        "connect_timeout": "10s", "lb_policy": "LEAST_REQUEST", "common_lb_config": {},
        "metadata": {"filter_metadata": {"istio": {"services": [{"host": s.fqdn(), "name": s.name, "namespace": NAMESPACE}],
            "default_original_port": port}}}});
    let mut mtls = true;
    if let Some(p) = policy {
        check_keys(
            p,
            &["connectionPool", "outlierDetection", "tls"],
            "trafficPolicy",
        );
        let t = &mut breakers["thresholds"][0];
        if let Some(n) = p["connectionPool"]["tcp"]["maxConnections"].as_u64() {
            t["max_connections"] = json!(n);
        }
        if let Some(n) = p["connectionPool"]["http"]["http1MaxPendingRequests"].as_u64() {
            t["max_pending_requests"] = json!(n);
        }
        if let Some(n) = p["connectionPool"]["http"]["http2MaxRequests"].as_u64() {
            t["max_requests"] = json!(n);
        }
        if let Some(n) = p["connectionPool"]["http"]["maxRequestsPerConnection"].as_u64() {
            c["max_requests_per_connection"] = json!(n);
        }
        if let Some(o) = p.get("outlierDetection") {
            check_keys(
                o,
                &[
                    "consecutive5xxErrors",
                    "consecutiveGatewayErrors",
                    "interval",
                    "baseEjectionTime",
                    "maxEjectionPercent",
                ],
                "outlierDetection",
            );
            let mut od = json!({"enforcing_consecutive_5xx": 100, "enforcing_success_rate": 0});
            if let Some(n) = o["consecutive5xxErrors"].as_u64() {
                od["consecutive_5xx"] = json!(n);
            }
            if let Some(n) = o["consecutiveGatewayErrors"].as_u64() {
                od["consecutive_gateway_failure"] = json!(n);
                od["enforcing_consecutive_gateway_failure"] = json!(100);
            }
            for (from, to) in [
                ("interval", "interval"),
                ("baseEjectionTime", "base_ejection_time"),
            ] {
                if let Some(v) = o.get(from) {
                    od[to] = duration(v);
                }
            }
            if let Some(n) = o["maxEjectionPercent"].as_u64() {
                od["max_ejection_percent"] = json!(n);
            }
            c["outlier_detection"] = od;
        }
        if let Some(mode) = p["tls"]["mode"].as_str() {
            mtls = match mode {
                "ISTIO_MUTUAL" => true,
                "DISABLE" => false,
                other => panic!("the control-plane stand-in does not translate tls.mode {other}"),
            };
        }
    }
    c["circuit_breakers"] = breakers;
    if flavor == Flavor::IstioProxy {
        c["filters"] = json!([{"name": "istio.metadata_exchange", "typed_config": {
            "@type": "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange", "protocol": "istio-peer-exchange"}}]);
    }
    let raw = json!({"name": "tlsMode-disabled", "match": {}, "transport_socket": {"name": "envoy.transport_sockets.raw_buffer",
        "typed_config": {"@type": "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer"}}});
    if mtls {
        let sans: Vec<Value> = identities.iter().map(|i| json!({"exact": i})).collect();
        let tls = json!({"name": "tlsMode-istio", "match": {"tlsMode": "istio"}, "transport_socket": {
            "name": "envoy.transport_sockets.tls", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "sni": format!("outbound_.{port}_.{}_.{}", name.split('|').nth(2).unwrap_or(""), s.fqdn()),
                "common_tls_context": {
                    "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
                    "alpn_protocols": ["istio-peer-exchange", "istio"],
                    "tls_certificate_sds_secret_configs": [sds("default")],
                    "combined_validation_context": {
                        "default_validation_context": {"match_subject_alt_names": sans},
                        "validation_context_sds_secret_config": sds("ROOTCA")}}}}});
        c["transport_socket_matches"] = json!([tls, raw]);
    } else {
        c["transport_socket_matches"] = json!([raw]);
    }
    c
}

/// A cluster's assignment: the pods with Istio's endpoint metadata.
fn assignment(name: &str, pods: &[Workload], port: u16) -> Value {
    let endpoints: Vec<Value> = pods
        .iter()
        .map(|w| {
            let mut md = json!({"istio": {"workload": format!("{};{};{};{};Kubernetes", w.deployment, w.namespace, w.app(), w.version())}});
            if w.sidecar {
                md["envoy.transport_socket_match"] = json!({"tlsMode": "istio"});
            }
            json!({"endpoint": {"address": socket(&w.ip, port)}, "health_status": "HEALTHY",
                "metadata": {"filter_metadata": md}, "load_balancing_weight": 1})
        })
        .collect();
    let mut a = json!({"cluster_name": name});
    if !endpoints.is_empty() {
        a["endpoints"] = json!([{"locality": {}, "lb_endpoints": endpoints, "load_balancing_weight": endpoints.len()}]);
    }
    a
}

fn inbound_original_dst(name: &str) -> Value {
    json!({"name": name, "type": "ORIGINAL_DST", "connect_timeout": "10s", "lb_policy": "CLUSTER_PROVIDED",
        "cleanup_interval": "60s", "circuit_breakers": default_circuit_breakers(),
        "upstream_bind_config": {"source_address": {"address": "127.0.0.6", "port_value": 0}},
        "metadata": {"filter_metadata": {"istio": {"services": []}}}})
}

/// Istio's HCM tracing with mesh config `defaultConfig.tracing.sampling: 100` (what the tracing
/// task sets), reported by the bootstrap's Zipkin tracer.
fn hcm_tracing() -> Value {
    json!({"client_sampling": {"value": 100}, "random_sampling": {"value": 100}, "overall_sampling": {"value": 100},
        "custom_tags": [{"tag": "istio.mesh_id", "literal": {"value": "cluster.local"}}]})
}

/// Istio's text access log on the proxy's standard output.
fn istio_access_log() -> Value {
    json!({"name": "envoy.access_loggers.file", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog", "path": "/dev/stdout",
        "log_format": {"text_format_source": {"inline_string": "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n"}}}})
}

fn typed_struct(type_url: &str, value: Value) -> Value {
    json!({"@type": "type.googleapis.com/udpa.type.v1.TypedStruct", "type_url": format!("type.googleapis.com/{type_url}"), "value": value})
}

/// The HTTP filters Istio puts in a sidecar's or gateway's connection managers (its own ones
/// only for Istio's proxy).
fn http_filters(flavor: Flavor, inbound: bool) -> Vec<Value> {
    let mut f = Vec::new();
    if flavor == Flavor::IstioProxy {
        let mx = if inbound {
            json!({"downstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}], "downstream_propagation": [{"istio_headers": {}}]})
        } else {
            json!({"upstream_discovery": [{"istio_headers": {}}, {"workload_discovery": {}}], "upstream_propagation": [{"istio_headers": {}}]})
        };
        f.push(json!({"name": "istio.metadata_exchange", "typed_config": typed_struct("io.istio.http.peer_metadata.Config", mx)}));
    }
    f.push(json!({"name": "envoy.filters.http.grpc_stats", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig", "emit_filter_state": true, "stats_for_all_methods": false}}));
    if flavor == Flavor::IstioProxy && !inbound {
        f.push(json!({"name": "istio.alpn", "typed_config": {"@type": "type.googleapis.com/istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
            "alpn_override": [{"upstream_protocol": "HTTP10", "alpn_override": ["istio-http/1.0", "istio"]},
                {"upstream_protocol": "HTTP11", "alpn_override": ["istio-http/1.1", "istio"]},
                {"upstream_protocol": "HTTP2", "alpn_override": ["istio-h2", "istio"]}]}}));
    }
    f.push(json!({"name": "envoy.filters.http.fault", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}}));
    f.push(json!({"name": "envoy.filters.http.cors", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.cors.v3.Cors"}}));
    if flavor == Flavor::IstioProxy {
        let stats = if inbound {
            json!({"@type": "type.googleapis.com/stats.PluginConfig", "disable_host_header_fallback": true})
        } else {
            json!({"@type": "type.googleapis.com/stats.PluginConfig"})
        };
        f.push(json!({"name": "istio.stats", "typed_config": stats}));
    }
    f.push(json!({"name": "envoy.filters.http.router", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}));
    f
}

/// The inbound HTTP filters with the RBAC ones after metadata exchange (Istio's order).
fn with_rbac(mut filters: Vec<Value>, rbac: Vec<Value>) -> Vec<Value> {
    let at = filters
        .iter()
        .position(|f| f["name"] != "istio.metadata_exchange")
        .unwrap_or(0);
    filters.splice(at..at, rbac);
    filters
}

/// One AuthorizationPolicy rule as an RBAC policy: `to.operation` (methods, paths) as
/// permissions, `from.source` (principals, namespaces) as principals; absent parts match all.
fn rbac_policy(rule: &Value) -> Value {
    check_keys(rule, &["from", "to"], "AuthorizationPolicy.spec.rules[]");
    let mut permissions = Vec::new();
    for to in rule["to"].as_array().into_iter().flatten() {
        let op = &to["operation"];
        check_keys(op, &["methods", "paths"], "to.operation");
        let mut and = Vec::new();
        if let Some(m) = op["methods"].as_array() {
            let any: Vec<Value> = m
                .iter()
                .map(|m| json!({"header": {"name": ":method", "string_match": {"exact": m}}}))
                .collect();
            and.push(json!({"or_rules": {"rules": any}}));
        }
        if let Some(paths) = op["paths"].as_array() {
            let any: Vec<Value> = paths
                .iter()
                .filter_map(Value::as_str)
                .map(|p| {
                    let m = if p == "*" {
                        json!({"safe_regex": {"regex": ".+"}})
                    } else if let Some(prefix) = p.strip_suffix('*') {
                        json!({"prefix": prefix})
                    } else if let Some(suffix) = p.strip_prefix('*') {
                        json!({"suffix": suffix})
                    } else {
                        json!({"exact": p})
                    };
                    json!({"url_path": {"path": m}})
                })
                .collect();
            and.push(json!({"or_rules": {"rules": any}}));
        }
        if and.is_empty() {
            and.push(json!({"any": true}));
        }
        permissions.push(json!({"and_rules": {"rules": and}}));
    }
    if permissions.is_empty() {
        permissions.push(json!({"and_rules": {"rules": [{"any": true}]}}));
    }
    let mut principals = Vec::new();
    for from in rule["from"].as_array().into_iter().flatten() {
        let source = &from["source"];
        check_keys(source, &["principals", "namespaces"], "from.source");
        let mut and = Vec::new();
        if let Some(ps) = source["principals"].as_array() {
            let any: Vec<Value> = ps
                .iter()
                .filter_map(Value::as_str)
                .map(|p| json!({"authenticated": {"principal_name": {"exact": format!("spiffe://{p}")}}}))
                .collect();
            and.push(json!({"or_ids": {"ids": any}}));
        }
        if let Some(ns) = source["namespaces"].as_array() {
            let any: Vec<Value> = ns
                .iter()
                .filter_map(Value::as_str)
                .map(|n| json!({"authenticated": {"principal_name": {"safe_regex": {"regex": format!(".*/ns/{n}/.*")}}}}))
                .collect();
            and.push(json!({"or_ids": {"ids": any}}));
        }
        if and.is_empty() {
            and.push(json!({"any": true}));
        }
        principals.push(json!({"and_ids": {"ids": and}}));
    }
    if principals.is_empty() {
        principals.push(json!({"and_ids": {"ids": [{"any": true}]}}));
    }
    json!({"permissions": permissions, "principals": principals})
}

/// Network filters ahead of an inbound chain's terminal filter.
fn inbound_network_filters(flavor: Flavor) -> Vec<Value> {
    if flavor == Flavor::IstioProxy {
        vec![json!({"name": "istio.metadata_exchange", "typed_config": {
            "@type": "type.googleapis.com/envoy.tcp.metadataexchange.config.MetadataExchange", "protocol": "istio-peer-exchange"}})]
    } else {
        Vec::new()
    }
}

/// A TCP chain to `cluster` with Istio's stats ahead of it.
fn tcp_filters(cluster: &str, flavor: Flavor, inbound: bool) -> Vec<Value> {
    let mut f = if inbound {
        inbound_network_filters(flavor)
    } else {
        Vec::new()
    };
    if flavor == Flavor::IstioProxy {
        let stats = if inbound {
            json!({"@type": "type.googleapis.com/stats.PluginConfig", "disable_host_header_fallback": true})
        } else {
            json!({"@type": "type.googleapis.com/stats.PluginConfig"})
        };
        f.push(json!({"name": "istio.stats", "typed_config": stats}));
    }
    f.push(
        json!({"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": cluster, "cluster": cluster}}),
    );
    f
}

/// The server side of Istio mTLS: the workload certificate, peers verified against the root
/// CA with any SPIFFE identity of the trust domain.
fn downstream_tls() -> Value {
    json!({"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "common_tls_context": {
            "tls_params": {"tls_minimum_protocol_version": "TLSv1_2", "tls_maximum_protocol_version": "TLSv1_3"},
            "alpn_protocols": ["h2", "http/1.1"],
            "tls_certificate_sds_secret_configs": [sds("default")],
            "combined_validation_context": {
                "default_validation_context": {"match_subject_alt_names": [{"prefix": format!("spiffe://{TRUST_DOMAIN}/")}]},
                "validation_context_sds_secret_config": sds("ROOTCA")}},
        "require_client_certificate": true}})
}

/// An outbound `bind_to_port: false` listener for a service port (the original destination
/// `0.0.0.0:<port>` reached through `virtualOutbound`).
fn outbound_listener(name: &str, port: u16, flavor: Flavor) -> Value {
    let mut passthrough = Vec::new();
    if flavor == Flavor::IstioProxy {
        passthrough.push(json!({"name": "istio.stats", "typed_config": {"@type": "type.googleapis.com/stats.PluginConfig"}}));
    }
    passthrough.push(json!({"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy", "stat_prefix": "PassthroughCluster", "cluster": "PassthroughCluster"}}));
    json!({"name": name, "address": socket("0.0.0.0", port), "bind_to_port": false, "traffic_direction": "OUTBOUND",
        "listener_filters_timeout": "0s", "continue_on_listener_filters_timeout": true,
        "listener_filters": [
            {"name": "envoy.filters.listener.tls_inspector", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector"}},
            {"name": "envoy.filters.listener.http_inspector", "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.listener.http_inspector.v3.HttpInspector"}}],
        "filter_chains": [{"filter_chain_match": {"transport_protocol": "raw_buffer", "application_protocols": ["http/1.1", "h2c"]},
            "filters": [{"name": "envoy.filters.network.http_connection_manager", "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": format!("outbound_0.0.0.0_{port}"),
                "rds": {"config_source": {"ads": {}, "initial_fetch_timeout": "0s", "resource_api_version": "V3"}, "route_config_name": port.to_string()},
                "http_filters": http_filters(flavor, false),
                "use_remote_address": false, "upgrade_configs": [{"upgrade_type": "websocket"}], "stream_idle_timeout": "0s",
                "normalize_path": true, "path_with_escaped_slashes_action": "KEEP_UNCHANGED",
                "request_id_extension": {"typed_config": {"@type": "type.googleapis.com/envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig", "use_request_id_for_trace_sampling": true}},
                "access_log": [istio_access_log()], "tracing": hcm_tracing()}}]}],
        "default_filter_chain": {"name": "PassthroughFilterChain", "filters": passthrough}})
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bookinfo() -> Mesh {
        let yaml = std::fs::read_to_string(
            "../../shared/istio/samples/bookinfo/platform/kube/bookinfo.yaml",
        )
        .or_else(|_| {
            std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/istio/samples/bookinfo/platform/kube/bookinfo.yaml"
            ))
        })
        .expect("bookinfo.yaml");
        Mesh::from_kube(&yaml, &|_| "10.0.1.1".into(), &|_| "10.0.0.1".into())
    }

    #[test]
    fn bookinfo_sidecar_has_istio_names() {
        let mut mesh = bookinfo();
        mesh.config.apply(
            &std::fs::read_to_string(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../shared/istio/samples/bookinfo/networking/destination-rule-all.yaml"
            ))
            .expect("dr"),
        );
        let w = mesh
            .workloads
            .iter()
            .find(|w| w.deployment == "productpage-v1")
            .expect("productpage")
            .clone();
        let r = mesh.resources(&w, false, Flavor::IstioProxy);
        for c in [
            "outbound|9080||reviews.default.svc.cluster.local",
            "outbound|9080|v2|reviews.default.svc.cluster.local",
            "inbound|9080||",
            "PassthroughCluster",
            "BlackHoleCluster",
        ] {
            assert!(r[CLUSTER].contains_key(c), "{c}");
        }
        assert_eq!(
            r[ENDPOINTS]["outbound|9080|v3|reviews.default.svc.cluster.local"]["endpoints"][0]
                ["lb_endpoints"]
                .as_array()
                .map(Vec::len),
            Some(1)
        );
        assert!(
            r[LISTENER].contains_key("virtualInbound") && r[LISTENER].contains_key("0.0.0.0_9080")
        );
        assert_eq!(
            w.node_id(false),
            "sidecar~10.0.0.1~productpage-v1-0.default~default.svc.cluster.local"
        );
    }

    #[test]
    fn a_service_entry_opens_its_host_under_registry_only() {
        let mut mesh = bookinfo();
        mesh.config.registry_only = true;
        mesh.config.apply("kind: ServiceEntry\nmetadata: {name: e}\nspec: {hosts: [external.test], ports: [{number: 80, name: http, protocol: HTTP}], resolution: STATIC, location: MESH_EXTERNAL, endpoints: [{address: 10.9.9.9}]}");
        let w = mesh.workloads[0].clone();
        let r = mesh.resources(&w, false, Flavor::IstioProxy);
        let hosts: Vec<&Value> = r[ROUTES]["80"]["virtual_hosts"]
            .as_array()
            .expect("vhosts")
            .iter()
            .map(|v| &v["domains"])
            .collect();
        assert_eq!(
            hosts,
            [&json!(["external.test", "external.test:80"]), &json!(["*"])]
        );
        assert_eq!(
            r[ENDPOINTS]["outbound|80||external.test"]["endpoints"][0]["lb_endpoints"][0]
                ["endpoint"]["address"]["socket_address"]["address"],
            "10.9.9.9"
        );
        assert!(r[LISTENER].contains_key("0.0.0.0_80"));
    }

    #[test]
    fn authorization_policies_become_istio_rbac_filters() {
        let mut mesh = bookinfo();
        mesh.config.apply("kind: AuthorizationPolicy\nmetadata: {name: deny-all}\nspec: {action: DENY, rules: [{}]}\n---\nkind: AuthorizationPolicy\nmetadata: {name: viewer}\nspec: {selector: {matchLabels: {app: details}}, rules: [{from: [{source: {principals: [cluster.local/ns/default/sa/sleep]}}], to: [{operation: {methods: [GET]}}]}]}");
        let w = mesh
            .workloads
            .iter()
            .find(|w| w.deployment == "details-v1")
            .expect("details")
            .clone();
        let f = mesh.rbac_filters(&w);
        // Istio's golden for a DENY policy with an empty rule (xds/authz/http/deny-empty-rule-out.yaml).
        assert_eq!(
            f[0]["typed_config"]["rules"],
            json!({"action": "DENY", "policies": {"ns[default]-policy[deny-all]-rule[0]": {
            "permissions": [{"and_rules": {"rules": [{"any": true}]}}], "principals": [{"and_ids": {"ids": [{"any": true}]}}]}}})
        );
        assert_eq!(
            f[1]["typed_config"]["rules"]["policies"]["ns[default]-policy[viewer]-rule[0]"]
                ["principals"][0]["and_ids"]["ids"][0]["or_ids"]["ids"][0],
            json!({"authenticated": {"principal_name": {"exact": "spiffe://cluster.local/ns/default/sa/sleep"}}})
        );
        let other = mesh
            .workloads
            .iter()
            .find(|w| w.deployment == "ratings-v1")
            .expect("ratings")
            .clone();
        assert_eq!(
            mesh.rbac_filters(&other).len(),
            1,
            "the viewer policy selects details only"
        );
    }

    #[test]
    fn go_durations_become_proto_durations() {
        assert_eq!(duration(&json!("3m")), json!("180s"));
        assert_eq!(duration(&json!("0.5s")), json!("0.5s"));
        assert_eq!(duration(&json!("500ms")), json!("0.5s"));
        assert_eq!(duration(&json!("1h")), json!("3600s"));
    }

    #[test]
    #[should_panic(expected = "does not translate VirtualService.spec.http[].corsPolicy")]
    fn untranslated_fields_are_refused() {
        let mut mesh = bookinfo();
        mesh.config.apply("kind: VirtualService\nmetadata: {name: x}\nspec: {hosts: [reviews], http: [{corsPolicy: {}, route: [{destination: {host: reviews}}]}]}");
        let w = mesh.workloads[0].clone();
        mesh.resources(&w, false, Flavor::IstioProxy);
    }
}
