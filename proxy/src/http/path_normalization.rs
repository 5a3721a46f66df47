//! The connection manager's path policies, in Envoy's order: `path_with_escaped_slashes_action`,
//! then `normalize_path` (dot segments), then `merge_slashes`. The query string is never touched.

/// `path_with_escaped_slashes_action`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum EscapedSlashes {
    KeepUnchanged,
    RejectRequest,
    UnescapeAndRedirect,
    UnescapeAndForward,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PathPolicy {
    pub escaped_slashes: EscapedSlashes,
    pub normalize_path: bool,
    pub merge_slashes: bool,
}

/// What to do with the request after normalising.
#[derive(Debug, PartialEq)]
pub enum PathOutcome {
    Continue(String),
    /// 400, `path_normalization_failed`.
    Reject,
    /// 307 to the normalised path.
    Redirect(String),
}

impl PathPolicy {
    pub fn is_noop(&self) -> bool {
        self.escaped_slashes == EscapedSlashes::KeepUnchanged
            && !self.normalize_path
            && !self.merge_slashes
    }

    pub fn apply(&self, path_and_query: &str) -> PathOutcome {
        let (path, query) = match path_and_query.find('?') {
            Some(i) => (&path_and_query[..i], &path_and_query[i..]),
            None => (path_and_query, ""),
        };
        let mut p = path.to_string();
        let mut redirect = false;
        if self.escaped_slashes != EscapedSlashes::KeepUnchanged {
            if let Some(unescaped) = unescape_slashes(&p) {
                match self.escaped_slashes {
                    EscapedSlashes::RejectRequest => return PathOutcome::Reject,
                    EscapedSlashes::UnescapeAndRedirect => redirect = true,
                    _ => {}
                }
                p = unescaped;
            }
        }
        if self.normalize_path {
            p = remove_dot_segments(&p);
        }
        if self.merge_slashes {
            p = merge_slashes(&p);
        }
        let out = format!("{p}{query}");
        if redirect {
            PathOutcome::Redirect(out)
        } else {
            PathOutcome::Continue(out)
        }
    }
}

/// `%2F`/`%2f` → `/` and `%5C`/`%5c` → `\`; None when there were none.
pub fn unescape_slashes(p: &str) -> Option<String> {
    let lower = p.to_ascii_lowercase();
    if !lower.contains("%2f") && !lower.contains("%5c") {
        return None;
    }
    let b = p.as_bytes();
    let mut out = String::with_capacity(p.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' && i + 2 < b.len() {
            let code = [b[i + 1].to_ascii_lowercase(), b[i + 2].to_ascii_lowercase()];
            match &code {
                b"2f" => {
                    out.push('/');
                    i += 3;
                    continue;
                }
                b"5c" => {
                    out.push('\\');
                    i += 3;
                    continue;
                }
                _ => {}
            }
        }
        out.push(b[i] as char);
        i += 1;
    }
    Some(out)
}

/// Collapses runs of `/`.
pub fn merge_slashes(p: &str) -> String {
    let mut out = String::with_capacity(p.len());
    let mut prev = '\0';
    for c in p.chars() {
        if !(c == '/' && prev == '/') {
            out.push(c);
        }
        prev = c;
    }
    out
}

/// RFC 3986 section 5.2.4 dot-segment removal.
pub fn remove_dot_segments(p: &str) -> String {
    let mut out: Vec<&str> = Vec::new();
    let segs: Vec<&str> = p.split('/').collect();
    for (i, s) in segs.iter().enumerate().skip(1) {
        let last = i + 1 == segs.len();
        match *s {
            "." => {
                if last {
                    out.push("");
                }
            }
            ".." => {
                out.pop();
                if last {
                    out.push("");
                }
            }
            s => out.push(s),
        }
    }
    format!("/{}", out.join("/"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(e: EscapedSlashes, n: bool, m: bool) -> PathPolicy {
        PathPolicy {
            escaped_slashes: e,
            normalize_path: n,
            merge_slashes: m,
        }
    }

    #[test]
    fn order_and_actions() {
        let p = policy(EscapedSlashes::UnescapeAndForward, true, true);
        assert_eq!(
            p.apply("/a%2F..//b?x=%2F"),
            PathOutcome::Continue("/b?x=%2F".into())
        );
        assert_eq!(
            policy(EscapedSlashes::RejectRequest, false, false).apply("/a%2fb"),
            PathOutcome::Reject
        );
        assert_eq!(
            policy(EscapedSlashes::RejectRequest, false, false).apply("/a/b"),
            PathOutcome::Continue("/a/b".into())
        );
        assert_eq!(
            policy(EscapedSlashes::UnescapeAndRedirect, false, false).apply("/a%5Cb"),
            PathOutcome::Redirect("/a\\b".into())
        );
        assert_eq!(remove_dot_segments("/a/./b/../c"), "/a/c");
        assert_eq!(remove_dot_segments("/../a"), "/a");
        assert_eq!(remove_dot_segments("/a/b/.."), "/a/");
        assert_eq!(merge_slashes("//a///b/"), "/a/b/");
        assert_eq!(unescape_slashes("/a%2"), None);
        assert_eq!(unescape_slashes("/a%2f"), Some("/a/".into()));
    }

    proptest! {
        #[test]
        fn normalised_paths_are_stable(p in "/[a-z./%2F]{0,20}") {
            let pol = policy(EscapedSlashes::UnescapeAndForward, true, true);
            if let PathOutcome::Continue(once) = pol.apply(&p) {
                prop_assert_eq!(pol.apply(&once), PathOutcome::Continue(once.clone()));
                prop_assert!(once.starts_with('/'));
                prop_assert!(!once.contains("//"));
            }
        }
    }
}
