//! `acpi-ged`: the ACPI Generic Event Device. One MMIO register holds pending event bits
//! (reading returns and clears them); raising an event sets its bit and the interrupt line.
//! The DSDT's `_EVT` method reads the register and notifies the right ACPI objects.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use parking_lot::Mutex;
use qom::{Kind, Property, TypeInfo, Value};

use crate::bus::{BusDevice, read_window};
use crate::device::{DEVICE, Space, claim, device_type, release};
use crate::interrupt::IrqLine;
use crate::platform::{PlatformRef, upgrade};
use crate::state::SerdeState;

pub const TYPE: &str = "acpi-ged";
pub const MMIO_BASE: u64 = 0xfed0_0000;
pub const MMIO_LEN: u64 = 4;
pub const GSI: u32 = 9;

/// Event bits of the status register.
pub const EVENT_POWER_BUTTON: u32 = 1 << 0;
/// A PCI slot was added or is asked to go: the DSDT's `PCNT` reads the hotplug registers.
pub const EVENT_PCI_HOTPLUG: u32 = 1 << 1;

pub struct Ged {
    platform: PlatformRef,
    pending: AtomicU32,
    line: Mutex<Option<Arc<IrqLine>>>,
}

impl Ged {
    /// Raises events (bits of the status register) and the interrupt.
    pub fn raise(&self, events: u32) {
        self.pending.fetch_or(events, Ordering::SeqCst);
        if let Some(line) = self.line.lock().as_ref() {
            line.trigger();
        }
    }

    pub fn pending(&self) -> u32 {
        self.pending.load(Ordering::SeqCst)
    }
}

impl BusDevice for Ged {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let value = if offset == 0 {
            self.pending.swap(0, Ordering::SeqCst)
        } else {
            0
        };
        read_window(&value.to_le_bytes(), offset as usize, data);
    }
    fn write(&self, _offset: u64, _data: &[u8]) {}
    fn reset(&self) {
        self.pending.store(0, Ordering::SeqCst);
    }
}

pub(crate) fn register(platform: &PlatformRef) -> TypeInfo {
    device_type(TYPE, DEVICE, platform, |platform, _| {
        Ok(Ged {
            platform,
            pending: AtomicU32::new(0),
            line: Mutex::new(None),
        })
    })
    .description("ACPI Generic Event Device: power button (and hotplug) events")
    .getter(
        Property::new("pending", Kind::uint32())
            .description("Event bits the guest has not read yet"),
        |d| Value::UInt(d.pending().into()),
    )
    .serde_state(1, Ged::pending, |d, pending: u32| {
        d.pending.store(pending, Ordering::SeqCst);
        Ok(())
    })
    .realize(|dev, o| {
        *dev.line.lock() = Some(upgrade(&dev.platform)?.irq_line(GSI)?);
        claim(
            &dev.platform,
            o,
            Space::Mmio,
            MMIO_BASE,
            MMIO_LEN,
            dev.clone(),
        )
        .map_err(|e| {
            *dev.line.lock() = None;
            e.into()
        })
    })
    .unrealize(|dev, o| {
        release(&dev.platform, o);
        *dev.line.lock() = None;
    })
    .build()
}
