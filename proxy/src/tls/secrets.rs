//! Secrets from SDS (`tls_certificate_sds_secret_configs`, `validation_context_sds_secret_config`):
//! one slot per (source, name) shared by every TLS context that names it. Contexts read the slot
//! at each handshake, so a rotated secret applies to new handshakes while established
//! connections keep theirs; a listener or cluster whose slots are empty stays warming.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use arc_swap::ArcSwapOption;
use rustls::sign::CertifiedKey;
use xds_client::pb::envoy::config::core::v3::{
    api_config_source, config_source::ConfigSourceSpecifier, grpc_service::TargetSpecifier,
    ConfigSource,
};
use xds_client::pb::envoy::extensions::transport_sockets::tls::v3::{
    secret, SdsSecretConfig, Secret,
};

use super::validation::Validation;
use crate::config::{invalid, reject_unhandled, ConfigError};

/// Where a secret comes from.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum SdsSource {
    /// A `SecretDiscoveryService` stream to a static cluster (Istio's `sds-grpc`).
    Grpc { cluster: String, delta: bool },
    /// The ADS stream.
    Ads,
}

#[derive(Debug)]
pub enum SecretValue {
    Certificate(Arc<CertifiedKey>),
    Validation(Arc<Validation>),
}

/// One named secret as the contexts naming it see it.
#[derive(Debug)]
pub struct SecretSlot {
    pub source: SdsSource,
    pub name: String,
    value: ArcSwapOption<SecretValue>,
}

impl SecretSlot {
    pub fn certificate(&self) -> Option<Arc<CertifiedKey>> {
        match self.value.load().as_deref() {
            Some(SecretValue::Certificate(c)) => Some(c.clone()),
            _ => None,
        }
    }

    pub fn validation(&self) -> Option<Arc<Validation>> {
        match self.value.load().as_deref() {
            Some(SecretValue::Validation(v)) => Some(v.clone()),
            _ => None,
        }
    }

    pub fn is_ready(&self) -> bool {
        self.value.load().is_some()
    }
}

type Key = (SdsSource, String);

/// The slots in use, process-wide.
#[derive(Default)]
pub struct SecretRegistry {
    slots: Mutex<BTreeMap<Key, Weak<SecretSlot>>>,
    /// Values that arrived for names no context held yet (kept so a context compiled later
    /// finds them, as Envoy's secret manager does).
    values: Mutex<BTreeMap<Key, Arc<SecretValue>>>,
    /// Wakes whoever follows subscriptions when a new name is wanted.
    pub wanted_changed: tokio::sync::Notify,
}

pub fn registry() -> &'static SecretRegistry {
    static R: LazyLock<SecretRegistry> = LazyLock::new(SecretRegistry::default);
    &R
}

impl SecretRegistry {
    /// The slot for a name, shared with every other context naming it.
    pub fn slot(&self, source: SdsSource, name: &str) -> Arc<SecretSlot> {
        let key = (source.clone(), name.to_string());
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = slots.get(&key).and_then(Weak::upgrade) {
            return s;
        }
        let known = self
            .values
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&key)
            .cloned();
        let slot = Arc::new(SecretSlot {
            source,
            name: name.to_string(),
            value: ArcSwapOption::new(known),
        });
        slots.retain(|_, w| w.strong_count() > 0);
        slots.insert(key, Arc::downgrade(&slot));
        drop(slots);
        self.wanted_changed.notify_one();
        slot
    }

    /// The names wanted from each source (those a live context holds).
    pub fn wanted(&self) -> BTreeMap<SdsSource, BTreeSet<String>> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: BTreeMap<SdsSource, BTreeSet<String>> = BTreeMap::new();
        for ((source, name), w) in slots.iter() {
            if w.strong_count() > 0 {
                out.entry(source.clone()).or_default().insert(name.clone());
            }
        }
        out
    }

    /// Applies secrets that arrived from `source`: all compile, or none applies (the error
    /// names the secret and field). Returns whether any slot changed.
    pub fn apply(&self, source: &SdsSource, secrets: &[Secret]) -> Result<bool, String> {
        let mut compiled = Vec::with_capacity(secrets.len());
        for s in secrets {
            compiled.push((s.name.clone(), compile(s).map_err(|e| e.to_string())?));
        }
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        for (name, value) in compiled {
            let key = (source.clone(), name);
            let value = Arc::new(value);
            if let Some(slot) = slots.get(&key).and_then(Weak::upgrade) {
                slot.value.store(Some(value.clone()));
                changed = true;
            }
            values.insert(key, value);
        }
        Ok(changed)
    }
}

