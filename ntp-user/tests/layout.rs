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

/// Panics naming the first import cycle of `g` (`what` says where).
fn assert_acyclic(what: &str, g: &BTreeMap<String, BTreeSet<String>>) {
    // Depth-first search for a cycle.
    fn visit(
        what: &str,
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        path: &mut Vec<String>,
        done: &mut BTreeSet<String>,
    ) {
        if done.contains(n) {
            return;
        }
        if let Some(i) = path.iter().position(|p| p == n) {
            panic!("import cycle in {what}: {} -> {n}", path[i..].join(" -> "));
        }
        path.push(n.to_string());
        for d in g.get(n).into_iter().flatten() {
            visit(what, d, g, path, done);
        }
        path.pop();
        done.insert(n.to_string());
    }
    let mut done = BTreeSet::new();
    for n in g.keys() {
        visit(what, n, g, &mut Vec::new(), &mut done);
    }
}

/// Whether `text` at byte `i` starts a path segment (not the tail of a longer name or path).
fn starts_a_path(text: &str, i: usize) -> bool {
    !text[..i]
        .chars()
        .next_back()
        .is_some_and(|c| c.is_alphanumeric() || c == '_' || c == ':')
}

/// The files of one folder and what each imports from its siblings: `mod` is the folder's
/// mod.rs, which a sibling imports by naming one of its items (`super::Item`).
fn folder_graph(folder: &Path) -> BTreeMap<String, BTreeSet<String>> {
    let name = folder.file_name().unwrap().to_string_lossy().into_owned();
    let files: Vec<PathBuf> = std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .collect();
    let stems: BTreeSet<String> = files
        .iter()
        .map(|p| p.file_stem().unwrap().to_string_lossy().into_owned())
        .collect();
    let mut g = BTreeMap::new();
    for f in &files {
        let me = f.file_stem().unwrap().to_string_lossy().into_owned();
        // Declarations and re-exports in mod.rs are the folder's face, not imports.
        let text: String = code(&std::fs::read_to_string(f).unwrap())
            .lines()
            .filter(|l| {
                let l = l.trim_start();
                !(me == "mod"
                    && (l.starts_with("pub mod ")
                        || l.starts_with("mod ")
                        || l.starts_with("pub use ")))
            })
            .collect::<Vec<_>>()
            .join("\n");
        let mut deps = BTreeSet::new();
        let prefixes = [
            format!("crate::{name}::"),
            "super::".to_string(),
            "self::".to_string(),
        ];
        for prefix in &prefixes {
            for (i, _) in text.match_indices(prefix.as_str()) {
                if !starts_a_path(&text, i) || (prefix == "super::" && me == "mod") {
                    continue;
                }
                let next: String = text[i + prefix.len()..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                if stems.contains(&next) && next != "mod" {
                    deps.insert(next);
                } else if me != "mod" && prefix != "self::" {
                    deps.insert("mod".to_string());
                }
            }
        }
        if me == "mod" {
            // mod.rs names its children directly: `child::Item`.
            for s in stems.iter().filter(|s| *s != "mod") {
                let pat = format!("{s}::");
                if text
                    .match_indices(pat.as_str())
                    .any(|(i, _)| starts_a_path(&text, i))
                {
                    deps.insert(s.clone());
                }
            }
        }
        deps.remove(&me);
        g.insert(me, deps);
    }
    g
}

#[test]
fn the_files_of_each_folder_import_each_other_in_one_direction() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut cycles = Vec::new();
    for e in std::fs::read_dir(&src).unwrap() {
        let folder = e.unwrap().path();
        if folder.is_dir() {
            let g = folder_graph(&folder);
            let what = folder.file_name().unwrap().to_string_lossy().into_owned();
            if let Err(e) = std::panic::catch_unwind(|| assert_acyclic(&what, &g)) {
                cycles.push(
                    e.downcast_ref::<String>()
                        .cloned()
                        .unwrap_or_else(|| what.clone()),
                );
            }
        }
    }
    assert!(cycles.is_empty(), "{}", cycles.join("\n"));
}

#[test]
fn a_circle_inside_a_folder_is_found() {
    let dir = std::env::temp_dir().join(format!("layout-circle-{}", std::process::id()));
    let folder = dir.join("things");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(folder.join("mod.rs"), "pub mod a;\npub mod b;\n").unwrap();
    std::fs::write(
        folder.join("a.rs"),
        "use crate::things::b::B;\npub struct A;\n",
    )
    .unwrap();
    std::fs::write(folder.join("b.rs"), "use super::a::A;\npub struct B;\n").unwrap();
    let g = folder_graph(&folder);
    std::fs::remove_dir_all(&dir).unwrap();
    let found = std::panic::catch_unwind(|| assert_acyclic("things", &g));
    assert!(found.is_err(), "{g:?}");
}

