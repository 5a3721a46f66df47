//! Filter state (Envoy's `StreamInfo::FilterState`): named objects network filters set on a
//! connection (`istio_authn`'s principals, `set_filter_state`'s strings), read by RBAC's
//! `filter_state` matcher, by `%FILTER_STATE(...)%`, and by upstream pooling (objects shared
//! with upstream keep connections of different values apart, as Envoy's pool hash does).

use std::hash::{Hash, Hasher};

/// Whether an object travels to the upstream connection (`shared_with_upstream`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SharedWithUpstream {
    None,
    Once,
    Transitive,
}

/// One object.
#[derive(Debug, Clone, PartialEq)]
pub struct Object {
    pub key: String,
    /// Its string form (`serializeAsString`, what `:PLAIN` prints and matchers see).
    pub plain: String,
    /// Its proto form as JSON (`serializeAsProto`); None when the object has none, and then
    /// `%FILTER_STATE(key)%` prints `-`.
    pub proto: Option<serde_json::Value>,
    pub read_only: bool,
    pub shared: SharedWithUpstream,
    /// Whether it hashes into the upstream pool key when shared (Istio's principals do;
    /// Envoy's generic string does not).
    pub hashable: bool,
}

/// A connection's objects, by key.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FilterState {
    objects: Vec<Object>,
}

impl FilterState {
    pub fn get(&self, key: &str) -> Option<&Object> {
        self.objects.iter().find(|o| o.key == key)
    }

    pub fn is_empty(&self) -> bool {
        self.objects.is_empty()
    }

    /// Sets an object; a read-only object already under the key stays (Envoy refuses to
    /// replace it). Returns whether it was set.
    pub fn set(&mut self, object: Object) -> bool {
        match self.objects.iter_mut().find(|o| o.key == object.key) {
            Some(existing) if existing.read_only => false,
            Some(existing) => {
                *existing = object;
                true
            }
            None => {
                self.objects.push(object);
                true
            }
        }
    }

    /// What keeps upstream connections apart: the hashable objects shared with upstream (None
    /// when there are none, so such streams share Envoy's one pool).
    pub fn upstream_key(&self) -> Option<u64> {
        let mut shared = self
            .objects
            .iter()
            .filter(|o| o.shared != SharedWithUpstream::None && o.hashable)
            .peekable();
        shared.peek()?;
        let mut h = std::collections::hash_map::DefaultHasher::new();
        for o in shared {
            o.key.hash(&mut h);
            o.plain.hash(&mut h);
        }
        Some(h.finish())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn obj(key: &str, plain: &str, read_only: bool, shared: SharedWithUpstream) -> Object {
        Object {
            key: key.into(),
            plain: plain.into(),
            proto: None,
            read_only,
            shared,
            hashable: true,
        }
    }

    #[test]
    fn read_only_objects_stay() {
        let mut s = FilterState::default();
        assert!(s.set(obj("a", "1", true, SharedWithUpstream::None)));
        assert!(!s.set(obj("a", "2", false, SharedWithUpstream::None)));
        assert_eq!(s.get("a").map(|o| o.plain.as_str()), Some("1"));
        assert!(s.set(obj("b", "1", false, SharedWithUpstream::None)));
        assert!(s.set(obj("b", "2", false, SharedWithUpstream::None)));
        assert_eq!(s.get("b").map(|o| o.plain.as_str()), Some("2"));
    }

    #[test]
    fn only_shared_objects_key_upstream_connections() {
        let mut a = FilterState::default();
        assert_eq!(a.upstream_key(), None);
        a.set(obj("local", "x", false, SharedWithUpstream::None));
        assert_eq!(a.upstream_key(), None);
        a.set(Object {
            hashable: false,
            ..obj("s", "not hashed", false, SharedWithUpstream::Once)
        });
        assert_eq!(a.upstream_key(), None);
        a.set(obj("p", "spiffe://a", true, SharedWithUpstream::Once));
        let mut b = a.clone();
        b.set(obj("local", "y", false, SharedWithUpstream::None));
        assert_eq!(a.upstream_key(), b.upstream_key());
        let mut c = FilterState::default();
        c.set(obj("p", "spiffe://b", true, SharedWithUpstream::Once));
        assert_ne!(a.upstream_key(), c.upstream_key());
    }
}