/// Compiles one `Secret`.
pub fn compile(s: &Secret) -> Result<SecretValue, ConfigError> {
    let path = format!("secret '{}'", s.name);
    let mut rest = s.clone();
    rest.name.clear();
    let value = match rest.r#type.take() {
        Some(secret::Type::TlsCertificate(c)) => SecretValue::Certificate(
            super::certificate::certified_key(&c, &format!("{path}.tls_certificate"))?,
        ),
        Some(secret::Type::ValidationContext(v)) => SecretValue::Validation(Arc::new(
            Validation::compile(&v, &format!("{path}.validation_context"))?,
        )),
        Some(_) => {
            return Err(ConfigError::Unsupported {
                path,
                fields: "session_ticket_keys/generic_secret".into(),
            })
        }
        None => return Err(invalid(path, "type is required")),
    };
    reject_unhandled(&rest, &format!("secret '{}'", s.name))?;
    Ok(value)
}

/// An `SdsSecretConfig`: the slot it names.
pub fn sds_slot(c: &SdsSecretConfig, path: &str) -> Result<Arc<SecretSlot>, ConfigError> {
    let mut rest = c.clone();
    let name = std::mem::take(&mut rest.name);
    if name.is_empty() {
        return Err(invalid(
            format!("{path}.name"),
            "value length must be at least 1 characters",
        ));
    }
    let source = match rest.sds_config.take() {
        Some(cs) => source(&cs, &format!("{path}.sds_config"))?,
        None => {
            return Err(ConfigError::Unsupported {
                path: path.into(),
                fields: "static secrets (an SdsSecretConfig without sds_config)".into(),
            })
        }
    };
    reject_unhandled(&rest, path)?;
    Ok(registry().slot(source, &name))
}

/// An SDS `ConfigSource`: ADS, or a gRPC stream to a static cluster.
fn source(c: &ConfigSource, path: &str) -> Result<SdsSource, ConfigError> {
    let mut rest = c.clone();
    if !matches!(std::mem::take(&mut rest.resource_api_version), 0 | 2) {
        return Err(invalid(
            format!("{path}.resource_api_version"),
            "only V3 is supported",
        ));
    }
    // Listeners and clusters warm until their secrets arrive. Istio sets `0s` (wait forever);
    // a bounded wait (after which Envoy activates them without the secret) is not supported.
    if let Some(t) = rest.initial_fetch_timeout.take() {
        if t.seconds != 0 || t.nanos != 0 {
            return Err(invalid(
                format!("{path}.initial_fetch_timeout"),
                "Petrel waits for SDS secrets without a timeout: only 0s is supported",
            ));
        }
    }
    let src = match rest.config_source_specifier.take() {
        Some(ConfigSourceSpecifier::Ads(_)) => SdsSource::Ads,
        Some(ConfigSourceSpecifier::ApiConfigSource(mut a)) => {
            let ap = format!("{path}.api_config_source");
            let delta = match api_config_source::ApiType::try_from(std::mem::take(&mut a.api_type))
            {
                Ok(api_config_source::ApiType::Grpc) => false,
                Ok(api_config_source::ApiType::DeltaGrpc) => true,
                _ => {
                    return Err(invalid(
                        format!("{ap}.api_type"),
                        "only GRPC and DELTA_GRPC are supported",
                    ))
                }
            };
            if !matches!(std::mem::take(&mut a.transport_api_version), 0 | 2) {
                return Err(invalid(
                    format!("{ap}.transport_api_version"),
                    "only V3 is supported",
                ));
            }
            a.set_node_on_first_message_only = false;
            let services = std::mem::take(&mut a.grpc_services);
            reject_unhandled(&a, &ap)?;
            let [svc] = services.as_slice() else {
                return Err(invalid(
                    format!("{ap}.grpc_services"),
                    "exactly one gRPC service is supported",
                ));
            };
            let mut srest = svc.clone();
            let cluster = match srest.target_specifier.take() {
                Some(TargetSpecifier::EnvoyGrpc(e)) => e.cluster_name,
                _ => {
                    return Err(ConfigError::Unsupported {
                        path: format!("{ap}.grpc_services[0]"),
                        fields: "'google_grpc'".into(),
                    })
                }
            };
            srest.timeout = None;
            reject_unhandled(&srest, &format!("{ap}.grpc_services[0]"))?;
            SdsSource::Grpc { cluster, delta }
        }
        _ => {
            return Err(ConfigError::Unsupported {
                path: path.into(),
                fields: "an SDS source other than ADS or a gRPC api_config_source".into(),
            })
        }
    };
    reject_unhandled(&rest, path)?;
    Ok(src)
}
