//! What devices need from the machine they are plugged into.
//!
//! The machine implements [`Platform`] and hands it to the device types when it registers
//! them ([`crate::register_types`]), so the devices crate never depends on the machine.

use std::sync::{Arc, Weak};

use crate::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use crate::bus::Bus;
use crate::ged::Ged;
use crate::interrupt::IrqLine;
use crate::pci::PciBus;
use crate::pci::hotplug::Hotplug;

/// QEMU's `ShutdownCause`, the `reason` of SHUTDOWN and RESET events.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ShutdownCause {
    None,
    HostError,
    HostQmpQuit,
    HostQmpSystemReset,
    HostSignal,
    HostUi,
    GuestShutdown,
    GuestReset,
    GuestPanic,
    SubsystemReset,
}

impl ShutdownCause {
    /// Every cause, in QEMU's order.
    pub const ALL: [ShutdownCause; 10] = [
        ShutdownCause::None,
        ShutdownCause::HostError,
        ShutdownCause::HostQmpQuit,
        ShutdownCause::HostQmpSystemReset,
        ShutdownCause::HostSignal,
        ShutdownCause::HostUi,
        ShutdownCause::GuestShutdown,
        ShutdownCause::GuestReset,
        ShutdownCause::GuestPanic,
        ShutdownCause::SubsystemReset,
    ];

    /// QEMU's name (`host-qmp-quit`, ...).
    pub fn name(self) -> &'static str {
        match self {
            ShutdownCause::None => "none",
            ShutdownCause::HostError => "host-error",
            ShutdownCause::HostQmpQuit => "host-qmp-quit",
            ShutdownCause::HostQmpSystemReset => "host-qmp-system-reset",
            ShutdownCause::HostSignal => "host-signal",
            ShutdownCause::HostUi => "host-ui",
            ShutdownCause::GuestShutdown => "guest-shutdown",
            ShutdownCause::GuestReset => "guest-reset",
            ShutdownCause::GuestPanic => "guest-panic",
            ShutdownCause::SubsystemReset => "subsystem-reset",
        }
    }

    /// True if the guest asked for it.
    pub fn is_guest(self) -> bool {
        matches!(
            self,
            ShutdownCause::GuestShutdown | ShutdownCause::GuestReset | ShutdownCause::GuestPanic
        )
    }
}

/// Something a device asks the machine to do. Devices run on vCPU threads, so the machine
/// acts on these from its own control thread, never inside the device's access.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MachineRequest {
    Reset(ShutdownCause),
    Shutdown(ShutdownCause),
    /// End the VMM with this exit status (isa-debug-exit).
    Exit(i32),
    /// The guest ejected the device in `slot` of the PCI root bus, answering `removal`.
    EjectPciSlot {
        slot: u8,
        removal: crate::pci::hotplug::controller::Removal,
    },
}

/// The machine as devices see it.
pub trait Platform: Send + Sync {
    /// The port I/O bus.
    fn pio_bus(&self) -> &Bus;
    /// The MMIO bus.
    fn mmio_bus(&self) -> &Bus;
    /// An interrupt line to `gsi`.
    ///
    /// # Errors
    /// The GSI does not exist or the line could not be created.
    fn irq_line(&self, gsi: u32) -> crate::Result<Arc<IrqLine>>;
    /// Asks the machine to act (reset, shut down, exit); returns at once.
    fn request(&self, request: MachineRequest);
    /// The PCI root bus.
    fn pci_bus(&self) -> &Arc<PciBus>;
    /// Guest RAM, once the VM exists (devices doing DMA fetch it on first use).
    fn guest_memory(&self) -> Option<GuestMemoryMmap>;
    /// The ACPI Generic Event Device, once the board has one.
    fn ged(&self) -> Option<Arc<Ged>>;
    /// The PCI hotplug controller, once the board has one.
    fn hotplug(&self) -> Option<Arc<Hotplug>>;
    /// Has KVM signal `fd`, without a vCPU exit, when the guest writes (any width) to the
    /// MMIO address `addr`: an ioeventfd. False while the VM does not exist yet (in
    /// `prelaunch`): the device then signals `fd` itself when the write exits.
    ///
    /// # Errors
    /// KVM refuses.
    fn register_ioevent(&self, fd: &EventFd, addr: u64) -> crate::Result<bool>;
    /// Undoes [`Platform::register_ioevent`] (nothing if it was not registered).
    fn unregister_ioevent(&self, fd: &EventFd, addr: u64);
}

/// How device types reach the machine: a weak reference, so that the types registered in
/// the tree do not keep the machine (which owns the tree) alive.
pub type PlatformRef = Weak<dyn Platform>;

/// The platform, or an error if the machine is gone.
pub(crate) fn upgrade(platform: &PlatformRef) -> crate::Result<Arc<dyn Platform>> {
    platform.upgrade().ok_or(crate::Error::MachineGone)
}
