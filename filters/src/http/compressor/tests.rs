use super::*;

fn config(encoding: &str, types: &[&str], choose_first: bool) -> Arc<Config> {
    let library = match encoding {
        "gzip" => Library::Gzip {
            level: 6,
            window_bits: 12,
        },
        _ => Library::Zstd {
            level: 3,
            checksum: false,
        },
    };
    Arc::new(Config {
        library,
        min_content_length: 30,
        content_types: types.iter().map(|s| s.to_string()).collect(),
        disable_on_etag_header: false,
        remove_accept_encoding_header: false,
        choose_first,
        stats: Stats::new(&Store::default(), "t.", true),
    })
}

#[test]
fn highest_q_value_wins() {
    let chain = [config("zstd", &[], false), config("gzip", &[], false)];
    let pick = |accept: &str| choose_encoding(accept, Some("text/plain"), &chain);
    assert_eq!(pick("gzip"), ("gzip".into(), HeaderStat::ValidCompressor));
    assert_eq!(
        pick("gzip;q=0.5, zstd"),
        ("zstd".into(), HeaderStat::ValidCompressor)
    );
    // Equal q-values: the first listed, unless a later one says choose_first.
    assert_eq!(
        pick("gzip, zstd"),
        ("gzip".into(), HeaderStat::ValidCompressor)
    );
    assert_eq!(pick("identity"), ("identity".into(), HeaderStat::Identity));
    assert_eq!(pick("deflate"), ("identity".into(), HeaderStat::NotValid));
    assert_eq!(pick(""), ("identity".into(), HeaderStat::NotValid));
    assert_eq!(pick("gzip;q=0"), ("identity".into(), HeaderStat::NotValid));
    // `*` takes the first registered compressor the client did not refuse.
    assert_eq!(pick("*"), ("zstd".into(), HeaderStat::Wildcard));
    assert_eq!(pick("zstd;q=0, *"), ("gzip".into(), HeaderStat::Wildcard));
    // An unparsable q-value drops the token.
    assert_eq!(pick("gzip;q=x"), ("identity".into(), HeaderStat::NotValid));
    let first = [config("zstd", &[], false), config("gzip", &[], true)];
    assert_eq!(
        choose_encoding("zstd, gzip", None, &first),
        ("gzip".into(), HeaderStat::ValidCompressor)
    );
}

#[test]
fn compressors_not_for_the_content_type_step_aside() {
    let chain = [
        config("zstd", &["application/json"], false),
        config("gzip", &["text/plain"], false),
    ];
    assert_eq!(
        choose_encoding("zstd, gzip", Some("text/plain"), &chain),
        ("gzip".into(), HeaderStat::ValidCompressor)
    );
    assert_eq!(
        choose_encoding("zstd", Some("text/plain"), &chain),
        ("identity".into(), HeaderStat::NotValid)
    );
}
