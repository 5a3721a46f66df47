//! Puts the source commit in `--version`, where Envoy has its own (`<sha>/<version>/…`): from
//! `PETREL_GIT_SHA` when set (image builds without `.git`), else `git rev-parse HEAD`, else
//! zeros.

fn main() {
    println!("cargo:rerun-if-env-changed=PETREL_GIT_SHA");
    println!("cargo:rerun-if-changed=../.git/HEAD");
    let sha = std::env::var("PETREL_GIT_SHA")
        .ok()
        .or_else(|| {
            let out = std::process::Command::new("git")
                .args(["rev-parse", "HEAD"])
                .output()
                .ok()?;
            out.status
                .success()
                .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
        })
        .filter(|s| s.len() == 40 && s.chars().all(|c| c.is_ascii_hexdigit()))
        .unwrap_or_else(|| "0".repeat(40));
    println!("cargo:rustc-env=PETREL_GIT_SHA={sha}");
}
