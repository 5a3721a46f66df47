//! Files Petrel appends to: access logs, its own log, the outlier event log. Paths are opened
//! as Envoy opens them, `/dev/stdout` and `/dev/stderr` included (by path: a proxy whose
//! standard output is a file it may not open fails to start, as Envoy does).

use std::fs::File;

/// Opens `path` for appending, creating it if missing.
pub fn open_append(path: &str) -> std::io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn appends_and_creates() {
        let dir = std::env::temp_dir().join(format!("petrel-append-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let p = dir.join("log");
        let p = p.to_str().expect("utf-8");
        open_append(p)
            .expect("open")
            .write_all(b"a")
            .expect("write");
        open_append(p)
            .expect("open")
            .write_all(b"b")
            .expect("write");
        assert_eq!(std::fs::read_to_string(p).expect("read"), "ab");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
