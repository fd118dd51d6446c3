//! The documentation, checked: README.md stays a short front page whose two commands are the
//! ones CI runs, every relative link in README.md and docs/ leads to a file that exists, and
//! the docs say what is, not how it came to be (no history, no issue numbers).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

const README_MAX_LINES: usize = 200;

/// The service command and the test command README gives a newcomer, exactly as written there.
const RUN_COMMAND: &str = "sudo cargo xtask run";
const TEST_COMMAND: &str = "sudo cargo xtask test";

/// History and issue-tracker talk: the docs describe what is, and why.
const HISTORY_PHRASES: &[&str] = &["this round", "it used to", "used to be", "no longer"];

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// README.md and every Markdown file under docs/, as (path relative to the root, text).
fn documents() -> Vec<(PathBuf, String)> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, out);
            } else if p.extension().is_some_and(|x| x == "md") {
                out.push(p);
            }
        }
    }
    let root = root();
    let mut paths = vec![root.join("README.md")];
    walk(&root.join("docs"), &mut paths);
    paths.sort();
    paths
        .into_iter()
        .map(|p| {
            let text = std::fs::read_to_string(&p).unwrap();
            (p.strip_prefix(&root).unwrap().to_path_buf(), text)
        })
        .collect()
}

/// The text outside fenced code blocks (a `[x](y)` inside one is code, not a link).
fn prose(text: &str) -> String {
    let mut out = String::new();
    let mut fenced = false;
    for line in text.lines() {
        if line.trim_start().starts_with("```") {
            fenced = !fenced;
            continue;
        }
        if !fenced {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// The targets of inline Markdown links, `[text](target)`, with any `#anchor` kept.
fn link_targets(text: &str) -> Vec<String> {
    let prose = prose(text);
    let mut targets = Vec::new();
    let mut rest = prose.as_str();
    while let Some(i) = rest.find("](") {
        rest = &rest[i + 2..];
        let end = rest.find([')', ' ', '\n']).unwrap_or(rest.len());
        targets.push(rest[..end].to_string());
        rest = &rest[end..];
    }
    targets
}

/// Relative links of `doc` (a path relative to `root`) whose file does not exist, as
/// "target (resolved path)".
fn broken_links(root: &Path, doc: &Path, text: &str) -> Vec<String> {
    let dir = doc.parent().unwrap_or(Path::new(""));
    link_targets(text)
        .into_iter()
        .filter(|t| !t.contains("://") && !t.starts_with("mailto:") && !t.starts_with('#'))
        .filter_map(|t| {
            let file = t.split('#').next().unwrap();
            let resolved = normalize(&dir.join(file));
            (!root.join(&resolved).exists()).then(|| format!("{t} ({})", resolved.display()))
        })
        .collect()
}

/// `a/b/../c` → `a/c`, without touching the file system.
fn normalize(path: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in path.components() {
        match c {
            std::path::Component::ParentDir => {
                out.pop();
            }
            std::path::Component::CurDir => {}
            c => out.push(c),
        }
    }
    out
}

/// History phrases and issue references ("issue 13", "issue #13") in `text`.
fn history(text: &str) -> Vec<String> {
    let lower = text.to_lowercase();
    let mut found: Vec<String> = HISTORY_PHRASES
        .iter()
        .filter(|p| lower.contains(*p))
        .map(|p| p.to_string())
        .collect();
    let mut rest = lower.as_str();
    while let Some(i) = rest.find("issue") {
        let after = rest[i + "issue".len()..].trim_start_matches([' ', '#']);
        if after.starts_with(|c: char| c.is_ascii_digit()) {
            let number: String = after.chars().take_while(char::is_ascii_digit).collect();
            found.push(format!("issue {number}"));
        }
        rest = &rest[i + "issue".len()..];
    }
    found
}

#[test]
fn readme_is_a_short_front_page() {
    let text = std::fs::read_to_string(root().join("README.md")).unwrap();
    let lines = text.lines().count();
    assert!(
        lines <= README_MAX_LINES,
        "README.md has {lines} lines, at most {README_MAX_LINES}: move the rest into docs/"
    );
}

#[test]
fn readme_gives_the_two_commands_and_ci_runs_its_test_command() {
    let text = std::fs::read_to_string(root().join("README.md")).unwrap();
    // The first code block: what a newcomer types first.
    let first_block: Vec<&str> = text
        .split("```")
        .nth(1)
        .expect("README.md has a code block")
        .lines()
        .skip(1)
        .map(|l| l.split('#').next().unwrap().trim())
        .filter(|l| !l.is_empty())
        .collect();
    assert_eq!(
        first_block,
        [RUN_COMMAND, TEST_COMMAND],
        "README's first code block gives the service and the test command"
    );
    // CI runs the same command (as root already, so without sudo).
    let ci = std::fs::read_to_string(root().join(".ci/run")).unwrap();
    let test = TEST_COMMAND.trim_start_matches("sudo ");
    assert!(
        ci.lines()
            .any(|l| l.split("||").next().unwrap().trim() == test),
        ".ci/run does not run README's test command `{test}`"
    );
}

#[test]
fn every_relative_link_leads_to_a_file_that_exists() {
    let root = root();
    let docs = documents();
    assert!(docs.len() > 1, "README.md and docs/*.md are read");
    let mut checked = 0;
    let mut broken = Vec::new();
    for (path, text) in &docs {
        checked += link_targets(text).len();
        for b in broken_links(&root, path, text) {
            broken.push(format!("{}: {b}", path.display()));
        }
    }
    assert!(
        checked > 10,
        "only {checked} links found: the scan is wrong"
    );
    assert!(
        broken.is_empty(),
        "links to missing files:\n{}",
        broken.join("\n")
    );
}

#[test]
fn the_docs_say_what_is_without_history() {
    let mut found = Vec::new();
    for (path, text) in documents() {
        for h in history(&text) {
            found.push(format!("{}: {h}", path.display()));
        }
    }
    assert!(
        found.is_empty(),
        "history in the docs:\n{}",
        found.join("\n")
    );
}

#[test]
fn the_checks_find_what_they_look_for() {
    let root = root();
    let doc = Path::new("docs/example.md");
    let text = "See [design](design.md), [gone](missing.md#part), [up](../README.md),\n\
                [web](https://example.org), [here](#top).\n```\n[code](not-a-link.md)\n```\n";
    assert_eq!(
        broken_links(&root, doc, text),
        ["missing.md#part (docs/missing.md)"]
    );
    assert_eq!(
        history("As it used to be, see Issue 13 and issue #2; an issue of scale."),
        ["it used to", "used to be", "issue 13", "issue 2"]
    );
    assert!(history("What is, and why.").is_empty());
}

/// The keys of the generated reference, as `section.key` (`upstream.address`, `vip.routes`).
fn reference_keys(reference: &str) -> BTreeSet<String> {
    let mut keys = BTreeSet::new();
    let mut section = None;
    for line in reference.lines() {
        if let Some(h) = line.strip_prefix("## ") {
            let name = h.trim_matches(|c| c == '`' || c == '[' || c == ']');
            section = (!name.contains(' ')).then(|| name.to_string());
        } else if let (Some(s), Some(row)) = (&section, line.strip_prefix("| `")) {
            if let Some(key) = row.split('`').next() {
                keys.insert(format!("{s}.{key}"));
            }
        }
    }
    keys
}

/// The `section.key` names a document gives in backticks whose section is one of the config's
/// and whose key the reference does not have.
fn unknown_keys(keys: &BTreeSet<String>, text: &str) -> Vec<String> {
    let sections: BTreeSet<&str> = keys.iter().filter_map(|k| k.split('.').next()).collect();
    text.split('`')
        .skip(1)
        .step_by(2)
        .filter_map(|t| {
            let name = t
                .split('[')
                .next()
                .unwrap_or(t)
                .split('=')
                .next()
                .unwrap()
                .trim();
            let (section, key) = name.split_once('.')?;
            // File names (`fleet.rs`, `nts.toml`) are not keys.
            let file = ["rs", "md", "toml", "json", "svg", "conf", "pem", "service"].contains(&key);
            let word =
                |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_lowercase() || c == '_');
            (sections.contains(section) && word(key) && !file && !keys.contains(name))
                .then(|| name.to_string())
        })
        .collect()
}

#[test]
fn every_config_key_the_docs_name_is_in_the_schema() {
    let root = root();
    let keys =
        reference_keys(&std::fs::read_to_string(root.join("docs/config-reference.md")).unwrap());
    assert!(
        keys.contains("clock.max_poll") && keys.contains("upstream.address"),
        "{keys:?}"
    );
    assert_eq!(
        unknown_keys(&keys, "`clock.max_pol` and `clock.max_poll`"),
        ["clock.max_pol"]
    );
    let mut unknown = Vec::new();
    let mut named = 0;
    for (path, text) in documents() {
        named += text.matches("`clock.").count();
        for k in unknown_keys(&keys, &text) {
            unknown.push(format!("{}: `{k}`", path.display()));
        }
    }
    assert!(
        named > 3,
        "the docs name hardly any key: the check would check nothing"
    );
    assert!(
        unknown.is_empty(),
        "keys the schema does not have:\n{}",
        unknown.join("\n")
    );
}
