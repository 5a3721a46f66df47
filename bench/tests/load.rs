//! The load runner against real sockets: percentiles against known delays, pacing, the
//! coordinated-omission correction, h2c and gRPC, reconnects, and bad input. Every timing
//! assertion is a lower bound the pacing guarantees, never an upper bound.

use std::process::Command;
use std::time::Duration;

use petrel_bench::load::{self, LoadArgs};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

async fn backend() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(petrel_bench::backend::serve(listener));
    port
}

fn args(line: &str) -> LoadArgs {
    LoadArgs::parse(line.split_whitespace().map(String::from)).unwrap()
}

fn codes(r: &load::RunResult) -> Vec<(String, u64)> {
    r.codes.iter().map(|(c, n)| (c.clone(), *n)).collect()
}

#[tokio::test]
async fn latencies_of_a_known_delay() {
    let port = backend().await;
    let r = load::run(&args(&format!(
        "-c 2 -qps 0 -n 10 http://127.0.0.1:{port}/delay/20"
    )))
    .await
    .unwrap();
    assert_eq!(codes(&r), [("200".to_string(), 10)]);
    assert_eq!(r.latencies.count(), 10);
    assert_eq!(r.sockets, 2);
    assert!(
        r.latencies.min() >= Duration::from_millis(20),
        "{:?}",
        r.latencies.min()
    );
    // Closed loop on 2 connections: 5 rounds of at least 20 ms each.
    assert!(r.elapsed >= Duration::from_millis(100));
}

#[tokio::test]
async fn pacing_sends_on_schedule() {
    let port = backend().await;
    // 200 qps over 2 connections, 40 requests: the last is due at 195 ms.
    let r = load::run(&args(&format!(
        "-c 2 -qps 200 -n 40 http://127.0.0.1:{port}/"
    )))
    .await
    .unwrap();
    assert_eq!(r.calls(), 40);
    assert!(r.elapsed >= Duration::from_millis(195), "{:?}", r.elapsed);
    // For a duration, exactly the requests due before its end are sent: 0, 10, …, 290 ms.
    let r = load::run(&args(&format!(
        "-c 1 -qps 100 -t 300ms http://127.0.0.1:{port}/"
    )))
    .await
    .unwrap();
    assert_eq!(r.calls(), 30);
}

#[tokio::test]
async fn waiting_behind_a_stalled_answer_is_counted() {
    // The first answer takes 300 ms, the rest are immediate. At 100 qps on one connection the
    // requests due at 10…190 ms wait behind it: each latency counts from its due time, so every
    // one is at least 300 - 190 = 110 ms. Timed from the send, all but the first would be ~0.
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut buf = vec![0u8; 4096];
        let mut first = true;
        while let Ok(n) = tcp.read(&mut buf).await {
            if n == 0 {
                break;
            }
            if std::mem::take(&mut first) {
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            // One request per read: the runner waits for each answer before the next.
            let _ = tcp
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\n\r\nok")
                .await;
        }
    });
    let r = load::run(&args(&format!(
        "-c 1 -qps 100 -n 20 http://127.0.0.1:{port}/"
    )))
    .await
    .unwrap();
    assert_eq!(codes(&r), [("200".to_string(), 20)]);
    assert!(
        r.latencies.min() >= Duration::from_millis(110),
        "{:?}",
        r.latencies.min()
    );
    assert!(r.latencies.percentile(50.0) >= Duration::from_millis(200));
}

