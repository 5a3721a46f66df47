//! The admin API on the bootstrap's admin address, with Envoy's paths and output formats.

use std::convert::Infallible;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use arc_swap::ArcSwap;
use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::Full;
use serde_json::{json, Value};
use xds_client::TypeRegistry;

use crate::cli::Options;
use crate::upstream::cluster::HostAddress;
use crate::upstream::host_set::health_flag;

mod config_dump;
mod prometheus;
use crate::config::snapshot::Snapshot;
use crate::logging;
use crate::observe::stats::Store;

pub struct AdminState {
    pub current: Arc<ArcSwap<Snapshot>>,
    pub store: Store,
    pub options: Options,
    pub started: Instant,
    pub started_wall: std::time::SystemTime,
    pub healthcheck_failed: AtomicBool,
    pub shutdown: tokio::sync::Notify,
    /// LIVE once initialization (xDS) is over.
    pub initialized: Arc<AtomicBool>,
    pub manager: Arc<std::sync::Mutex<crate::listener::manager::ListenerManager>>,
}

const HELP: &[(&str, &str)] = &[
    ("/", "Admin home page"),
    ("/clusters", "upstream cluster status"),
    ("/config_dump", "dump current Envoy configs"),
    ("/drain_listeners", "drain listeners"),
    (
        "/healthcheck/fail",
        "cause the server to fail health checks",
    ),
    ("/healthcheck/ok", "cause the server to pass health checks"),
    ("/help", "print out list of admin commands"),
    ("/listeners", "print listener info"),
    ("/logging", "query/change logging levels"),
    ("/quitquitquit", "exit the server"),
    (
        "/ready",
        "print server state, return 200 if LIVE, otherwise return 503",
    ),
    ("/reopen_logs", "reopen access logs"),
    ("/server_info", "print server version/status information"),
    ("/stats", "print server stats"),
    (
        "/stats/prometheus",
        "print server stats in prometheus format",
    ),
];

fn text(status: StatusCode, body: impl Into<Bytes>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(body.into()));
    *r.status_mut() = status;
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("text/plain; charset=UTF-8"),
    );
    r.headers_mut().insert(
        "x-content-type-options",
        http::HeaderValue::from_static("nosniff"),
    );
    r.headers_mut().insert(
        "cache-control",
        http::HeaderValue::from_static("no-cache, max-age=0"),
    );
    r
}

