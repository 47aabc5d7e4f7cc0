//! Compiles `loopguard-ebpf` for the BPF target and leaves the object in
//! `OUT_DIR`, so the agent always embeds the eBPF built from the current source.
//! Needs the nightly toolchain with rust-src and bpf-linker: `cargo xtask
//! build-ebpf` installs them.

use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=../loopguard-common/src");
    let linker = Command::new("bpf-linker").arg("--version").output();
    assert!(
        linker.is_ok_and(|out| out.status.success()),
        "bpf-linker was not found on PATH; run `cargo xtask build-ebpf` once, which installs it \
         (with the nightly toolchain's rust-src and LLVM 22), then build again"
    );
    let package = aya_build::Package {
        name: "loopguard-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../loopguard-ebpf"),
        ..Default::default()
    };
    if let Err(error) = aya_build::build_ebpf([package], aya_build::Toolchain::default()) {
        panic!("failed to build the eBPF programs: {error:#}");
    }
}
