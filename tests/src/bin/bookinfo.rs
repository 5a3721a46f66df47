//! Bookinfo-shaped services for the mesh tests (not the real images): one binary, a role per
//! pod. Services reach each other by name (`details:9080`) at the cluster IP the harness gives
//! with `--resolve`, as a pod reaches a Kubernetes Service; the sidecar intercepts the
//! connection.
//!
//! ```text
//! bookinfo serve ROLE POD [--port P] [--resolve name=ip ...]   productpage|details|reviews-v1|
//!                                                               reviews-v2|reviews-v3|ratings|httpbin|
//!                                                               zipkin (a collector)
//! bookinfo agent                                                pilot-agent's 15020 readiness
//!                                                               (its checks of /stats)
//! bookinfo raw HOST:PORT                                        sends standard input as is and
//!                                                               prints the answer's first line
//!                                                               (or how the connection ended)
//! bookinfo get URL [-n N] [-c C] [-H name:value ...]            a fortio-like client: prints a
//!           [--resolve name=ip ...]                             JSON summary of the answers
//! ```
//!
//! productpage calls details and reviews (twice, 3 s each, as the real one does), reviews v2/v3
//! call ratings (10 s and 2.5 s timeouts: black and red stars), each propagating `end-user`,
//! `x-request-id` and the trace headers; answers say which pod served them.

use std::collections::{BTreeMap, HashMap};
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::{connect::HttpConnector, Client};
use hyper_util::rt::{TokioExecutor, TokioIo};
use serde_json::json;

/// Headers Bookinfo's services propagate from the request they serve to the calls they make.
const PROPAGATED: &[&str] = &[
    "end-user",
    "user-agent",
    "cookie",
    "x-request-id",
    "x-b3-traceid",
    "x-b3-spanid",
    "x-b3-parentspanid",
    "x-b3-sampled",
    "x-b3-flags",
    "b3",
    "traceparent",
    "tracestate",
];

type HttpClient = Client<HttpConnector, Full<Bytes>>;
/// Headers carried from the request being served to the calls it makes.
type Headers = [(String, String)];

/// How reviews v2/v3 call ratings: their star color and their timeout.
struct Ratings<'a> {
    color: &'a str,
    timeout: Duration,
    headers: &'a Headers,
}

struct App {
    /// Spans a `zipkin` role was sent.
    spans: std::sync::Mutex<Vec<serde_json::Value>>,
    role: String,
    pod: String,
    resolve: HashMap<String, String>,
    client: HttpClient,
}

fn usage() -> ! {
    eprintln!("usage: bookinfo serve ROLE POD [--port P] [--resolve name=ip]... | agent | get URL [-n N] [-c C] [-H name:value]...");
    std::process::exit(2)
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("serve") if args.len() >= 3 => serve(&args[1], &args[2], &args[3..]).await,
        Some("agent") => agent().await,
        Some("get") if args.len() >= 2 => get(&args[1], &args[2..]).await,
        Some("raw") if args.len() == 2 => raw(&args[1]).await,
        _ => usage(),
    }
}

fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build_http()
}

async fn serve(role: &str, pod: &str, rest: &[String]) {
    let mut port = 9080u16;
    let mut resolve = HashMap::new();
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "--port" => port = value.parse().unwrap_or_else(|_| usage()),
            "--resolve" => {
                let (name, ip) = value.split_once('=').unwrap_or_else(|| usage());
                resolve.insert(name.to_string(), ip.to_string());
            }
            _ => usage(),
        }
    }
    let app = Arc::new(App {
        spans: Default::default(),
        role: role.to_string(),
        pod: pod.to_string(),
        resolve,
        client: client(),
    });
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", port))
        .await
        .unwrap_or_else(|e| panic!("bind {port}: {e}"));
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let app = app.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req| {
                let app = app.clone();
                async move { Ok::<_, Infallible>(app.answer(req).await) }
            });
            let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

fn reply(status: u16, body: serde_json::Value) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut().insert(
        http::header::CONTENT_TYPE,
        http::HeaderValue::from_static("application/json"),
    );
    r
}

