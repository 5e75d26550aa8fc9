//! PCI hotplug of the root bus, as Linux's acpiphp drives it: the controller's books
//! ([`controller`]), its qom type `pci-hotplug` with its registers at MMIO 0xfed01000, and
//! the protocol a hot-plug or hot-unplug follows ([`Hotplug::plugged`],
//! [`Hotplug::request_unplug`], [`Hotplug::ejected`]), which the machine calls with its
//! configuration lock held. The machine reaches the controller through its platform
//! ([`crate::Platform::hotplug`]).

pub mod controller;
mod qom;

pub use self::controller::LEN as MMIO_LEN;
pub(crate) use self::qom::register;
pub use self::qom::{Hotplug, MMIO_BASE, TYPE};
