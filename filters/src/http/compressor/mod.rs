//! `envoy.filters.http.compressor`: compresses response bodies with the encoding the client
//! accepts (gzip, brotli, zstd). Several compressor filters in one chain choose together, as
//! Envoy's do: the client's `accept-encoding` q-values against the compressors whose content
//! types fit the response, `*` taking the first registered, `choose_first` breaking ties; each
//! filter then compresses only when the choice is its encoding. Stats under
//! `<prefix>compressor.<library name>.<library>.` as Envoy names them.

pub mod library;

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http::header::{
    HeaderValue, ACCEPT_ENCODING, CACHE_CONTROL, CONNECTION, CONTENT_ENCODING, CONTENT_LENGTH,
    CONTENT_TYPE, ETAG, TRANSFER_ENCODING, UPGRADE, VARY,
};
use http::HeaderMap;
use xds_client::pb::envoy::extensions::filters::http::compressor::v3::{
    compressor::CommonDirectionConfig, Compressor,
};
use xds_client::pb::google::protobuf::Any;

use crate::http_filter::{
    BodyEncoder, FilterStatus, HttpFilter, HttpFilterFactory, RequestHead, ResponseHead,
};
use crate::stats::{Counter, Store};
use crate::{invalid, FilterConfigError};
use library::Library;

pub const TYPE_URL: &str =
    "type.googleapis.com/envoy.extensions.filters.http.compressor.v3.Compressor";

/// Envoy's content types when a config lists none.
const DEFAULT_CONTENT_TYPES: &[&str] = &[
    "text/html",
    "text/plain",
    "text/css",
    "application/javascript",
    "application/x-javascript",
    "text/javascript",
    "text/x-javascript",
    "text/ecmascript",
    "text/js",
    "text/jscript",
    "text/x-js",
    "application/ecmascript",
    "application/x-json",
    "application/xml",
    "application/json",
    "image/svg+xml",
    "text/xml",
    "application/xhtml+xml",
    "application/grpc-web",
    "application/grpc-web+proto",
];

#[derive(Debug)]
struct Stats {
    compressed: Arc<Counter>,
    not_compressed: Arc<Counter>,
    total_uncompressed_bytes: Arc<Counter>,
    total_compressed_bytes: Arc<Counter>,
    content_length_too_small: Arc<Counter>,
    request_not_compressed: Arc<Counter>,
    no_accept_header: Arc<Counter>,
    header_identity: Arc<Counter>,
    header_compressor_used: Arc<Counter>,
    header_compressor_overshadowed: Arc<Counter>,
    header_wildcard: Arc<Counter>,
    header_not_valid: Arc<Counter>,
    not_compressed_etag: Arc<Counter>,
}

impl Stats {
    /// `response_scoped`: a `response_direction_config` puts the direction's counters under
    /// `response.` (the accept-encoding ones stay above it).
    fn new(store: &Store, prefix: &str, response_scoped: bool) -> Stats {
        let response = if response_scoped {
            format!("{prefix}response.")
        } else {
            prefix.to_string()
        };
        let c = |p: &str, n: &str| store.counter(&format!("{p}{n}"));
        let request = format!("{prefix}request.");
        // The request direction's counters exist (and `not_compressed` counts every request)
        // even though Petrel, as Istio, does not compress requests.
        for n in [
            "compressed",
            "total_uncompressed_bytes",
            "total_compressed_bytes",
            "content_length_too_small",
        ] {
            c(&request, n);
        }
        Stats {
            compressed: c(&response, "compressed"),
            not_compressed: c(&response, "not_compressed"),
            total_uncompressed_bytes: c(&response, "total_uncompressed_bytes"),
            total_compressed_bytes: c(&response, "total_compressed_bytes"),
            content_length_too_small: c(&response, "content_length_too_small"),
            request_not_compressed: c(&request, "not_compressed"),
            no_accept_header: c(prefix, "no_accept_header"),
            header_identity: c(prefix, "header_identity"),
            header_compressor_used: c(prefix, "header_compressor_used"),
            header_compressor_overshadowed: c(prefix, "header_compressor_overshadowed"),
            header_wildcard: c(prefix, "header_wildcard"),
            header_not_valid: c(prefix, "header_not_valid"),
            not_compressed_etag: c(prefix, "not_compressed_etag"),
        }
    }
}

