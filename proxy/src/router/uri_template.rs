//! `envoy.path.match.uri_template` patterns (`/{lang}/{country}/**`), compiled to a full-match
//! regex as Envoy's `pattern_template` library does.

use crate::config::{invalid, ConfigError};

/// RFC 3986 pchar without '/': unreserved, sub-delims, ':', '@', and percent escapes.
const SEGMENT: &str = "[a-zA-Z0-9\\-._~%!$&'()+,;:@=]+";
const SEGMENTS: &str = "[a-zA-Z0-9\\-._~%!$&'()+,;:@=/]*";

#[derive(Debug)]
pub struct UriTemplate {
    re: regex::Regex,
}

impl UriTemplate {
    pub fn compile(template: &str, path: &str) -> Result<UriTemplate, ConfigError> {
        let bad = |why: &str| {
            invalid(
                format!("{path}.path_template"),
                format!("invalid URI template '{template}': {why}"),
            )
        };
        if !template.starts_with('/') {
            return Err(bad("must start with '/'"));
        }
        let segments: Vec<&str> = template[1..].split('/').collect();
        let mut re = String::from("^");
        let mut names = std::collections::HashSet::new();
        // As Envoy's parser: literals may follow a `**`, another glob may not.
        let mut seen_text_glob = false;
        for seg in &segments {
            re.push('/');
            let glob = if let Some(inner) = seg.strip_prefix('{').and_then(|s| s.strip_suffix('}'))
            {
                let (name, pat) = inner.split_once('=').unwrap_or((inner, "*"));
                if name.is_empty() || !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                {
                    return Err(bad("invalid variable name"));
                }
                if !names.insert(name.to_string()) {
                    return Err(bad("duplicate variable name"));
                }
                pat
            } else {
                seg
            };
            if seen_text_glob && (glob == "*" || glob == "**") {
                return Err(bad("Glob after text glob."));
            }
            match glob {
                "*" => re.push_str(SEGMENT),
                "**" => {
                    seen_text_glob = true;
                    re.push_str(SEGMENTS);
                }
                lit => {
                    if lit.contains(['{', '}', '*']) {
                        return Err(bad("wildcards must be whole segments"));
                    }
                    re.push_str(&regex::escape(lit));
                }
            }
        }
        re.push('$');
        let re = regex::Regex::new(&re).map_err(|e| bad(&e.to_string()))?;
        Ok(UriTemplate { re })
    }

    pub fn matches(&self, path: &str) -> bool {
        self.re.is_match(path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates() {
        let t = UriTemplate::compile("/api/{version}/users/*", "p").unwrap();
        assert!(t.matches("/api/v1/users/bob"));
        assert!(!t.matches("/api/v1/users/bob/x"));
        assert!(!t.matches("/api/v1/users/"));
        let t = UriTemplate::compile("/static/{rest=**}", "p").unwrap();
        assert!(t.matches("/static/a/b/c.css"));
        assert!(t.matches("/static/"));
        let t = UriTemplate::compile("/**/path/template", "p").unwrap();
        assert!(t.matches("/x/y/path/template"));
        assert!(!t.matches("/x/y/path/other"));
        assert!(UriTemplate::compile("/a/**/*", "p").is_err());
        assert!(UriTemplate::compile("/a/**/{x}", "p").is_err());
        assert!(UriTemplate::compile("/a/{x}/{x}", "p").is_err());
        assert!(UriTemplate::compile("nope", "p").is_err());
    }
}