impl App {
    async fn answer(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        let path = req.uri().path().to_string();
        let propagated: Vec<(String, String)> = PROPAGATED
            .iter()
            .filter_map(|h| {
                let v = req.headers().get(*h)?.to_str().ok()?;
                Some((h.to_string(), v.to_string()))
            })
            .collect();
        match (self.role.as_str(), path.as_str()) {
            ("productpage", "/productpage") => self.productpage(&propagated).await,
            ("details", p) if p.starts_with("/details/") => reply(
                200,
                json!({"id": 0, "author": "William Shakespeare", "type": "paperback", "served_by": self.pod}),
            ),
            ("reviews-v1", p) if p.starts_with("/reviews/") => self.reviews(None).await,
            ("reviews-v2", p) if p.starts_with("/reviews/") => {
                self.reviews(Some(Ratings {
                    color: "black",
                    timeout: Duration::from_secs(10),
                    headers: &propagated,
                }))
                .await
            }
            ("reviews-v3", p) if p.starts_with("/reviews/") => {
                self.reviews(Some(Ratings {
                    color: "red",
                    timeout: Duration::from_millis(2500),
                    headers: &propagated,
                }))
                .await
            }
            ("ratings", p) if p.starts_with("/ratings/") => reply(
                200,
                json!({"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}, "served_by": self.pod}),
            ),
            ("httpbin", _) => httpbin(&self.pod, req).await,
            // A Zipkin collector: spans POSTed as JSON arrays, all of them at `/spans`.
            ("zipkin", "/api/v2/spans") => {
                let body = req
                    .into_body()
                    .collect()
                    .await
                    .map(|b| b.to_bytes())
                    .unwrap_or_default();
                let posted: Vec<serde_json::Value> =
                    serde_json::from_slice(&body).unwrap_or_default();
                self.spans
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend(posted);
                let mut r = reply(202, json!({}));
                *r.body_mut() = Full::new(Bytes::new());
                r
            }
            ("zipkin", "/spans") => reply(
                200,
                json!(*self.spans.lock().unwrap_or_else(|e| e.into_inner())),
            ),
            _ => reply(404, json!({"error": "not found", "served_by": self.pod})),
        }
    }

    /// A GET to `service` (resolved to its cluster IP) with the propagated headers: the status
    /// and body, or `None` on a timeout or connection failure.
    async fn call(
        &self,
        service: &str,
        path: &str,
        headers: &Headers,
        timeout: Duration,
    ) -> Option<(u16, serde_json::Value)> {
        let (name, port) = service.split_once(':').unwrap_or((service, "80"));
        let ip = self.resolve.get(name)?;
        let mut req =
            Request::get(format!("http://{ip}:{port}{path}")).header(http::header::HOST, service);
        for (k, v) in headers {
            req = req.header(k.as_str(), v.as_str());
        }
        let req = req.body(Full::new(Bytes::new())).ok()?;
        let resp = tokio::time::timeout(timeout, async {
            let resp = self.client.request(req).await.ok()?;
            let status = resp.status().as_u16();
            let body = resp.into_body().collect().await.ok()?.to_bytes();
            Some((status, body))
        })
        .await
        .ok()??;
        let json = serde_json::from_slice(&resp.1)
            .unwrap_or_else(|_| json!(String::from_utf8_lossy(&resp.1)));
        Some((resp.0, json))
    }

    async fn productpage(&self, headers: &Headers) -> Response<Full<Bytes>> {
        let details = match self
            .call(
                "details:9080",
                "/details/0",
                headers,
                Duration::from_secs(3),
            )
            .await
        {
            Some((200, d)) => d["served_by"].clone(),
            _ => json!("Sorry, product details are currently unavailable for this book."),
        };
        // The real productpage tries reviews twice, 3 s each.
        let mut reviews = None;
        for _ in 0..2 {
            reviews = self
                .call(
                    "reviews:9080",
                    "/reviews/0",
                    headers,
                    Duration::from_secs(3),
                )
                .await;
            if reviews.is_some() {
                break;
            }
        }
        let reviews = match reviews {
            Some((200, r)) => json!({"served_by": r["served_by"], "stars": r["stars"]}),
            _ => json!("Sorry, product reviews are currently unavailable for this book."),
        };
        let user = headers
            .iter()
            .find(|(k, _)| k == "end-user")
            .map(|(_, v)| v.as_str());
        reply(
            200,
            json!({"served_by": self.pod, "user": user, "details": details, "reviews": reviews}),
        )
    }

    async fn reviews(&self, ratings: Option<Ratings<'_>>) -> Response<Full<Bytes>> {
        let stars = match ratings {
            None => json!(null),
            Some(r) => {
                match self
                    .call("ratings:9080", "/ratings/0", r.headers, r.timeout)
                    .await
                {
                    Some((200, body)) if body["ratings"].is_object() => json!(r.color),
                    _ => json!("Ratings service is currently unavailable"),
                }
            }
        };
        reply(
            200,
            json!({"id": "0", "served_by": self.pod, "stars": stars}),
        )
    }
}

/// httpbin's endpoints the tasks use: `/get`, `/headers`, `/status/N`, `/delay/N`.
async fn httpbin(pod: &str, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    // The request log the mirroring task reads.
    let host = req
        .headers()
        .get(http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("");
    println!("{} {host} {path}", req.method());
    let headers: BTreeMap<String, String> = req
        .headers()
        .iter()
        .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
        .collect();
    let echo = json!({"headers": headers, "url": req.uri().to_string(), "served_by": pod});
    if path == "/get" || path == "/headers" {
        return reply(200, echo);
    }
    if let Some(code) = path.strip_prefix("/status/") {
        return match code.parse::<u16>() {
            Ok(c) if (100..600).contains(&c) => reply(c, json!({"served_by": pod})),
            _ => reply(400, json!({"error": "bad status"})),
        };
    }
    if let Some(secs) = path.strip_prefix("/delay/") {
        let secs = secs.parse::<f64>().unwrap_or(0.0).clamp(0.0, 10.0);
        tokio::time::sleep(Duration::from_secs_f64(secs)).await;
        return reply(200, echo);
    }
    reply(404, json!({"error": "not found", "served_by": pod}))
}

/// Bad input at the edge: standard input's bytes to `addr`, and what came back.
async fn raw(addr: &str) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut input = Vec::new();
    if std::io::Read::read_to_end(&mut std::io::stdin(), &mut input).is_err() {
        usage();
    }
    let mut s = match tokio::net::TcpStream::connect(addr).await {
        Ok(s) => s,
        Err(e) => {
            println!("connect failed: {e}");
            return;
        }
    };
    let _ = s.write_all(&input).await;
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf).await {
                Ok(0) => return "closed",
                Ok(n) => answer.extend_from_slice(&buf[..n]),
                Err(_) => return "reset",
            }
        }
    })
    .await
    .unwrap_or("open after 5 s");
    let first = String::from_utf8_lossy(&answer)
        .lines()
        .next()
        .unwrap_or("")
        .to_string();
    if first.is_empty() {
        println!("no answer, {read}");
    } else {
        println!("{first}");
    }
}