/// One compressor filter's compiled config.
#[derive(Debug)]
pub struct Config {
    library: Library,
    min_content_length: u64,
    /// Lower-cased.
    content_types: Vec<String>,
    disable_on_etag_header: bool,
    remove_accept_encoding_header: bool,
    choose_first: bool,
    stats: Stats,
}

impl Config {
    pub fn compile(
        any: &Any,
        path: &str,
        store: &Store,
        stat_prefix: &str,
    ) -> Result<Config, FilterConfigError> {
        #![allow(deprecated)]
        let cfg: Compressor = xds_client::TypeRegistry::global()
            .unpack(any)
            .map_err(|e| invalid(path, e.to_string()))?;
        let lib_pb = cfg
            .compressor_library
            .as_ref()
            .ok_or_else(|| invalid(format!("{path}.compressor_library"), "value is required"))?;
        let library = Library::compile(lib_pb, &format!("{path}.compressor_library"))?;
        let unsupported = |field: &str| {
            invalid(
                path,
                format!("'{field}' is not supported by Petrel's compressor filter"),
            )
        };
        if cfg.request_direction_config.is_some() {
            return Err(unsupported("request_direction_config"));
        }
        if cfg.runtime_enabled.is_some() {
            return Err(unsupported("runtime_enabled"));
        }
        let (common, disable_on_etag_header, remove_accept_encoding_header) =
            match &cfg.response_direction_config {
                Some(r) => {
                    if r.weaken_etag_on_compress {
                        return Err(unsupported("weaken_etag_on_compress"));
                    }
                    if !r.uncompressible_response_codes.is_empty() {
                        return Err(unsupported("uncompressible_response_codes"));
                    }
                    if r.status_header_enabled {
                        return Err(unsupported("status_header_enabled"));
                    }
                    (
                        r.common_config.clone().unwrap_or_default(),
                        r.disable_on_etag_header,
                        r.remove_accept_encoding_header,
                    )
                }
                // The deprecated top-level fields, as Envoy reads them without one.
                None => (
                    CommonDirectionConfig {
                        min_content_length: cfg.content_length,
                        content_type: cfg.content_type.clone(),
                        ..Default::default()
                    },
                    cfg.disable_on_etag_header,
                    cfg.remove_accept_encoding_header,
                ),
            };
        if common.enabled.is_some() {
            return Err(unsupported("enabled"));
        }
        if !common.content_type_matcher.is_empty() {
            return Err(unsupported("content_type_matcher"));
        }
        let content_types = if common.content_type.is_empty() {
            DEFAULT_CONTENT_TYPES
                .iter()
                .map(|s| s.to_string())
                .collect()
        } else {
            common
                .content_type
                .iter()
                .map(|s| s.to_ascii_lowercase())
                .collect()
        };
        let prefix = format!(
            "{stat_prefix}compressor.{}.{}",
            lib_pb.name,
            library.stats_prefix()
        );
        Ok(Config {
            stats: Stats::new(store, &prefix, cfg.response_direction_config.is_some()),
            min_content_length: match common.min_content_length.map(|v| v.value) {
                Some(n) if n > 0 => n.into(),
                _ => 30,
            },
            content_types,
            disable_on_etag_header,
            remove_accept_encoding_header,
            choose_first: cfg.choose_first,
            library,
        })
    }

    fn encoding(&self) -> &'static str {
        self.library.content_encoding()
    }

    fn content_type_allowed(&self, headers: &HeaderMap) -> bool {
        match media_type(headers) {
            Some(t) if !self.content_types.is_empty() => self
                .content_types
                .iter()
                .any(|c| c.eq_ignore_ascii_case(&t)),
            _ => true,
        }
    }

    /// A `content-length` at least the minimum (absent: unknown, so yes).
    fn long_enough(&self, headers: &HeaderMap) -> bool {
        let Some(v) = headers.get(CONTENT_LENGTH) else {
            return true;
        };
        let ok = v
            .to_str()
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .is_some_and(|n| n >= self.min_content_length);
        if !ok {
            self.stats.content_length_too_small.inc();
        }
        ok
    }
}

/// The response's media type: `content-type` up to `;`, trimmed.
fn media_type(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(CONTENT_TYPE)?.to_str().ok()?;
    Some(v.split(';').next().unwrap_or("").trim().to_string())
}

