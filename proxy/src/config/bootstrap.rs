//! Loading the bootstrap as Envoy does: `-c` file (YAML, JSON or binary proto by extension) with
//! `--config-yaml` merged on top (proto `MergeFrom`: repeated fields appended, scalars replaced).

use bytes::Bytes;
use prost::Message;
use xds_client::pb::envoy::config::bootstrap::v3::Bootstrap;
use xds_client::pb::envoy::config::core::v3::{data_source::Specifier, DataSource};
use xds_client::TypeRegistry;

use super::{invalid, ConfigError};
use crate::cli::Options;

fn parse_text(text: &str, yaml: bool, allow_unknown: bool) -> Result<Bootstrap, ConfigError> {
    let value: serde_json::Value = if yaml {
        serde_yaml::from_str(text)
            .map_err(|e| invalid("(root)", format!("Unable to parse YAML: {e}")))?
    } else {
        serde_json::from_str(text)
            .map_err(|e| invalid("(root)", format!("Unable to parse JSON: {e}")))?
    };
    TypeRegistry::global()
        .from_json(&value, allow_unknown)
        .map_err(|e| match e {
            xds_client::DecodeError::TypeNotSupported { path, type_name } => {
                ConfigError::UnsupportedExtension {
                    path,
                    why: petrel_filters::extensions::refusal(&type_name),
                    type_url: format!("type.googleapis.com/{type_name}"),
                }
            }
            other => ConfigError::Decode(other),
        })
}

/// Loads and merges the bootstrap named by the command line.
pub fn load(opts: &Options) -> Result<Bootstrap, ConfigError> {
    let mut bootstrap = Bootstrap::default();
    if let Some(path) = &opts.config_path {
        let bytes = std::fs::read(path).map_err(|e| ConfigError::Io {
            path: path.clone(),
            message: e.to_string(),
        })?;
        let lower = path.to_ascii_lowercase();
        bootstrap = if lower.ends_with(".pb") {
            Bootstrap::decode(bytes.as_slice())
                .map_err(|e| invalid("(root)", format!("Unable to parse binary proto: {e}")))?
        } else {
            let text =
                String::from_utf8(bytes).map_err(|_| invalid("(root)", "file is not UTF-8"))?;
            let yaml =
                lower.ends_with(".yaml") || lower.ends_with(".yml") || !lower.ends_with(".json");
            parse_text(&text, yaml, opts.allow_unknown_static_fields)?
        };
    }
    if let Some(y) = &opts.config_yaml {
        let overlay = parse_text(y, true, opts.allow_unknown_static_fields)?;
        bootstrap
            .merge(overlay.encode_to_vec().as_slice())
            .map_err(|e| invalid("--config-yaml", e.to_string()))?;
    }
    if opts.config_path.is_none() && opts.config_yaml.is_none() {
        return Err(invalid("(root)", "At least one of --config-path or --config-yaml or Options::configProto() should be non-empty"));
    }
    Ok(bootstrap)
}

/// Reads a `DataSource` (inline bytes/string, file, or environment variable).
pub fn data_source(ds: &DataSource, path: &str) -> Result<Bytes, ConfigError> {
    if ds.watched_directory.is_some() {
        return Err(ConfigError::Unsupported {
            path: path.into(),
            fields: "'watched_directory'".into(),
        });
    }
    match &ds.specifier {
        Some(Specifier::InlineBytes(b)) => Ok(Bytes::from(b.clone())),
        Some(Specifier::InlineString(s)) => Ok(Bytes::from(s.clone())),
        Some(Specifier::Filename(f)) => {
            std::fs::read(f)
                .map(Bytes::from)
                .map_err(|e| ConfigError::Io {
                    path: f.clone(),
                    message: e.to_string(),
                })
        }
        Some(Specifier::EnvironmentVariable(v)) => std::env::var(v)
            .map(Bytes::from)
            .map_err(|_| invalid(path, format!("Environment variable doesn't exist: {v}"))),
        None => Err(invalid(path, "specifier is required")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(path: Option<&str>, yaml: Option<&str>) -> Options {
        Options {
            config_path: path.map(Into::into),
            config_yaml: yaml.map(Into::into),
            ..Default::default()
        }
    }

    #[test]
    fn config_yaml_merges_like_merge_from() {
        let dir = std::env::temp_dir().join(format!("petrel-bs-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("b.yaml");
        std::fs::write(
            &f,
            "node: {id: a, cluster: c}\nstatic_resources: {clusters: [{name: one}]}\n",
        )
        .unwrap();
        let b = load(&opts(
            f.to_str(),
            Some("node: {id: b}\nstatic_resources: {clusters: [{name: two}]}"),
        ))
        .unwrap();
        let node = b.node.unwrap();
        assert_eq!((node.id.as_str(), node.cluster.as_str()), ("b", "c"));
        let names: Vec<_> = b
            .static_resources
            .unwrap()
            .clusters
            .iter()
            .map(|c| c.name.clone())
            .collect();
        assert_eq!(names, ["one", "two"]);
    }

    /// Every bootstrap pilot-agent renders either loads and compiles, or is refused with an
    /// error that names what Petrel does not support (never a vague failure).
    #[test]
    fn every_istio_rendered_bootstrap_loads_or_is_refused_by_name() {
        let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../shared/istio/bootstrap");
        let mut seen = 0;
        for e in std::fs::read_dir(dir).expect("../shared/istio/bootstrap beside the checkout") {
            let p = e.expect("dir entry").path();
            let name = p
                .file_name()
                .unwrap_or_default()
                .to_string_lossy()
                .to_string();
            let store = crate::observe::stats::Store::default();
            let result = load(&opts(p.to_str(), None)).and_then(|b| {
                crate::config::snapshot::compile(&b, &Options::default(), &store).map(|_| ())
            });
            seen += 1;
            if let Err(e) = result {
                let msg = e.to_string();
                let named =
                    msg.contains("not supported by Petrel") || msg.contains("type.googleapis.com/");
                println!("{name}: {msg}");
                assert!(
                    named,
                    "{name}: refusal does not name the unsupported part: {msg}"
                );
            }
        }
        assert!(seen > 20);
    }
}
