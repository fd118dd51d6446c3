//! Builds the eBPF object (ntp-ebpf) with aya-build and embeds it into the ntp-xdp binary.
//!
//! The toolchain is the dated nightly named in `ntp-ebpf/rust-toolchain.toml` (never plain
//! "nightly", whose LLVM may be newer than bpf-linker's); `cargo xtask setup` installs it and a
//! bpf-linker built for the same LLVM major.
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("ntp-user has no parent directory"))?
        .join("ntp-ebpf");
    let toolchain_file = ebpf_dir.join("rust-toolchain.toml");
    println!("cargo:rerun-if-changed={}", toolchain_file.display());
    let toolchain = ebpf_toolchain(&toolchain_file)?;
    println!("cargo:rustc-env=NTP_EBPF_TOOLCHAIN={toolchain}");
    let ebpf_dir = ebpf_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    println!("cargo:rerun-if-changed=../ntp-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ntp-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::Custom(&toolchain),
    )
    .with_context(|| {
        format!(
            "building ntp-ebpf with {toolchain} (from {}); `cargo xtask setup` installs it and \
             a matching bpf-linker",
            toolchain_file.display()
        )
    })
}

/// `[toolchain] channel` of the eBPF crate's rust-toolchain.toml.
fn ebpf_toolchain(path: &std::path::Path) -> anyhow::Result<String> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let doc: toml::Table = text
        .parse()
        .with_context(|| format!("parsing {}", path.display()))?;
    doc.get("toolchain")
        .and_then(|t| t.get("channel"))
        .and_then(|c| c.as_str())
        .map(str::to_owned)
        .ok_or_else(|| anyhow!("{}: no [toolchain] channel", path.display()))
}
