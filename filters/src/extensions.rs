//! The table of extension type URLs Petrel knows, each either supported or explicitly refused with
//! the issue that will bring it. Resources carrying a refused type fail with that reason.

/// What Petrel does with an extension type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Support {
    Supported,
    /// Refused; the text says which work brings it.
    Refused(&'static str),
}

const ISSUE_XDS: &str = "comes with xDS support (issue #4)";
const ISSUE_SECURITY: &str = "comes with mesh security (issue #6)";
const ISSUE_OBSERVE: &str = "comes with observability (issue #7)";

/// `(type name without the type.googleapis.com/ prefix, support)`.
pub const TABLE: &[(&str, Support)] = &[
    (
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        Support::Supported,
    ),
    (
        "envoy.extensions.filters.http.router.v3.Router",
        Support::Supported,
    ),
    (
        "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
        Support::Supported,
    ),
    (
        "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer",
        Support::Supported,
    ),
    (
        "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
        Support::Supported,
    ),
    (
        "envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig",
        Support::Supported,
    ),
    (
        "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        Support::Supported,
    ),
    (
        "envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
        Support::Supported,
    ),
    (
        "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
        Support::Supported,
    ),
    (
        "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
        Support::Supported,
    ),
    (
        "envoy.extensions.bootstrap.internal_listener.v3.InternalListener",
        Support::Refused(ISSUE_XDS),
    ),
    (
        "envoy.extensions.transport_sockets.internal_upstream.v3.InternalUpstreamTransport",
        Support::Refused(ISSUE_XDS),
    ),
    (
        "envoy.extensions.filters.network.set_filter_state.v3.Config",
        Support::Supported,
    ),
    (
        "envoy.extensions.filters.http.set_filter_state.v3.Config",
        Support::Refused(ISSUE_XDS),
    ),
    (
        "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
        Support::Supported,
    ),
    (
        "envoy.extensions.filters.http.fault.v3.HTTPFault",
        Support::Supported,
    ),
    (
        "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate",
        Support::Supported,
    ),
    (
        "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
        Support::Supported,
    ),
    (
        "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
        Support::Supported,
    ),
    (
        "envoy.extensions.filters.http.cors.v3.Cors",
        Support::Supported,
    ),
    (
        "envoy.extensions.filters.http.cors.v3.CorsPolicy",
        Support::Supported,
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        Support::Supported,
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        Support::Supported,
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig",
        Support::Supported,
    ),
    (
        "envoy.extensions.transport_sockets.tls.v3.Secret",
        Support::Supported,
    ),
    (
        "envoy.extensions.filters.http.rbac.v3.RBAC",
        Support::Supported,
    ),
    (
        "envoy.extensions.filters.network.rbac.v3.RBAC",
        Support::Supported,
    ),
    (
        "envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        Support::Refused(ISSUE_SECURITY),
    ),
    (
        "envoy.extensions.filters.network.ext_authz.v3.ExtAuthz",
        Support::Refused(ISSUE_SECURITY),
    ),
    (
        "istio.envoy.config.filter.http.alpn.v2alpha1.FilterConfig",
        Support::Supported,
    ),
    ("io.istio.network.authn.Config", Support::Supported),
    (
        "envoy.extensions.access_loggers.file.v3.FileAccessLog",
        Support::Supported,
    ),
    (
        "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
        Support::Supported,
    ),
    (
        "envoy.extensions.access_loggers.stream.v3.StderrAccessLog",
        Support::Supported,
    ),
    ("envoy.config.trace.v3.ZipkinConfig", Support::Supported),
    ("envoy.config.metrics.v3.StatsdSink", Support::Supported),
    (
        "envoy.config.metrics.v3.MetricsServiceConfig",
        Support::Refused(ISSUE_OBSERVE),
    ),
    (
        "envoy.extensions.stat_sinks.open_telemetry.v3.SinkConfig",
        Support::Refused(ISSUE_OBSERVE),
    ),
    (
        "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
        Support::Supported,
    ),
    ("stats.PluginConfig", Support::Supported),
    ("io.istio.http.peer_metadata.Config", Support::Supported),
    (
        "envoy.tcp.metadataexchange.config.MetadataExchange",
        Support::Supported,
    ),
    (
        "envoy.extensions.network_filters.peer_metadata.Config",
        Support::Refused(ISSUE_OBSERVE),
    ),
    (
        "envoy.extensions.network_filters.peer_metadata.UpstreamConfig",
        Support::Refused(ISSUE_OBSERVE),
    ),
    (
        "envoy.extensions.filters.http.compressor.v3.Compressor",
        Support::Supported,
    ),
    (
        "envoy.extensions.compression.gzip.compressor.v3.Gzip",
        Support::Supported,
    ),
    (
        "envoy.extensions.compression.brotli.compressor.v3.Brotli",
        Support::Supported,
    ),
    (
        "envoy.extensions.compression.zstd.compressor.v3.Zstd",
        Support::Supported,
    ),
    (
        "envoy.extensions.filters.http.wasm.v3.Wasm",
        Support::Refused("Wasm is not planned"),
    ),
    (
        "envoy.config.trace.v3.LightstepConfig",
        Support::Refused("the Lightstep tracer was removed from Envoy too"),
    ),
    (
        "envoy.extensions.transport_sockets.quic.v3.QuicDownstreamTransport",
        Support::Refused("QUIC is not planned"),
    ),
    (
        "envoy.extensions.transport_sockets.quic.v3.QuicUpstreamTransport",
        Support::Refused("QUIC is not planned"),
    ),
];

/// Looks up a type URL (with or without the `type.googleapis.com/` prefix).
pub fn support(type_url: &str) -> Option<Support> {
    let name = type_url.rsplit('/').next().unwrap_or(type_url);
    TABLE.iter().find(|(n, _)| *n == name).map(|(_, s)| *s)
}

/// The reason to give when refusing a type: the table's, or "unknown extension".
pub fn refusal(type_url: &str) -> String {
    match support(type_url) {
        Some(Support::Refused(why)) => format!(" ({why})"),
        Some(Support::Supported) => String::new(),
        None => " (unknown extension)".to_string(),
    }
}