/// How the chain's choice came about (which `header_*` counter it moves).
#[derive(Debug, Clone, Copy, PartialEq)]
enum HeaderStat {
    NotValid,
    Identity,
    Wildcard,
    ValidCompressor,
}

/// The encoding for a response (Envoy's `chooseEncoding`), from the client's
/// `accept-encoding` and the chain's compressors that fit the response's content type.
fn choose_encoding(
    accept: &str,
    content_type: Option<&str>,
    chain: &[Arc<Config>],
) -> (String, HeaderStat) {
    // encoding → (registration order, choose_first).
    let mut allowed: BTreeMap<String, (u32, bool)> = BTreeMap::new();
    let mut order = 0;
    for c in chain {
        if let Some(t) = content_type.filter(|t| !t.is_empty()) {
            if !c.content_types.is_empty()
                && !c.content_types.iter().any(|ct| ct.eq_ignore_ascii_case(t))
            {
                continue;
            }
        }
        if !allowed.contains_key(c.encoding()) {
            allowed.insert(c.encoding().to_string(), (order, c.choose_first));
            order += 1;
        }
    }
    let mut pairs: Vec<(String, f32)> = Vec::new();
    for token in accept.split(',').filter(|t| !t.is_empty()) {
        let (name, params) = match token.split_once(';') {
            Some((n, p)) => (n.trim(), Some(p)),
            None => (token.trim(), None),
        };
        let mut q = 1.0f32;
        if let Some(params) = params {
            if let Some((k, v)) = params.split_once('=') {
                if k.trim().eq_ignore_ascii_case("q") {
                    match v.trim().parse::<f32>() {
                        Ok(v) => q = v,
                        Err(_) => continue,
                    }
                }
            }
        }
        pairs.push((name.to_string(), q));
        if q == 0.0 {
            allowed.remove(name);
        }
    }
    if pairs.is_empty() || allowed.is_empty() {
        return ("identity".into(), HeaderStat::NotValid);
    }
    let mut choice = ("identity".to_string(), 0.0f32);
    for (name, q) in &pairs {
        if allowed.contains_key(name) || name == "identity" || name == "*" {
            // Envoy reads `choose_first` through the map's index operator, which inserts a
            // default entry for `identity` and `*`: kept, as it changes the wildcard's pick.
            let better =
                *q > choice.1 || (*q == choice.1 && allowed.entry(name.clone()).or_default().1);
            if better {
                choice = (name.clone(), *q);
            }
        }
    }
    if choice.1 == 0.0 {
        return ("identity".into(), HeaderStat::NotValid);
    }
    match choice.0.as_str() {
        "identity" => ("identity".into(), HeaderStat::Identity),
        "*" => {
            let first = allowed
                .iter()
                .min_by_key(|(_, (n, _))| *n)
                .map(|(e, _)| e.clone())
                .unwrap_or_default();
            (first, HeaderStat::Wildcard)
        }
        _ => (choice.0, HeaderStat::ValidCompressor),
    }
}

fn has_token(value: &str, token: &str) -> bool {
    value
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case(token))
}

#[derive(Debug)]
pub struct Factory {
    name: String,
    config: Arc<Config>,
    /// Every compressor filter of the chain, in order (Envoy's per-stream registry).
    chain: Arc<[Arc<Config>]>,
}

impl Factory {
    pub fn new(name: &str, config: Arc<Config>, chain: Arc<[Arc<Config>]>) -> Factory {
        Factory {
            name: name.to_string(),
            config,
            chain,
        }
    }
}

impl HttpFilterFactory for Factory {
    fn name(&self) -> &str {
        &self.name
    }
    fn create(&self) -> Box<dyn HttpFilter> {
        Box::new(Filter {
            config: self.config.clone(),
            chain: self.chain.clone(),
            accept_encoding: None,
            compress: false,
        })
    }
}

struct Filter {
    config: Arc<Config>,
    chain: Arc<[Arc<Config>]>,
    accept_encoding: Option<String>,
    compress: bool,
}

