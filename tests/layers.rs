//! The layout rules of `src/` (the map in `lib.rs`), checked so that they stay true: a
//! layer names only the layers it may use, all before it; modules do not name each
//! other in a circle; no file grows past what a reader can hold.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

/// The layers in data-flow order, each with the layers it may use (as `lib.rs` says).
const LAYERS: &[(&str, &[&str])] = &[
    ("formats", &[]),
    ("storage", &["formats"]),
    ("disk_cache", &["formats"]),
    ("fetch", &["formats", "storage", "disk_cache"]),
    ("mount", &["formats", "storage", "disk_cache", "fetch"]),
    // the write side never needs a mount
    ("publish", &["formats", "storage", "fetch"]),
    // nix itself on the mount
    (
        "nixstore",
        &["formats", "storage", "disk_cache", "fetch", "mount"],
    ),
    (
        "cli",
        &[
            "formats",
            "storage",
            "disk_cache",
            "fetch",
            "mount",
            "publish",
            "nixstore",
        ],
    ),
];

/// Lines a file may have before its first `#[cfg(test)]`.
const MAX_LINES: usize = 650;

type Module = Vec<String>;

struct Source {
    rel: PathBuf,
    module: Module,
    text: String,
}

fn sources(src: &Path, dir: &Path, out: &mut Vec<Source>) {
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            sources(src, &p, out);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let rel = p.strip_prefix(src).unwrap().to_owned();
            let mut module: Module = rel
                .with_extension("")
                .components()
                .map(|c| c.as_os_str().to_str().unwrap().to_owned())
                .collect();
            if ["mod", "lib", "main"].contains(&module.last().unwrap().as_str()) {
                module.pop();
            }
            let text = std::fs::read_to_string(&p).unwrap();
            out.push(Source { rel, module, text });
        }
    }
}

/// The code of `text` without `//` comments (doc links are not imports) and, if
/// `tests` is false, without its unit test modules (`#[cfg(test)] mod ... { ... }`).
fn code(text: &str, tests: bool) -> String {
    let mut out = Vec::new();
    let lines = text.lines().map(|l| l.find("//").map_or(l, |i| &l[..i]));
    let mut skipping: Option<i64> = None; // braces open in a test module
    let mut test_attr = false;
    for l in lines {
        if let Some(depth) = &mut skipping {
            *depth += l.matches('{').count() as i64 - l.matches('}').count() as i64;
            if *depth <= 0 {
                skipping = None;
            }
            continue;
        }
        if !tests && test_attr && l.trim_start().starts_with("mod ") && l.contains('{') {
            let depth = l.matches('{').count() as i64 - l.matches('}').count() as i64;
            skipping = (depth > 0).then_some(depth);
            out.pop(); // the attribute
            test_attr = false;
            continue;
        }
        test_attr = l.trim() == "#[cfg(test)]";
        out.push(l);
    }
    out.join("\n")
}

fn ident(s: &str) -> &str {
    let n = s
        .find(|c: char| !(c.is_alphanumeric() || c == '_'))
        .unwrap_or(s.len());
    &s[..n]
}

/// The paths of `rest` (what follows a `crate::` or `super::`), groups expanded:
/// `a::{b::C, d}` gives `a::b::C` and `a::d`.
fn paths(rest: &str, prefix: &mut Vec<String>, out: &mut Vec<Vec<String>>) {
    let rest = rest.trim_start();
    if let Some(group) = rest.strip_prefix('{') {
        let (mut depth, mut start) = (0, true);
        for (j, c) in group.char_indices() {
            match c {
                '{' => depth += 1,
                '}' if depth == 0 => break,
                '}' => depth -= 1,
                ',' if depth == 0 => start = true,
                c if start && depth == 0 && !c.is_whitespace() => {
                    paths(&group[j..], &mut prefix.clone(), out);
                    start = false;
                }
                _ => {}
            }
        }
        return;
    }
    let id = ident(rest);
    if id.is_empty() {
        out.push(prefix.clone());
        return;
    }
    prefix.push(id.to_owned());
    match rest[id.len()..].strip_prefix("::") {
        Some(more) => paths(more, prefix, out),
        None => out.push(prefix.clone()),
    }
}

/// The modules `code` (of a file that is module `own`) names through `crate::` and
/// `super::` paths, as absolute module paths (items included; see `resolve`).
fn named(code: &str, own: &Module) -> Vec<Module> {
    let mut out = Vec::new();
    let bytes = code.as_bytes();
    for (i, _) in code.match_indices(['c', 's']) {
        if i > 0 && (bytes[i - 1].is_ascii_alphanumeric() || b"_:".contains(&bytes[i - 1])) {
            continue;
        }
        let mut rest = &code[i..];
        let mut base = if let Some(r) = rest.strip_prefix("crate::") {
            rest = r;
            Vec::new()
        } else if rest.starts_with("super::") {
            let mut base = own.clone();
            while let Some(r) = rest.strip_prefix("super::") {
                base.pop();
                rest = r;
            }
            base
        } else {
            continue;
        };
        paths(rest, &mut base, &mut out);
    }
    out
}

