//! Builds the test guests (and the demo guest qomu bundles) from `c/` with the system C
//! compiler, as freestanding integer-only 64-bit ELF images loaded at 1 MiB.

use std::env;
use std::path::PathBuf;
use std::process::Command;

const GUESTS: &[&str] = &[
    "demo", "hello", "reset", "wild", "spin", "bad", "pio", "idle", "virtio",
];

fn main() {
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let src =
        PathBuf::from(env::var_os("CARGO_MANIFEST_DIR").expect("cargo sets CARGO_MANIFEST_DIR"))
            .join("c");
    let cc = env::var("GUEST_CC").unwrap_or_else(|_| "cc".to_owned());
    println!("cargo:rerun-if-changed=c");
    println!("cargo:rerun-if-env-changed=GUEST_CC");
    for guest in GUESTS {
        let elf = out.join(format!("{guest}.elf"));
        let status = Command::new(&cc)
            .args([
                "-m64",
                "-ffreestanding",
                "-fno-pic",
                "-fno-pie",
                "-no-pie",
                "-fno-stack-protector",
                "-mno-red-zone",
                "-mgeneral-regs-only",
                "-fno-asynchronous-unwind-tables",
                "-O2",
                "-Wall",
                "-Werror",
                "-nostdlib",
                "-static",
                "-Wl,--build-id=none",
                "-Wl,--no-warn-rwx-segments",
            ])
            .arg(format!("-Wl,-T,{}", src.join("guest.ld").display()))
            .arg("-o")
            .arg(&elf)
            .arg(src.join("start.S"))
            .arg(src.join(format!("{guest}.c")))
            .status()
            .unwrap_or_else(|e| {
                panic!("cannot run the C compiler '{cc}' for the test guests: {e}")
            });
        assert!(status.success(), "building guest {guest} failed");
    }
}
