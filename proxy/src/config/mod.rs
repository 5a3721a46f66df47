//! Compiling Envoy configuration into immutable runtime snapshots.
//!
//! Every compile function takes the proto and a JSON-style path for messages; anything it cannot
//! honour fails with [`ConfigError`] naming that path, never silently.

pub mod bootstrap;
pub mod duration;
pub mod dynamic;
pub mod snapshot;
pub mod xds_listeners;
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
    let json = TypeRegistry::global().to_json(rest);
    let fields = match json {
        serde_json::Value::Object(m) if !m.is_empty() => m
            .keys()
            .map(|k| format!("'{k}'"))
            .collect::<Vec<_>>()
            .join(", "),
        _ => "(unrecognised)".to_string(),
    };
    Err(ConfigError::Unsupported {
        path: path.to_string(),
        fields,
    })
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