/// The module file a path lands in: its longest prefix that is a module.
fn resolve<'a>(path: &[String], modules: &'a BTreeSet<Module>) -> Option<&'a Module> {
    (0..=path.len())
        .rev()
        .find_map(|n| modules.get(&path[..n].to_vec()))
}

/// A cycle in `edges`, as the modules along it.
fn cycle(edges: &BTreeMap<Module, BTreeSet<Module>>) -> Option<Vec<Module>> {
    fn visit(
        m: &Module,
        edges: &BTreeMap<Module, BTreeSet<Module>>,
        done: &mut BTreeSet<Module>,
        stack: &mut Vec<Module>,
    ) -> Option<Vec<Module>> {
        if let Some(at) = stack.iter().position(|s| s == m) {
            let mut c = stack[at..].to_vec();
            c.push(m.clone());
            return Some(c);
        }
        if !done.insert(m.clone()) {
            return None;
        }
        stack.push(m.clone());
        for n in edges.get(m).into_iter().flatten() {
            if let Some(c) = visit(n, edges, done, stack) {
                return Some(c);
            }
        }
        stack.pop();
        None
    }
    let mut done = BTreeSet::new();
    edges
        .keys()
        .find_map(|m| visit(m, edges, &mut done, &mut Vec::new()))
}

fn src() -> Vec<Source> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut files = Vec::new();
    sources(&src, &src, &mut files);
    files.sort_by(|a, b| a.rel.cmp(&b.rel));
    files
}

#[test]
fn layers_name_only_the_layers_they_may_use() {
    let files = src();
    let modules: BTreeSet<Module> = files.iter().map(|f| f.module.clone()).collect();
    let mut faults = Vec::new();
    for f in &files {
        let Some(top) = f.module.first() else {
            continue; // lib.rs, main.rs
        };
        let Some(&(_, may)) = LAYERS.iter().find(|(l, _)| l == top) else {
            faults.push(format!(
                "{}: in no layer; add it to LAYERS here and to the map in lib.rs",
                f.rel.display()
            ));
            continue;
        };
        for path in named(&code(&f.text, true), &f.module) {
            let Some(to) = resolve(&path, &modules).and_then(|m| m.first()) else {
                continue;
            };
            if to != top && !may.contains(&to.as_str()) {
                faults.push(format!(
                    "{}: layer {top} names crate::{}, and may not use {to}",
                    f.rel.display(),
                    path.join("::")
                ));
            }
        }
    }
    faults.dedup();
    assert!(faults.is_empty(), "{}", faults.join("\n"));
}

/// A module may use its parent (its `mod.rs`), as the files of a split `impl` do;
/// any other circle means two modules that cannot be read, or moved, one without the
/// other.
#[test]
fn modules_do_not_name_each_other_in_a_circle() {
    let files = src();
    let modules: BTreeSet<Module> = files.iter().map(|f| f.module.clone()).collect();
    let mut edges: BTreeMap<Module, BTreeSet<Module>> = BTreeMap::new();
    for f in &files {
        for path in named(&code(&f.text, false), &f.module) {
            if let Some(to) = resolve(&path, &modules) {
                if !f.module.starts_with(to) {
                    edges
                        .entry(f.module.clone())
                        .or_default()
                        .insert(to.clone());
                }
            }
        }
    }
    if let Some(c) = cycle(&edges) {
        let c: Vec<String> = c.iter().map(|m| m.join("::")).collect();
        panic!("modules name each other in a circle: {}", c.join(" → "));
    }
}

#[test]
fn files_stay_small() {
    let faults: Vec<String> = src()
        .iter()
        .filter_map(|f| {
            let lines = f
                .text
                .lines()
                .take_while(|l| !l.trim_start().starts_with("#[cfg(test)]"))
                .count();
            (lines > MAX_LINES).then(|| {
                format!(
                    "{}: {lines} lines before its tests (at most {MAX_LINES}): split it by concern",
                    f.rel.display()
                )
            })
        })
        .collect();
    assert!(faults.is_empty(), "{}", faults.join("\n"));
}

#[test]
fn each_layer_uses_only_layers_before_it() {
    for (i, (layer, may)) in LAYERS.iter().enumerate() {
        for m in *may {
            let at = LAYERS.iter().position(|(l, _)| l == m);
            assert!(
                at.is_some_and(|at| at < i),
                "{layer} may use {m}, not before it"
            );
        }
    }
}

#[test]
fn the_scanner_sees_grouped_plain_and_relative_paths() {
    let own: Module = vec!["fetch".into(), "nar".into()];
    let c = code(
        "use crate::fetch::X; // crate::cli\nuse crate::{mount::{a, b::C}, cli};\n\
         use super::super::formats::nar;\nlet x = super::Fetcher::new();\n\
         #[cfg(test)]\nmod tests {\n use crate::publish;\n}\nuse crate::storage::X;",
        false,
    );
    let got: Vec<String> = named(&c, &own).iter().map(|p| p.join("::")).collect();
    assert_eq!(
        got,
        [
            "fetch::X",
            "mount::a",
            "mount::b::C",
            "cli",
            "formats::nar",
            "fetch::Fetcher::new",
            "storage::X"
        ]
    );
}
