//! A Zipkin collector for tests: records every report (path, headers, body) and answers 202,
//! over plaintext or TLS.

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// One POST the collector received.
#[derive(Debug, Clone)]
pub struct Report {
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Report {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

#[derive(Clone)]
pub struct Collector {
    pub port: u16,
    reports: Arc<Mutex<Vec<Report>>>,
}

impl Collector {
    pub fn reports(&self) -> Vec<Report> {
        self.reports.lock().map(|r| r.clone()).unwrap_or_default()
    }

    /// Every span reported so far, in arrival order.
    pub fn spans(&self) -> Vec<serde_json::Value> {
        self.reports()
            .iter()
            .flat_map(|r| {
                serde_json::from_str::<Vec<serde_json::Value>>(&r.body).unwrap_or_default()
            })
            .collect()
    }

    /// Waits until at least `n` spans have come (or `timeout` passed).
    pub fn wait_spans(&self, n: usize, timeout: Duration) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let spans = self.spans();
            if spans.len() >= n || Instant::now() > deadline {
                return spans;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Starts a collector; with `tls` (certificate and key PEM files) it speaks HTTPS.
pub fn start_collector(tls: Option<&crate::tls::Pem>) -> Collector {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind collector");
    let port = l.local_addr().expect("addr").port();
    let reports = Arc::new(Mutex::new(Vec::new()));
    let acceptor = tls.map(|pem| {
        let certs: Vec<_> = rustls_pki_types::pem::PemObject::pem_file_iter(&pem.cert)
            .expect("cert pem")
            .collect::<Result<_, _>>()
            .expect("certs");
        let key = rustls_pki_types::pem::PemObject::from_pem_file(&pem.key).expect("key pem");
        let cfg = rustls::ServerConfig::builder()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .expect("server config");
        tokio_rustls::TlsAcceptor::from(Arc::new(cfg))
    });
    let r = reports.clone();
    crate::spawn_server(l, move |s| {
        let r = r.clone();
        let acceptor = acceptor.clone();
        async move {
            let svc =
                hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                    let r = r.clone();
                    async move {
                        use http_body_util::BodyExt;
                        let path = req
                            .uri()
                            .path_and_query()
                            .map(|p| p.to_string())
                            .unwrap_or_default();
                        let headers = crate::header_pairs(req.headers());
                        let body = req
                            .into_body()
                            .collect()
                            .await
                            .map(|b| b.to_bytes())
                            .unwrap_or_default();
                        if let Ok(mut all) = r.lock() {
                            all.push(Report {
                                path,
                                headers,
                                body: String::from_utf8_lossy(&body).into_owned(),
                            });
                        }
                        let mut resp =
                            http::Response::new(http_body_util::Full::new(bytes::Bytes::new()));
                        *resp.status_mut() = http::StatusCode::ACCEPTED;
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
            let builder =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            match acceptor {
                Some(a) => {
                    if let Ok(t) = a.accept(s).await {
                        let _ = builder
                            .serve_connection(hyper_util::rt::TokioIo::new(t), svc)
                            .await;
                    }
                }
                None => {
                    let _ = builder
                        .serve_connection(hyper_util::rt::TokioIo::new(s), svc)
                        .await;
                }
            }
        }
    });
    Collector { port, reports }
}
