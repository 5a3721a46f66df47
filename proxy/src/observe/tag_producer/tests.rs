use super::*;

fn tags(p: &TagProducer, stat: &str) -> (String, Vec<String>) {
    let (name, tags) = p.produce(stat);
    (
        name,
        tags.into_iter().map(|(k, v)| format!("{k}={v}")).collect(),
    )
}

#[test]
fn envoy_default_tags() {
    let p = TagProducer::default();
    assert_eq!(
        tags(&p, "cluster.up.upstream_rq_2xx"),
        (
            "cluster.upstream_rq_xx".into(),
            vec![
                "envoy.response_code_class=2".into(),
                "envoy.cluster_name=up".into()
            ]
        )
    );
    assert_eq!(
        tags(
            &p,
            "listener.127.0.0.1_10000.http.ingress.downstream_rq_200"
        ),
        (
            "listener.http.downstream_rq".into(),
            vec![
                "envoy.response_code=200".into(),
                "envoy.http_conn_manager_prefix=ingress".into(),
                "envoy.listener_address=127.0.0.1_10000".into()
            ]
        )
    );
    // `admin` is not a listener address.
    assert_eq!(
        tags(&p, "listener.admin.downstream_cx_total"),
        ("listener.admin.downstream_cx_total".into(), vec![])
    );
    assert_eq!(
        tags(&p, "http.ingress.rbac.allowed"),
        (
            "http.rbac.allowed".into(),
            vec!["envoy.http_conn_manager_prefix=ingress".into()]
        )
    );
    assert_eq!(
        tags(&p, "vhost.v.route.r.upstream_rq_total"),
        (
            "vhost.route.upstream_rq_total".into(),
            vec!["envoy.virtual_host=v".into(), "envoy.route=r".into()]
        )
    );
    assert_eq!(
        tags(&p, "tcp.inbound.downstream_cx_total"),
        (
            "tcp.downstream_cx_total".into(),
            vec!["envoy.tcp_prefix=inbound".into()]
        )
    );
    assert_eq!(tags(&p, "server.live"), ("server.live".into(), vec![]));
}

#[test]
fn regex_prefixes_as_envoy_finds_them() {
    assert_eq!(regex_prefix(r"^cluster\.x"), Some("cluster".into()));
    assert_eq!(
        regex_prefix(r"^listener(?=\.).*?\.http"),
        Some("listener".into())
    );
    assert_eq!(regex_prefix(r"^server$"), Some("server".into()));
    assert_eq!(regex_prefix(r"^(?:a|b)\."), None);
    assert_eq!(regex_prefix(r"_rq(_(\d{3}))$"), None);
}

#[test]
fn token_patterns() {
    let pat = |p: &str| -> Vec<String> { p.split('.').map(str::to_string).collect() };
    let toks = |s: &'static str| -> Vec<&'static str> { s.split('.').collect() };
    let p = pat("mongo.*.collection.$.**.query.*");
    let cap = p.iter().position(|t| t == "$").unwrap();
    assert_eq!(
        search(
            &p,
            cap,
            &toks("mongo.m.collection.c.x.y.query.total"),
            0,
            0,
            0
        ),
        Some(Some((3, 19)))
    );
    assert_eq!(
        search(&p, cap, &toks("mongo.m.collection.c"), 0, 0, 0),
        None
    );
    let last = pat("$.http_local_rate_limit.**");
    assert_eq!(
        search(&last, 0, &toks("p.http_local_rate_limit.ok"), 0, 0, 0),
        Some(Some((0, 0)))
    );
}
