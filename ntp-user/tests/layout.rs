//! The crate's shape, checked: folders import each other in one direction only, the config
//! does not depend on the CLI, and the clock core stays free of IO, clock reads, randomness
//! and the runtime (it takes all of those as values).

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

fn sources(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(sources(&p));
        } else if p.extension().is_some_and(|x| x == "rs") {
            out.push(p);
        }
    }
    out
}

/// Top-level module of a source file: `src/clock/system.rs` → clock, `src/cli.rs` → cli.
fn module_of(src: &Path, file: &Path) -> String {
    let rel = file.strip_prefix(src).unwrap();
    let first = rel
        .components()
        .next()
        .unwrap()
        .as_os_str()
        .to_string_lossy();
    first.trim_end_matches(".rs").to_string()
}

/// The code of a file without its `#[cfg(test)]` module and comments.
fn code(text: &str) -> String {
    let text = match text.find("#[cfg(test)]") {
        Some(i) => &text[..i],
        None => text,
    };
    text.lines()
        .filter(|l| !l.trim_start().starts_with("//"))
        .collect::<Vec<_>>()
        .join("\n")
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut g: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for f in sources(&src) {
        let m = module_of(&src, &f);
        if m == "lib" || m == "main" {
            continue;
        }
        let text = code(&std::fs::read_to_string(&f).unwrap());
        let deps = g.entry(m.clone()).or_default();
        for (i, _) in text.match_indices("crate::") {
            let name: String = text[i + 7..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '_')
                .collect();
            if !name.is_empty() && name != m {
                deps.insert(name);
            }
        }
    }
    g
}

#[test]
fn folders_import_each_other_in_one_direction() {
    let g = graph();
    // Depth-first search for a cycle.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(n) {
            return;
        }
        if let Some(i) = path.iter().position(|p| p == n) {
            panic!("import cycle: {} -> {n}", path[i..].join(" -> "));
        }
        path.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            visit(d, g, path, done);
        }
        path.pop();
        done.insert(n.to_string());
    }
    let mut done = BTreeSet::new();
    for n in g.keys() {
        visit(n, &g, &mut Vec::new(), &mut done);
    }
    // The layers, bottom up: each may import only those below it.
    let allowed: &[(&str, &[&str])] = &[
        ("clock", &[]),
        ("host", &[]),
        ("nts", &["host"]),
        ("responder", &["host", "nts"]),
        ("observe", &["clock", "host", "nts", "responder"]),
        ("daemon", &["clock", "host", "nts", "responder", "observe"]),
        ("fleet", &["clock", "host", "nts", "observe", "daemon"]),
        (
            "config",
            &[
                "clock",
                "host",
                "nts",
                "responder",
                "observe",
                "daemon",
                "fleet",
            ],
        ),
        (
            "cli",
            &[
                "clock",
                "config",
                "daemon",
                "fleet",
                "host",
                "nts",
                "responder",
            ],
        ),
    ];
    for (m, ok) in allowed {
        let deps = g.get(*m).cloned().unwrap_or_default();
        let bad: Vec<_> = deps.iter().filter(|d| !ok.contains(&d.as_str())).collect();
        assert!(
            bad.is_empty(),
            "{m} imports {bad:?}; it may import only {ok:?}"
        );
    }
}

#[test]
fn the_clock_core_is_sans_io() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/clock");
    let forbidden = [
        "tokio",
        "std::net::UdpSocket",
        "std::fs",
        "std::thread",
        "std::process",
        "Instant",
        "SystemTime",
        "rand::",
        "libc::",
        "nix::",
        "aya",
        "std::io",
    ];
    for f in sources(&src) {
        let text = code(&std::fs::read_to_string(&f).unwrap());
        for word in forbidden {
            assert!(
                !text.contains(word),
                "{} uses {word}: the clock core takes time, packets and randomness as values",
                f.display()
            );
        }
    }
}
