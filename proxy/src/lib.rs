//! Petrel: an Envoy-compatible data plane for Istio.

// Envoy's deprecated fields are still Envoy's config: they are honoured, not warned about.
#![allow(deprecated)]

pub mod admin;
pub mod append_file;
pub mod cli;
pub mod config;
pub mod http;
pub mod listener;
pub mod local_info;
pub mod logging;
pub mod memory;
pub mod network;
pub mod observe;
pub mod rbac;
pub mod router;
pub mod server;
pub mod tcp;
pub mod tls;
pub mod upstream;
pub mod worker;

/// `--version` as Envoy prints it, `<sha>/<x.y.z>/<status>/<build>/<ssl>` (the form tools
/// reading Envoy's version expect: the commit, then the version).
pub fn version_string() -> String {
    format!(
        "{}/{}/Clean/RELEASE/rustls",
        env!("PETREL_GIT_SHA"),
        env!("CARGO_PKG_VERSION")
    )
}

#[cfg(test)]
mod version_tests {
    #[test]
    fn version_has_envoys_fields() {
        let v = super::version_string();
        let fields: Vec<&str> = v.split('/').collect();
        assert_eq!(fields.len(), 5, "{v}");
        assert!(
            fields[0].len() == 40 && fields[0].chars().all(|c| c.is_ascii_hexdigit()),
            "{v}"
        );
        assert!(
            fields[1].split('.').all(|n| n.parse::<u32>().is_ok()),
            "{v}"
        );
    }
}