#[tokio::test]
async fn h2c_grpc_and_bodies() {
    let port = backend().await;
    let r = load::run(&args(&format!(
        "-http2 -c 3 -qps 0 -n 30 http://127.0.0.1:{port}/size/65536"
    )))
    .await
    .unwrap();
    assert_eq!(
        (codes(&r), r.sockets),
        ([("200".to_string(), 30)].to_vec(), 3)
    );
    let r = load::run(&args(&format!(
        "-grpc -payload-size 1024 -c 2 -qps 0 -n 10 http://127.0.0.1:{port}/pkg.Svc/Call"
    )))
    .await
    .unwrap();
    assert_eq!(codes(&r), [("grpc-status 0".to_string(), 10)]);
    let r = load::run(&args(&format!(
        "-payload-size 1024 -H x-a:1 -c 1 -qps 0 -n 3 http://127.0.0.1:{port}/status/503"
    )))
    .await
    .unwrap();
    assert_eq!(codes(&r), [("503".to_string(), 3)]);
}

#[tokio::test]
async fn closed_sockets_are_reopened_and_errors_counted() {
    // Each connection answers once with `connection: close`, then the fourth accept is dropped
    // at once: three 200s over three sockets, then socket errors (-1).
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut accepted = 0;
        while let Ok((mut tcp, _)) = listener.accept().await {
            accepted += 1;
            if accepted > 3 {
                drop(tcp);
                continue;
            }
            let mut buf = vec![0u8; 4096];
            let _ = tcp.read(&mut buf).await;
            let _ = tcp
                .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
                .await;
        }
    });
    let r = load::run(&args(&format!("-c 1 -qps 0 -n 5 http://127.0.0.1:{port}/")))
        .await
        .unwrap();
    assert_eq!(codes(&r), [("-1".to_string(), 2), ("200".to_string(), 3)]);
    assert_eq!(r.sockets, 5);
}

fn load_command(words: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_load"))
        .args(words)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn bad_input_gets_clear_errors() {
    // A port nobody listens on: bound, then released.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("http://127.0.0.1:{port}/");
    let (code, _, err) = load_command(&["-n", "1", &url]);
    assert_eq!(code, 1);
    assert!(
        err.starts_with(&format!(
            "load: cannot connect to 127.0.0.1:{port}: Connection refused"
        )),
        "{err}"
    );
    let (code, _, err) = load_command(&["-c", "many", &url]);
    assert_eq!(
        (code, err.as_str()),
        (2, "load: flag -c: \"many\" is not a whole number\n")
    );
    let (code, _, err) = load_command(&["-qps", "fast", &url]);
    assert_eq!(
        (code, err.as_str()),
        (
            2,
            "load: flag -qps: \"fast\" is not a rate of zero or more\n"
        )
    );
    let (code, _, err) = load_command(&["-n", "3", "ftp://127.0.0.1/"]);
    assert_eq!(code, 2);
    assert!(
        err.contains("bad URL \"ftp://127.0.0.1/\": scheme ftp"),
        "{err}"
    );
}

#[test]
fn fortio_summary_and_json() {
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let port = runtime.block_on(backend());
    let dir = std::env::temp_dir().join(format!("petrel-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let json = dir.join("r.json");
    let url = format!("http://127.0.0.1:{port}/");
    let (code, out, err) = load_command(&[
        "load",
        "-c",
        "2",
        "-qps",
        "100",
        "-n",
        "8",
        "-json",
        json.to_str().unwrap(),
        &url,
    ]);
    assert_eq!(code, 0, "{err}");
    for line in [
        "Fortio-style load: 100 queries per second, 2 connection(s), 8 calls",
        ": 8 calls. qps=",
        "# target 50% ",
        "# target 99.9% ",
        "Sockets used: 2 (for perfect keepalive, would be 2)",
        "Code 200 : 8 (100.0 %)",
        "All done 8 calls (plus 0 warmup)",
    ] {
        assert!(out.contains(line), "{line:?} not in:\n{out}");
    }
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["RetCodes"]["200"], 8);
    assert_eq!(v["DurationHistogram"]["Count"], 8);
    assert_eq!(v["DurationHistogram"]["Percentiles"][0]["Percentile"], 50.0);
    assert_eq!(v["NumThreads"], 2);
    assert_eq!(v["RequestedQPS"], "100");
    let _ = std::fs::remove_dir_all(&dir);
}