/// The proxy's admin stats `path` as name → value.
async fn admin_stats(http: &HttpClient, path: &str) -> Option<HashMap<String, u64>> {
    let req = Request::get(format!("http://127.0.0.1:15000{path}"))
        .body(Full::new(Bytes::new()))
        .ok()?;
    let resp = http.request(req).await.ok()?;
    if resp.status() != 200 {
        return None;
    }
    let body = resp.into_body().collect().await.ok()?.to_bytes();
    Some(
        String::from_utf8_lossy(&body)
            .lines()
            .filter_map(|l| l.split_once(": "))
            .filter_map(|(k, v)| Some((k.to_string(), v.trim().parse().ok()?)))
            .collect(),
    )
}

/// Whether the proxy is ready as pilot-agent's probe decides it: `server.state` LIVE (0) and
/// the workers started, and configuration received from the control plane (CDS and LDS
/// updates succeeded), read from `/stats?usedonly` as pilot-agent reads them.
async fn proxy_ready(http: &HttpClient) -> Result<(), String> {
    let state = admin_stats(
        http,
        // `^(server\.state|listener_manager\.workers_started)$`, percent-encoded as Go's client sends it.
        "/stats?usedonly&filter=%5E%28server%5C.state%7Clistener_manager%5C.workers_started%29%24",
    )
    .await
    .ok_or("admin not reachable")?;
    if state.get("server.state") != Some(&0) {
        return Err(format!("server.state is {:?}", state.get("server.state")));
    }
    if state.get("listener_manager.workers_started") != Some(&1) {
        return Err("workers have not started".into());
    }
    let xds = admin_stats(
        http,
        // `^(cluster_manager\.cds|listener_manager\.lds)\.(update_success|update_rejected)$`.
        "/stats?usedonly&filter=%5E%28cluster_manager%5C.cds%7Clistener_manager%5C.lds%29%5C.%28update_success%7Cupdate_rejected%29%24",
    )
    .await
    .ok_or("admin not reachable")?;
    let success = |k: &str| xds.get(k).copied().unwrap_or(0);
    if success("cluster_manager.cds.update_success") == 0
        || success("listener_manager.lds.update_success") == 0
    {
        return Err("config not received from the control plane".into());
    }
    Ok(())
}