/// Envoy's admin JSON: pretty-printed with a one-space indent.
fn json_resp(v: &Value) -> Response<Full<Bytes>> {
    use serde::Serialize;
    let mut out = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(
        &mut out,
        serde_json::ser::PrettyFormatter::with_indent(b" "),
    );
    let _ = v.serialize(&mut ser);
    out.push(b'\n');
    let mut r = text(StatusCode::OK, out);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn query_params(q: Option<&str>) -> Vec<(String, String)> {
    q.unwrap_or("")
        .split('&')
        .filter(|s| !s.is_empty())
        .map(|kv| {
            let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
            let dec = |s: &str| {
                percent_encoding::percent_decode_str(&s.replace('+', " "))
                    .decode_utf8_lossy()
                    .into_owned()
            };
            (dec(k), dec(v))
        })
        .collect()
}

/// Answers an admin request and writes `admin.access_log` for it.
pub async fn handle_logged(
    req: Request<hyper::body::Incoming>,
    st: Arc<AdminState>,
    remote: std::net::SocketAddr,
    local: std::net::SocketAddr,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let logs = st.current.load().admin_access_logs.clone();
    if logs.is_empty() {
        return handle(req, st).await;
    }
    let start = std::time::Instant::now();
    let start_time = std::time::SystemTime::now();
    let method = req.method().clone();
    let uri = req.uri().clone();
    let headers = req.headers().clone();
    let resp = handle(req, st).await?;
    let authority = headers
        .get(http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let mut v = crate::observe::formatter::StreamValues::new(start_time, remote, local);
    v.request_headers = Some(&headers);
    v.request_line = Some(crate::observe::formatter::RequestLine {
        method: method.as_str(),
        path: uri.path_and_query().map_or("/", |p| p.as_str()),
        authority,
        scheme: "http",
    });
    v.response_headers = Some(resp.headers());
    v.response_code = resp.status().as_u16();
    v.response_code_details = "admin_filter_response";
    v.protocol = "HTTP/1.1";
    v.bytes_sent = http_body::Body::size_hint(resp.body()).exact().unwrap_or(0);
    v.duration = Some(start.elapsed());
    crate::observe::access_log::log_all(&logs, &v);
    Ok(resp)
}

pub async fn handle(
    req: Request<hyper::body::Incoming>,
    st: Arc<AdminState>,
) -> Result<Response<Full<Bytes>>, Infallible> {
    let path = req.uri().path().to_string();
    let params = query_params(req.uri().query());
    let has = |k: &str| params.iter().any(|(p, _)| p == k);
    let get = |k: &str| params.iter().find(|(p, _)| p == k).map(|(_, v)| v.clone());
    let mutating = matches!(
        path.as_str(),
        "/quitquitquit"
            | "/healthcheck/fail"
            | "/healthcheck/ok"
            | "/logging"
            | "/drain_listeners"
            | "/reopen_logs"
    );
    if mutating && req.method() != http::Method::POST {
        return Ok(text(
            StatusCode::METHOD_NOT_ALLOWED,
            format!("Method {} not allowed, POST required.", req.method()),
        ));
    }
    Ok(match path.as_str() {
        // Envoy reports DRAINING (and /ready fails) once health checks are failed.
        "/ready" if st.healthcheck_failed.load(Ordering::Relaxed) => {
            text(StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n")
        }
        // Until xDS initialization is over, Envoy answers INITIALIZING.
        "/ready" if !st.initialized.load(Ordering::Relaxed) => {
            text(StatusCode::SERVICE_UNAVAILABLE, "INITIALIZING\n")
        }
        "/ready" => text(StatusCode::OK, "LIVE\n"),
        "/help" | "/" => {
            let mut s = String::from("admin commands are:\n");
            for (p, d) in HELP {
                s.push_str(&format!("  {p}: {d}\n"));
            }
            text(StatusCode::OK, s)
        }
        "/server_info" => json_resp(&server_info(&st)),
        "/stats" => stats(
            &st,
            has("usedonly"),
            get("filter"),
            get("format").as_deref() == Some("json"),
        ),
        "/stats/prometheus" => prometheus(&st, has("usedonly"), get("filter")),
        "/clusters" => clusters(&st, get("format").as_deref() == Some("json")),
        "/listeners" => listeners(&st, get("format").as_deref() == Some("json")),
        "/config_dump" => {
            let q = config_dump::Query {
                resource: get("resource"),
                mask: get("mask"),
                include_eds: has("include_eds"),
            };
            let snap = st.current.load();
            let dump = config_dump::render(
                &snap,
                &crate::http::date::rfc3339_millis(st.started_wall),
                &q,
            );
            crate::memory::release_config_memory();
            match dump {
                Ok(v) => json_resp(&v),
                Err(msg) => text(StatusCode::NOT_FOUND, msg),
            }
        }
        "/logging" => logging_endpoint(&params),
        "/healthcheck/fail" | "/healthcheck/ok" => {
            // Envoy sets `server.live` at once; `server.state` follows at the next stats flush.
            let fail = path == "/healthcheck/fail";
            st.healthcheck_failed.store(fail, Ordering::Relaxed);
            st.store.gauge("server.live").set(i64::from(!fail));
            text(StatusCode::OK, "OK\n")
        }
        "/quitquitquit" => {
            st.shutdown.notify_one();
            text(StatusCode::OK, "OK\n")
        }
        "/reopen_logs" => {
            crate::observe::access_log::reopen_all();
            text(StatusCode::OK, "OK\n")
        }
        "/drain_listeners" => {
            drain_listeners(&st, has("inboundonly"), has("graceful"), has("skip_exit"));
            text(StatusCode::OK, "OK\n")
        }
        _ => {
            let mut s = String::from("invalid path. admin commands are:\n");
            for (p, d) in HELP {
                s.push_str(&format!("  {p}: {d}\n"));
            }
            text(StatusCode::NOT_FOUND, s)
        }
    })
}

/// `/server_info` with Envoy's fields in Envoy's order.
fn server_info(st: &AdminState) -> Value {
    let snap = st.current.load();
    let o = &st.options;
    let uptime = format!("{}s", st.started.elapsed().as_secs());
    let mut options = json!({
            "base_id": o.base_id.to_string(),
            "concurrency": o.concurrency,
            "config_path": o.config_path.clone().unwrap_or_default(),
            "config_yaml": o.config_yaml.clone().unwrap_or_default(),
            "allow_unknown_static_fields": o.allow_unknown_static_fields,
            "admin_address_path": o.admin_address_path.clone().unwrap_or_default(),
            "local_address_ip_version": match o.local_address_ip_version { crate::cli::IpVersion::V4 => "v4", crate::cli::IpVersion::V6 => "v6" },
            "log_level": o.log_level,
            "component_log_level": o.component_log_level.iter().map(|(c, l)| format!("{c}:{l}")).collect::<Vec<_>>().join(","),
            "log_format": o.log_format.clone().unwrap_or_else(|| logging::DEFAULT_FORMAT.to_string()),
            "log_path": o.log_path.clone().unwrap_or_default(),
            "service_cluster": o.service_cluster.clone().unwrap_or_default(),
            "service_node": o.service_node.clone().unwrap_or_default(),
            "service_zone": o.service_zone.clone().unwrap_or_default(),
            "file_flush_interval": format!("{}s", o.file_flush_interval_msec as f64 / 1000.0),
    });
    // Split in two: one `json!` this long exceeds the macro recursion limit.
    let rest = json!({
            "drain_time": format!("{}s", o.drain_time_s),
            "parent_shutdown_time": format!("{}s", o.parent_shutdown_time_s),
            "mode": o.mode.to_string(),
            "disable_hot_restart": true,
            "enable_mutex_tracing": false,
            "restart_epoch": 0,
            "cpuset_threads": false,
            "reject_unknown_dynamic_fields": o.reject_unknown_dynamic_fields,
            "log_format_escaped": false,
            "disabled_extensions": [],
            "ignore_unknown_dynamic_fields": o.ignore_unknown_dynamic_fields,
            "use_dynamic_base_id": false,
            "base_id_path": "",
            "drain_strategy": match o.drain_strategy { crate::cli::DrainStrategy::Gradual => "Gradual", crate::cli::DrainStrategy::Immediate => "Immediate" },
            "enable_fine_grain_logging": false,
            "socket_path": "",
            "socket_mode": 0,
            "enable_core_dump": false,
            "stats_tag": [],
            "skip_hot_restart_on_no_parent": false,
            "skip_hot_restart_parent_stats": false,
            "skip_deprecated_logs": false,
            "file_flush_min_size": 0,
            "log_stacktrace_single_entry": false,
    });
    if let (Value::Object(a), Value::Object(b)) = (&mut options, rest) {
        a.extend(b);
    }
    json!({
        "version": crate::version_string(),
        "state": if st.healthcheck_failed.load(Ordering::Relaxed) { "DRAINING" } else if !st.initialized.load(Ordering::Relaxed) { "INITIALIZING" } else { "LIVE" },
        "uptime_current_epoch": uptime,
        "uptime_all_epochs": uptime,
        "hot_restart_version": "disabled",
        "command_line_options": options,
        "node": TypeRegistry::global().to_json(&snap.node),
        "hot_restart_initializing": false,
    })
}

/// `?filter=` as a regex; the error is the 400 body Envoy answers with.
fn filter_re(filter: Option<String>) -> Result<Option<regex::Regex>, String> {
    match filter {
        Some(f) if !f.is_empty() => regex::Regex::new(&f)
            .map(Some)
            .map_err(|_| format!("Invalid re2 regex: {f}\n")),
        _ => Ok(None),
    }
}

/// Refreshes the gauges computed on read (uptime).
fn refresh(st: &AdminState) {
    st.store
        .gauge("server.uptime")
        .set(st.started.elapsed().as_secs() as i64);
}

/// What `stats_config` lets exist: not rejected by `stats_matcher`, and under deferred
/// creation a cluster's traffic stats only once one of them was used.
fn existing(st: &AdminState, snap: &crate::observe::stats::StatsSnapshot) -> impl Fn(&str) -> bool {
    let config = st.current.load().stats_config.clone();
    let used: std::collections::HashSet<String> = snap
        .counters
        .iter()
        .chain(&snap.gauges)
        .filter(|(_, _, used)| *used)
        .filter_map(|(n, _, _)| config.deferred_cluster(n).map(str::to_string))
        .collect();
    move |n: &str| config.accepts(n) && config.deferred_cluster(n).is_none_or(|c| used.contains(c))
}

fn stats(
    st: &AdminState,
    used_only: bool,
    filter: Option<String>,
    json: bool,
) -> Response<Full<Bytes>> {
    refresh(st);
    let re = match filter_re(filter) {
        Ok(r) => r,
        Err(body) => return text(StatusCode::BAD_REQUEST, body),
    };
    let snap = st.store.snapshot();
    let exists = existing(st, &snap);
    let keep = |n: &str, used: bool| {
        (!used_only || used) && re.as_ref().is_none_or(|r| r.is_match(n)) && exists(n)
    };
    let mut rows: Vec<(String, String, Value)> = Vec::new();
    for (n, v, used) in snap.counters {
        if keep(&n, used) {
            rows.push((n, v.to_string(), json!(v)));
        }
    }
    for (n, v, used) in snap.gauges {
        if keep(&n, used) {
            rows.push((n, v.to_string(), json!(v)));
        }
    }
    rows.sort_by(|a, b| a.0.cmp(&b.0));
    let histograms: Vec<_> = snap
        .histograms
        .iter()
        .filter(|(n, _, used)| keep(n, *used))
        .collect();
    let mut texts: Vec<(String, String)> = snap
        .text
        .into_iter()
        .filter(|(n, _)| keep(n, true))
        .collect();
    texts.sort();
    if json {
        let mut out: Vec<Value> = texts
            .iter()
            .map(|(n, v)| json!({"name": n, "value": v}))
            .collect();
        out.extend(
            rows.into_iter()
                .map(|(n, _, v)| json!({"name": n, "value": v})),
        );
        if !histograms.is_empty() {
            out.push(histograms_json(&histograms));
        }
        // Envoy prints stats JSON compact, unlike its other admin JSON.
        let mut r = text(StatusCode::OK, json!({"stats": out}).to_string());
        r.headers_mut().insert(
            http::header::CONTENT_TYPE,
            http::HeaderValue::from_static("application/json"),
        );
        return r;
    }
    let mut s = String::new();
    for (n, v) in texts {
        s.push_str(&format!("{n}: \"{v}\"\n"));
    }
    for (n, v, _) in rows {
        s.push_str(&format!("{n}: {v}\n"));
    }
    for (n, merged, used) in &histograms {
        s.push_str(&format!("{n}: {}\n", histogram_summary(merged, *used)));
    }
    text(StatusCode::OK, s)
}

/// Envoy's quantile labels (`P{:g}` of the supported quantiles).
const QUANTILE_LABELS: [&str; 10] = [
    "0", "25", "50", "75", "90", "95", "99", "99.5", "99.9", "100",
];

/// A double as Envoy's `fmt` `{}` writes it (shortest round trip; `nan`).
fn fmt_double(v: f64) -> String {
    if v.is_nan() {
        "nan".into()
    } else {
        v.to_string()
    }
}

/// A histogram's `/stats` line: `P0(interval,cumulative) …`, or "No recorded values".
fn histogram_summary(m: &petrel_filters::histogram::Merged, used: bool) -> String {
    use petrel_filters::histogram::quantiles;
    if !used {
        return "No recorded values".into();
    }
    let (i, c) = (quantiles(&m.interval), quantiles(&m.cumulative));
    QUANTILE_LABELS
        .iter()
        .enumerate()
        .map(|(k, l)| format!("P{l}({},{})", fmt_double(i[k]), fmt_double(c[k])))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The `histograms` element of `/stats?format=json`.
fn histograms_json(hs: &[&(String, petrel_filters::histogram::Merged, bool)]) -> Value {
    use petrel_filters::histogram::{quantiles, SUPPORTED_QUANTILES};
    // Envoy's JSON writes whole numbers without a fraction.
    let num = |v: f64| match v {
        v if v.is_nan() => Value::Null,
        v if v.fract() == 0.0 && v.abs() < 9e15 => json!(v as i64),
        v => json!(v),
    };
    let computed: Vec<Value> = hs
        .iter()
        .map(|(n, m, _)| {
            let (i, c) = (quantiles(&m.interval), quantiles(&m.cumulative));
            let values: Vec<Value> = (0..10)
                .map(|k| json!({"interval": num(i[k]), "cumulative": num(c[k])}))
                .collect();
            json!({"name": n, "values": values})
        })
        .collect();
    let supported: Vec<Value> = SUPPORTED_QUANTILES.iter().map(|q| num(q * 100.0)).collect();
    json!({"histograms": {"supported_quantiles": supported, "computed_quantiles": computed}})
}

fn prometheus(st: &AdminState, used_only: bool, filter: Option<String>) -> Response<Full<Bytes>> {
    refresh(st);
    let re = match filter_re(filter) {
        Ok(r) => r,
        Err(body) => return text(StatusCode::BAD_REQUEST, body),
    };
    let snap = st.store.snapshot();
    let exists = existing(st, &snap);
    let config = st.current.load().stats_config.clone();
    let body = prometheus::render(&snap, &config, |n, used| {
        (!used_only || used) && re.as_ref().is_none_or(|r| r.is_match(n)) && exists(n)
    });
    text(StatusCode::OK, body)
}

/// A host's stats as `/clusters` lists them: (name, value, is_gauge), in Envoy's order.
fn host_stats(h: &crate::upstream::cluster::Host) -> [(&'static str, u64, bool); 9] {
    let s = &h.stats;
    let v = |a: &std::sync::atomic::AtomicU64| a.load(Ordering::Relaxed);
    [
        ("cx_active", v(&s.cx_active), true),
        ("cx_connect_fail", v(&s.cx_connect_fail), false),
        ("cx_total", v(&s.cx_total), false),
        ("rq_active", v(&h.active_requests), true),
        ("rq_error", v(&s.rq_error), false),
        ("rq_pending_active", 0, true),
        ("rq_success", v(&s.rq_success), false),
        ("rq_timeout", v(&s.rq_timeout), false),
        ("rq_total", v(&s.rq_total), false),
    ]
}

fn locality_parts(h: &crate::upstream::cluster::Host) -> (String, String, String) {
    let mut it = h.locality.splitn(3, '/').map(str::to_string);
    (
        it.next().unwrap_or_default(),
        it.next().unwrap_or_default(),
        it.next().unwrap_or_default(),
    )
}

/// The thresholds `/clusters` shows for a priority, in Envoy's order.
fn threshold_values(r: &crate::upstream::circuit_breakers::Resources) -> [(&'static str, u64); 4] {
    [
        ("max_connections", r.connections.max()),
        ("max_pending_requests", r.pending_requests.max()),
        ("max_requests", r.requests.max()),
        ("max_retries", r.retries.max()),
    ]
}

fn clusters(st: &AdminState, json: bool) -> Response<Full<Bytes>> {
    let snap = st.current.load();
    let mut all: Vec<_> = snap.clusters.values().collect();
    all.sort_by(|a, b| a.name.cmp(&b.name));
    if json {
        let statuses: Vec<Value> = all
            .iter()
            .map(|c| {
                let hosts: Vec<Value> = c
                    .host_set.hosts
                    .iter()
                    .map(|h| {
                        // proto3 JSON, as Envoy prints it: zero values and empty strings omitted.
                        let mut counters: Vec<Value> = Vec::new();
                        let mut gauges: Vec<Value> = Vec::new();
                        for (name, value, gauge) in host_stats(h) {
                            let mut o = serde_json::Map::new();
                            if value != 0 {
                                o.insert("value".into(), json!(value.to_string()));
                            }
                            o.insert("name".into(), json!(name));
                            if gauge {
                                o.insert("type".into(), json!("GAUGE"));
                                gauges.push(Value::Object(o));
                            } else {
                                counters.push(Value::Object(o));
                            }
                        }
                        counters.extend(gauges);
                        let (region, zone, sub_zone) = locality_parts(h);
                        let mut locality = serde_json::Map::new();
                        for (k, v) in [("region", region), ("zone", zone), ("sub_zone", sub_zone)] {
                            if !v.is_empty() {
                                locality.insert(k.into(), json!(v));
                            }
                        }
                        let mut o = serde_json::Map::new();
                        let address = match &h.address {
                            HostAddress::Ip(a) => json!({"socket_address": {"address": a.ip().to_string(), "port_value": a.port()}}),
                            HostAddress::Pipe(p) => json!({"pipe": {"path": p.as_ref()}}),
                        };
                        o.insert("address".into(), address);
                        o.insert("stats".into(), Value::Array(counters));
                        let flags = h.health.load(Ordering::Relaxed);
                        let mut health = serde_json::Map::new();
                        if flags & health_flag::FAILED_OUTLIER_CHECK != 0 {
                            health.insert("failed_outlier_check".into(), json!(true));
                        }
                        health.insert("eds_health_status".into(), json!(eds_status_name(h)));
                        o.insert("health_status".into(), Value::Object(health));
                        for (key, local) in [("success_rate", false), ("local_origin_success_rate", true)] {
                            let r = h.outlier.success_rate(local);
                            if c.outlier.is_some() && r >= 0.0 {
                                o.insert(key.into(), json!({"value": r}));
                            }
                        }
                        o.insert("weight".into(), json!(h.weight));
                        if !h.hostname.is_empty() {
                            o.insert("hostname".into(), json!(h.hostname));
                        }
                        if h.priority != 0 {
                            o.insert("priority".into(), json!(h.priority));
                        }
                        o.insert("locality".into(), Value::Object(locality));
                        Value::Object(o)
                    })
                    .collect();
                let mut o = serde_json::Map::new();
                o.insert("name".into(), json!(c.name));
                let thresholds: Vec<Value> = [(&c.resources, None), (&c.resources_high, Some("HIGH"))]
                    .into_iter()
                    .map(|(r, priority)| {
                        let mut t = serde_json::Map::new();
                        if let Some(p) = priority {
                            t.insert("priority".into(), json!(p));
                        }
                        for (k, v) in threshold_values(r) {
                            t.insert(k.into(), json!(v));
                        }
                        Value::Object(t)
                    })
                    .collect();
                if let Some(d) = &c.outlier {
                    let r = d.cluster_rates();
                    for (key, v) in [
                        ("success_rate_ejection_threshold", r.success_rate_ejection_threshold),
                        ("local_origin_success_rate_ejection_threshold", r.local_origin_success_rate_ejection_threshold),
                    ] {
                        if v >= 0.0 {
                            o.insert(key.into(), json!({"value": v}));
                        }
                    }
                }
                o.insert("circuit_breakers".into(), json!({"thresholds": thresholds}));
                if !hosts.is_empty() {
                    o.insert("host_statuses".into(), Value::Array(hosts));
                }
                o.insert("observability_name".into(), json!(c.name));
                Value::Object(o)
            })
            .collect();
        return json_resp(&json!({"cluster_statuses": statuses}));
    }
    let mut s = String::new();
    for c in all {
        s.push_str(&format!("{0}::observability_name::{0}\n", c.name));
        if let Some(d) = &c.outlier {
            let r = d.cluster_rates();
            for (k, v) in [
                ("success_rate_average", r.success_rate_average),
                (
                    "success_rate_ejection_threshold",
                    r.success_rate_ejection_threshold,
                ),
                (
                    "local_origin_success_rate_average",
                    r.local_origin_success_rate_average,
                ),
                (
                    "local_origin_success_rate_ejection_threshold",
                    r.local_origin_success_rate_ejection_threshold,
                ),
            ] {
                s.push_str(&format!("{}::outlier::{k}::{}\n", c.name, format_g(v)));
            }
        }
        for (priority, r) in [("default", &c.resources), ("high", &c.resources_high)] {
            for (k, v) in threshold_values(r) {
                s.push_str(&format!("{}::{priority}_priority::{k}::{v}\n", c.name));
            }
        }
        s.push_str(&format!("{}::added_via_api::false\n", c.name));
        for h in &c.host_set.hosts {
            let p = format!("{}::{}", c.name, h.address);
            for (name, value, _) in host_stats(h) {
                s.push_str(&format!("{p}::{name}::{value}\n"));
            }
            let (region, zone, sub_zone) = locality_parts(h);
            s.push_str(&format!("{p}::hostname::{}\n", h.hostname));
            s.push_str(&format!("{p}::health_flags::{}\n", health_flags(h)));
            s.push_str(&format!("{p}::weight::{}\n", h.weight));
            s.push_str(&format!(
                "{p}::region::{region}\n{p}::zone::{zone}\n{p}::sub_zone::{sub_zone}\n"
            ));
            s.push_str(&format!("{p}::canary::false\n"));
            s.push_str(&format!("{p}::priority::{}\n", h.priority));
            s.push_str(&format!(
                "{p}::success_rate::{}\n{p}::local_origin_success_rate::{}\n",
                h.outlier.success_rate(false),
                h.outlier.success_rate(true)
            ));
        }
    }
    text(StatusCode::OK, s)
}

/// Envoy's `healthFlagsToString`: `healthy`, else each set flag.
fn health_flags(h: &crate::upstream::cluster::Host) -> String {
    let flags = h.health.load(Ordering::Relaxed);
    if flags == 0 {
        return "healthy".into();
    }
    let mut s = String::new();
    if flags & health_flag::FAILED_OUTLIER_CHECK != 0 {
        s.push_str("/failed_outlier_check");
    }
    if flags & health_flag::FAILED_EDS_HEALTH != 0 {
        s.push_str("/failed_eds_health");
    }
    if flags & health_flag::EDS_STATUS_DRAINING != 0 {
        s.push_str("/eds_status_draining");
    }
    s
}

/// The EDS `HealthStatus` name `/clusters?format=json` shows (unset shows as HEALTHY).
fn eds_status_name(h: &crate::upstream::cluster::Host) -> &'static str {
    match h.eds_status.load(Ordering::Relaxed) {
        // TIMEOUT shows as UNHEALTHY, as in Envoy.
        2 | 4 => "UNHEALTHY",
        3 => "DRAINING",
        _ => "HEALTHY",
    }
}

/// fmt's `{:g}`: six significant digits, trailing zeros dropped (the values here are
/// percentages or -1, so no exponent form is needed).
fn format_g(v: f64) -> String {
    if v == 0.0 || !v.is_finite() {
        return format!("{v}");
    }
    let digits = 5 - v.abs().log10().floor() as i32;
    let s = format!("{:.*}", digits.max(0) as usize, v);
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

/// `/drain_listeners`: the connections of every listener (or the inbound ones) are asked to
/// close (`--drain-strategy`); the listeners stop accepting at once, or with `graceful` once
/// `--drain-time-s` has passed (during which they still accept, as Envoy does, to lose nothing);
/// `skip_exit` keeps them accepting.
fn drain_listeners(st: &Arc<AdminState>, inbound_only: bool, graceful: bool, skip_exit: bool) {
    let snap = st.current.load_full();
    let chosen: Vec<Arc<crate::listener::Listener>> = snap
        .listeners
        .iter()
        .filter(|l| !inbound_only || l.inbound)
        .cloned()
        .collect();
    let time = std::time::Duration::from_secs(st.options.drain_time_s as u64);
    for l in &chosen {
        l.drain.start(time, st.options.drain_strategy);
    }
    if skip_exit {
        return;
    }
    let stop = move |st: &AdminState| {
        if let Ok(mut m) = st.manager.lock() {
            m.stop_accepting(inbound_only);
        }
    };
    if graceful {
        let st = st.clone();
        tokio::spawn(async move {
            tokio::time::sleep(time).await;
            stop(&st);
        });
    } else {
        stop(st);
    }
}

fn listeners(st: &AdminState, json: bool) -> Response<Full<Bytes>> {
    let snap = st.current.load();
    if json {
        let ls: Vec<Value> = snap
            .listeners
            .iter()
            .map(|l| json!({"name": l.name, "local_address": {"socket_address": {"address": l.address.ip().to_string(), "port_value": l.address.port()}}}))
            .collect();
        return json_resp(&json!({"listener_statuses": ls}));
    }
    let s: String = snap
        .listeners
        .iter()
        .map(|l| format!("{}::{}\n", l.name, l.address))
        .collect();
    text(StatusCode::OK, s)
}

fn logging_endpoint(params: &[(String, String)]) -> Response<Full<Bytes>> {
    for (k, v) in params {
        let Some(level) = logging::Level::parse(v) else {
            return text(
                StatusCode::NOT_FOUND,
                format!("error: unknown logger level '{v}'\n"),
            );
        };
        if k == "level" {
            logging::set_all(level);
        } else if !logging::set_level(k, level) {
            return text(
                StatusCode::NOT_FOUND,
                format!("error: unknown logger name '{k}'\n"),
            );
        }
    }
    let mut s = String::from("active loggers:\n");
    for (c, l) in logging::levels() {
        s.push_str(&format!("  {c}: {}\n", l.name()));
    }
    text(StatusCode::OK, s)
}