#[test]
fn folders_import_each_other_in_one_direction() {
    let g = graph();
    assert_acyclic("the crate's folders", &g);
    // The layers, bottom up: each may import only those below it (cli and main on top).
    let allowed: &[(&str, &[&str])] = &[
        ("clock", &[]),
        ("host", &[]),
        ("vip", &["host"]),
        ("nts", &["host"]),
        ("responder", &["host", "nts"]),
        ("userspace", &["host", "nts", "responder"]),
        (
            "observe",
            &["clock", "host", "vip", "nts", "responder", "userspace"],
        ),
        (
            "config",
            &["clock", "host", "vip", "nts", "responder", "observe"],
        ),
        (
            "fleet",
            &[
                "clock",
                "host",
                "vip",
                "nts",
                "responder",
                "userspace",
                "observe",
                "config",
            ],
        ),
        (
            "daemon",
            &[
                "clock",
                "host",
                "vip",
                "nts",
                "responder",
                "userspace",
                "observe",
                "config",
                "fleet",
            ],
        ),
        (
            "cli",
            &[
                "clock",
                "host",
                "vip",
                "nts",
                "responder",
                "observe",
                "config",
                "fleet",
                "daemon",
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

/// Calls from the files of `folder` into the crate's other folders: a path `crate::x::...::f`
/// that ends in a lowercase name (a function, called or passed), or a function imported by
/// `use crate::x::...::f` and then called. Types, consts and enum variants are not calls.
fn calls_into_other_folders(folder: &Path) -> Vec<String> {
    let me = folder.file_name().unwrap().to_string_lossy().into_owned();
    let segment = |s: &str| -> String {
        s.chars()
            .take_while(|c| c.is_alphanumeric() || *c == '_')
            .collect()
    };
    let lowercase = |s: &str| s.starts_with(|c: char| c.is_ascii_lowercase());
    let mut found = Vec::new();
    for f in sources(folder) {
        let file = f.file_name().unwrap().to_string_lossy().into_owned();
        let text = code(&std::fs::read_to_string(&f).unwrap());
        let (uses, body): (Vec<&str>, Vec<&str>) = text
            .split_inclusive(';')
            .partition(|s| s.trim_start().starts_with("use ") || s.contains("\nuse "));
        // Paths in the code: the last segment before anything but `::`.
        let body = body.concat();
        for (i, _) in body.match_indices("crate::") {
            if !starts_a_path(&body, i) {
                continue;
            }
            let mut rest = &body[i + 7..];
            let folder_name = segment(rest);
            if folder_name == me {
                continue;
            }
            let mut last = folder_name.clone();
            while rest[last.len()..].starts_with("::") {
                rest = &rest[last.len() + 2..];
                last = segment(rest);
            }
            if lowercase(&last) && last != folder_name {
                found.push(format!(
                    "{file}: crate::{}",
                    &body[i + 7..i + 7 + (body[i + 7..].len() - rest.len()) + last.len()]
                ));
            }
        }
        // Functions imported by name, then called.
        for u in uses {
            let Some(path) = u.split("use crate::").nth(1) else {
                continue;
            };
            let path: String = path.chars().filter(|c| !c.is_whitespace()).collect();
            let path = path.trim_end_matches(';');
            if segment(path) == me {
                continue;
            }
            let leaves: Vec<&str> = match path.split_once('{') {
                Some((_, group)) => group.trim_end_matches('}').split(',').collect(),
                None => vec![path.rsplit("::").next().unwrap()],
            };
            for leaf in leaves {
                let name = leaf
                    .rsplit(" as ")
                    .next()
                    .unwrap()
                    .rsplit("::")
                    .next()
                    .unwrap();
                if lowercase(name)
                    && body
                        .match_indices(&format!("{name}("))
                        .any(|(i, _)| starts_a_path(&body, i) && !body[..i].ends_with("fn "))
                {
                    found.push(format!("{file}: {name}( imported from crate::{path}"));
                }
            }
        }
    }
    found
}

#[test]
fn config_imports_nothing_but_types() {
    let config = Path::new(env!("CARGO_MANIFEST_DIR")).join("src/config");
    let calls = calls_into_other_folders(&config);
    assert!(
        calls.is_empty(),
        "config calls functions of other folders (compute such values where they are used, or \
         make them methods of the types config builds):\n{}",
        calls.join("\n")
    );
}

#[test]
fn a_call_from_config_into_another_folder_is_found() {
    let dir = std::env::temp_dir().join(format!("layout-calls-{}", std::process::id()));
    let folder = dir.join("config");
    std::fs::create_dir_all(&folder).unwrap();
    std::fs::write(
        folder.join("types.rs"),
        "use crate::vip::{radvd, VipSpec};\nuse crate::config::names::parse;\n\
         fn port() -> u16 { crate::nts::KE_PORT }\n\
         fn mode() -> crate::responder::XdpModePref { crate::responder::XdpModePref::Auto }\n\
         fn spec(v: &VipSpec) -> Option<radvd::RadvdSpec> { parse(v); v.health_socket(); None }\n",
    )
    .unwrap();
    std::fs::write(
        folder.join("calls.rs"),
        "use crate::host::files::state_dir;\n\
         fn a(n: &str) { crate::vip::health_socket(n); state_dir(n); }\n\
         fn b(v: Option<crate::vip::VipSpec>) { v.map(crate::vip::VipSpec::health_socket); }\n",
    )
    .unwrap();
    let mut calls = calls_into_other_folders(&folder);
    std::fs::remove_dir_all(&dir).unwrap();
    calls.sort();
    assert_eq!(
        calls,
        [
            "calls.rs: crate::vip::VipSpec::health_socket",
            "calls.rs: crate::vip::health_socket",
            "calls.rs: state_dir( imported from crate::host::files::state_dir",
        ],
        "{calls:?}"
    );
}
