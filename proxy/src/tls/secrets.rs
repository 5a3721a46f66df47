//! Secrets from SDS (`tls_certificate_sds_secret_configs`, `validation_context_sds_secret_config`):
//! one slot per (source, name) shared by every TLS context that names it. Contexts read the slot
//! at each handshake, so a rotated secret applies to new handshakes while established
//! connections keep theirs; a listener or cluster whose slots are empty stays warming.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, LazyLock, Mutex, Weak};

use arc_swap::ArcSwapOption;
use rustls::sign::CertifiedKey;
use xds_client::pb::envoy::config::core::v3::{config_source::ConfigSourceSpecifier, ConfigSource};
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
    /// The bootstrap's `static_resources.secrets` (an `SdsSecretConfig` without `sds_config`).
    Static,
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
    /// When a context first asked for it (`last_updated` of a warming secret).
    created: String,
    /// Order of first request (`/config_dump` lists secrets in it, as Envoy does).
    seq: u64,
    /// When waiting ends without the secret (`initial_fetch_timeout`; None: never).
    deadline: Option<std::time::Instant>,
    timed_out: std::sync::atomic::AtomicBool,
    /// The contexts' `ssl_context_update_by_sds` counters.
    watchers: Mutex<Vec<Weak<crate::observe::stats::Counter>>>,
}

/// A secret as it arrived, for `/config_dump` (its private key redacted).
#[derive(Debug, Clone)]
pub struct SecretRecord {
    pub version: String,
    pub last_updated: String,
    pub shown: Secret,
}

/// One named secret as `/config_dump` shows it: active (arrived) or warming.
pub struct DumpedSecret {
    pub name: String,
    pub record: Option<SecretRecord>,
    pub waiting_since: String,
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

    /// Arrived, or waited for as long as `initial_fetch_timeout` allows.
    pub fn is_ready(&self) -> bool {
        self.has_value() || self.timed_out.load(std::sync::atomic::Ordering::Relaxed)
    }

    pub fn has_value(&self) -> bool {
        self.value.load().is_some()
    }

    /// Counts this secret's updates in a context's counter.
    pub fn watch(&self, counter: &Arc<crate::observe::stats::Counter>) {
        self.watchers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Arc::downgrade(counter));
    }

    fn updated(&self) {
        let mut w = self.watchers.lock().unwrap_or_else(|e| e.into_inner());
        w.retain(|c| c.strong_count() > 0);
        for c in w.iter().filter_map(Weak::upgrade) {
            c.inc();
        }
    }
}

type Key = (SdsSource, String);

static NEXT_SLOT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// The slots in use, process-wide.
#[derive(Default)]
pub struct SecretRegistry {
    slots: Mutex<BTreeMap<Key, Weak<SecretSlot>>>,
    /// Values that arrived for names no context held yet (kept so a context compiled later
    /// finds them, as Envoy's secret manager does), with what `/config_dump` shows of them.
    values: Mutex<BTreeMap<Key, (Arc<SecretValue>, SecretRecord)>>,
    /// Wakes whoever follows subscriptions when a new name is wanted.
    pub wanted_changed: tokio::sync::Notify,
    /// Where `sds.<name>.*` are counted (set once at start).
    store: std::sync::OnceLock<crate::observe::stats::Store>,
    /// The bootstrap's static secrets in configuration order, for `/config_dump`.
    statics: Mutex<Vec<(String, SecretRecord)>>,
}

crate::stat_struct!(SdsStats {
    counter update_attempt,
    counter update_success,
    counter update_rejected,
    counter init_fetch_timeout,
});

pub fn registry() -> &'static SecretRegistry {
    static R: LazyLock<SecretRegistry> = LazyLock::new(SecretRegistry::default);
    &R
}

impl SecretRegistry {
    /// Sets the store `sds.<name>.*` stats go to.
    pub fn set_store(&self, store: &crate::observe::stats::Store) {
        let _ = self.store.set(store.clone());
    }

    fn stats(&self, name: &str) -> Option<SdsStats> {
        self.store
            .get()
            .map(|s| SdsStats::new(s, &format!("sds.{name}.")))
    }

    /// The slot for a name, shared with every other context naming it; `timeout` is how long
    /// a new one waits for its secret.
    pub fn slot(
        &self,
        source: SdsSource,
        name: &str,
        timeout: Option<std::time::Duration>,
    ) -> Arc<SecretSlot> {
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
            .map(|(v, _)| v.clone());
        let slot = Arc::new(SecretSlot {
            source,
            name: name.to_string(),
            value: ArcSwapOption::new(known),
            created: crate::http::date::rfc3339_millis(std::time::SystemTime::now()),
            seq: NEXT_SLOT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
            deadline: timeout.map(|t| std::time::Instant::now() + t),
            timed_out: Default::default(),
            watchers: Default::default(),
        });
        slots.retain(|_, w| w.strong_count() > 0);
        slots.insert(key, Arc::downgrade(&slot));
        drop(slots);
        if slot.source == SdsSource::Static {
            return slot;
        }
        // A new subscription is an update attempt, as Envoy counts it.
        if let Some(s) = self.stats(name) {
            s.update_attempt.inc();
        }
        self.wanted_changed.notify_one();
        slot
    }

