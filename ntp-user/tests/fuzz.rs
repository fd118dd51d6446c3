//! Property tests over arbitrary input, bounded to seconds: the config loader and the
//! userspace answer path take anything without panicking, a config error always names the
//! file, and a userspace reply is never larger than its request.

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
        let r = ntp_user::responder::userspace::answer(&request, port, &anchor, &ServerParams::DEFAULT, mono, mono + 100, 7);
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
