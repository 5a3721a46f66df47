//! Finds the descriptor set that `envoy-types` ships beside its generated code, so proto3-JSON
//! decoding (prost-reflect) sees exactly the messages the Rust types were generated from.
use std::path::PathBuf;

const ENVOY_TYPES_DIR: &str = "envoy-types-0.7.7";

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
        let src = root.join("registry").join("src");
        if let Ok(entries) = std::fs::read_dir(&src) {
            for e in entries.flatten() {
                out.push(
                    e.path()
                        .join(ENVOY_TYPES_DIR)
                        .join("src/generated/types.bin"),
                );
            }
        }
    }
    // `cargo vendor` layout, next to the workspace.
    if let Ok(dir) = std::env::var("CARGO_MANIFEST_DIR") {
        out.push(PathBuf::from(dir).join("../vendor/envoy-types/src/generated/types.bin"));
    }
    out
}

fn main() {
    println!("cargo:rerun-if-env-changed=PETREL_ENVOY_DESCRIPTORS");
    let path = std::env::var("PETREL_ENVOY_DESCRIPTORS")
        .map(PathBuf::from)
        .ok()
        .or_else(|| candidates().into_iter().find(|p| p.is_file()));
    match path {
        Some(p) => {
            println!("cargo:rerun-if-changed={}", p.display());
            println!("cargo:rustc-env=PETREL_ENVOY_DESCRIPTORS={}", p.display());
        }
        None => panic!(
            "cannot find {ENVOY_TYPES_DIR}/src/generated/types.bin in the cargo registry; \
             set PETREL_ENVOY_DESCRIPTORS to its path"
        ),
    }
}
