//! Compiling Envoy configuration into immutable runtime snapshots.
//!
//! Every compile function takes the proto and a JSON-style path for messages; anything it cannot
//! honour fails with [`ConfigError`] naming that path, never silently.

pub mod bootstrap;
pub mod cluster_manager;
pub mod duration;
pub mod dynamic;
pub mod overload;
pub mod runtime;
pub mod snapshot;
pub mod xds_listeners;
pub mod xds_secrets;
pub mod xds_sink;

use prost::{Message, Name};
use xds_client::TypeRegistry;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ConfigError {
    #[error("{path}: {message}")]
    Invalid { path: String, message: String },
    #[error("{path}: field(s) {fields} not supported by Petrel")]
    Unsupported { path: String, fields: String },
    #[error("{path}: extension '{type_url}' not supported by Petrel{why}")]
    UnsupportedExtension {
        path: String,
        type_url: String,
        why: String,
    },
    #[error(transparent)]
    Decode(#[from] xds_client::DecodeError),
    #[error("unable to read file: {path}: {message}")]
    Io { path: String, message: String },
}

impl From<petrel_filters::FilterConfigError> for ConfigError {
    fn from(e: petrel_filters::FilterConfigError) -> Self {
        match e {
            petrel_filters::FilterConfigError::Invalid { path, message } => {
                ConfigError::Invalid { path, message }
            }
        }
    }
}

pub fn invalid(path: impl Into<String>, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        path: path.into(),
        message: message.into(),
    }
}

/// Fails if `rest` (a message whose honoured fields were taken out) still has fields set: those
/// are fields Petrel would otherwise ignore. Names them in proto3-JSON spelling.
pub fn reject_unhandled<M: Message + Name + Default + PartialEq>(
    rest: &M,
    path: &str,
) -> Result<(), ConfigError> {
    if *rest == M::default() {
        return Ok(());
    }
    let names = TypeRegistry::global().set_fields(rest);
    let fields = if names.is_empty() {
        "(unrecognised)".to_string()
    } else {
        names
            .iter()
            .map(|k| match deferred_field(&M::full_name(), k) {
                Some(why) => format!("'{k}' ({why})"),
                None => format!("'{k}'"),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    Err(ConfigError::Unsupported {
        path: path.to_string(),
        fields,
    })
}

const OBSERVE: &str = "comes with observability, issue #7";

/// Fields Petrel refuses today that a later issue brings, by message: the refusal says which
/// issue (as the extension table does for `@type`s).
const DEFERRED_FIELDS: &[(&str, &[&str], &str)] = &[(
    "envoy.config.listener.v3.Listener",
    &["access_log"],
    OBSERVE,
)];

/// Which issue brings a field Petrel refuses today, if one does.
fn deferred_field(message: &str, field: &str) -> Option<&'static str> {
    DEFERRED_FIELDS
        .iter()
        .find(|(m, fields, _)| *m == message && fields.contains(&field))
        .map(|(_, _, why)| *why)
}

/// A `transport_socket` Petrel honours: none or `raw_buffer` (plaintext, the default: `None`),
/// or `envoy.transport_sockets.tls` with the context type `tls_context` (the decoded context).
/// Others are refused with the extension table's reason.
pub fn transport_socket<M: prost::Message + prost::Name + Default>(
    ts: Option<&xds_client::pb::envoy::config::core::v3::TransportSocket>,
    path: &str,
) -> Result<Option<M>, ConfigError> {
    use xds_client::pb::envoy::config::core::v3::transport_socket::ConfigType;
    let Some(ts) = ts else { return Ok(None) };
    let (url, any) = match &ts.config_type {
        Some(ConfigType::TypedConfig(any)) => (TypeRegistry::effective_type_url(any), any),
        None => return Err(invalid(path, "typed_config is required")),
    };
    let tls_url = format!("type.googleapis.com/{}", M::full_name());
    match url.as_str() {
        "type.googleapis.com/envoy.extensions.transport_sockets.raw_buffer.v3.RawBuffer" => {
            Ok(None)
        }
        u if u == tls_url => {
            Ok(Some(TypeRegistry::global().unpack(any).map_err(|e| {
                invalid(format!("{path}.typed_config"), e.to_string())
            })?))
        }
        _ => Err(ConfigError::UnsupportedExtension {
            path: path.to_string(),
            why: petrel_filters::extensions::refusal(&url),
            type_url: url,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use xds_client::pb::envoy::config::route::v3::VirtualHost;

    /// The embedded descriptor set is reduced at build time to what Petrel decodes: every type
    /// the extension table calls supported must be in it.
    #[test]
    fn supported_extensions_are_decodable() {
        use petrel_filters::extensions::{Support, TABLE};
        let reg = TypeRegistry::global();
        for (name, support) in TABLE {
            if *support == Support::Supported {
                assert!(
                    reg.knows(name),
                    "{name} is supported but not in xds-client/build.rs ROOTS"
                );
            }
        }
    }

    #[test]
    fn leftover_fields_are_named() {
        let rest = VirtualHost {
            include_request_attempt_count: true,
            ..Default::default()
        };
        let e = reject_unhandled(&rest, "virtual_hosts[0]").unwrap_err();
        assert_eq!(
            e.to_string(),
            "virtual_hosts[0]: field(s) 'include_request_attempt_count' not supported by Petrel"
        );
        assert!(reject_unhandled(&VirtualHost::default(), "x").is_ok());
    }
}
