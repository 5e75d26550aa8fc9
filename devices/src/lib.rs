//! `devices`: qomu's emulated devices as qom types.
//!
//! Each device is plain emulation logic (register reads and writes at an offset, an
//! interrupt line; vm-superio's where it has one) wrapped by a qom type that adds
//! properties, actions and notifiers. Devices reach the machine only through the
//! [`Platform`] trait, handed to them when their types are registered.
//!
//! | type | what |
//! |---|---|
//! | `isa-serial` | 16550 UART, console backend, `line` notifier |
//! | `i8042` | keyboard controller's CPU reset line |
//! | `isa-debug-exit` | QEMU's debug exit port |
//! | `mc146818rtc` | CMOS clock and NVRAM |
//! | `acpi-pm` | ACPI sleep and reset registers |
//! | `acpi-ged` | ACPI Generic Event Device (power button) |
//! | `ioport80` | POST code port |
//! | `pci-host` | PCI host bridge: root bus `pci.0`, ports 0xcf8/0xcfc, ECAM |
//! | `virtio-rng-pci` | virtio entropy device (modern virtio-pci) |
//! | `virtio-blk-pci` | virtio block device on a raw image file |
//! | `virtio-net-pci` | virtio network card on a `tap` or `stream` netdev |
//! | `pci-hotplug` | ACPI PCI hotplug controller (PCIU, PCID, B0EJ) |
//!
//! and the entropy backends `rng-builtin` and `rng-random` (user-creatable objects).

pub mod acpi_pm;
pub mod bus;
pub mod debug_exit;
pub mod device;
pub mod error;
pub mod ged;
pub mod i8042;
pub mod interrupt;
pub mod net;
pub mod pci;
pub mod platform;
pub mod port80;
pub mod rng;
pub mod rtc;
pub mod serial;
pub mod state;
pub mod virtio;

pub use bus::{Bus, BusDevice, RangeInfo};

/// Guest RAM as devices and the machine see it: vm-memory's mmap backend with an atomic
/// dirty bitmap, so that every write a device makes through it (virtio rings, disk reads,
/// received frames) is marked for a live migration, which KVM's dirty log cannot see
/// (docs/migration.md). Writes that bypass it (a `preadv` into guest buffers) mark their
/// ranges themselves.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<vm_memory::bitmap::AtomicBitmap>;
pub use device::{DEVICE, USER_DEVICE};
pub use error::{Error, Result};
pub use interrupt::IrqLine;
pub use platform::{MachineRequest, Platform, PlatformRef, ShutdownCause};

/// Registers the device types, bound to the machine they will be plugged into.
///
/// # Errors
/// A type is already registered.
pub fn register_types(builder: &qom::TreeBuilder, platform: &PlatformRef) -> qom::Result<()> {
    for info in device::base_types()
        .into_iter()
        .chain(rng::types())
        .chain(pci::types(platform))
        .chain([
            virtio::base_type(),
            virtio::rng::register(platform),
            virtio::blk::register(platform),
            virtio::net::register(platform),
        ])
    {
        builder.register(info)?;
    }
    for info in [
        serial::register(platform),
        i8042::register(platform),
        debug_exit::register(platform),
        rtc::register(platform),
        acpi_pm::register(platform),
        ged::register(platform),
        port80::register(platform),
        net::netdev::register_base(),
        net::netdev::register_tap(),
        net::netdev::register_stream(),
    ] {
        builder.register(info)?;
    }
    Ok(())
}
