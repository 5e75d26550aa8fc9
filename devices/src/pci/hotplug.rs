//! `pci-hotplug`: the ACPI PCI hotplug controller. Three 32-bit registers, one bit per slot
//! of the root bus, read by the DSDT's `PCNT` method when the GED signals a hotplug event:
//!
//! | offset | name | access |
//! |---|---|---|
//! | 0x0 | `PCIU` | slots added since the last read (reading clears) |
//! | 0x4 | `PCID` | slots the host asks the guest to release (until ejected) |
//! | 0x8 | `B0EJ` | the guest writes a slot's bit to eject it (`_EJ0`) |
//!
//! An eject is carried out by the machine's control thread, never on the vCPU thread.

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, OnceLock};

use qom::{Field, Kind, Notifier, NotifierDecl, Property, TypeInfo, Value};

use crate::bus::{BusDevice, read_window};
use crate::device::{DEVICE, Space, claim, instance, release};
use crate::platform::{MachineRequest, PlatformRef};

pub const TYPE: &str = "pci-hotplug";
pub const MMIO_BASE: u64 = 0xfed0_1000;
pub const MMIO_LEN: u64 = 12;
pub const PCIU: u64 = 0;
pub const PCID: u64 = 4;
pub const B0EJ: u64 = 8;

pub struct Hotplug {
    up: AtomicU32,
    down: AtomicU32,
    platform: PlatformRef,
    /// `eject`, once realized.
    eject: OnceLock<Notifier>,
}

impl Hotplug {
    /// Marks `slot` as added (the guest learns of it through the GED).
    pub fn added(&self, slot: u8) {
        self.up.fetch_or(1 << slot, Ordering::SeqCst);
    }

    /// Asks the guest to release `slot`.
    pub fn request_removal(&self, slot: u8) {
        self.down.fetch_or(1 << slot, Ordering::SeqCst);
    }

    /// The slot is gone: no request stands any more.
    pub fn removed(&self, slot: u8) {
        self.up.fetch_and(!(1 << slot), Ordering::SeqCst);
        self.down.fetch_and(!(1 << slot), Ordering::SeqCst);
    }

    pub fn removal_requested(&self, slot: u8) -> bool {
        self.down.load(Ordering::SeqCst) & (1 << slot) != 0
    }
}

impl BusDevice for Hotplug {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let value = match offset {
            PCIU => self.up.swap(0, Ordering::SeqCst),
            PCID => self.down.load(Ordering::SeqCst),
            _ => 0,
        };
        read_window(&value.to_le_bytes(), 0, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        if offset != B0EJ || data.len() != 4 {
            return;
        }
        let bits = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
        // Only a slot the host asked to release can be ejected: a guest ejecting whatever it
        // likes must not take devices away from under the host.
        let wanted = bits & self.down.load(Ordering::SeqCst);
        if let Some(n) = self.eject.get() {
            for slot in (0..32u8).filter(|s| bits & (1 << s) != 0) {
                n.emit(|| {
                    Value::map([
                        ("slot", Value::UInt(slot.into())),
                        ("requested", Value::Bool(wanted & (1 << slot) != 0)),
                    ])
                });
            }
        }
        if let Some(platform) = self.platform.upgrade() {
            for slot in (0..32u8).filter(|s| wanted & (1 << s) != 0) {
                platform.request(MachineRequest::EjectPciSlot(slot));
            }
        }
    }

    fn reset(&self) {
        self.up.store(0, Ordering::SeqCst);
    }
}

pub(crate) fn register(platform: &PlatformRef) -> TypeInfo {
    let (p_new, p_realize, p_unrealize) = (platform.clone(), platform.clone(), platform.clone());
    let bits = |name: &str, description: &str, read: fn(&Hotplug) -> u32| {
        Property::new(name, Kind::uint32())
            .description(description)
            .getter(move |o| Ok(Value::UInt(read(&*instance::<Hotplug>(o)?).into())))
    };
    TypeInfo::new(TYPE, DEVICE)
        .description("ACPI PCI hotplug controller of the root bus (PCIU, PCID, B0EJ registers)")
        .property(bits(
            "added",
            "Slots added that the guest has not read yet (PCIU)",
            |h| h.up.load(Ordering::SeqCst),
        ))
        .property(bits(
            "removal-requested",
            "Slots the guest is asked to release (PCID)",
            |h| h.down.load(Ordering::SeqCst),
        ))
        .notifier(
            NotifierDecl::new(
                "eject",
                Kind::structure(
                    "PciEject",
                    vec![
                        Field::new("slot", Kind::uint8(), "The slot the guest ejected"),
                        Field::new(
                            "requested",
                            Kind::Bool,
                            "Whether the host had asked for it (otherwise the eject is ignored)",
                        ),
                    ],
                ),
            )
            .description("The guest wrote a slot's bit to B0EJ (on the vCPU thread, as it writes)"),
        )
        .state(
            1,
            |o| {
                let h = instance::<Hotplug>(o)?;
                let saved = (h.up.load(Ordering::SeqCst), h.down.load(Ordering::SeqCst));
                crate::state::encode(o, &saved)
            },
            |o, bytes| {
                let (up, down): (u32, u32) = crate::state::decode(o, bytes)?;
                let h = instance::<Hotplug>(o)?;
                h.up.store(up, Ordering::SeqCst);
                h.down.store(down, Ordering::SeqCst);
                Ok(())
            },
        )
        .constructor(move |_| {
            Ok(Arc::new(Hotplug {
                up: AtomicU32::new(0),
                down: AtomicU32::new(0),
                platform: p_new.clone(),
                eject: OnceLock::new(),
            }))
        })
        .realize(move |o| {
            let dev = instance::<Hotplug>(o)?;
            let _ = dev.eject.set(o.notifier("eject")?);
            claim(&p_realize, o, Space::Mmio, MMIO_BASE, MMIO_LEN, dev)
        })
        .unrealize(move |o| release(&p_unrealize, o))
}