    /// The names wanted from each source (those a live context holds).
    pub fn wanted(&self) -> BTreeMap<SdsSource, BTreeSet<String>> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: BTreeMap<SdsSource, BTreeSet<String>> = BTreeMap::new();
        for ((source, name), w) in slots.iter() {
            if w.strong_count() > 0 && *source != SdsSource::Static {
                out.entry(source.clone()).or_default().insert(name.clone());
            }
        }
        out
    }

    /// Applies secrets (with their versions) that arrived from `source`, each on its own as
    /// Envoy's per-secret subscriptions do: those that compile apply; the others keep their
    /// last good value and are named in the error. Returns whether any slot changed, and the
    /// error of those that did not compile.
    pub fn apply(
        &self,
        source: &SdsSource,
        secrets: &[(Secret, String)],
    ) -> (bool, Result<(), String>) {
        let mut compiled = Vec::with_capacity(secrets.len());
        let mut errors = Vec::new();
        for (s, version) in secrets {
            let stats = self.stats(&s.name);
            if let Some(st) = &stats {
                st.update_attempt.inc();
            }
            match compile(s) {
                Ok(v) => {
                    if let Some(st) = &stats {
                        st.update_success.inc();
                    }
                    compiled.push((s, version, v));
                }
                Err(e) => {
                    if let Some(st) = &stats {
                        st.update_rejected.inc();
                    }
                    errors.push(e.to_string());
                }
            }
        }
        let now = crate::http::date::rfc3339_millis(std::time::SystemTime::now());
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        let mut changed = false;
        for (secret, version, value) in compiled {
            let key = (source.clone(), secret.name.clone());
            let value = Arc::new(value);
            if let Some(slot) = slots.get(&key).and_then(Weak::upgrade) {
                slot.value.store(Some(value.clone()));
                slot.updated();
                changed = true;
            }
            let record = SecretRecord {
                version: version.clone(),
                last_updated: now.clone(),
                shown: redacted(secret),
            };
            values.insert(key, (value, record));
        }
        let result = if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        };
        (changed, result)
    }

    /// The earliest `initial_fetch_timeout` still running.
    pub fn next_deadline(&self) -> Option<std::time::Instant> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .values()
            .filter_map(Weak::upgrade)
            .filter(|s| !s.is_ready())
            .filter_map(|s| s.deadline)
            .min()
    }

    /// Ends the waits whose timeout ran out (counted in `sds.<name>.init_fetch_timeout`);
    /// whether any did.
    pub fn expire_due(&self) -> bool {
        let now = std::time::Instant::now();
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut any = false;
        for s in slots.values().filter_map(Weak::upgrade) {
            if !s.is_ready() && s.deadline.is_some_and(|d| d <= now) {
                s.timed_out
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                if let Some(st) = self.stats(&s.name) {
                    st.init_fetch_timeout.inc();
                }
                any = true;
            }
        }
        any
    }

    /// Takes the bootstrap's `static_resources.secrets` (replacing any earlier set).
    pub fn set_static(&self, secrets: &[Secret]) -> Result<(), ConfigError> {
        let now = crate::http::date::rfc3339_millis(std::time::SystemTime::now());
        let mut compiled = Vec::with_capacity(secrets.len());
        for (i, secret) in secrets.iter().enumerate() {
            if secrets[..i].iter().any(|o| o.name == secret.name) {
                return Err(invalid(
                    "static_resources.secrets",
                    format!("Duplicate static secret name {}", secret.name),
                ));
            }
            compiled.push((secret, compile(secret)?));
        }
        let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        values.retain(|(source, _), _| *source != SdsSource::Static);
        let mut statics = self.statics.lock().unwrap_or_else(|e| e.into_inner());
        statics.clear();
        for (secret, value) in compiled {
            let record = SecretRecord {
                version: String::new(),
                last_updated: now.clone(),
                shown: redacted(secret),
            };
            statics.push((secret.name.clone(), record.clone()));
            values.insert(
                (SdsSource::Static, secret.name.clone()),
                (Arc::new(value), record),
            );
        }
        Ok(())
    }

    fn has_static(&self, name: &str) -> bool {
        self.values
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&(SdsSource::Static, name.to_string()))
    }

    /// The static secrets, in configuration order, as `/config_dump` lists them.
    pub fn dump_static(&self) -> Vec<(String, SecretRecord)> {
        self.statics
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The secrets live contexts name, by name, as `/config_dump` lists them.
    pub fn dump(&self) -> Vec<DumpedSecret> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        let mut out: Vec<(u64, DumpedSecret)> = slots
            .iter()
            .filter(|(key, _)| key.0 != SdsSource::Static)
            .filter_map(|(key, w)| {
                let slot = w.upgrade()?;
                Some((
                    slot.seq,
                    DumpedSecret {
                        name: key.1.clone(),
                        record: values.get(key).map(|(_, r)| r.clone()),
                        waiting_since: slot.created.clone(),
                    },
                ))
            })
            .collect();
        out.sort_by_key(|(seq, _)| *seq);
        out.into_iter().map(|(_, d)| d).collect()
    }
}

