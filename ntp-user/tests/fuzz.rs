//! Property tests over arbitrary input, bounded to seconds: the config loader and the
//! userspace answer path take anything without panicking, a config error always names the
//! file, a userspace reply is never larger than its request, and the helpers' generated files
//! (keepalived.conf, radvd.conf) hold exactly the directives intended, whatever names a
//! config gives.

use std::path::Path;

use ntp_common::wire::*;
use ntp_common::{ServerParams, TimeAnchor};
use proptest::prelude::*;

const ORIGIN: &str = "/etc/fuzzed.toml";

/// A valid config exercising every section: the base the mutations start from.
const FULL: &str = r#"[service]
netns = "ntpxdp-f"
interface = "ntpf0"
addresses = ["169.254.169.123", "fd00:ec2::123"]
xdp_mode = "auto"
precision = -24

[vip]
host_interface = "ntpf0-h"
bridge = "ntpf-br"
create_bridge = true
service_address = "169.254.100.1/24"
service_address6 = "fd00:ec2::1/64"
repair_interval = "1s"
routes = [{ to = "169.254.200.0/24", via = "169.254.100.254" }]

[dhcp]
enable = true
range = ["169.254.100.10", "169.254.100.200"]
lease_time = "1h"

[clock]
reference = "upstream"
min_poll = 4
max_poll = 10
min_sources = 1
max_holdover = "1h"
max_anchor_age = "30s"

[limits]
rate = 2.0
burst = 16
kod_interval = "10s"

[access]
allow = ["169.254.0.0/16", "fd00::/8"]
deny = ["169.254.7.0/24"]
deny_action = "kod"

[guest_clocks]
alarm_offset = "100ms"

[metrics]
listen = "127.0.0.1:9273"

[alarms]
max_offset = "5ms"

