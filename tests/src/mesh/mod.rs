//! Bookinfo in a box: a network namespace per pod on a private bridge, Istio's sidecar iptables
//! rules in each app pod, the Bookinfo-shaped services (`bookinfo` binary), a pilot-agent
//! stand-in for readiness, and the proxy (Petrel or Envoy) started in each pod with pilot-agent's
//! command line on the bootstrap pilot-agent renders (`../shared/istio/bootstrap/tracing_zipkin.json`
//! with the pod's node identity), fed by [`control_plane::ControlPlane`] over the pod's Unix
//! sockets. Nothing outside the namespaces it makes is touched; they go when it is dropped.

pub mod control_plane;
pub mod istiod;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::watch;

use crate::netns::{Hub, Pod};
use crate::sds::{root_secret, workload_secret, Secrets};
use crate::tls::Ca;
use control_plane::{ControlPlane, ProxyIdentity};
use istiod::{Flavor, Mesh, Workload};

/// The uid the proxy runs as (istio-iptables leaves its traffic alone).
const PROXY_UID: u32 = 1337;
/// The uid the apps run as.
const APP_UID: u32 = 1000;
pub const GATEWAY: &str = "istio-ingressgateway";
/// A host outside the mesh (no sidecar, not in the registry) for the egress tasks.
pub const EXTERNAL: &str = "external";
pub const EXTERNAL_IP: &str = "10.250.3.10";
/// The Zipkin collector every proxy reports to (pilot-agent's `zipkin` cluster).
pub const ZIPKIN: &str = "zipkin";
pub const ZIPKIN_IP: &str = "10.250.3.11";

/// The other samples Istio's tasks use, as in `samples/httpbin`, `samples/sleep` and the
/// fortio client of the circuit-breaking task (whose stats matcher adds `cluster.outbound`).
const MORE_APPS: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: httpbin, labels: {app: httpbin}}
spec:
  ports: [{name: http, port: 8000, targetPort: 8080}]
  selector: {app: httpbin}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: httpbin-v1}
spec:
  template:
    metadata: {labels: {app: httpbin, version: v1}}
    spec: {serviceAccountName: httpbin}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: httpbin-v2}
spec:
  template:
    metadata: {labels: {app: httpbin, version: v2}}
    spec: {serviceAccountName: httpbin}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: sleep}
spec:
  template:
    metadata: {labels: {app: sleep}}
    spec: {serviceAccountName: sleep}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: fortio-deploy}
spec:
  template:
    metadata: {labels: {app: fortio}}
    spec: {serviceAccountName: default}
"#;
pub const CLIENT: &str = "client";

