//! qomu's guests: small freestanding 64-bit programs (C, integer-only), built from `c/` by
//! this crate's build script with the system compiler and booted through the same 64-bit
//! ELF entry as a Linux `vmlinux`.
//!
//! - `demo`: bundled in the `qomu` binary; prints a banner and answers commands on the
//!   serial console.
//! - `hello`, `reset`, `wild`, `spin`, `bad`: the end-to-end tests' guests, and `pio`,
//!   the benchmarks' `pio` and `idle`, and `virtio`, a PCI and virtio driver (see each
//!   file's header comment).

use std::path::PathBuf;

/// The demo guest's ELF image.
pub const DEMO: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/demo.elf"));

/// Every guest built.
pub const NAMES: &[&str] = &[
    "demo", "hello", "reset", "wild", "spin", "bad", "pio", "idle", "virtio",
];

/// The path of a built guest image (`hello`, `spin`, ...).
pub fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("OUT_DIR")).join(format!("{name}.elf"))
}
