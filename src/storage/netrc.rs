//! netrc files, as nix.conf's `netrc-file` names them (curl reads them for Nix): the
//! way to give an http(s) cache credentials without putting them in its URL, where
//! they would show in process listings and unit files.
//!
//! `machine HOST login USER password PASS` entries, `default` for any other host,
//! `account` ignored and `macdef` bodies skipped, tokens separated by any white
//! space; a token may be double-quoted with `\` escapes (as curl allows).

use crate::storage::cache_url::Credentials;
use std::path::Path;

/// Where Nix looks when nix.conf sets no `netrc-file`.
pub const NIX_DEFAULT: &str = "/etc/nix/netrc";

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Netrc {
    machines: Vec<(Option<String>, Credentials)>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("netrc file {file}: {why}")]
pub struct NetrcError {
    pub file: String,
    pub why: String,
}

impl Netrc {
    pub fn load(path: &Path) -> Result<Self, NetrcError> {
        let err = |why: String| NetrcError {
            file: path.display().to_string(),
            why,
        };
        let text = std::fs::read_to_string(path).map_err(|e| err(e.to_string()))?;
        Self::parse(&text).map_err(err)
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let mut toks = Tokens { rest: text };
        let mut machines = Vec::new();
        let mut cur: Option<(Option<String>, Option<String>, Option<String>)> = None;
        let flush = |cur: &mut Option<(Option<String>, Option<String>, Option<String>)>,
                     machines: &mut Vec<(Option<String>, Credentials)>| {
            if let Some((host, user, password)) = cur.take() {
                machines.push((
                    host,
                    Credentials {
                        user: user.unwrap_or_default(),
                        password: password.unwrap_or_default(),
                    },
                ));
            }
        };
        while let Some(t) = toks.next()? {
            match t.as_str() {
                "machine" => {
                    flush(&mut cur, &mut machines);
                    let host = toks.next()?.ok_or("'machine' without a host name")?;
                    cur = Some((Some(host), None, None));
                }
                "default" => {
                    flush(&mut cur, &mut machines);
                    cur = Some((None, None, None));
                }
                "login" | "password" | "account" => {
                    let v = toks.next()?.ok_or(format!("'{t}' without a value"))?;
                    let Some(c) = cur.as_mut() else {
                        return Err(format!("'{t}' before any 'machine' or 'default'"));
                    };
                    match t.as_str() {
                        "login" => c.1 = Some(v),
                        "password" => c.2 = Some(v),
                        _ => {}
                    }
                }
                "macdef" => {
                    flush(&mut cur, &mut machines);
                    toks.next()?.ok_or("'macdef' without a name")?;
                    toks.skip_macro();
                }
                other => {
                    // never echo what may be a password
                    let shown: String = other.chars().take(1).collect();
                    return Err(format!("unexpected token starting with '{shown}'"));
                }
            }
        }
        flush(&mut cur, &mut machines);
        Ok(Netrc { machines })
    }

    /// The credentials for `host` (without port): its `machine` entry, else `default`.
    pub fn lookup(&self, host: &str) -> Option<&Credentials> {
        self.machines
            .iter()
            .find(|(h, _)| h.as_deref().is_some_and(|h| h.eq_ignore_ascii_case(host)))
            .or_else(|| self.machines.iter().find(|(h, _)| h.is_none()))
            .map(|(_, c)| c)
    }
}

struct Tokens<'a> {
    rest: &'a str,
}

impl Tokens<'_> {
    fn next(&mut self) -> Result<Option<String>, String> {
        self.rest = self.rest.trim_start();
        if self.rest.is_empty() {
            return Ok(None);
        }
        if let Some(q) = self.rest.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = q.char_indices();
            while let Some((i, c)) = chars.next() {
                match c {
                    '"' => {
                        self.rest = &q[i + 1..];
                        return Ok(Some(out));
                    }
                    '\\' => match chars.next() {
                        Some((_, 'n')) => out.push('\n'),
                        Some((_, 'r')) => out.push('\r'),
                        Some((_, 't')) => out.push('\t'),
                        Some((_, e)) => out.push(e),
                        None => break,
                    },
                    c => out.push(c),
                }
            }
            return Err("unterminated quoted token".into());
        }
        let end = self
            .rest
            .find(char::is_whitespace)
            .unwrap_or(self.rest.len());
        let (t, rest) = self.rest.split_at(end);
        self.rest = rest;
        Ok(Some(t.to_owned()))
    }

    /// A macro body runs to the next empty line.
    fn skip_macro(&mut self) {
        match self.rest.find("\n\n") {
            Some(i) => self.rest = &self.rest[i + 2..],
            None => self.rest = "",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machines_default_and_quoting() {
        let n =
            Netrc::parse("machine cache.example.org\n  login alice\n  password s3cret\n").unwrap();
        let c = n.lookup("CACHE.example.org").unwrap();
        assert_eq!((c.user.as_str(), c.password.as_str()), ("alice", "s3cret"));
        assert_eq!(n.lookup("other.example.org"), None);

        let n = Netrc::parse(
            "machine a login u1 password p1 account x\n\
             macdef init\ncd /\nls\n\n\
             default login anon password \"with space \\\" quote\"\n",
        )
        .unwrap();
        assert_eq!(n.lookup("a").unwrap().password, "p1");
        assert_eq!(n.lookup("b").unwrap().password, "with space \" quote");
        assert_eq!(n.lookup("b").unwrap().user, "anon");
    }

    #[test]
    fn malformed_files_are_refused_without_echoing_secrets() {
        for (bad, why) in [
            ("login u", "before any"),
            ("machine", "without a host"),
            ("machine h password", "without a value"),
            ("machine h password \"open", "unterminated"),
            ("machine h hunter2", "starting with 'h'"),
        ] {
            let e = Netrc::parse(bad).unwrap_err();
            assert!(e.contains(why), "{bad}: {e}");
            assert!(!e.contains("hunter2"));
        }
        let e = Netrc::load(Path::new("/nonexistent/netrc")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/netrc"));
    }
}
