//! `envoy.filters.http.grpc_stats` against Envoy 1.40: gRPC calls that succeed, fail with a
//! status in trailers-only form, go to an upstream that is down, and a plain request, through
//! a chain with per-method stats and one without; the clusters' `grpc` stats must be Envoy's.

use std::net::TcpListener;
use std::path::Path;

use petrel_tests::*;

/// A gRPC upstream over h2c: `/pkg.Svc/Fail` answers trailers-only with status 7; anything else
/// two messages and status 0 in trailers.
fn grpc_upstream() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let port = l.local_addr().expect("addr").port();
    spawn_server(l, |s| async move {
        let service =
            hyper::service::service_fn(|req: http::Request<hyper::body::Incoming>| async move {
                use http_body_util::BodyExt;
                let path = req.uri().path().to_string();
                let _ = req.into_body().collect().await;
                type Frames = Vec<Result<http_body::Frame<bytes::Bytes>, std::convert::Infallible>>;
                let mut resp = http::Response::builder()
                    .status(200)
                    .header("content-type", "application/grpc");
                let frames: Frames = if path == "/pkg.Svc/Fail" {
                    resp = resp.header("grpc-status", "7");
                    vec![]
                } else {
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", "0".parse().expect("value"));
                    vec![
                        Ok(http_body::Frame::data(bytes::Bytes::from_static(
                            b"\x00\x00\x00\x00\x02hi\x00\x00\x00\x00\x01x",
                        ))),
                        Ok(http_body::Frame::trailers(trailers)),
                    ]
                };
                let body = http_body_util::StreamBody::new(tokio_stream::iter(frames));
                Ok::<_, std::convert::Infallible>(resp.body(body).expect("response"))
            });
        let _ = hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection(hyper_util::rt::TokioIo::new(s), service)
            .await;
    });
    port
}

fn hcm(prefix: &str, cluster: &str, grpc_stats: &str) -> String {
    format!(
        r#"{{name: envoy.filters.network.http_connection_manager, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: {prefix}, route_config: {{virtual_hosts: [{{name: v, domains: ["*"], routes: [{{match: {{prefix: "/down"}}, route: {{cluster: down}}}}, {{match: {{prefix: "/"}}, route: {{cluster: {cluster}}}}}]}}]}}, http_filters: [{{name: envoy.filters.http.grpc_stats, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.grpc_stats.v3.FilterConfig, {grpc_stats}}}}}, {{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]}}}}"#
    )
}

fn cluster(name: &str, port: &str) -> String {
    format!(
        r#"  - name: {name}
    connect_timeout: 1s
    typed_extension_protocol_options:
      envoy.extensions.upstreams.http.v3.HttpProtocolOptions:
        "@type": type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions
        explicit_http_config: {{http2_protocol_options: {{}}}}
    load_assignment:
      cluster_name: {name}
      endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}}}]}}]
"#
    )
}

fn bootstrap() -> String {
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: ADMIN}}}}
static_resources:
  listeners:
  - name: plain
    address: {{socket_address: {{address: 127.0.0.1, port_value: PLAIN}}}}
    filter_chains: [{{filters: [{}]}}]
  - name: methods
    address: {{socket_address: {{address: 127.0.0.1, port_value: METHODS}}}}
    filter_chains: [{{filters: [{}]}}]
  clusters:
{}{}{}"#,
        hcm(
            "plain",
            "svc",
            "emit_filter_state: true, stats_for_all_methods: false"
        ),
        hcm("methods", "svc_methods", "stats_for_all_methods: true"),
        cluster("svc", "UPSTREAM"),
        cluster("svc_methods", "UPSTREAM"),
        cluster("down", "DOWN"),
    )
}

fn transcript(name: &'static str, bin: &Path, upstream: u16) -> Vec<String> {
    let (admin, plain, methods, down) = (free_port(), free_port(), free_port(), free_port());
    let values = [
        ("ADMIN", admin),
        ("PLAIN", plain),
        ("METHODS", methods),
        ("UPSTREAM", upstream),
        ("DOWN", down),
    ];
    let _proxy = start_templated(name, bin, &bootstrap(), &values, &[]);
    let grpc = [("content-type", "application/grpc")];
    let three = "\0\0\0\0\x01a\0\0\0\0\x01b\0\0\0\0\x01c";
    let mut out = Vec::new();
    for port in [plain, methods] {
        for (path, headers, body) in [
            ("/pkg.Svc/Get", &grpc[..], three),
            ("/pkg.Svc/Get", &grpc[..], ""),
            ("/pkg.Svc/Fail", &grpc[..], three),
            ("/other.Svc/Put", &grpc[..], "\0\0\0\0\x01a"),
            (
                "/pkg.Svc/Get",
                &[("content-type", "application/grpc-web")][..],
                three,
            ),
            ("/plain", &[][..], "x"),
            // No body: whether Envoy reads it before the connect failure is a race.
            ("/down.Svc/Get", &grpc[..], ""),
        ] {
            let r = h2c(port, "POST", path, headers, body).expect("request");
            out.push(format!(
                "{port_name} {path} -> {} grpc-status={:?}",
                r.status,
                r.header("grpc-status"),
                port_name = if port == plain { "plain" } else { "methods" }
            ));
        }
    }
    // The streams are charged as they end, a moment after the answers.
    std::thread::sleep(std::time::Duration::from_millis(300));
    let stats = http_raw(
        admin,
        b"GET /stats?filter=%5C.grpc%5C. HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .expect("stats");
    out.extend(stats.body_str().lines().map(str::to_string));
    out
}

#[test]
fn grpc_stats_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        eprintln!("envoy not installed; skipping");
        return;
    };
    let upstream = grpc_upstream();
    let e = transcript("envoy", &envoy, upstream);
    let p = transcript("petrel", &petrel_bin(), upstream);
    assert!(e.iter().any(|l| l.contains("grpc.success")), "{e:#?}");
    assert_same_transcript(&e, &p);
}
