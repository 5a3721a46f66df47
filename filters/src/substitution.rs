//! Envoy's `%COMMAND(arg):max%` substitution syntax, tokenized once for both the header-value
//! formatter and the access-log/local-reply formatter (which differ in what the commands mean).

#[derive(Debug, PartialEq)]
pub enum Token<'a> {
    Literal(String),
    Command {
        name: &'a str,
        arg: Option<&'a str>,
        /// The `:N` truncation suffix, unparsed.
        max: Option<&'a str>,
        /// The whole text between the `%`s, for error messages.
        raw: &'a str,
    },
}

/// Where a format string stops making sense.
#[derive(Debug, PartialEq)]
pub enum TokenError {
    /// A `%` with no closing `%`; the byte offset of the opening one.
    Unterminated(usize),
    /// `NAME(arg` without its `)`.
    UnclosedArgument(String),
}

/// Splits a format string into literals (with `%%` unescaped) and commands.
pub fn tokenize(src: &str) -> Result<Vec<Token<'_>>, TokenError> {
    let mut out = Vec::new();
    let mut lit = String::new();
    let mut rest = src;
    while let Some(i) = rest.find('%') {
        lit.push_str(&rest[..i]);
        let open = src.len() - rest.len() + i;
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('%') {
            lit.push('%');
            rest = r;
            continue;
        }
        // A command's argument may hold `%` (`%START_TIME(%Y)%`): its end is looked for after
        // the argument's `)`, as Envoy's parser does.
        let name_len = rest
            .bytes()
            .take_while(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || *b == b'_')
            .count();
        let end = match rest[name_len..].strip_prefix('(').and_then(|a| a.find(')')) {
            Some(close) => {
                let after = name_len + 1 + close + 1;
                rest[after..].find('%').map(|e| after + e)
            }
            None => rest.find('%'),
        }
        .ok_or(TokenError::Unterminated(open))?;
        let raw = &rest[..end];
        rest = &rest[end + 1..];
        if !lit.is_empty() {
            out.push(Token::Literal(std::mem::take(&mut lit)));
        }
        out.push(command(raw)?);
    }
    lit.push_str(rest);
    if !lit.is_empty() {
        out.push(Token::Literal(lit));
    }
    Ok(out)
}

fn command(raw: &str) -> Result<Token<'_>, TokenError> {
    let Some((name, after)) = raw.split_once('(') else {
        return Ok(Token::Command {
            name: raw,
            arg: None,
            max: None,
            raw,
        });
    };
    let close = after
        .rfind(')')
        .ok_or_else(|| TokenError::UnclosedArgument(raw.to_string()))?;
    let arg = &after[..close];
    let tail = &after[close + 1..];
    let max = match tail.strip_prefix(':') {
        Some(m) => Some(m),
        None if tail.is_empty() => None,
        None => return Err(TokenError::UnclosedArgument(raw.to_string())),
    };
    Ok(Token::Command {
        name,
        arg: Some(arg),
        max,
        raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn argument_with_percent() {
        let t = tokenize("%START_TIME(%Y-%m)%x").unwrap();
        assert_eq!(
            t,
            vec![
                Token::Command {
                    name: "START_TIME",
                    arg: Some("%Y-%m"),
                    max: None,
                    raw: "START_TIME(%Y-%m)"
                },
                Token::Literal("x".into())
            ]
        );
    }

    #[test]
    fn tokens() {
        let t = tokenize("a %%b %REQ(x-y):10% c%PROTOCOL%").unwrap();
        assert_eq!(
            t,
            vec![
                Token::Literal("a %b ".into()),
                Token::Command {
                    name: "REQ",
                    arg: Some("x-y"),
                    max: Some("10"),
                    raw: "REQ(x-y):10"
                },
                Token::Literal(" c".into()),
                Token::Command {
                    name: "PROTOCOL",
                    arg: None,
                    max: None,
                    raw: "PROTOCOL"
                },
            ]
        );
        assert_eq!(tokenize("x %OPEN"), Err(TokenError::Unterminated(2)));
        assert_eq!(
            tokenize("%REQ(x%"),
            Err(TokenError::UnclosedArgument("REQ(x".into()))
        );
        assert_eq!(
            tokenize("%UPSTREAM_METADATA([\"a\", \"b\"])%")
                .unwrap()
                .len(),
            1
        );
    }

    proptest! {
        /// Text without `%` is one literal, whatever it holds.
        #[test]
        fn plain_text_is_literal(s in "[^%]{1,40}") {
            prop_assert_eq!(tokenize(&s).unwrap(), vec![Token::Literal(s.clone())]);
        }
    }
}