impl Filter {
    /// Whether the chain's choice is this filter's encoding; moves the `header_*` counters.
    fn accept_encoding_allowed(&self, maybe: bool, headers: &HeaderMap) -> bool {
        if !maybe {
            return false;
        }
        let s = &self.config.stats;
        let Some(accept) = &self.accept_encoding else {
            s.no_accept_header.inc();
            return false;
        };
        let (encoding, stat) = choose_encoding(accept, media_type(headers).as_deref(), &self.chain);
        let mine = encoding.eq_ignore_ascii_case(self.config.encoding());
        match stat {
            HeaderStat::ValidCompressor if mine => s.header_compressor_used.inc(),
            HeaderStat::ValidCompressor => s.header_compressor_overshadowed.inc(),
            HeaderStat::Identity => s.header_identity.inc(),
            HeaderStat::Wildcard => s.header_wildcard.inc(),
            HeaderStat::NotValid => s.header_not_valid.inc(),
        }
        mine
    }
}

impl HttpFilter for Filter {
    fn decode_headers(&mut self, req: &mut RequestHead<'_>, _end_stream: bool) -> FilterStatus {
        self.accept_encoding = req
            .headers
            .get(ACCEPT_ENCODING)
            .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
        if self.config.remove_accept_encoding_header {
            req.headers.remove(ACCEPT_ENCODING);
        }
        self.config.stats.request_not_compressed.inc();
        FilterStatus::Continue
    }

    fn encode_headers(&mut self, resp: &mut ResponseHead<'_>) -> FilterStatus {
        let c = &self.config;
        let h = &mut *resp.headers;
        let enabled_and_long = c.long_enough(h);
        let upgrade = h
            .get(CONNECTION)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| has_token(v, "upgrade"))
            && h.contains_key(UPGRADE);
        let compressible = enabled_and_long
            && !upgrade
            && c.content_type_allowed(h)
            && !h
                .get(CACHE_CONTROL)
                .and_then(|v| v.to_str().ok())
                .is_some_and(|v| has_token(v, "no-transform"))
            && {
                let etag_ok = !(c.disable_on_etag_header && h.contains_key(ETAG));
                if !etag_ok {
                    c.stats.not_compressed_etag.inc();
                }
                etag_ok
            }
            && !h.contains_key(CONTENT_ENCODING);
        let transfer_ok = || {
            h.get(TRANSFER_ENCODING)
                .and_then(|v| v.to_str().ok())
                .is_none_or(|v| {
                    !v.split(',').any(|t| {
                        let t = t.trim();
                        ["gzip", "br", "deflate", "compress", "zstd", c.encoding()]
                            .iter()
                            .any(|e| t.eq_ignore_ascii_case(e))
                    })
                })
        };
        if !resp.end_stream
            && self.accept_encoding_allowed(enabled_and_long, h)
            && compressible
            && transfer_ok()
        {
            // A strong entity tag no longer describes the bytes: dropped (weak ones stay).
            if let Some(e) = h.get(ETAG) {
                let b = e.as_bytes();
                if b.len() > 2 && !(matches!(b[0], b'w' | b'W') && b[1] == b'/') {
                    h.remove(ETAG);
                }
            }
            h.remove(CONTENT_LENGTH);
            h.insert(CONTENT_ENCODING, HeaderValue::from_static(c.encoding()));
            c.stats.compressed.inc();
            self.compress = true;
        } else {
            c.stats.not_compressed.inc();
        }
        if compressible {
            let vary = match h.get(VARY).and_then(|v| v.to_str().ok()) {
                Some(v) if v.split(',').any(|t| t.trim() == "Accept-Encoding") => None,
                Some(v) => HeaderValue::from_str(&format!("{v}, Accept-Encoding")).ok(),
                None => Some(HeaderValue::from_static("Accept-Encoding")),
            };
            if let Some(v) = vary {
                h.insert(VARY, v);
            }
        }
        FilterStatus::Continue
    }

    fn response_body_encoder(&mut self) -> Option<Box<dyn BodyEncoder>> {
        self.compress.then(|| {
            Box::new(Encoder {
                stream: self.config.library.start(),
                config: self.config.clone(),
            }) as Box<dyn BodyEncoder>
        })
    }
}

/// One response's compressor.
struct Encoder {
    stream: library::Stream,
    config: Arc<Config>,
}

impl BodyEncoder for Encoder {
    fn encode(&mut self, data: Bytes, end_stream: bool) -> Bytes {
        let s = &self.config.stats;
        s.total_uncompressed_bytes.add(data.len() as u64);
        let out = self.stream.compress(&data, end_stream);
        s.total_compressed_bytes.add(out.len() as u64);
        out
    }
}

#[cfg(test)]
mod tests;
