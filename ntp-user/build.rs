//! Builds the eBPF object (ntp-ebpf) with aya-build: nightly + bpf-linker, target bpfel.
//! `cargo xtask setup` installs both; the object is embedded into the ntp-user binary.
use anyhow::{anyhow, Context as _};

fn main() -> anyhow::Result<()> {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?;
    let ebpf_dir = std::path::Path::new(&manifest_dir)
        .parent()
        .ok_or_else(|| anyhow!("ntp-user has no parent directory"))?
        .join("ntp-ebpf");
    let ebpf_dir = ebpf_dir.to_str().ok_or_else(|| anyhow!("non-UTF-8 path"))?;
    println!("cargo:rerun-if-changed=../ntp-common/src");
    aya_build::build_ebpf(
        [aya_build::Package {
            name: "ntp-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        aya_build::Toolchain::default(),
    )
}
