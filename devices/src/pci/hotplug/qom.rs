//! The `pci-hotplug` type: the controller's registers on the MMIO bus, its `eject`
//! notifier and counters, and the hotplug protocol around it (docs/hotplug.md).

use std::sync::OnceLock;

use parking_lot::Mutex;
use qom::{Field, Kind, Notifier, NotifierDecl, ObjectRef, Property, Tree, TypeInfo, Value};

use super::controller::{self, Controller, Removal};
use crate::bus::{BusDevice, read_window};
use crate::device::{DEVICE, Space, claim, device_type, release};
use crate::ged::EVENT_PCI_HOTPLUG;
use crate::platform::{MachineRequest, PlatformRef, upgrade};
use crate::state::SerdeState;

pub const TYPE: &str = "pci-hotplug";
pub const MMIO_BASE: u64 = 0xfed0_1000;

/// The instance of the `pci-hotplug` object.
pub struct Hotplug {
    platform: PlatformRef,
    books: Mutex<Controller>,
    /// `eject`, and the tree, once realized.
    eject: OnceLock<Notifier>,
    tree: OnceLock<Tree>,
}

impl Hotplug {
    /// The PCI device `dev` is on the bus: `plugged {bus, slot}` goes out, then, when the
    /// guest is running (`hot`), its slot is marked added and the GED raised. `plugged`
    /// goes first so that nothing the guest does with the device (`driver-ok`) reaches a
    /// client before it.
    pub fn plugged(&self, dev: &ObjectRef, hot: bool) {
        let Some(slot) = dev
            .get("slot")
            .ok()
            .and_then(|v| v.as_i64())
            .and_then(|s| u8::try_from(s).ok())
        else {
            return;
        };
        if let Ok(n) = dev.notifier("plugged") {
            n.emit(|| {
                Value::map([
                    ("bus", Value::Str(crate::pci::ROOT_BUS.to_owned())),
                    ("slot", Value::UInt(slot.into())),
                ])
            });
        }
        if hot {
            self.books.lock().added(slot);
            self.raise_ged();
        }
    }

    /// Asks the guest to release the PCI device `dev`: `unplug-requested` goes out, its
    /// slot is marked in `PCID` (`unplug-pending` reads true and notifies) and the GED is
    /// raised, in that order, so a client sees the request before anything the guest does
    /// about it. The device stays until the guest ejects it.
    ///
    /// # Errors
    /// The device is on no slot, or its removal was asked for already.
    pub fn request_unplug(&self, dev: &ObjectRef) -> crate::Result<()> {
        let slot = dev
            .get("slot")
            .ok()
            .and_then(|v| v.as_i64())
            .and_then(|s| u8::try_from(s).ok())
            .ok_or_else(|| crate::Error::NotHotpluggable {
                path: dev.path().to_owned(),
            })?;
        let mut books = self.books.lock();
        if books.removal_requested(slot) {
            return Err(crate::Error::UnplugPending {
                slot,
                id: dev.name().to_owned(),
            });
        }
        if let Ok(n) = dev.notifier("unplug-requested") {
            n.emit_fields(|| []);
        }
        books.request_removal(slot);
        drop(books);
        dev.notify_property_changed("unplug-pending", &Value::Bool(true));
        self.raise_ged();
        Ok(())
    }

    /// The guest ejected `slot` answering `removal`: the device there, after its
    /// `unplugged` went out, for the caller to delete. The slot is forgotten first, so a
    /// client that plugs it again as soon as it hears of the deletion finds it announced,
    /// not cleared behind it. None if that removal no longer stands (the device went on an
    /// earlier eject, and the slot may hold another now), or nothing is there.
    pub fn ejected(&self, slot: u8, removal: Removal) -> Option<ObjectRef> {
        if !self.books.lock().take_removal(slot, removal) {
            return None;
        }
        let path = upgrade(&self.platform)
            .ok()?
            .pci_bus()
            .occupants()
            .into_iter()
            .find_map(|(s, path)| (s == slot).then_some(path))?;
        let dev = self.tree.get()?.lookup(&path).ok()?;
        if let Ok(n) = dev.notifier("unplugged") {
            n.emit_fields(|| []);
        }
        Some(dev)
    }

    /// Whether the guest is asked to release `slot` and has not yet.
    pub fn removal_requested(&self, slot: u8) -> bool {
        self.books.lock().removal_requested(slot)
    }

    fn raise_ged(&self) {
        if let Some(ged) = self.platform.upgrade().and_then(|p| p.ged()) {
            ged.raise(EVENT_PCI_HOTPLUG);
        }
    }
}

impl BusDevice for Hotplug {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let value = self.books.lock().read(offset);
        read_window(&value.to_le_bytes(), 0, data);
    }

    fn write(&self, offset: u64, data: &[u8]) {
        let Ok(raw) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let ejects = self.books.lock().write(offset, u32::from_le_bytes(raw));
        if ejects.is_empty() {
            return;
        }
        if let Some(n) = self.eject.get() {
            for e in &ejects {
                n.emit(|| {
                    Value::map([
                        ("slot", Value::UInt(e.slot.into())),
                        ("requested", Value::Bool(e.removal.is_some())),
                    ])
                });
            }
        }
        // Carried out by the machine's control thread, never on this vCPU thread.
        if let Some(platform) = self.platform.upgrade() {
            for e in &ejects {
                if let Some(removal) = e.removal {
                    platform.request(MachineRequest::EjectPciSlot {
                        slot: e.slot,
                        removal,
                    });
                }
            }
        }
    }

    fn reset(&self) {
        self.books.lock().reset();
    }
}

pub(crate) fn register(platform: &PlatformRef) -> TypeInfo {
    let info = device_type(TYPE, DEVICE, platform, |platform, _| {
        Ok(Hotplug {
            platform,
            books: Mutex::new(Controller::default()),
            eject: OnceLock::new(),
            tree: OnceLock::new(),
        })
    })
    .description("ACPI PCI hotplug controller of the root bus (PCIU, PCID, B0EJ registers)")
    .getter(
        Property::new("added", Kind::uint32())
            .description("Slots added that the guest has not read yet (PCIU)"),
        |h| Value::UInt(h.books.lock().bits().0.into()),
    )
    .getter(
        Property::new("removal-requested", Kind::uint32())
            .description("Slots the guest is asked to release (PCID)"),
        |h| Value::UInt(h.books.lock().bits().1.into()),
    )
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
    .serde_state(
        1,
        |h| {
            let (up, down) = h.books.lock().bits();
            (up, down)
        },
        |h, (up, down): (u32, u32)| {
            let mut books = Controller::default();
            for slot in 0..32u8 {
                if up & (1 << slot) != 0 {
                    books.added(slot);
                }
                if down & (1 << slot) != 0 {
                    books.request_removal(slot);
                }
            }
            *h.books.lock() = books;
            Ok(())
        },
    )
    .realize(|h, o| {
        let _ = h.eject.set(o.notifier("eject")?);
        let _ = h.tree.set(o.tree().clone());
        Ok(claim(
            &h.platform,
            o,
            Space::Mmio,
            MMIO_BASE,
            controller::LEN,
            h.clone(),
        )?)
    })
    .unrealize(|h, o| release(&h.platform, o));
    info.build()
}
