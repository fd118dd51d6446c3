//! The eBPF object embedded in the binary, and the names of what it holds.

pub use ntp_common::maps::{PEER_PASS_PROGRAM, RESPONDER_PROGRAM};

/// The compiled `ntp-ebpf` object, embedded at build time.
pub static EBPF_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/ntp-ebpf"));

#[cfg(test)]
mod tests {
    /// The embedded object was compiled by the pinned eBPF toolchain (its DWARF producer names
    /// that rustc), not by whatever "nightly" the machine has: proves the pin holds.
    #[test]
    fn the_object_comes_from_the_pinned_toolchain() {
        let toolchain = env!("NTP_EBPF_TOOLCHAIN");
        let out = std::process::Command::new("rustup")
            .args(["run", toolchain, "rustc", "-V"])
            .output()
            .expect("rustup run");
        assert!(out.status.success(), "{toolchain} is not installed");
        // "rustc 1.98.0-nightly (3daae5e42 2026-06-14)"
        let version = String::from_utf8(out.stdout).unwrap();
        let version = version.trim().strip_prefix("rustc ").unwrap();
        let producer = format!("rustc version {version}");
        let found = super::EBPF_OBJECT
            .windows(producer.len())
            .any(|w| w == producer.as_bytes());
        assert!(
            found,
            "the eBPF object was not built by {toolchain} ({producer})"
        );
    }

    /// The object holds exactly the maps and programs ntp-common names (the eBPF crate names
    /// them by their statics; a rename on one side only is caught here, not at run time).
    #[test]
    fn the_object_holds_the_named_maps_and_programs() {
        let obj = aya_obj::Object::parse(super::EBPF_OBJECT).expect("parsing the object");
        let mut in_object: Vec<&str> = obj
            .maps
            .keys()
            .map(String::as_str)
            .filter(|m| !m.starts_with('.') && !m.starts_with("AYA_"))
            .collect();
        in_object.sort_unstable();
        let mut named = ntp_common::maps::ALL.to_vec();
        named.sort_unstable();
        assert_eq!(in_object, named);
        for p in [
            super::RESPONDER_PROGRAM,
            super::PEER_PASS_PROGRAM,
            ntp_common::maps::BENCH_SINK_PROGRAM,
            ntp_common::maps::BENCH_DROP_PROGRAM,
        ] {
            assert!(obj.programs.contains_key(p), "program {p} missing");
        }
    }

    /// The anchor maps are created mmapable (the daemon publishes through a mapping, with
    /// release stores), and the responder's read of them holds fully ordered atomics: BPF's
    /// only full barriers, which `read_published` needs on weakly ordered CPUs. A compiler
    /// that turned them into plain stores, or into atomics that return nothing (not ordered),
    /// fails here rather than tearing anchors on arm64.
    #[test]
    fn the_anchor_is_published_and_read_with_barriers() {
        let obj = aya_obj::Object::parse(super::EBPF_OBJECT).expect("parsing the object");
        for name in [ntp_common::maps::ANCHORS, ntp_common::maps::ANCHOR_ACTIVE] {
            let flags = obj.maps[name].map_flags();
            assert_eq!(
                flags & ntp_common::anchor::ANCHOR_MAP_FLAGS,
                ntp_common::anchor::ANCHOR_MAP_FLAGS,
                "{name} is created with flags {flags:#x}"
            );
        }
        const BPF_STX: u8 = 0x03;
        const BPF_ATOMIC: u8 = 0xc0;
        const BPF_FETCH: i32 = 0x01;
        let program = &obj.programs[super::RESPONDER_PROGRAM];
        let code = &obj.functions[&program.function_key()].instructions;
        let atomics: Vec<i32> = code
            .iter()
            .filter(|i| i.code & 0x07 == BPF_STX && i.code & 0xe0 == BPF_ATOMIC)
            .map(|i| i.imm)
            .collect();
        let fully_ordered = atomics.iter().filter(|&&imm| imm & BPF_FETCH != 0).count();
        // One before and one after the slot copy, at least (a retry adds two more).
        assert!(
            fully_ordered >= 2,
            "the responder has {fully_ordered} fully ordered atomics (all atomics: {atomics:x?})"
        );
    }
}