[[upstream]]
address = "169.254.1.1"
"#;

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 2048,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Replaces the value of line `line` (if it has one) with `token`.
fn mutate(line: usize, token: &str) -> String {
    FULL.lines()
        .enumerate()
        .map(|(i, l)| match l.split_once(" = ") {
            Some((k, _)) if i == line % FULL.lines().count() => format!("{k} = {token}"),
            _ => l.to_string(),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn check(text: &str) -> Result<(), TestCaseError> {
    match ntp_user::config::parse(text, Path::new(ORIGIN)) {
        Ok(_) => Ok(()),
        Err(e) => {
            let msg = format!("{e:#}");
            prop_assert!(msg.contains(ORIGIN), "error without the file name: {msg}");
            Ok(())
        }
    }
}

#[test]
fn the_base_config_is_valid() {
    ntp_user::config::parse(FULL, Path::new(ORIGIN)).unwrap();
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_text_is_rejected_or_accepted_without_panic(text in "\\PC{0,400}") {
        check(&text)?;
    }

    #[test]
    fn any_value_in_any_field(
        line in 0usize..200,
        token in prop_oneof![
            "-?[0-9]{1,25}(\\.[0-9]{0,5})?",
            "\"[ -~]{0,30}\"",
            Just("true".to_string()),
            Just("[]".to_string()),
            Just("[\"\"]".to_string()),
            Just("\"-1s\"".to_string()),
            Just("1e999".to_string()),
            Just("nan".to_string()),
            Just("\"::/0\"".to_string()),
            Just("[\"0.0.0.0/0\", \"0.0.0.0/0\"]".to_string()),
        ],
    ) {
        check(&mutate(line, &token))?;
    }

    #[test]
    fn any_line_dropped_or_duplicated(line in 0usize..100, dup in any::<bool>()) {
        let lines: Vec<&str> = FULL.lines().collect();
        let i = line % lines.len();
        let mut out: Vec<&str> = lines.clone();
        if dup {
            out.insert(i, lines[i]);
        } else {
            out.remove(i);
        }
        check(&out.join("\n"))?;
    }

    #[test]
    fn userspace_replies_never_grow_and_always_echo(
        request in prop::collection::vec(any::<u8>(), 0..120),
        port in any::<u16>(),
        mono in 1u64..(1 << 62),
    ) {
        let anchor = TimeAnchor {
            mono_ns: mono,
            ntp_ns: 3_972_000_000_000_000_000,
            max_age_ns: 10_000_000_000,
            stratum: 2,
            ..Default::default()
        };
        let r = ntp_user::userspace::answer(&request, port, &anchor, &ServerParams::DEFAULT, mono, mono + 100, 7);
        if let Ok(reply) = r {
            prop_assert!(reply.len() <= request.len());
            prop_assert!(port != 0);
            prop_assert_eq!(mode(request[0]), MODE_CLIENT);
            prop_assert_eq!(&reply[OFF_ORIGIN_TS..OFF_ORIGIN_TS + 8], &request[OFF_TRANSMIT_TS..OFF_TRANSMIT_TS + 8]);
        } else {
            prop_assert!(request.len() < 48 || port == 0 || request_rejection(request[0]).is_some());
        }
    }
}

use ntp_common::reply::request_rejection;

use ntp_user::vip::conffile::Syntax;

/// How keepalived and radvd split a file, or stricter: per line (a NUL ends a C line too),
/// comments (`#`, and keepalived's `!`) cut outside quotes, a double-quoted string one token,
/// whitespace between tokens, and every other character outside the bare set
/// (`A-Z a-z 0-9 / . _ - :`) a token of its own, so a value holding one reads differently.
fn directives(text: &str) -> Vec<Vec<String>> {
    let mut lines = Vec::new();
    for line in text.split(['\n', '\0']) {
        let mut tokens: Vec<String> = Vec::new();
        let mut bare = String::new();
        let mut chars = line.chars();
        let flush = |bare: &mut String, tokens: &mut Vec<String>| {
            if !bare.is_empty() {
                tokens.push(std::mem::take(bare));
            }
        };
        while let Some(c) = chars.next() {
            match c {
                'A'..='Z' | 'a'..='z' | '0'..='9' | '/' | '.' | '_' | '-' | ':' => bare.push(c),
                ' ' | '\t' => flush(&mut bare, &mut tokens),
                '#' | '!' => break,
                '"' => {
                    flush(&mut bare, &mut tokens);
                    let quoted: String = chars.by_ref().take_while(|&c| c != '"').collect();
                    tokens.push(format!("\"{quoted}\""));
                }
                other => {
                    flush(&mut bare, &mut tokens);
                    tokens.push(other.to_string());
                }
            }
        }
        flush(&mut bare, &mut tokens);
        if !tokens.is_empty() {
            lines.push(tokens);
        }
    }
    lines
}

/// A redundant VIP host whose names are the given ones (TOML-quoted here).
fn named_vip_config(netns: &str, interface: &str, vrrp_interface: &str) -> String {
    let q = |s: &str| toml::Value::String(s.into()).to_string();
    format!(
        "[service]\nnetns = {}\ninterface = {}\naddresses = [\"169.254.169.123\", \"fd00:ec2::123\"]\n\
         [vip]\nhost_interface = \"qqhostqq\"\nservice_address = \"169.254.100.1/24\"\n\
         service_address6 = \"fd00:ec2::1/64\"\nipv6_route_advertisements = true\n\
         [redundancy]\nvirtual_router_id = 51\nbridge = \"qqmgmtqq\"\ninterface = {}\n\
         host_interface = \"qqhrqq\"\nown_address = \"169.254.250.2/24\"\n\
         unicast_peers = [\"169.254.250.3\"]\n",
        q(netns),
        q(interface),
        q(vrrp_interface)
    )
}

/// Placeholders no template holds: the intended files are those of these names with each
/// one replaced by the value given.
const PLACEHOLDERS: [&str; 3] = ["qqnetnsqq", "qqifqq", "qqvrrpqq"];

/// keepalived.conf and radvd.conf of a configuration.
fn helper_files(v: &ntp_user::config::Validated) -> [String; 2] {
    let vip = v.vip.as_ref().expect("a [vip]");
    [
        vip.redundancy
            .as_ref()
            .expect("a [redundancy]")
            .keepalived
            .config_text(),
        vip.router_advertisements
            .as_ref()
            .expect("RAs")
            .config_text(),
    ]
    .map(|f| f.expect("a validated config renders").as_str().to_string())
}

/// A name as a fuzzer would give it: mostly from the allowed set, sometimes with the
/// characters that would break out of a file or a command line.
fn name(allowed: &'static str) -> impl Strategy<Value = String> {
    prop_oneof![
        4 => allowed,
        1 => "[A-Za-z0-9_./ \t\n\r\0\"'\\\\{};#!$@~é-]{0,16}",
        1 => "\\PC{0,16}",
    ]
}

proptest! {
    #![proptest_config(config())]

    /// Whatever names a configuration gives, it is refused naming the field, or its
    /// keepalived.conf and radvd.conf read as the same directives as with plain names.
    #[test]
    fn generated_files_hold_only_the_intended_directives(
        netns in name("[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}"),
        interface in name("[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}"),
        vrrp_interface in name("[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}"),
    ) {
        let text = named_vip_config(&netns, &interface, &vrrp_interface);
        let v = match ntp_user::config::parse(&text, Path::new(ORIGIN)) {
            Ok(v) => v,
            Err(e) => {
                let c = e.downcast_ref::<ntp_user::config::ConfigError>();
                prop_assert!(c.is_some_and(|c| c.field.is_some()), "{e:#}");
                return Ok(());
            }
        };
        let [n, i, r] = PLACEHOLDERS;
        let plain = ntp_user::config::parse(&named_vip_config(n, i, r), Path::new(ORIGIN)).unwrap();
        for (got, plain) in helper_files(&v).iter().zip(helper_files(&plain)) {
            let intended: Vec<Vec<String>> = directives(&plain)
                .into_iter()
                .map(|line| {
                    line.into_iter()
                        .map(|t| t.replace(n, &netns).replace(i, &interface).replace(r, &vrrp_interface))
                        .collect()
                })
                .collect();
            prop_assert_eq!(directives(got), intended, "{}", got);
        }
    }

    /// The writer's tokens read back as themselves, or are refused.
    #[test]
    fn a_written_token_reads_back_as_itself(
        words in prop::collection::vec("\\PC{0,12}|[a-z \t\n\r\0\"'\\\\{};#!$]{0,6}", 1..4),
    ) {
        for syntax in [Syntax::Keepalived, Syntax::Radvd] {
            if let Ok(w) = syntax.word(&words[0]) {
                prop_assert_eq!(directives(&format!("key {w}")), vec![vec!["key".to_string(), words[0].clone()]]);
            }
        }
        if let Ok(script) = Syntax::Keepalived.command(&words) {
            let read = directives(&format!("script {script}"));
            prop_assert_eq!(read.len(), 1);
            prop_assert_eq!(read[0].len(), 2);
            let inner = read[0][1].trim_matches('"');
            prop_assert_eq!(inner.split_whitespace().collect::<Vec<_>>(), words.iter().map(String::as_str).collect::<Vec<_>>());
            prop_assert!(inner.bytes().all(|b| b == b' ' || b.is_ascii_graphic()) && !inner.contains(['\\', '\'', '$', '#', '!']));
        }
    }
}
