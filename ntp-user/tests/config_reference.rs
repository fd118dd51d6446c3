//! docs/config-reference.md is the configuration schema rendered: it cannot drift from what
//! the daemon reads. `NTP_XDP_BLESS=1` rewrites it; otherwise a difference fails.

use std::path::Path;

use ntp_user::config::reference;

#[test]
fn every_key_has_a_doc_comment() {
    let missing = reference::undocumented();
    assert!(
        missing.is_empty(),
        "these keys (or types) have no doc comment in ntp-user/src/config/schema.rs, and the \
         configuration reference is made of them: {missing:?}"
    );
}

/// A key without a doc comment is found (and so would fail the test above).
#[test]
fn a_key_without_a_doc_comment_is_found() {
    /// A section.
    #[allow(dead_code)]
    #[derive(schemars::JsonSchema)]
    struct Section {
        /// Documented.
        documented: u8,
        bare: u8,
    }
    /// A file.
    #[allow(dead_code)]
    #[derive(schemars::JsonSchema)]
    struct File {
        /// The section.
        section: Section,
    }
    let schema = serde_json::to_value(schemars::schema_for!(File)).unwrap();
    assert_eq!(reference::undocumented_in(&schema), ["section.bare"]);
}

#[test]
fn the_configuration_reference_is_the_schema_rendered() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/config-reference.md");
    let rendered = reference::markdown();
    if std::env::var_os("NTP_XDP_BLESS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, &rendered).unwrap();
        return;
    }
    let written = std::fs::read_to_string(&path).unwrap_or_default();
    if written != rendered {
        let line = written
            .lines()
            .zip(rendered.lines())
            .position(|(a, b)| a != b)
            .unwrap_or(written.lines().count().min(rendered.lines().count()));
        panic!(
            "{} is not the configuration schema rendered (first difference at line {}): run \
             `NTP_XDP_BLESS=1 cargo test -p ntp-user --test config_reference` to rewrite it, \
             and commit it",
            path.display(),
            line + 1
        );
    }
}

/// The rendering carries what the schema says: a key, its type, its default, its doc comment.
#[test]
fn the_rendering_carries_keys_types_defaults_and_descriptions() {
    let md = reference::markdown();
    for line in [
        "## `[clock]`",
        "## `[[upstream]]`",
        "## `vip.routes` entries",
        "| `max_holdover` | [Duration](#duration) | `\"1h\"` | How long the clock is served as \
         synchronized without a correction (at least two polls at `max_poll`). |",
        "| `interface` | [InterfaceName](#interfacename) | required |",
        "- `\"host-clock\"`: Serve the kernel clock",
    ] {
        assert!(md.contains(line), "{line:?} is not in:\n{md}");
    }
}
