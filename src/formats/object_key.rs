//! What a key asked of a cache may be. Keys come from unsigned narinfo fields and
//! index headers, so the formats refuse unsafe ones when parsing and storage refuses
//! them again before any request: one rule for both.

/// Why `key` (a narinfo's unsigned `URL`, or any key asked of a cache) is not a
/// plain relative key under the cache root; `None` if it is. Only a safe character
/// set passes: no percent-escapes or backslashes that a server or URL parser could
/// turn into `..`, no `.`/`..`/empty segments, no scheme, host or absolute path.
pub fn unsafe_key(key: &str) -> Option<&'static str> {
    let (path, query) = match key.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (key, None),
    };
    let plain = |c: u8| c.is_ascii_alphanumeric() || b"-._~+=,".contains(&c);
    if path.is_empty() || key.len() > 1024 {
        Some("empty or over-long key")
    } else if !path.bytes().all(|c| plain(c) || c == b'/') {
        Some("characters outside [A-Za-z0-9-._~+=,/] (no %, \\, :, @ or spaces)")
    } else if path
        .split('/')
        .any(|c| c.is_empty() || c == "." || c == "..")
    {
        Some("an empty, '.' or '..' path segment (or a leading '/')")
    } else if query.is_some_and(|q| !q.bytes().all(|c| plain(c) || c == b'&')) {
        Some("a query string with characters outside [A-Za-z0-9-._~+=,&]")
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_relative_keys_are_safe() {
        for good in [
            "nar/1w1fff338fvdw53sqgamddn1b2xgds473pv6y13gizdbqjv4i5p3.nar.xz",
            "nar/abc.nar?hash=xyz",
            "x.nar",
            "a/b/c.nar.zst",
        ] {
            assert_eq!(unsafe_key(good), None, "{good}");
        }
        for bad in [
            "",
            "/etc/passwd",
            "nar/../x.nar",
            "nar/%2e%2e/%2e%2e/x.nar",
            "nar/..\\..\\x.nar",
            "nar//x",
            "./x",
            "http://evil/x",
            "//evil/x",
            "nar/x y",
            "nar/x\n",
            "nar/x?a=%2e",
            "nar/x#frag",
            "u@evil/x",
        ] {
            assert!(unsafe_key(bad).is_some(), "{bad}");
        }
    }
}
