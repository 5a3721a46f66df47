//! The part of Go's `text/template` istio/proxy's end-to-end fixtures use
//! (`../shared/istio/proxy-testdata`, `../shared/istio/telemetry/metric`), so tests load those
//! files as they are: `{{ .Vars.X }}`, `{{ .Ports.X }}`, `{{ .N }}`, the pipes `fill` (render the
//! value as a template) and `indent N` (Sprig's: every line), `if` with `eq`/`ne`/a value,
//! `else`, `end`, and `{{-`/`-}}` whitespace trimming. A missing variable is empty.

use std::collections::HashMap;

/// What a template may read.
#[derive(Debug, Clone, Default)]
pub struct Params {
    pub vars: HashMap<String, String>,
    pub ports: HashMap<String, u16>,
    pub n: u32,
}

impl Params {
    pub fn var(mut self, k: &str, v: impl Into<String>) -> Self {
        self.vars.insert(k.to_string(), v.into());
        self
    }
    pub fn port(mut self, k: &str, v: u16) -> Self {
        self.ports.insert(k.to_string(), v);
        self
    }
}

#[derive(Debug)]
enum Token {
    Text(String),
    Action(String),
}

fn tokenize(src: &str) -> Vec<Token> {
    let mut out = Vec::new();
    let mut rest = src;
    let mut trim_next = false;
    while let Some(start) = rest.find("{{") {
        let mut text = &rest[..start];
        if trim_next {
            text = text.trim_start();
        }
        let after = &rest[start + 2..];
        let end = after.find("}}").expect("unclosed action");
        let mut action = &after[..end];
        if let Some(a) = action.strip_prefix('-') {
            text = text.trim_end();
            action = a;
        }
        trim_next = false;
        if let Some(a) = action.strip_suffix('-') {
            trim_next = true;
            action = a;
        }
        out.push(Token::Text(text.to_string()));
        out.push(Token::Action(action.trim().to_string()));
        rest = &after[end + 2..];
    }
    out.push(Token::Text(if trim_next {
        rest.trim_start().to_string()
    } else {
        rest.to_string()
    }));
    out
}

fn value(term: &str, p: &Params) -> String {
    if let Some(s) = term.strip_prefix('"').and_then(|t| t.strip_suffix('"')) {
        return s.to_string();
    }
    if let Some(k) = term.strip_prefix(".Vars.") {
        return p.vars.get(k).cloned().unwrap_or_default();
    }
    if let Some(k) = term.strip_prefix(".Ports.") {
        return p.ports.get(k).map(u16::to_string).unwrap_or_default();
    }
    if term == ".N" {
        return p.n.to_string();
    }
    panic!("template term not supported: {term}");
}

fn pipeline(action: &str, p: &Params) -> String {
    let mut stages = action.split('|').map(str::trim);
    let mut v = value(stages.next().unwrap_or_default(), p);
    for stage in stages {
        let words: Vec<&str> = stage.split_whitespace().collect();
        v = match words.as_slice() {
            ["fill"] => render(&v, p),
            ["indent", n] => {
                let pad = " ".repeat(n.parse().expect("indent width"));
                format!("{pad}{}", v.replace('\n', &format!("\n{pad}")))
            }
            _ => panic!("template pipe not supported: {stage}"),
        };
    }
    v
}

fn condition(cond: &str, p: &Params) -> bool {
    let words: Vec<&str> = cond.split_whitespace().collect();
    match words.as_slice() {
        ["eq", a, b] => value(a, p) == value(b, p),
        ["ne", a, b] => value(a, p) != value(b, p),
        [v] => !value(v, p).is_empty(),
        _ => panic!("template condition not supported: {cond}"),
    }
}

/// Renders tokens from `i` until an `else`/`end` at this level; returns where it stopped.
fn run(tokens: &[Token], mut i: usize, p: &Params, emit: bool, out: &mut String) -> usize {
    while i < tokens.len() {
        match &tokens[i] {
            Token::Text(t) => {
                if emit {
                    out.push_str(t);
                }
                i += 1;
            }
            Token::Action(a) if a == "else" || a == "end" || a.starts_with("else if ") => return i,
            Token::Action(a) => {
                if let Some(cond) = a.strip_prefix("if ") {
                    // `if`, any `else if`, an optional `else`, one `end`.
                    let mut taken = false;
                    let mut cond = Some(cond.to_string());
                    let mut at = i;
                    loop {
                        let yes = !taken && cond.as_deref().is_none_or(|c| condition(c, p));
                        taken |= yes;
                        let stop = run(tokens, at + 1, p, emit && yes, out);
                        match &tokens[stop] {
                            Token::Action(e) if e == "else" => cond = None,
                            Token::Action(e) if e.starts_with("else if ") => {
                                cond = Some(e["else if ".len()..].to_string())
                            }
                            _ => {
                                i = stop + 1;
                                break;
                            }
                        }
                        at = stop;
                    }
                } else {
                    if emit {
                        out.push_str(&pipeline(a, p));
                    }
                    i += 1;
                }
            }
        }
    }
    i
}

pub fn render(src: &str, p: &Params) -> String {
    let tokens = tokenize(src);
    let mut out = String::new();
    run(&tokens, 0, p, true, &mut out);
    out
}

/// A fixture file from `../shared/istio/<path>` (relative to the workspace).
pub fn fixture(path: &str) -> String {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../shared/istio");
    std::fs::read_to_string(root.join(path)).unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_the_fixture_subset() {
        let p = Params::default()
            .var("A", "x")
            .var("Inner", "{{ .Vars.A }}\ny")
            .port("P", 7);
        assert_eq!(render("a{{ .Vars.A }}b{{.Ports.P}}", &p), "axb7");
        assert_eq!(
            render("{{ .Vars.Inner | fill | indent 2 }}", &p),
            "  x\n  y"
        );
        assert_eq!(
            render(
                "1\n{{- if eq .Vars.A \"x\" }}\nyes{{ else }}no{{ end }}",
                &p
            ),
            "1\nyes"
        );
        assert_eq!(
            render("{{ if ne .Vars.B \"\" }}b{{ else }}none{{ end }}", &p),
            "none"
        );
        assert_eq!(render("{{ if .Vars.A }}a{{ end }}-", &p), "a-");
        let chain = "{{ if .Vars.B }}b{{ else if eq .Vars.A \"x\" }}ax{{ else }}z{{ end }}";
        assert_eq!(render(chain, &p), "ax");
        assert_eq!(render(chain, &p.clone().var("B", "1")), "b");
        assert_eq!(render(chain, &p.clone().var("A", "q")), "z");
        assert_eq!(render("a  {{- .N -}}  b", &p), "a0b");
    }
}
