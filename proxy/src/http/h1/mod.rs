//! Petrel's own HTTP/1.1 server codec (downstream only): Envoy's framing rules and error
//! answers, a body read straight from the connection, and upgrades handed to the router.
//! HTTP/2 and upstream HTTP/1.1 stay with hyper.

pub mod body;
pub mod conn;
pub mod head;

use std::sync::{Arc, Mutex};

use bytes::Bytes;

/// A connection given up by the codec after a `101 Switching Protocols`.
pub struct Upgraded {
    pub stream: crate::listener::stream::Downstream,
    /// Bytes the client sent after the upgrade request that the codec had already read.
    pub leftover: Bytes,
}

/// Request extension through which the router receives the upgraded downstream connection.
/// (Extensions must be `Clone + Send + Sync`; the lock is taken once, on upgrade.)
#[derive(Clone)]
pub struct H1Upgrade(pub Arc<Mutex<Option<tokio::sync::oneshot::Receiver<Upgraded>>>>);

impl H1Upgrade {
    pub fn take(&self) -> Option<tokio::sync::oneshot::Receiver<Upgraded>> {
        self.0.lock().ok().and_then(|mut r| r.take())
    }
}

/// Marks a request whose target had a `#fragment`: Envoy refuses it (400) unless the runtime
/// key `envoy.reloadable_features.http_reject_path_with_fragment` is false (then it is dropped).
#[derive(Debug, Clone, Copy)]
pub struct FragmentInPath;
