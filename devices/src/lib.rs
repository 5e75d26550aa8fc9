//! `devices`: qomu's emulated devices as qom types.
//!
//! Each device is plain emulation logic (register reads and writes at an offset, an
//! interrupt line) wrapped by a qom type that adds properties, actions and notifiers.
//! The devices arrive with the machine issue; for now the crate only names the base type.

/// The abstract base type of every device.
pub const DEVICE: &str = "device";
