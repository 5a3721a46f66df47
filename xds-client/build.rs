//! Builds the descriptor set Petrel embeds: the part of Envoy's API (as shipped by `envoy-types`
//! beside its generated code) reachable from the bootstrap and the extensions Petrel supports.
//!
//! Why reduced: the whole API decodes into ~50 MB of descriptors and takes ~90 ms at start; the
//! bootstrap's closure is a small fraction. A type outside it fails to decode with its type URL
//! named, which is the refusal it would get anyway.
use std::collections::{BTreeSet, HashMap};
use std::path::PathBuf;

use prost::Message;
use prost_types::{DescriptorProto, FileDescriptorSet};

const ENVOY_TYPES_DIR: &str = "envoy-types-0.7.7";

/// Messages Petrel decodes from JSON or `Any`. Every `Supported` entry of the extension table in
/// `filters/src/extensions.rs` must be here (a test checks it).
const ROOTS: &[&str] = &[
    "envoy.config.bootstrap.v3.Bootstrap",
    "envoy.config.cluster.v3.Cluster",
    "envoy.config.listener.v3.Listener",
    "envoy.config.route.v3.RouteConfiguration",
    "envoy.config.endpoint.v3.ClusterLoadAssignment",
    "envoy.config.accesslog.v3.AccessLogFilter",
    "envoy.config.accesslog.v3.AccessLog",
    "envoy.extensions.access_loggers.file.v3.FileAccessLog",
    "envoy.config.trace.v3.ZipkinConfig",
    "envoy.config.metrics.v3.StatsdSink",
    "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
    "envoy.extensions.access_loggers.stream.v3.StderrAccessLog",
    "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
    "envoy.extensions.filters.http.router.v3.Router",
    "envoy.extensions.filters.http.header_mutation.v3.HeaderMutation",
    "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
    "envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer",
    "envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
    "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
    "envoy.extensions.transport_sockets.tls.v3.Secret",
    "envoy.extensions.transport_sockets.tls.v3.SPIFFECertValidatorConfig",
    "envoy.extensions.filters.http.rbac.v3.RBAC",
    "envoy.extensions.filters.network.rbac.v3.RBAC",
    "envoy.extensions.filters.network.set_filter_state.v3.Config",
    "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig",
    "envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig",
    "envoy.extensions.filters.listener.original_dst.v3.OriginalDst",
    "envoy.extensions.filters.listener.tls_inspector.v3.TlsInspector",
    "envoy.extensions.filters.listener.http_inspector.v3.HttpInspector",
    "envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
    "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
    "envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate",
    "envoy.extensions.retry.priority.previous_priorities.v3.PreviousPrioritiesConfig",
    "envoy.extensions.filters.http.fault.v3.HTTPFault",
    "envoy.extensions.filters.http.grpc_stats.v3.FilterConfig",
    "envoy.extensions.filters.http.cors.v3.Cors",
    "envoy.extensions.filters.http.compressor.v3.Compressor",
    "envoy.extensions.compression.gzip.compressor.v3.Gzip",
    "envoy.extensions.compression.brotli.compressor.v3.Brotli",
    "envoy.extensions.compression.zstd.compressor.v3.Zstd",
    "envoy.extensions.filters.http.cors.v3.CorsPolicy",
    "envoy.admin.v3.BootstrapConfigDump",
    "envoy.admin.v3.ClustersConfigDump",
    "envoy.admin.v3.ListenersConfigDump",
    "envoy.admin.v3.RoutesConfigDump",
    "google.protobuf.Struct",
];

fn candidates() -> Vec<PathBuf> {
    let mut roots = Vec::new();
    if let Ok(home) = std::env::var("CARGO_HOME") {
        roots.push(PathBuf::from(home));
    }
    if let Ok(home) = std::env::var("HOME") {
        roots.push(PathBuf::from(home).join(".cargo"));
    }
    let mut out = Vec::new();
    for root in roots {
        if let Ok(entries) = std::fs::read_dir(root.join("registry").join("src")) {
            for e in entries.flatten() {
                out.push(
                    e.path()
                        .join(ENVOY_TYPES_DIR)
                        .join("src/generated/types.bin"),
                );
            }
        }
    }
    if let Ok(dir) = std::env::var("CARGO_MANIFEST_DIR") {
        out.push(PathBuf::from(dir).join("../vendor/envoy-types/src/generated/types.bin"));
    }
    out
}

fn collect_messages(
    prefix: &str,
    msgs: &[DescriptorProto],
    file: usize,
    out: &mut HashMap<String, usize>,
) {
    for m in msgs {
        let name = format!("{prefix}.{}", m.name());
        collect_messages(&name, &m.nested_type, file, out);
        out.insert(name, file);
    }
}

fn strip_enum(e: &mut prost_types::EnumDescriptorProto) {
    // `allow_alias` is kept: enums with aliased numbers do not load without it.
    let alias = e.options.as_ref().and_then(|o| o.allow_alias);
    e.options = alias.map(|a| prost_types::EnumOptions {
        allow_alias: Some(a),
        ..Default::default()
    });
    for v in &mut e.value {
        v.options = None;
    }
}

