//! `backend --port N`: the benchmarks' backend (see `petrel_bench::backend`) as a process, so
//! it can be pinned to a CPU beside the load.

fn main() {
    let port = petrel_bench::arg("--port", 18080) as u16;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a tokio runtime");
    runtime.block_on(async {
        let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port)).await {
            Ok(l) => l,
            Err(e) => {
                eprintln!("backend: cannot listen on 127.0.0.1:{port}: {e}");
                std::process::exit(1);
            }
        };
        petrel_bench::backend::serve(listener).await;
    });
}
