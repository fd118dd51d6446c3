//! The in-kernel NTP responder. Built for `bpfel-unknown-none` by `ntp-user/build.rs`; on the
//! host this crate is an empty stub so that workspace tooling keeps working.
#![cfg_attr(target_arch = "bpf", no_std)]
#![cfg_attr(target_arch = "bpf", no_main)]

#[cfg(target_arch = "bpf")]
mod packet;
#[cfg(target_arch = "bpf")]
mod responder;

#[cfg(target_arch = "bpf")]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// GPL-compatible licence so the program may use every helper aya-log needs.
#[cfg(target_arch = "bpf")]
#[unsafe(link_section = "license")]
#[unsafe(no_mangle)]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";

#[cfg(not(target_arch = "bpf"))]
fn main() {
    eprintln!("ntp-ebpf is an eBPF object; ntp-user embeds and loads it");
}
