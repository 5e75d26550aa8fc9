//! `i8042`: the keyboard controller, for its CPU reset line (vm-superio's emulation).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::Mutex;
use qom::{Kind, Notifier, NotifierDecl, Property, TypeInfo, Value};
use vm_superio::I8042Device;

use crate::bus::BusDevice;
use crate::device::{DEVICE, Space, claim, device_type, release};
use crate::platform::{MachineRequest, PlatformRef, ShutdownCause};

pub const TYPE: &str = "i8042";
const BASE: u64 = 0x60;
/// Ports 0x60 (data) to 0x64 (command), as vm-superio expects them.
const LEN: u64 = 5;

/// The reset line: tells subscribers, then asks the machine to reset.
struct ResetLine {
    platform: PlatformRef,
    notifier: Notifier,
    requests: Arc<AtomicU64>,
}

impl vm_superio::Trigger for ResetLine {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        self.notifier.emit_fields(|| []);
        if let Some(p) = self.platform.upgrade() {
            p.request(MachineRequest::Reset(ShutdownCause::GuestReset));
        }
        Ok(())
    }
}

pub struct I8042 {
    platform: PlatformRef,
    emulation: Mutex<Option<I8042Device<ResetLine>>>,
    requests: Arc<AtomicU64>,
}

impl BusDevice for I8042 {
    fn read(&self, offset: u64, data: &mut [u8]) {
        let mut emu = self.emulation.lock();
        for b in data.iter_mut() {
            *b = emu.as_mut().map_or(0xff, |e| e.read(offset as u8));
        }
    }
    fn write(&self, offset: u64, data: &[u8]) {
        if let (Some(e), Some(&v)) = (self.emulation.lock().as_mut(), data.first()) {
            let _ = e.write(offset as u8, v);
        }
    }
}

pub(crate) fn register(platform: &PlatformRef) -> TypeInfo {
    device_type(TYPE, DEVICE, platform, |platform, _| {
        Ok(I8042 {
            platform,
            emulation: Mutex::new(None),
            requests: Arc::new(AtomicU64::new(0)),
        })
    })
    .description("Keyboard controller (its CPU reset line) at ports 0x60-0x64")
    .getter(
        Property::new("reset-requests", Kind::uint64()).description("Resets the guest asked for"),
        |d| Value::UInt(d.requests.load(Ordering::Relaxed)),
    )
    .notifier(
        NotifierDecl::new("reset-request", Kind::structure("ResetRequest", vec![]))
            .description("The guest pulsed the CPU reset line"),
    )
    .realize(|dev, o| {
        let line = ResetLine {
            platform: dev.platform.clone(),
            notifier: o.notifier("reset-request")?,
            requests: dev.requests.clone(),
        };
        *dev.emulation.lock() = Some(I8042Device::new(line));
        claim(&dev.platform, o, Space::Pio, BASE, LEN, dev.clone()).map_err(|e| {
            *dev.emulation.lock() = None;
            e.into()
        })
    })
    .unrealize(|dev, o| {
        release(&dev.platform, o);
        *dev.emulation.lock() = None;
    })
    .build()
}
