//! Compiles `loopguard-ebpf` for the BPF target and leaves the object in
//! `OUT_DIR`, so the agent always embeds the eBPF built from the current source.
//! Needs the nightly toolchain with rust-src and bpf-linker: `cargo xtask
//! build-ebpf` installs them.
//!
//! Without bpf-linker on PATH the agent is built with an empty object and a
//! warning: everything but attaching (the pure modules and their unit tests)
//! then builds and tests on stable alone, and `attach` says how to get a
//! working build. `LOOPGUARD_REQUIRE_EBPF=1` (set by `cargo xtask`) makes the
//! missing linker an error instead.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=../loopguard-common/src");
    // aya-build's own switch: builds that never attach (the fuzz targets)
    // skip the eBPF object, and get an empty one as without bpf-linker.
    let skip =
        std::env::var("AYA_BUILD_SKIP").is_ok_and(|v| v == "1" || v.eq_ignore_ascii_case("true"));
    let linker = Command::new("bpf-linker").arg("--version").output();
    if skip || !linker.is_ok_and(|out| out.status.success()) {
        let advice = if skip {
            "AYA_BUILD_SKIP is set; unset it to build the eBPF programs"
        } else {
            "bpf-linker was not found on PATH; run `cargo xtask build-ebpf` once, which \
             installs it (with the nightly toolchain's rust-src and LLVM 22), then build again"
        };
        assert!(
            std::env::var_os("LOOPGUARD_REQUIRE_EBPF").is_none_or(|v| v.is_empty() || v == "0"),
            "{advice}"
        );
        // Look again once the toolchain may be there, so an empty object is
        // never kept by a later build that could make the real one.
        println!("cargo:rerun-if-env-changed=PATH");
        println!("cargo:rerun-if-env-changed=LOOPGUARD_REQUIRE_EBPF");
        println!("cargo:rerun-if-env-changed=AYA_BUILD_SKIP");
        println!(
            "cargo:warning=building loopguard WITHOUT its eBPF programs (it cannot attach): {advice}"
        );
        let out = PathBuf::from(std::env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
        std::fs::write(out.join("loopguard"), []).expect("failed to write the empty eBPF object");
        return;
    }
    let package = aya_build::Package {
        name: "loopguard-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../loopguard-ebpf"),
        ..Default::default()
    };
    if let Err(error) = aya_build::build_ebpf([package], aya_build::Toolchain::default()) {
        panic!("failed to build the eBPF programs: {error:#}");
    }
}