/// A file of `../shared/istio/`.
pub fn istio_file(rel: &str) -> String {
    let p = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../shared/istio")
        .join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The `bookinfo` binary built with the tests.
pub fn bookinfo_bin() -> PathBuf {
    crate::target_bin("bookinfo")
}

/// The running mesh. Fields drop in order: pods (and their processes) before the hub.
pub struct Bookinfo {
    pub pods: BTreeMap<String, Pod>,
    pub cp: ControlPlane,
    pub flavor: Flavor,
    pub dir: PathBuf,
    pub ca: Ca,
    /// Each pod's proxy process.
    pub proxies: BTreeMap<String, u32>,
    /// `--resolve name=ip` for every service: the pods' DNS.
    resolve: Vec<String>,
    secrets: BTreeMap<String, watch::Sender<Secrets>>,
    /// Runs the control plane while the test blocks on its clients.
    _rt: tokio::runtime::Runtime,
    _hub: Hub,
}

impl Bookinfo {
    /// Starts the mesh of `bookinfo.yaml` plus the ingress gateway and a sidecar-less client,
    /// with `proxy` (Petrel or Envoy) as every proxy, and waits until each is ready as
    /// pilot-agent's probe sees it. `tag` prefixes the namespaces.
    pub fn start(tag: &str, flavor: Flavor, proxy: &Path) -> Bookinfo {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("runtime");
        let dir = std::env::temp_dir().join(format!("petrel-mesh-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("mesh dir");
        open_dir(&dir);
        let kube =
            istio_file("samples/bookinfo/platform/kube/bookinfo.yaml") + "\n---\n" + MORE_APPS;
        let service_names: Vec<String> = istiod::yaml_docs(&kube)
            .iter()
            .filter(|d| d["kind"] == "Service")
            .filter_map(|d| d["metadata"]["name"].as_str().map(String::from))
            .collect();
        let deployments: Vec<String> = istiod::yaml_docs(&kube)
            .iter()
            .filter(|d| d["kind"] == "Deployment")
            .filter_map(|d| d["metadata"]["name"].as_str().map(String::from))
            .collect();
        let pod_ip = |name: &str| {
            let i = deployments
                .iter()
                .position(|d| d == name)
                .expect("deployment");
            format!("10.250.0.{}", 10 + i)
        };
        let service_ip = |name: &str| {
            let i = service_names
                .iter()
                .position(|s| s == name)
                .expect("service");
            format!("10.250.1.{}", 10 + i)
        };
        let mut mesh = Mesh::from_kube(&kube, &service_ip, &pod_ip);
        mesh.workloads.push(Workload {
            deployment: GATEWAY.into(),
            namespace: "istio-system".into(),
            labels: [("istio", "ingressgateway"), ("app", GATEWAY)]
                .into_iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            service_account: "istio-ingressgateway-service-account".into(),
            ip: "10.250.0.3".into(),
            sidecar: false,
        });
        mesh.config.apply(&istio_file(
            "samples/bookinfo/networking/bookinfo-gateway.yaml",
        ));
        mesh.config.apply(&istio_file(
            "samples/bookinfo/networking/destination-rule-all.yaml",
        ));

        let hub = Hub::new(tag);
        let ca = Ca::new(&dir, "mesh-ca");
        let cp = ControlPlane::new(mesh.clone());
        let resolve: Vec<String> = mesh
            .services
            .iter()
            .flat_map(|s| {
                [
                    "--resolve".to_string(),
                    format!("{}={}", s.name, s.cluster_ip),
                ]
            })
            .collect();
        let mut pods = BTreeMap::new();
        let mut secrets = BTreeMap::new();
        let mut proxies = BTreeMap::new();
        let template: Value =
            serde_json::from_str(&istio_file("bootstrap/tracing_zipkin.json")).expect("bootstrap");
        for (i, w) in mesh.workloads.iter().enumerate() {
            let gateway = w.deployment == GATEWAY;
            let mut pod = Pod::on_hub(&hub, &w.deployment, &w.ip, i);
            let pod_dir = dir.join(&w.deployment);
            std::fs::create_dir_all(pod_dir.join("etc/istio/proxy")).expect("pod dir");
            open_dir(&pod_dir);
            let cert = ca.svid(&pod_dir, "workload", &[&w.spiffe()]);
            let (tx, rx) = watch::channel((1, vec![workload_secret(&cert), root_secret(&ca)]));
            secrets.insert(w.deployment.clone(), tx);
            let identity = ProxyIdentity {
                workload: w.clone(),
                gateway,
                flavor,
            };
            rt.block_on(cp.serve(&pod_dir, identity, rx));
            let bootstrap = pod_dir.join("etc/istio/proxy/envoy-rev.json");
            std::fs::write(
                &bootstrap,
                render_bootstrap(&template, w, gateway).to_string(),
            )
            .expect("bootstrap");
            if !gateway {
                pod.istio_iptables();
                let role = match w.app() {
                    "reviews" => Some(format!("reviews-{}", w.version())),
                    // Clients only.
                    "sleep" | "fortio" => None,
                    app => Some(app.to_string()),
                };
                if let Some(role) = role {
                    let port = if role == "httpbin" { "8080" } else { "9080" };
                    let mut cmd = vec![
                        bookinfo_bin().display().to_string(),
                        "serve".into(),
                        role,
                        w.pod(),
                        "--port".into(),
                        port.into(),
                    ];
                    cmd.extend(resolve.iter().cloned());
                    let cmd: Vec<&str> = cmd.iter().map(String::as_str).collect();
                    pod.spawn_logged(APP_UID, &pod_dir, &cmd, &pod_dir.join("app.log"));
                }
            }
            let agent = bookinfo_bin().display().to_string();
            pod.spawn_logged(
                APP_UID,
                &pod_dir,
                &[&agent, "agent"],
                &pod_dir.join("agent.log"),
            );
            let bin = proxy.display().to_string();
            // pilot-agent's default level; `PETREL_MESH_LOG_LEVEL` raises it when debugging.
            let level = std::env::var("PETREL_MESH_LOG_LEVEL").unwrap_or_else(|_| "warning".into());
            let pid = pod.spawn_logged(
                PROXY_UID,
                &pod_dir,
                &[
                    &bin,
                    "-c",
                    "etc/istio/proxy/envoy-rev.json",
                    "--drain-time-s",
                    "45",
                    "--drain-strategy",
                    "immediate",
                    "--local-address-ip-version",
                    "v4",
                    "--file-flush-interval-msec",
                    "1000",
                    "--disable-hot-restart",
                    "--allow-unknown-static-fields",
                    "-l",
                    &level,
                    "--component-log-level",
                    "misc:error",
                    "--concurrency",
                    "2",
                ],
                &pod_dir.join("proxy.log"),
            );
            proxies.insert(w.deployment.clone(), pid);
            pods.insert(w.deployment.clone(), pod);
        }
        let client = Pod::on_hub(&hub, CLIENT, "10.250.0.2", mesh.workloads.len());
        pods.insert(CLIENT.into(), client);
        // A host outside the mesh: httpbin's endpoints on port 80, no sidecar.
        let mut external = Pod::on_hub(&hub, EXTERNAL, EXTERNAL_IP, mesh.workloads.len() + 1);
        let ext_dir = dir.join(EXTERNAL);
        std::fs::create_dir_all(&ext_dir).expect("external dir");
        let bin = bookinfo_bin().display().to_string();
        // Root: port 80 is privileged.
        external.spawn_logged(
            0,
            &ext_dir,
            &[&bin, "serve", "httpbin", "external-0", "--port", "80"],
            &ext_dir.join("app.log"),
        );
        pods.insert(EXTERNAL.into(), external);
        let mut zipkin = Pod::on_hub(&hub, ZIPKIN, ZIPKIN_IP, mesh.workloads.len() + 2);
        let zipkin_dir = dir.join(ZIPKIN);
        std::fs::create_dir_all(&zipkin_dir).expect("zipkin dir");
        zipkin.spawn_logged(
            APP_UID,
            &zipkin_dir,
            &[&bin, "serve", "zipkin", "zipkin-0", "--port", "9411"],
            &zipkin_dir.join("app.log"),
        );
        pods.insert(ZIPKIN.into(), zipkin);
        let mesh = Bookinfo {
            pods,
            cp,
            flavor,
            dir,
            ca,
            resolve,
            proxies,
            secrets,
            _rt: rt,
            _hub: hub,
        };
        mesh.wait_ready();
        mesh
    }

    /// Waits until every proxy answers pilot-agent's readiness probe (15021 `/healthz/ready`).
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(60);
        for (name, pod) in self
            .pods
            .iter()
            .filter(|(n, _)| ![CLIENT, EXTERNAL, ZIPKIN].contains(&n.as_str()))
        {
            loop {
                let r = self.get_in(pod, "http://127.0.0.1:15021/healthz/ready", 1, &[]);
                if r.codes.get("200") == Some(&1) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "{name} never became ready: {r:?}\nproxy log:\n{}\nNACKs: {:?}",
                    self.log(name, "proxy.log"),
                    self.cp.nacks()
                );
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    /// A pod's log file (`proxy.log`, `app.log`, `agent.log`).
    pub fn log(&self, pod: &str, file: &str) -> String {
        std::fs::read_to_string(self.dir.join(pod).join(file)).unwrap_or_default()
    }

    /// Every pod's logs and the NACKs: what a failed assertion shows.
    pub fn diagnose(&self) -> String {
        let mut out = format!("NACKs: {:?}\n", self.cp.nacks());
        for name in self.pods.keys() {
            for file in ["proxy.log", "app.log"] {
                let text = self.log(name, file);
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                if !tail.is_empty() {
                    out += &format!("--- {name}/{file}\n");
                    for l in tail.iter().rev() {
                        out += l;
                        out += "\n";
                    }
                }
            }
        }
        out
    }

    /// Runs the `bookinfo get` client in `pod`.
    pub fn get_in(&self, pod: &Pod, url: &str, n: usize, headers: &[&str]) -> Answers {
        self.load(pod, url, 1, n, headers)
    }

    /// `n` requests over `c` concurrent connections from `pod` (fortio's `-c C -n N`).
    pub fn load(&self, pod: &Pod, url: &str, c: usize, n: usize, headers: &[&str]) -> Answers {
        let bin = bookinfo_bin().display().to_string();
        let (n, c) = (n.to_string(), c.to_string());
        let mut cmd = vec![bin.as_str(), "get", url, "-n", &n, "-c", &c];
        cmd.extend(self.resolve.iter().map(String::as_str));
        for h in headers {
            cmd.extend(["-H", h]);
        }
        let out = pod
            .try_run(&cmd)
            .unwrap_or_else(|e| panic!("{cmd:?} in {}: {e}", pod.name));
        let v: Value = serde_json::from_str(out.trim()).unwrap_or_else(|e| panic!("{out}: {e}"));
        Answers {
            codes: serde_json::from_value(v["codes"].clone()).unwrap_or_default(),
            bodies: serde_json::from_value(v["bodies"].clone()).unwrap_or_default(),
        }
    }

    /// The proxy's `/stats` lines in `pod` matching `filter` (as `pilot-agent request GET stats`).
    pub fn stats(&self, pod: &str, filter: &str) -> BTreeMap<String, String> {
        let a = self.get_in(
            &self.pods[pod],
            &format!("http://127.0.0.1:15000/stats?filter={filter}"),
            1,
            &[],
        );
        a.bodies
            .keys()
            .flat_map(|b| b.lines().map(String::from).collect::<Vec<_>>())
            .filter_map(|l| {
                l.split_once(": ")
                    .map(|(k, v)| (k.to_string(), v.to_string()))
            })
            .collect()
    }

    /// An admin request to the proxy of `pod` with curl (`POST` for the mutating endpoints, as
    /// pilot-agent sends them): the status code and body.
    pub fn admin(&self, pod: &str, method: &str, path: &str) -> String {
        let url = format!("http://127.0.0.1:15000{path}");
        self.pods[pod]
            .try_run(&["curl", "-s", "-X", method, "-w", " %{http_code}", &url])
            .map(|out| out.split_whitespace().collect::<Vec<_>>().join(" "))
            .unwrap_or_else(|e| format!("failed {e}"))
    }

    /// Whether the proxy of `pod` is still running.
    pub fn proxy_running(&self, pod: &str) -> bool {
        std::path::Path::new(&format!("/proc/{}", self.proxies[pod])).exists()
            && !std::fs::read_to_string(format!("/proc/{}/stat", self.proxies[pod]))
                .is_ok_and(|s| s.contains(") Z "))
    }

    /// Sends `bytes` from the client to `port` of the gateway as they are: the answer's first
    /// line, or how the connection ended.
    pub fn raw_to_gateway(&self, port: u16, bytes: &[u8]) -> String {
        use std::io::Write;
        let mut child = std::process::Command::new("ip")
            .args(["netns", "exec", &self.pods[CLIENT].name])
            .arg(bookinfo_bin())
            .args(["raw", &format!("{}:{port}", self.pods[GATEWAY].ip)])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .expect("raw client");
        if let Some(mut stdin) = child.stdin.take() {
            let _ = stdin.write_all(bytes);
        }
        let out = child.wait_with_output().expect("raw client");
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Every span the collector has.
    pub fn spans(&self) -> Vec<Value> {
        let a = self.get_in(
            &self.pods[CLIENT],
            &format!("http://{ZIPKIN_IP}:9411/spans"),
            1,
            &[],
        );
        a.bodies
            .keys()
            .next()
            .and_then(|b| serde_json::from_str(b).ok())
            .unwrap_or_default()
    }

    /// `n` requests for `path` from the client through the ingress gateway.
    pub fn through_gateway(&self, path: &str, n: usize, headers: &[&str]) -> Answers {
        let gw = &self.pods[GATEWAY];
        self.get_in(
            &self.pods[CLIENT],
            &format!("http://{}:8080{path}", gw.ip),
            n,
            headers,
        )
    }

    /// Applies Istio YAML; every proxy is sent the difference.
    pub fn apply(&self, yaml: &str) {
        self.cp.update(|m| m.config.apply(yaml));
    }

    /// A new workload certificate for every pod (pilot-agent's rotation).
    pub fn rotate(&self) {
        let mesh = self.cp.mesh();
        for (name, tx) in &self.secrets {
            let Some(w) = mesh.workloads.iter().find(|w| &w.deployment == name) else {
                continue;
            };
            let cert = self
                .ca
                .svid(&self.dir.join(name), "workload-rotated", &[&w.spiffe()]);
            tx.send_modify(|(v, s)| {
                *v += 1;
                s[0] = workload_secret(&cert);
            });
        }
    }
}

impl Drop for Bookinfo {
    fn drop(&mut self) {
        // Processes and namespaces first; the files stay when a test failed, for its logs.
        self.pods.clear();
        if !std::thread::panicking() {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

/// What `bookinfo get` saw: answers by status code and by body.
#[derive(Debug, Default, Clone)]
pub struct Answers {
    pub codes: BTreeMap<String, usize>,
    pub bodies: BTreeMap<String, usize>,
}

impl Answers {
    /// How many answers had each value of `f` over their JSON bodies.
    pub fn by(&self, f: impl Fn(&Value) -> String) -> BTreeMap<String, usize> {
        let mut out = BTreeMap::new();
        for (body, n) in &self.bodies {
            let v: Value = serde_json::from_str(body).unwrap_or_else(|_| json!(body));
            *out.entry(f(&v)).or_default() += n;
        }
        out
    }
}

/// World-readable and traversable, so that the proxy's uid reaches its files.
fn open_dir(p: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let _ = std::fs::set_permissions(p, std::fs::Permissions::from_mode(0o755));
}

/// pilot-agent's bootstrap for `w`: the template with the pod's node identity and the Unix
/// socket paths pilot-agent uses.
fn render_bootstrap(template: &Value, w: &Workload, gateway: bool) -> Value {
    let mut b = template.clone();
    let mut labels = w.labels.clone();
    labels.insert("service.istio.io/canonical-name".into(), w.app().into());
    if !w.version().is_empty() {
        labels.insert(
            "service.istio.io/canonical-revision".into(),
            w.version().into(),
        );
    }
    if w.sidecar {
        labels.insert("security.istio.io/tlsMode".into(), "istio".into());
    }
    b["node"] = json!({
        "id": w.node_id(gateway),
        "cluster": format!("{}.{}", w.app(), w.namespace),
        "locality": {},
        "metadata": {
            "NAME": w.pod(), "NAMESPACE": w.namespace, "LABELS": labels,
            "WORKLOAD_NAME": w.deployment, "SERVICE_ACCOUNT": w.service_account,
            "OWNER": format!("kubernetes://apis/apps/v1/namespaces/{}/deployments/{}", w.namespace, w.deployment),
            "CLUSTER_ID": "Kubernetes", "MESH_ID": "cluster.local", "INSTANCE_IPS": w.ip,
            "ISTIO_VERSION": "1.28.0", "INTERCEPTION_MODE": "REDIRECT",
            "ENVOY_PROMETHEUS_PORT": 15090, "ENVOY_STATUS_PORT": 15021,
            "PILOT_SAN": ["istiod.istio-system.svc"], "APP_CONTAINERS": w.app(),
        }
    });
    // The fortio sample's `proxyStatsMatcher: {inclusionPrefixes: [cluster.outbound]}`.
    if w.app() == "fortio" {
        if let Some(p) =
            b["stats_config"]["stats_matcher"]["inclusion_list"]["patterns"].as_array_mut()
        {
            p.push(json!({"prefix": "cluster.outbound"}));
        }
    }
    for c in b["static_resources"]["clusters"]
        .as_array_mut()
        .into_iter()
        .flatten()
    {
        let path = match c["name"].as_str() {
            Some("xds-grpc") => "./etc/istio/proxy/XDS",
            Some("sds-grpc") => "./var/run/secrets/workload-spiffe-uds/socket",
            Some("zipkin") => {
                // `zipkin.istio-system:9411` in a cluster; no DNS here.
                c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] =
                    json!({"socket_address": {"address": ZIPKIN_IP, "port_value": 9411}});
                continue;
            }
            _ => continue,
        };
        c["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"] =
            json!({"pipe": {"path": path}});
    }
    b
}