/// A secret with its private key replaced by `[redacted]`, as Envoy's config dump shows it.
fn redacted(s: &Secret) -> Secret {
    use xds_client::pb::envoy::config::core::v3::{data_source::Specifier, DataSource};
    let mut s = s.clone();
    if let Some(secret::Type::TlsCertificate(c)) = &mut s.r#type {
        // The redaction keeps the way the key was given (bytes, string, file, variable).
        if let Some(k) = &c.private_key {
            let specifier = match k.specifier {
                Some(Specifier::InlineString(_)) => Specifier::InlineString("[redacted]".into()),
                Some(Specifier::Filename(_)) => Specifier::Filename("[redacted]".into()),
                Some(Specifier::EnvironmentVariable(_)) => {
                    Specifier::EnvironmentVariable("[redacted]".into())
                }
                _ => Specifier::InlineBytes(b"[redacted]".to_vec()),
            };
            c.private_key = Some(DataSource {
                specifier: Some(specifier),
                ..Default::default()
            });
        }
    }
    s
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

/// An `SdsSecretConfig`: the slot it names. Without `sds_config` it names a static secret
/// (`unknown` is Envoy's error when there is none of that name).
pub fn sds_slot(
    c: &SdsSecretConfig,
    path: &str,
    unknown: &str,
) -> Result<Arc<SecretSlot>, ConfigError> {
    let mut rest = c.clone();
    let name = std::mem::take(&mut rest.name);
    if name.is_empty() {
        return Err(invalid(
            format!("{path}.name"),
            "value length must be at least 1 characters",
        ));
    }
    let (source, timeout) = match rest.sds_config.take() {
        Some(cs) => source(&cs, &format!("{path}.sds_config"))?,
        None if registry().has_static(&name) => (SdsSource::Static, None),
        None => return Err(invalid(path, format!("{unknown}: {name}"))),
    };
    reject_unhandled(&rest, path)?;
    Ok(registry().slot(source, &name, timeout))
}

/// An SDS `ConfigSource`: ADS, or a gRPC stream to a static cluster; and how long a listener
/// or cluster waits for the secret (`initial_fetch_timeout`: 15 s unless set, `0s` forever).
fn source(
    c: &ConfigSource,
    path: &str,
) -> Result<(SdsSource, Option<std::time::Duration>), ConfigError> {
    let mut rest = c.clone();
    if !matches!(std::mem::take(&mut rest.resource_api_version), 0 | 2) {
        return Err(invalid(
            format!("{path}.resource_api_version"),
            "only V3 is supported",
        ));
    }
    // Listeners and clusters warm until their secrets arrive, or until this runs out: then
    // they go active and their connections are turned away until the secret comes.
    let timeout = match rest.initial_fetch_timeout.take() {
        Some(t) => {
            let d = crate::config::duration::to_std(&t, &format!("{path}.initial_fetch_timeout"))?;
            (!d.is_zero()).then_some(d)
        }
        None => Some(std::time::Duration::from_secs(15)),
    };
    let src = match rest.config_source_specifier.take() {
        Some(ConfigSourceSpecifier::Ads(_)) => SdsSource::Ads,
        Some(ConfigSourceSpecifier::ApiConfigSource(a)) => {
            let (api, cluster) = crate::config::dynamic::grpc_api_source(
                &a,
                false,
                &format!("{path}.api_config_source"),
            )?;
            SdsSource::Grpc {
                cluster,
                delta: api == xds_client::ads::ApiType::Delta,
            }
        }
        _ => {
            return Err(ConfigError::Unsupported {
                path: path.into(),
                fields: "an SDS source other than ADS or a gRPC api_config_source".into(),
            })
        }
    };
    reject_unhandled(&rest, path)?;
    Ok((src, timeout))
}