/// pilot-agent's status port: `/healthz/ready` answers 200 when [`proxy_ready`] holds (what
/// the 15021 listener's route asks through the `agent` cluster).
async fn agent() {
    let listener = tokio::net::TcpListener::bind(("0.0.0.0", 15020))
        .await
        .unwrap_or_else(|e| panic!("bind 15020: {e}"));
    let http = Arc::new(client());
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let http = http.clone();
        tokio::spawn(async move {
            let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                let http = http.clone();
                async move {
                    let ready = if req.uri().path() == "/healthz/ready" {
                        proxy_ready(&http).await
                    } else {
                        Err("not found".to_string())
                    };
                    Ok::<_, Infallible>(match ready {
                        Ok(()) => reply(200, json!({"ready": true})),
                        Err(why) => reply(503, json!({"ready": false, "why": why})),
                    })
                }
            });
            let _ = hyper::server::conn::http1::Builder::new()
                .serve_connection(TokioIo::new(stream), svc)
                .await;
        });
    }
}

/// Sends `-n` GETs over `-c` connections and prints `{"codes": {..}, "bodies": {..}}` with the
/// count of each status (`-1` for a failed request) and of each body.
async fn get(url: &str, rest: &[String]) {
    let (mut n, mut c) = (1usize, 1usize);
    let mut headers = Vec::new();
    let mut resolve = HashMap::new();
    let mut it = rest.iter();
    while let Some(flag) = it.next() {
        let value = it.next().unwrap_or_else(|| usage());
        match flag.as_str() {
            "-n" => n = value.parse().unwrap_or_else(|_| usage()),
            "-c" => c = value.parse().unwrap_or_else(|_| usage()),
            "-H" => {
                let (k, v) = value.split_once(':').unwrap_or_else(|| usage());
                headers.push((k.trim().to_string(), v.trim().to_string()));
            }
            "--resolve" => {
                let (name, ip) = value.split_once('=').unwrap_or_else(|| usage());
                resolve.insert(name.to_string(), ip.to_string());
            }
            _ => usage(),
        }
    }
    let mut uri: http::Uri = url.parse().unwrap_or_else(|_| usage());
    // A service name goes to its cluster IP (the pod's DNS), the name staying in `host`.
    if let Some(ip) = uri.host().and_then(|h| resolve.get(h)) {
        let authority = uri.authority().map(|a| a.to_string()).unwrap_or_default();
        if !headers.iter().any(|(k, _)| k.eq_ignore_ascii_case("host")) {
            headers.push(("host".into(), authority));
        }
        let port = uri.port_u16().map(|p| format!(":{p}")).unwrap_or_default();
        let path = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        uri = format!("http://{ip}{port}{path}")
            .parse()
            .unwrap_or_else(|_| usage());
    }
    let http = client();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let results = Arc::new(std::sync::Mutex::new(Vec::new()));
    let workers: Vec<_> =
        (0..c.max(1))
            .map(|_| {
                let (http, next, results, uri, headers) = (
                    http.clone(),
                    next.clone(),
                    results.clone(),
                    uri.clone(),
                    headers.clone(),
                );
                tokio::spawn(async move {
                    while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < n {
                        let mut req = Request::get(uri.clone());
                        for (k, v) in &headers {
                            req = req.header(k.as_str(), v.as_str());
                        }
                        let Ok(req) = req.body(Full::new(Bytes::new())) else {
                            break;
                        };
                        let outcome =
                            match tokio::time::timeout(Duration::from_secs(30), http.request(req))
                                .await
                            {
                                Ok(Ok(resp)) => {
                                    let status = i32::from(resp.status().as_u16());
                                    let body = resp
                                        .into_body()
                                        .collect()
                                        .await
                                        .map(|b| b.to_bytes())
                                        .unwrap_or_default();
                                    (status, String::from_utf8_lossy(&body).into_owned())
                                }
                                Ok(Err(e)) => (-1, e.to_string()),
                                Err(_) => (-1, "timeout".to_string()),
                            };
                        results
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(outcome);
                    }
                })
            })
            .collect();
    for w in workers {
        let _ = w.await;
    }
    let mut codes: BTreeMap<String, usize> = BTreeMap::new();
    let mut bodies: BTreeMap<String, usize> = BTreeMap::new();
    for (status, body) in results.lock().unwrap_or_else(|e| e.into_inner()).iter() {
        *codes.entry(status.to_string()).or_default() += 1;
        *bodies.entry(body.clone()).or_default() += 1;
    }
    println!("{}", json!({"codes": codes, "bodies": bodies}));
}