fn strip_message(m: &mut DescriptorProto) {
    let map_entry = m.options.as_ref().and_then(|o| o.map_entry);
    m.options = map_entry.map(|me| prost_types::MessageOptions {
        map_entry: Some(me),
        ..Default::default()
    });
    for f in &mut m.field {
        let packed = f.options.as_ref().and_then(|o| o.packed);
        f.options = packed.map(|p| prost_types::FieldOptions {
            packed: Some(p),
            ..Default::default()
        });
    }
    for o in &mut m.oneof_decl {
        o.options = None;
    }
    for n in &mut m.nested_type {
        strip_message(n);
    }
    for e in &mut m.enum_type {
        strip_enum(e);
    }
}

fn main() {
    println!("cargo:rerun-if-env-changed=PETREL_ENVOY_DESCRIPTORS");
    println!("cargo:rerun-if-changed=build.rs");
    let path = std::env::var("PETREL_ENVOY_DESCRIPTORS")
        .map(PathBuf::from)
        .ok()
        .or_else(|| candidates().into_iter().find(|p| p.is_file()))
        .unwrap_or_else(|| {
            panic!("cannot find {ENVOY_TYPES_DIR}/src/generated/types.bin in the cargo registry; set PETREL_ENVOY_DESCRIPTORS to its path")
        });
    println!("cargo:rerun-if-changed={}", path.display());
    let bytes = std::fs::read(&path).expect("read descriptor set");
    let set = FileDescriptorSet::decode(bytes.as_slice()).expect("decode descriptor set");

    let by_name: HashMap<&str, usize> = set
        .file
        .iter()
        .enumerate()
        .map(|(i, f)| (f.name(), i))
        .collect();
    let mut message_file = HashMap::new();
    for (i, f) in set.file.iter().enumerate() {
        collect_messages(f.package(), &f.message_type, i, &mut message_file);
    }
    let mut keep = BTreeSet::new();
    let mut stack: Vec<usize> = ROOTS
        .iter()
        .map(|r| {
            *message_file
                .get(*r)
                .unwrap_or_else(|| panic!("root message {r} not in the descriptor set"))
        })
        .collect();
    while let Some(i) = stack.pop() {
        if keep.insert(i) {
            for dep in &set.file[i].dependency {
                if let Some(&d) = by_name.get(dep.as_str()) {
                    stack.push(d);
                }
            }
        }
    }
    // Dependencies first, as a descriptor pool wants them.
    let mut ordered = Vec::new();
    let mut placed = BTreeSet::new();
    fn place(
        i: usize,
        set: &FileDescriptorSet,
        by_name: &HashMap<&str, usize>,
        placed: &mut BTreeSet<usize>,
        ordered: &mut Vec<usize>,
    ) {
        if !placed.insert(i) {
            return;
        }
        for dep in &set.file[i].dependency {
            if let Some(&d) = by_name.get(dep.as_str()) {
                place(d, set, by_name, placed, ordered);
            }
        }
        ordered.push(i);
    }
    for &i in &keep {
        place(i, &set, &by_name, &mut placed, &mut ordered);
    }
    let mut reduced = FileDescriptorSet {
        file: ordered.iter().map(|&i| strip_file(&set.file[i])).collect(),
    };
    // The Istio-only messages Petrel decodes (no dependencies outside their own file).
    for f in istio_protos().file {
        if ISTIO_SUPPORTED.contains(&f.name()) {
            reduced.file.push(strip_file(&f));
        }
    }
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("OUT_DIR"));
    let out = out_dir.join("envoy-descriptors.bin");
    std::fs::write(&out, reduced.encode_to_vec()).expect("write reduced descriptors");
    println!("cargo:rustc-env=PETREL_ENVOY_DESCRIPTORS={}", out.display());

    // Every type (Envoy's whole API and the Istio-only messages declared in `proto/istio`), for
    // tools and tests that must decode any resource Istio emits, including those Petrel refuses.
    let mut all = FileDescriptorSet {
        file: set.file.iter().map(strip_file).collect(),
    };
    let known: BTreeSet<String> = all.file.iter().map(|f| f.name().to_string()).collect();
    for f in istio_protos().file {
        if !known.contains(f.name()) {
            all.file.push(strip_file(&f));
        }
    }
    let out = out_dir.join("all-descriptors.bin");
    std::fs::write(&out, all.encode_to_vec()).expect("write all descriptors");
    println!("cargo:rustc-env=PETREL_ALL_DESCRIPTORS={}", out.display());
}

/// Comments and options (validation rules, annotations) are most of the bytes and none of what
/// decoding needs; `map_entry` and `packed` are kept because decoding does need them.
fn strip_file(file: &prost_types::FileDescriptorProto) -> prost_types::FileDescriptorProto {
    let mut f = file.clone();
    f.source_code_info = None;
    f.options = None;
    f.service.clear();
    for m in &mut f.message_type {
        strip_message(m);
    }
    for e in &mut f.enum_type {
        strip_enum(e);
    }
    f
}

/// Files of `proto/istio` whose messages Petrel decodes (the `istio.alpn` filter).
const ISTIO_SUPPORTED: &[&str] = &[
    "alpn.proto",
    "authn.proto",
    "metadata_exchange.proto",
    "peer_metadata.proto",
    "stats.proto",
];

/// The Istio-only extension messages Istio's configuration carries (`proto/istio`).
fn istio_protos() -> FileDescriptorSet {
    let dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").expect("manifest dir"))
        .join("proto/istio");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("proto/istio")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".proto"))
        .collect();
    files.sort();
    protox::compile(&files, [&dir]).unwrap_or_else(|e| panic!("proto/istio: {e}"))
}
